//! The HTTP API, through reqwest.

use serde_json::{Value, json};

use crate::common::{Server, click, item_ids};

#[tokio::test]
async fn recommend_returns_n_distinct_items_with_ids_and_versions() {
    let s = Server::start(&[]);
    let (status, body) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "alice", "n": 7, "context": {"device": "mobile", "hour": 20}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ids = item_ids(&body);
    assert_eq!(ids.len(), 7);
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        7
    );
    assert_eq!(body["ranker"], "popularity");
    assert_eq!(body["segment"], "default");
    assert!(
        body["model_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
    );
    assert!(body["request_id"].as_str().is_some_and(|v| v.len() == 36));
    let scores: Vec<f64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    for item in body["items"].as_array().unwrap() {
        assert_eq!(item["propensity"], 1.0);
        assert_eq!(item["explored"], false);
    }
    // n defaults to 10
    let (_, body) = s.post("/v1/recommend", json!({"user_id": "bob"})).await;
    assert_eq!(item_ids(&body).len(), 10);
}

#[tokio::test]
async fn clicks_move_an_item_up_for_everyone() {
    // Bought items always hidden, so that a purchase hides one (the learned default shows
    // them to some buyers while it finds out whether buyers click them).
    let s = Server::start(&["--hide-purchased", "always"]);
    let before = s.recommend("carol", 100).await;
    let target = before[80].clone();
    // The demo catalog's top item has a prior popularity of 100 clicks.
    let events: Vec<Value> = (0..150)
        .map(|i| click(&format!("c{i}"), &format!("u{i}"), &target))
        .collect();
    let (status, summary) = s.post("/v1/events", Value::Array(events)).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["accepted"], 150);
    let after = s.recommend("dave", 5).await;
    assert_eq!(after[0], target, "{after:?}");
    // A click shows interest: the item may come back to the clicker. A purchase hides it
    // from the buyer.
    assert!(s.recommend("u3", 100).await.contains(&target));
    let mut bought = click("p4", "u4", &target);
    bought["type"] = json!("purchase");
    let (status, _) = s.post("/v1/events", json!([bought])).await;
    assert_eq!(status, 200);
    assert!(!s.recommend("u4", 100).await.contains(&target));
}

#[tokio::test]
async fn a_duplicate_event_counts_once() {
    let s = Server::start(&[]);
    let all = s.recommend("erin", 100).await;
    let target = all[99].clone();
    let score = |body: &Value| {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["item_id"] == target.as_str())
            .map(|i| i["score"].as_f64().unwrap())
    };
    let (_, first) = s
        .post(
            "/v1/events",
            json!([{"event_id": "once", "user_id": "x", "item_id": target, "type": "purchase"}]),
        )
        .await;
    assert_eq!(first["accepted"], 1);
    let (_, after_one) = s
        .post("/v1/recommend", json!({"user_id": "erin", "n": 100}))
        .await;
    let (_, second) = s
        .post(
            "/v1/events",
            json!([{"event_id": "once", "user_id": "x", "item_id": target, "type": "purchase"}]),
        )
        .await;
    assert_eq!(
        (second["accepted"].clone(), second["duplicates"].clone()),
        (json!(0), json!(1))
    );
    let (_, after_two) = s
        .post("/v1/recommend", json!({"user_id": "erin", "n": 100}))
        .await;
    let (one, two) = (score(&after_one).unwrap(), score(&after_two).unwrap());
    // A second purchase would add 3 to a score of about 1; decay between the reads is ~1e-5.
    assert!((one - two).abs() < 1e-3, "{one} vs {two}");
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"onrec_events_total{type="purchase",outcome="duplicate"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn ndjson_is_applied_as_it_arrives_and_reports_each_line() {
    let s = Server::start(&[]);
    let top = s.recommend("streamer", 1).await[0].clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let request = s
        .client
        .post(s.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send();
    let response = tokio::spawn(request);
    tx.send(Ok(
        format!("{}\n", click("s1", "streamer", &top)).into_bytes()
    ))
    .await
    .unwrap();
    // The click lands in the user's history while the stream is still open.
    let mut applied = false;
    for _ in 0..100 {
        if !s.recommend("streamer", 5).await.contains(&top) {
            applied = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        applied,
        "the first line was not applied before the stream ended"
    );
    let rest = format!(
        "{}\n\n{{\"event_id\": \"s2\", \"user_id\": \"streamer\"\n{}\n{}",
        click("s1", "streamer", &top),
        json!({"event_id": "s3", "user_id": "streamer", "item_id": top, "type": "teleport"}),
        click("s4", "streamer", "no-such-item"),
    );
    tx.send(Ok(rest.into_bytes())).await.unwrap();
    drop(tx);
    let response = response.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let summary: Value = response.json().await.unwrap();
    assert_eq!(summary["received"], 5, "{summary}");
    assert_eq!(summary["accepted"], 1);
    assert_eq!(summary["duplicates"], 1);
    assert_eq!(summary["invalid"], 2);
    assert_eq!(summary["unknown_items"], 1);
    let errors = summary["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3);
    assert_eq!(errors[0]["index"], 2);
    assert!(
        errors[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("type: unknown variant `teleport`"),
        "{summary}"
    );
    assert_eq!(errors[2]["status"], "unknown_item");
}

#[tokio::test]
async fn bad_input_gets_400_naming_the_field() {
    let s = Server::start(&["--max-body-bytes", "2048"]);
    let cases = [
        (json!({"user_id": "u", "n": 0}), "n"),
        (json!({"user_id": "u", "n": 101}), "n"),
        (json!({"user_id": "", "n": 3}), "user_id"),
        (json!({"n": 3}), "body"),
        (json!({"user_id": "u", "n": "three"}), "n"),
        (
            json!({"user_id": "u", "context": {"hour": 25}}),
            "context.hour",
        ),
        (json!({"user_id": "u", "exclude": ["a", ""]}), "exclude[1]"),
        (json!({"user_id": "u", "colour": "red"}), "colour"),
    ];
    for (body, field) in cases {
        let (status, err) = s.post("/v1/recommend", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {err}");
        assert_eq!(err["field"], field, "{body} -> {err}");
        assert_eq!(err["code"], "invalid_argument");
        assert!(err["error"].as_str().unwrap().starts_with(field), "{err}");
    }
    let r = s
        .client
        .post(s.url("/v1/recommend"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let events = json!([click("a", "u", "sku-00001"), {"event_id": "b", "user_id": "u", "item_id": "sku-00002", "type": "like"}]);
    let (status, err) = s.post("/v1/events", events).await;
    assert_eq!(
        (status, err["field"].clone()),
        (400, json!("[1].type")),
        "{err}"
    );
    // The batch was rejected whole: the valid first event was not applied.
    let (_, again) = s
        .post("/v1/events", json!([click("a", "u", "sku-00001")]))
        .await;
    assert_eq!(again["accepted"], 1, "{again}");
    let (status, err) = s
        .post("/v1/events", json!({"event_id": "not an array"}))
        .await;
    assert_eq!(
        (status, err["field"].clone()),
        (400, json!("body")),
        "{err}"
    );
    // A timestamp far ahead of the clock (a fast client clock, microseconds) counts as now.
    let (status, summary) = s.post("/v1/events", json!([{"event_id": "t", "user_id": "u", "item_id": "sku-00001", "type": "click", "timestamp": 4_102_444_800_000_i64}])).await;
    assert_eq!(
        (status, summary["accepted"].clone()),
        (200, json!(1)),
        "{summary}"
    );
    // An object is an object: not an array of its fields.
    let (status, err) = s.post("/v1/recommend", json!(["alice", 3])).await;
    assert_eq!(
        (status, err["field"].clone()),
        (400, json!("body")),
        "{err}"
    );
    let big = json!({"user_id": "u", "exclude": vec!["x".repeat(100); 30]});
    let (status, err) = s.post("/v1/recommend", big).await;
    assert_eq!(status, 413, "{err}");
    let r = s
        .client
        .put(s.url("/v1/items"))
        .json(&json!([{"item_id": "p", "price": -3}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "[0].price");
    // A popularity that would pin the item first with a score of infinity.
    let r = s
        .client
        .put(s.url("/v1/items"))
        .json(&json!([{"item_id": "p", "popularity": 1.7976931348623157e308}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "[0].popularity");
    let early = json!([{"event_id": "t0", "user_id": "u", "item_id": "sku-00001", "type": "click", "timestamp": 0}]);
    let (status, err) = s.post("/v1/events", early).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["field"], "[0].timestamp", "{err}");
    let (status, _) = s.get_text("/v1/nothing-here").await;
    assert_eq!(status, 404);
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(metrics.contains(
        r#"onrec_requests_total{transport="http",endpoint="recommend",outcome="invalid_argument"}"#
    ));
}

#[tokio::test]
async fn api_keys_guard_reads_and_writes() {
    let s = Server::start(&["--write-api-keys", "w1,w2", "--read-api-keys", "r1"]);
    let send = |path: &str, key: Option<&str>, body: Value| {
        let mut r = s.client.post(s.url(path)).json(&body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    let rec = json!({"user_id": "u", "n": 1});
    assert_eq!(send("/v1/recommend", None, rec.clone()).await, 401);
    assert_eq!(send("/v1/recommend", Some("nope"), rec.clone()).await, 401);
    assert_eq!(send("/v1/recommend", Some("r1"), rec.clone()).await, 200);
    assert_eq!(send("/v1/recommend", Some("w2"), rec).await, 200);
    let ev = json!([click("k", "u", "sku-00001")]);
    assert_eq!(send("/v1/events", None, ev.clone()).await, 401);
    assert_eq!(send("/v1/events", Some("r1"), ev.clone()).await, 401);
    assert_eq!(send("/v1/events", Some("w1"), ev).await, 200);
    let items = s
        .client
        .put(s.url("/v1/items"))
        .json(&json!([{"item_id": "n"}]));
    assert_eq!(items.send().await.unwrap().status(), 401);
    // Health and metrics stay open for probes and scrapers; the keys never reach the log.
    assert_eq!(s.get_text("/healthz").await.0, 200);
    assert_eq!(s.get_text("/metrics").await.0, 200);
    let log = s.drain_log().join("\n");
    assert!(
        log.contains("***") && !log.contains("w1") && !log.contains("r1"),
        "{log}"
    );
}

#[tokio::test]
async fn items_can_be_added_and_hidden() {
    let s = Server::start(&["--demo-items", "50"]);
    let r = s.client.put(s.url("/v1/items"))
        .json(&json!([{"item_id": "hot-new", "title": "Hot New", "category": "shoes", "popularity": 1e6}]))
        .send().await.unwrap();
    assert_eq!(r.status(), 200);
    let summary: Value = r.json().await.unwrap();
    assert_eq!(
        (summary["created"].clone(), summary["catalog_size"].clone()),
        (json!(1), json!(51))
    );
    let (_, body) = s
        .post("/v1/recommend", json!({"user_id": "u", "n": 1}))
        .await;
    assert_eq!(body["items"][0]["item_id"], "hot-new");
    assert_eq!(body["items"][0]["title"], "Hot New");
    let r = s
        .client
        .put(s.url("/v1/items"))
        .json(&json!([{"item_id": "hot-new", "available": false}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["updated"], 1);
    assert!(!s.recommend("u", 50).await.contains(&"hot-new".to_owned()));
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(metrics.contains("onrec_catalog_items 51"), "{metrics}");
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let s = Server::start(&[]);
    assert_eq!(s.get_text("/healthz").await.0, 200);
    let (status, ready) = s.get_text("/readyz").await;
    assert_eq!((status, ready.contains("ready")), (200, true));
    s.recommend("m", 3).await;
    let (status, metrics) = s.get_text("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        r#"onrec_requests_total{transport="http",endpoint="recommend",outcome="ok"} 1"#,
        r#"onrec_request_duration_seconds_bucket{transport="http",endpoint="recommend",outcome="ok",le="#,
        "onrec_catalog_items 3000",
        r#"onrec_model_info{ranker="popularity",version="popularity-c1"} 1"#,
        "onrec_build_info{version=",
        "# TYPE onrec_request_duration_seconds histogram",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    let (status, doc) = s.get_text("/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for path in [
        "/v1/recommend",
        "/v1/events",
        "/v1/items",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} not documented");
    }
    // `top` is the optional query parameter it is, in its range.
    let top = &doc["paths"]["/v1/segments"]["get"]["parameters"][0];
    assert_eq!(
        (
            &top["name"],
            &top["in"],
            &top["required"],
            &top["schema"]["minimum"]
        ),
        (&json!("top"), &json!("query"), &json!(false), &json!(1)),
        "{top}"
    );
    // A known route with another method: 405, with the error body and the allowed ones.
    let answer = s
        .client
        .delete(s.url("/v1/recommend"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 405);
    assert_eq!(answer.headers()["allow"], "POST");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed", "{body}");
    // Every property the document gives a request type is accepted by the server.
    let props = doc["components"]["schemas"]["RecommendRequest"]["properties"]
        .as_object()
        .unwrap();
    let mut req = serde_json::Map::new();
    for name in props.keys() {
        let value = match name.as_str() {
            "user_id" => json!("doc"),
            "n" => json!(2),
            "context" => {
                json!({"device": "app", "country": "DE", "hour": 9, "page": "home", "attributes": {"ab": "b"}})
            }
            "recent_items" | "exclude" => json!(["sku-00001"]),
            "segment" => json!("vip"),
            other => panic!("the document lists a property the test does not know: {other}"),
        };
        req.insert(name.clone(), value);
    }
    let (status, body) = s.post("/v1/recommend", Value::Object(req)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["segment"], "vip");
}
