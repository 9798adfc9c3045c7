//! Exploration: policies at the service level, and bandit statistics in a real Redis
//! shared by two server processes, through Redis failures.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{RedisServer, Server, click, eventually, segment};

#[tokio::test]
async fn epsilon_greedy_explores_with_stated_propensities() {
    let s = Server::start(&[
        "--policy",
        "epsilon_greedy",
        "--epsilon",
        "0.3",
        "--candidates",
        "20",
    ]);
    let (mut explored, mut slots) = (0, 0);
    for i in 0..100 {
        let (status, body) = s
            .post("/v1/recommend", json!({"user_id": format!("e{i}"), "n": 5}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["policy"], "epsilon_greedy");
        for item in body["items"].as_array().unwrap() {
            let p = item["propensity"].as_f64().unwrap();
            let e = item["explored"].as_bool().unwrap();
            // An exploited slot had 1 − ε plus its share of ε; an explored one ε / remaining.
            if e {
                assert!(p > 0.0 && p < 0.3, "{item}");
            } else {
                assert!(p >= 0.7, "{item}");
            }
            explored += usize::from(e);
            slots += 1;
        }
    }
    // ε = 0.3, but exploring can land on the best item by chance (1 in ~18): about 28%.
    let rate = explored as f64 / slots as f64;
    assert!(
        (0.18..0.38).contains(&rate),
        "explored {explored} of {slots}"
    );
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(metrics.contains(r#"onrec_bandit_decisions_total{segment="default",policy="epsilon_greedy",explored="true"}"#), "{metrics}");
}

#[tokio::test]
async fn two_servers_share_segment_statistics_in_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = Server::start(&["--redis-url", &url, "--policy", "ucb1", "--personal", "0"]);
    let b = Server::start(&["--redis-url", &url, "--policy", "ucb1", "--personal", "0"]);
    let (_, served) = a
        .post(
            "/v1/recommend",
            json!({"user_id": "s1", "n": 4, "segment": "shared"}),
        )
        .await;
    assert_eq!(served["segment"], "shared");
    assert!(served.get("fallback").is_none(), "{served}");
    let item = served["items"][0]["item_id"].as_str().unwrap().to_owned();
    let mut ev = click("share-1", "s1", &item);
    ev["request_id"] = served["request_id"].clone();
    let (_, summary) = a.post("/v1/events", json!([ev])).await;
    assert_eq!(summary["accepted"], 1);
    eventually(
        "server B sees server A's impressions and reward",
        async || {
            let seg = segment(&b, "shared").await;
            seg["impressions"] == 4.0 && seg["reward"] == 1.0
        },
    )
    .await;
    let seg = segment(&b, "shared").await;
    assert_eq!(seg["policy"], "ucb1");
    assert_eq!(seg["top"][0]["item_id"], item.as_str());
    // B's UCB1 now knows A's arms: the four shown items are no longer untried.
    let (_, from_b) = b
        .post(
            "/v1/recommend",
            json!({"user_id": "s2", "n": 4, "segment": "shared"}),
        )
        .await;
    let first_a: Vec<&Value> = served["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["item_id"])
        .collect();
    assert!(
        from_b["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| !first_a.contains(&&i["item_id"])),
        "{from_b}"
    );
    let r = b.client.get(b.url("/v1/segments")).send().await.unwrap();
    let all: Value = r.json().await.unwrap();
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|s| s["segment"] == "shared"),
        "{all}"
    );
    let r = b
        .client
        .get(b.url("/v1/segments/shared?top=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn killing_redis_fails_no_recommendation_and_loses_no_update() {
    let mut redis = RedisServer::start();
    let s = Server::start(&[
        "--redis-url",
        &redis.url(),
        "--policy",
        "ucb1",
        "--personal",
        "0",
    ]);
    let (_, served) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "k0", "n": 3, "segment": "outage"}),
        )
        .await;
    assert!(served.get("fallback").is_none(), "{served}");
    // Written before the outage: what is buffered from here on is the outage's alone.
    eventually("the first impressions reach Redis", async || {
        segment(&s, "outage").await["impressions"] == 3.0
    })
    .await;
    redis.kill();
    let mut shown = Vec::new();
    for i in 0..5 {
        let (status, body) = s
            .post(
                "/v1/recommend",
                json!({"user_id": format!("k{i}"), "n": 3, "segment": "outage"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["fallback"],
            "bandit statistics are unavailable; the ranking is served without exploration",
            "{body}"
        );
        assert!(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["explored"] == false && i["propensity"] == 1.0)
        );
        shown.push(body);
    }
    let clicks: Vec<Value> = shown
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut c = click(
                &format!("out-{i}"),
                &format!("k{i}"),
                b["items"][0]["item_id"].as_str().unwrap(),
            );
            c["request_id"] = b["request_id"].clone();
            c
        })
        .collect();
    // Events are not accepted while Redis cannot take them: the client is told to retry.
    let clicks = Value::Array(clicks);
    let (status, body) = s.post("/v1/events", clicks.clone()).await;
    assert_eq!(status, 503, "{body}");
    let r = s
        .client
        .get(s.url("/v1/segments/outage"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    redis.restart();
    eventually("the clicks are accepted once Redis is back", async || {
        let (status, summary) = s.post("/v1/events", clicks.clone()).await;
        status == 200 && summary["accepted"] == 5
    })
    .await;
    // The restarted Redis is empty: what it ends up with is exactly what was buffered
    // during the outage (5 requests × 3 impressions) and the 5 clicks.
    eventually("the buffered updates are flushed", async || {
        let r = s
            .client
            .get(s.url("/v1/segments/outage"))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            return false;
        }
        let seg: Value = r.json().await.unwrap();
        seg["impressions"] == 15.0 && seg["reward"] == 5.0
    })
    .await;
    let (_, body) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "k9", "n": 3, "segment": "outage"}),
        )
        .await;
    assert!(body.get("fallback").is_none(), "{body}");
}

#[tokio::test]
async fn starts_without_redis_and_becomes_ready_when_it_answers() {
    let mut redis = RedisServer::start();
    redis.kill();
    let s = Server::start(&[
        "--redis-url",
        &redis.url(),
        "--policy",
        "ucb1",
        "--personal",
        "0",
    ]);
    let (status, body) = s
        .post("/v1/recommend", json!({"user_id": "r", "n": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.get_text("/readyz").await.0, 503);
    redis.restart();
    eventually("ready once Redis answers", async || {
        s.get_text("/readyz").await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn counts_in_an_append_only_redis_equal_what_was_served_and_clicked() {
    let redis = RedisServer::start_appendonly();
    let s = Server::start(&["--redis-url", &redis.url()]);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (client, url, events) = (
            s.client.clone(),
            s.url("/v1/recommend"),
            s.url("/v1/events"),
        );
        tasks.push(tokio::spawn(async move {
            let user = format!("aof-{}", i % 40);
            let served: Value = client
                .post(&url)
                .json(&json!({"user_id": user, "n": 5}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if i % 4 == 0 {
                let item = served["items"][0]["item_id"].as_str().unwrap();
                let mut ev = click(&format!("aof-click-{i}"), &user, item);
                ev["request_id"] = served["request_id"].clone();
                // Sent twice: the second is a duplicate and counts nothing.
                for _ in 0..2 {
                    client
                        .post(&events)
                        .json(&json!([ev]))
                        .send()
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eventually("every impression and click is in Redis", async || {
        let seg = segment(&s, "default").await;
        seg["impressions"] == 1000.0 && seg["reward"] == 50.0
    })
    .await;
    // Nothing more arrives later: the counts stay exact.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seg = segment(&s, "default").await;
    assert_eq!(
        (seg["impressions"].clone(), seg["reward"].clone()),
        (json!(1000.0), json!(50.0))
    );
}
