//! The gRPC API, through tonic clients.

use onrec_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::Server;

fn event(id: &str, user: &str, item: &str, kind: pb::EventType) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        user_id: user.into(),
        item_id: item.into(),
        r#type: kind.into(),
        ..Default::default()
    }
}

fn request(user: &str, n: u32) -> pb::RecommendRequest {
    pb::RecommendRequest {
        user_id: user.into(),
        n,
        ..Default::default()
    }
}

#[tokio::test]
async fn recommend_over_grpc_matches_http() {
    let s = Server::start(&[]);
    let mut client = s.grpc().await;
    let mut req = request("gina", 8);
    req.context = Some(pb::Context {
        device: "mobile".into(),
        hour: Some(7),
        ..Default::default()
    });
    let reply = client.recommend(req).await.unwrap().into_inner();
    let ids: Vec<String> = reply.items.iter().map(|i| i.item_id.clone()).collect();
    assert_eq!(ids.len(), 8);
    assert_eq!(ids, s.recommend("gina", 8).await);
    assert_eq!(reply.ranker, "popularity");
    assert_eq!(reply.request_id.len(), 36);
    assert!(
        reply
            .items
            .iter()
            .all(|i| i.propensity == 1.0 && !i.explored && !i.category.is_empty())
    );
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let s = Server::start(&[]);
    let mut client = s.grpc().await;
    for (req, field) in [
        (request("u", 0), "n"),
        (request("", 3), "user_id"),
        (
            pb::RecommendRequest {
                context: Some(pb::Context {
                    hour: Some(30),
                    ..Default::default()
                }),
                ..request("u", 3)
            },
            "context.hour",
        ),
    ] {
        let status = client.recommend(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() {
    let s = Server::start(&["--max-body-bytes", "1024"]);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // gRPC frames: a compressed flag, a length, the message. Code 3 is INVALID_ARGUMENT,
    // 8 RESOURCE_EXHAUSTED; an error before any message is a trailers-only answer.
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "a field tag with a truncated varint",
            vec![0, 0, 0, 0, 4, 0x0a, 0xff, 0xff, 0xff],
            "3",
        ),
        ("a frame cut short", vec![0, 0, 0, 0, 10, 0x0a, 0x01], "3"),
        (
            "a compressed flag without an encoding",
            vec![1, 0, 0, 0, 2, 0x0a, 0x00],
            "3",
        ),
        (
            "a message over max_body_bytes",
            vec![0, 0, 0, 0x10, 0x00, 0x0a, 0x00],
            "8",
        ),
    ];
    for (what, body, code) in cases {
        let r = client
            .post(format!("http://{}/onrec.v1.Recommender/Recommend", s.grpc))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_owned()),
            Some(code.into()),
            "{what}: {:?}",
            r.headers()
        );
    }
    // Counted like every other refused call.
    let (_, metrics) = s.get_text("/metrics").await;
    let counted = |outcome: &str| {
        let series = format!(
            "onrec_requests_total{{transport=\"grpc\",endpoint=\"recommend\",outcome=\"{outcome}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.parse::<f64>().unwrap())
    };
    assert_eq!(counted("invalid_argument"), Some(3.0), "{metrics}");
    assert_eq!(counted("payload_too_large"), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn record_events_summarises_a_client_stream() {
    let s = Server::start(&[]);
    let mut client = s.grpc().await;
    let events = vec![
        event("g1", "hank", "sku-00010", pb::EventType::Click),
        event("g1", "hank", "sku-00010", pb::EventType::Click),
        event("g2", "hank", "sku-00011", pb::EventType::Unspecified),
        event("g3", "hank", "missing", pb::EventType::Purchase),
        event("g4", "hank", "sku-00012", pb::EventType::AddToCart),
    ];
    let summary = client
        .record_events(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            summary.received,
            summary.accepted,
            summary.duplicates,
            summary.invalid,
            summary.unknown_items
        ),
        (5, 2, 1, 1, 1)
    );
    assert_eq!(summary.errors.len(), 2);
    assert_eq!(summary.errors[0].index, 2);
    assert_eq!(summary.errors[0].status(), pb::EventStatus::Invalid);
    assert_eq!(summary.errors[0].error, "type: must be set");
    assert_eq!(summary.errors[1].status(), pb::EventStatus::UnknownItem);
    // The interactions are in hank's history, so they are not recommended back to him.
    let ids = s.recommend("hank", 100).await;
    assert!(!ids.contains(&"sku-00010".to_owned()) && !ids.contains(&"sku-00012".to_owned()));
}

#[tokio::test]
async fn stream_events_acks_each_event_in_order() {
    let s = Server::start(&[]);
    let mut client = s.grpc().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut acks = client
        .stream_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sent = [
        (
            event("b1", "ivy", "sku-00001", pb::EventType::Click),
            pb::EventStatus::Accepted,
        ),
        (
            event("b1", "ivy", "sku-00001", pb::EventType::Click),
            pb::EventStatus::Duplicate,
        ),
        (
            event("b2", "ivy", "nope", pb::EventType::Click),
            pb::EventStatus::UnknownItem,
        ),
        (
            event("", "ivy", "sku-00001", pb::EventType::Click),
            pb::EventStatus::Invalid,
        ),
        (
            event("b3", "ivy", "sku-00002", pb::EventType::Dislike),
            pb::EventStatus::Accepted,
        ),
    ];
    for (index, (e, expected)) in sent.into_iter().enumerate() {
        let id = e.event_id.clone();
        tx.send(e).await.unwrap();
        // One ack per event, before the next is sent: the stream is interactive.
        let ack = acks.message().await.unwrap().expect("an ack");
        assert_eq!(
            (ack.index, ack.event_id.as_str(), ack.status()),
            (index as u64, id.as_str(), expected),
            "{ack:?}"
        );
        assert_eq!(
            ack.error.is_empty(),
            matches!(
                expected,
                pb::EventStatus::Accepted | pb::EventStatus::Duplicate
            ),
            "{ack:?}"
        );
    }
    drop(tx);
    assert!(acks.message().await.unwrap().is_none());
    let ids = s.recommend("ivy", 100).await;
    assert!(
        !ids.contains(&"sku-00002".to_owned()),
        "a disliked item was recommended"
    );
}

#[tokio::test]
async fn upsert_items_over_grpc() {
    let s = Server::start(&["--demo-items", "10"]);
    let mut client = s.grpc().await;
    let reply = client
        .upsert_items(pb::UpsertItemsRequest {
            items: vec![pb::Item {
                item_id: "grpc-item".into(),
                category: "books".into(),
                popularity: Some(1e6),
                description: "A novel in three parts.\nHardcover.".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.created, reply.updated, reply.catalog_size),
        (1, 0, 11)
    );
    assert_eq!(s.recommend("u", 1).await, vec!["grpc-item".to_owned()]);
    let bad = client
        .upsert_items(pb::UpsertItemsRequest {
            items: vec![pb::Item {
                price: Some(f64::NAN),
                item_id: "x".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("[0].price"), "{bad:?}");
    let bad = client
        .upsert_items(pb::UpsertItemsRequest {
            items: vec![pb::Item {
                item_id: "y".into(),
                description: "x".repeat(8193),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().starts_with("[0].description") && bad.message().contains("8192"),
        "{bad:?}"
    );
}

#[tokio::test]
async fn api_keys_travel_as_metadata() {
    let s = Server::start(&["--write-api-keys", "w", "--read-api-keys", "r"]);
    let mut client = s.grpc().await;
    let status = client.recommend(request("u", 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(request("u", 1));
    req.metadata_mut()
        .insert("authorization", "Bearer r".parse().unwrap());
    assert!(client.recommend(req).await.is_ok());
    let mut req = tonic::Request::new(tokio_stream::iter(vec![event(
        "a",
        "u",
        "sku-00001",
        pb::EventType::Click,
    )]));
    req.metadata_mut()
        .insert("authorization", "Bearer r".parse().unwrap());
    assert_eq!(
        client.record_events(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut req = tonic::Request::new(tokio_stream::iter(vec![event(
        "a",
        "u",
        "sku-00001",
        pb::EventType::Click,
    )]));
    req.metadata_mut()
        .insert("authorization", "Bearer w".parse().unwrap());
    assert_eq!(
        client
            .record_events(req)
            .await
            .unwrap()
            .into_inner()
            .accepted,
        1
    );
}

#[tokio::test]
async fn health_and_reflection() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let s = Server::start(&[]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel().await);
    for service in ["", "onrec.v1.Recommender"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service}");
    }
    let mut reflection = ServerReflectionClient::new(s.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection answer: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"onrec.v1.Recommender".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn a_record_events_stream_that_stalls_says_how_many_it_applied() {
    let s = Server::start(&["--stream-idle-timeout", "1s"]);
    let mut client = s.grpc().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for i in 0..3 {
        tx.send(event(
            &format!("st{i}"),
            "stall",
            &format!("sku-0000{i}"),
            pb::EventType::Click,
        ))
        .await
        .unwrap();
    }
    // The sender stays open and sends nothing more: the stream stalls.
    let status = client
        .record_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    assert!(
        status
            .message()
            .contains("3 events were read and 3 accepted before that"),
        "{status}"
    );
    drop(tx);
    // They were applied: sent again, they are duplicates.
    let summary = client
        .record_events(tokio_stream::iter((0..3).map(|i| {
            event(
                &format!("st{i}"),
                "stall",
                &format!("sku-0000{i}"),
                pb::EventType::Click,
            )
        })))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.received, summary.duplicates), (3, 3));
}
