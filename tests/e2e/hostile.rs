//! Clients that hold connections open without finishing what they send: they must not
//! take the places of well-behaved clients.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Server, eventually};

/// Opens a connection to `s` and sends `head` (request line and headers) plus `body`,
/// then leaves it open.
async fn stalled(s: &Server, head: &str, body: &str) -> TcpStream {
    let mut conn = TcpStream::connect(s.http).await.expect("connecting");
    conn.write_all(format!("{head}\r\n\r\n{body}").as_bytes())
        .await
        .expect("sending");
    conn
}

/// Opens a connection to `s` from the local address `from` and sends a whole NDJSON
/// event stream of `lines` with the extra header lines `headers`.
async fn stream_from(s: &Server, from: &str, headers: &str, lines: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(format!("{from}:0").parse().expect("an address"))
        .expect("binding the local address");
    let mut conn = socket.connect(s.http).await.expect("connecting");
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: onrec\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked{headers}\r\n\r\n{:x}\r\n{lines}\r\n0\r\n\r\n",
        lines.len()
    );
    conn.write_all(request.as_bytes()).await.expect("sending");
    conn
}

/// The start of the response on `conn` (status line, headers, some of the body), read
/// within `limit`.
async fn response_within(conn: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(limit, conn.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The status code of the response on `conn`, read within `limit`.
async fn status_within(conn: &mut TcpStream, limit: Duration) -> Option<u16> {
    response_within(conn, limit)
        .await?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Requests in flight over `transport` (`http`, `grpc`), from /metrics.
async fn inflight(s: &Server, transport: &str) -> f64 {
    let (_, text) = s.get_text("/metrics").await;
    let series = format!("onrec_inflight_requests{{transport=\"{transport}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A RecordEvents call on `channel` that never sends an event, in its own task.
fn idle_call(
    channel: tonic::transport::Channel,
) -> tokio::task::JoinHandle<
    Result<tonic::Response<onrec_proto::v1::RecordEventsSummary>, tonic::Status>,
> {
    tokio::spawn(async move {
        onrec_proto::v1::recommender_client::RecommenderClient::new(channel)
            .record_events(tokio_stream::pending::<onrec_proto::v1::Event>())
            .await
    })
}

#[tokio::test]
async fn slow_uploads_and_idle_streams_take_no_place_of_other_clients() {
    // One client (all of this test's connections come from one address) may take the
    // whole budget here: what is tested is the budget itself.
    let s = Server::start(&[
        "--max-concurrent-requests",
        "4",
        "--max-streams",
        "4",
        "--body-timeout",
        "3s",
        "--max-client-share",
        "1",
    ]);
    // 100 uploads that promise a body and send one byte of it: far more than the four
    // request places.
    let mut uploads = Vec::new();
    for _ in 0..100 {
        uploads.push(
            stalled(
                &s,
                "POST /v1/recommend HTTP/1.1\r\nHost: onrec\r\nContent-Type: application/json\r\nContent-Length: 100",
                "{",
            )
            .await,
        );
    }
    // Four idle streams fill their budget (they are in flight), and four more are
    // refused at once with 429.
    let ndjson = "POST /v1/events HTTP/1.1\r\nHost: onrec\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked";
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(stalled(&s, ndjson, "").await);
    }
    eventually("four idle streams are in flight", async || {
        inflight(&s, "http").await == 4.0
    })
    .await;
    for _ in 0..4 {
        let mut refused = stalled(&s, ndjson, "").await;
        assert_eq!(
            status_within(&mut refused, Duration::from_secs(20)).await,
            Some(429),
            "a stream past the budget is refused"
        );
    }
    // The well-behaved client is served every time.
    for i in 0..50 {
        let (status, body) = s
            .post("/v1/recommend", json!({"user_id": format!("u{i}"), "n": 3}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = s
        .post(
            "/v1/events",
            json!([{"event_id": "e1", "user_id": "u1", "item_id": "sku-00001", "type": "click"}]),
        )
        .await;
    assert_eq!(status, 200, "a JSON batch is a request, not a stream");

    // An upload that never finishes is answered 408 once body_timeout has passed.
    let status = status_within(&mut uploads[0], Duration::from_secs(30)).await;
    assert_eq!(status, Some(408));
}

#[tokio::test]
async fn idle_grpc_event_streams_on_one_connection_take_no_request_places() {
    let s = Server::start(&[
        "--max-concurrent-requests",
        "4",
        "--max-streams",
        "4",
        "--max-client-share",
        "1",
    ]);
    let channel = s.channel().await;
    // RecordEvents calls on one connection that never send an event: four fill the
    // streams budget, and the ones after them are refused at once.
    let mut idle: Vec<_> = (0..4).map(|_| idle_call(channel.clone())).collect();
    eventually("four idle streams are in flight", async || {
        inflight(&s, "grpc").await == 4.0
    })
    .await;
    for _ in 0..12 {
        let call = idle_call(channel.clone());
        let status = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("a refused call answers at once")
            .unwrap()
            .expect_err("past the budget");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    }
    // Unary calls, on the same connection and over HTTP, still get their places.
    let mut client = onrec_proto::v1::recommender_client::RecommenderClient::new(channel);
    for i in 0..20 {
        let request = onrec_proto::v1::RecommendRequest {
            user_id: format!("g{i}"),
            n: 3,
            ..Default::default()
        };
        client
            .recommend(request)
            .await
            .expect("a unary call is served");
        let (status, body) = s
            .post("/v1/recommend", json!({"user_id": format!("h{i}"), "n": 3}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for call in idle.drain(..) {
        call.abort();
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let s = Server::start(&["--header-timeout", "1s"]);
    let mut conn = stalled(&s, "POST /v1/recommend HTTP/1.1\r\nHost: onrec", "").await;
    let mut buf = [0u8; 256];
    // The server closes the connection (an empty read), with or without a 408 first.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was still open after 30 s");
    let (status, _) = s
        .post("/v1/recommend", json!({"user_id": "h", "n": 2}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn one_client_holds_at_most_its_share_of_the_streams_and_others_are_still_served() {
    // Eight stream places, a quarter of them per client: two. 127.0.0.1 is a trusted
    // proxy, so the client is the address it forwards.
    let s = Server::start(&[
        "--max-streams",
        "8",
        "--max-client-share",
        "0.25",
        "--trusted-proxies",
        "127.0.0.1",
    ]);
    let event = |id: &str| {
        format!(r#"{{"event_id":"{id}","user_id":"u1","item_id":"sku-00001","type":"click"}}"#)
    };
    let idle = "POST /v1/events HTTP/1.1\r\nHost: onrec\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 10.0.0.1";
    let held = vec![stalled(&s, idle, "").await, stalled(&s, idle, "").await];
    eventually("two idle streams are in flight", async || {
        inflight(&s, "http").await == 2.0
    })
    .await;
    // A third stream of that client is refused at once, saying why.
    let forwarded = |ip: &str| format!("\r\nX-Forwarded-For: {ip}");
    let mut third = stream_from(&s, "127.0.0.1", &forwarded("10.0.0.1"), &event("e1")).await;
    let refused = response_within(&mut third, Duration::from_secs(20))
        .await
        .expect("an answer");
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("max_client_share"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    // Another client behind the proxy is served.
    let mut other = stream_from(&s, "127.0.0.1", &forwarded("10.0.0.2"), &event("e2")).await;
    assert_eq!(
        status_within(&mut other, Duration::from_secs(20)).await,
        Some(200)
    );
    // A peer that is no trusted proxy cannot pass itself off as the held client: the
    // header is its own word, and it is served as itself.
    let mut direct = stream_from(&s, "127.0.0.2", &forwarded("10.0.0.1"), &event("e3")).await;
    assert_eq!(
        status_within(&mut direct, Duration::from_secs(20)).await,
        Some(200)
    );
    // A place the client gives back (its connection closed) is its own again.
    drop(held);
    eventually("the client streams again once it closed one", async || {
        let mut again = stream_from(&s, "127.0.0.1", &forwarded("10.0.0.1"), &event("e4")).await;
        status_within(&mut again, Duration::from_secs(20)).await == Some(200)
    })
    .await;
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "onrec_client_limited_total{transport=\"http\",budget=\"event streams\"}"
        )),
        "{metrics}"
    );

    // Over gRPC the peer (no forwarded address) is the client: two idle calls, and the
    // third is refused.
    let channel = s.channel().await;
    let calls: Vec<_> = (0..2).map(|_| idle_call(channel.clone())).collect();
    eventually("two idle gRPC streams are in flight", async || {
        inflight(&s, "grpc").await == 2.0
    })
    .await;
    let status = tokio::time::timeout(Duration::from_secs(20), idle_call(channel))
        .await
        .expect("a refused call answers at once")
        .unwrap()
        .expect_err("past the client's share");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("max_client_share"), "{status}");
    for call in calls {
        call.abort();
    }
}
