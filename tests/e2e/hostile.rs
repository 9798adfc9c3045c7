//! Clients that hold connections open without finishing what they send: they must not
//! take the places of well-behaved clients.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::Server;

/// Opens a connection to `s` and sends `head` (request line and headers) plus `body`,
/// then leaves it open.
async fn stalled(s: &Server, head: &str, body: &str) -> TcpStream {
    let mut conn = TcpStream::connect(s.http).await.expect("connecting");
    conn.write_all(format!("{head}\r\n\r\n{body}").as_bytes())
        .await
        .expect("sending");
    conn
}

/// The status code of the response on `conn`, read within `limit`.
async fn status_within(conn: &mut TcpStream, limit: Duration) -> Option<u16> {
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(limit, conn.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn slow_uploads_and_idle_streams_take_no_place_of_other_clients() {
    let s = Server::start(&[
        "--max-concurrent-requests",
        "4",
        "--max-streams",
        "4",
        "--body-timeout",
        "3s",
    ]);
    // 100 uploads that promise a body and send one byte of it, and 8 NDJSON event
    // streams that send nothing: far more than either budget.
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
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(
            stalled(
                &s,
                "POST /v1/events HTTP/1.1\r\nHost: onrec\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked",
                "",
            )
            .await,
        );
    }
    // Give the server time to take them all in before the well-behaved client starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ok = 0;
    for i in 0..50 {
        let (status, body) = s
            .post("/v1/recommend", json!({"user_id": format!("u{i}"), "n": 3}))
            .await;
        assert_eq!(status, 200, "{body}");
        ok += 1;
    }
    assert_eq!(ok, 50);
    let (status, _) = s
        .post(
            "/v1/events",
            json!([{"event_id": "e1", "user_id": "u1", "item_id": "sku-00001", "type": "click"}]),
        )
        .await;
    assert_eq!(status, 200, "a JSON batch is a request, not a stream");

    // Streams beyond their budget are refused with 429 and a Retry-After, the first four
    // are open.
    let mut refused = 0;
    for conn in &mut streams {
        match status_within(conn, Duration::from_secs(1)).await {
            Some(429) => refused += 1,
            Some(other) => panic!("an idle stream was answered {other}"),
            None => {}
        }
    }
    assert_eq!(refused, 4, "four streams fit the budget of four");
    // An upload that never finishes is answered 408 once body_timeout has passed.
    let status = status_within(&mut uploads[0], Duration::from_secs(30)).await;
    assert_eq!(status, Some(408));
}

#[tokio::test]
async fn idle_grpc_event_streams_on_one_connection_take_no_request_places() {
    let s = Server::start(&["--max-concurrent-requests", "4", "--max-streams", "4"]);
    let channel = s.channel().await;
    // 16 RecordEvents calls on one connection that never send an event.
    let mut idle = Vec::new();
    for _ in 0..16 {
        let mut client =
            onrec_proto::v1::recommender_client::RecommenderClient::new(channel.clone());
        idle.push(tokio::spawn(async move {
            client
                .record_events(tokio_stream::pending::<onrec_proto::v1::Event>())
                .await
        }));
    }
    // Those past the streams budget are refused at once.
    let mut refused = 0;
    for call in &mut idle {
        if let Ok(Ok(Err(status))) = tokio::time::timeout(Duration::from_secs(1), call).await {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
            refused += 1;
        }
    }
    assert_eq!(refused, 12, "four streams fit the budget of four");
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
    for call in idle {
        call.abort();
    }
}
