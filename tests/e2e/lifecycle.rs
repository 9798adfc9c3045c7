//! Starting, configuration, and shutting down the real process.

use std::time::Duration;

use onrec_proto::v1 as pb;
use serde_json::json;

use crate::common::{Server, eventually};

#[tokio::test]
async fn sigterm_first_says_draining_while_it_still_serves() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let s = Server::start(&["--drain-delay", "60s"]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel().await);
    s.terminate();
    eventually("/readyz says it is draining", async || {
        let (status, body) = s.get_text("/readyz").await;
        status == 503 && body.contains("draining")
    })
    .await;
    for service in ["", "onrec.v1.Recommender"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::NotServing, "{service}");
    }
    // Requests that still arrive (the balancer has not noticed yet) are served, on new
    // connections too.
    let fresh = reqwest::Client::new();
    let r = fresh
        .post(s.url("/v1/recommend"))
        .json(&json!({"user_id": "late", "n": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, summary) = s
        .post(
            "/v1/events",
            json!([crate::common::click("late-1", "late", "sku-00001")]),
        )
        .await;
    assert_eq!(
        (status, summary["accepted"].clone()),
        (200, json!(1)),
        "{summary}"
    );
}

#[tokio::test]
async fn sigterm_drains_open_streams_and_exits_zero() {
    let mut s = Server::start(&["--shutdown-grace", "10s"]);
    let mut client = s.grpc().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut acks = client
        .stream_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(pb::Event {
            event_id: format!("t{i}"),
            user_id: "term".into(),
            item_id: "sku-00001".into(),
            r#type: pb::EventType::Click.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(
            acks.message().await.unwrap().unwrap().status(),
            pb::EventStatus::Accepted
        );
    }
    s.terminate();
    // After the drain delay (5 s), the server ends the stream cleanly after acknowledging
    // everything it took.
    let end = tokio::time::timeout(Duration::from_secs(30), acks.message())
        .await
        .expect("stream ended");
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(tx);
    let status = tokio::task::spawn_blocking(move || {
        let status = s.wait(Duration::from_secs(30));
        (status, s.drain_log())
    })
    .await
    .unwrap();
    let (status, log) = status;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}; log:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("drained")),
        "{}",
        log.join("\n")
    );
}

#[tokio::test]
async fn serves_a_catalog_file_and_reads_a_config_file() {
    let dir = std::env::temp_dir().join(format!("onrec-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let catalog = dir.join("catalog.jsonl");
    std::fs::write(
        &catalog,
        "{\"item_id\":\"a\",\"category\":\"x\",\"popularity\":1}\n{\"item_id\":\"b\",\"category\":\"x\",\"popularity\":5}\n\n{\"item_id\":\"c\",\"available\":false,\"popularity\":9}\n",
    )
    .unwrap();
    let config = dir.join("onrec.toml");
    std::fs::write(
        &config,
        format!("catalog = {:?}\nmax_n = 2\n", catalog.display().to_string()),
    )
    .unwrap();
    let s = Server::start(&["--config", config.to_str().unwrap()]);
    assert_eq!(
        s.recommend("u", 2).await,
        vec!["b".to_owned(), "a".to_owned()]
    );
    let (status, err) = s
        .post("/v1/recommend", json!({"user_id": "u", "n": 3}))
        .await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"].as_str().unwrap().contains("1..=2"), "{err}");
    drop(s);

    std::fs::write(
        &catalog,
        "{\"item_id\":\"a\"}\n{\"item_id\":\"b\",\"price\":\"free\"}\n",
    )
    .unwrap();
    let err = Server::try_start(&["--catalog", catalog.to_str().unwrap()])
        .err()
        .expect("a bad catalog must not start");
    assert!(err.contains("line 2"), "{err}");
    std::fs::write(&config, "max_n = 0\n").unwrap();
    let err = Server::try_start(&["--config", config.to_str().unwrap()])
        .err()
        .expect("a bad config must not start");
    assert!(err.contains("max_n"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn empty_catalog_gives_an_empty_list_not_an_error() {
    let s = Server::start(&["--demo-items", "0"]);
    let (status, body) = s
        .post("/v1/recommend", json!({"user_id": "u", "n": 5}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"], json!([]));
}
