//! The encoder learns online through the real binary: started with only a catalog, the
//! service answers by popularity until events come, then ranks with a Transformer it
//! trains from them, publishes newer versions as events keep coming, takes items added
//! at run time into the model without a restart, and resumes after one from its data
//! directory, where every accepted event is logged for offline training.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Server, click};

/// A catalog of `items` items in 3 categories, as a JSON-lines file.
fn catalog(items: usize) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "onrec-online-catalog-{}-{items}.jsonl",
        std::process::id()
    ));
    let lines: Vec<String> = (0..items)
        .map(|i| json!({"item_id": format!("p{i}"), "category": format!("c{}", i % 3)}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// A data directory of this test process's own, empty.
fn empty_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("onrec-{name}-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn recommend(s: &Server, body: Value) -> Value {
    let (status, body) = s.post("/v1/recommend", body).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The online encoder's published version in a response's `model_version`
/// (`sasrec-online-<version>-c<catalog>`), if it ranked.
fn online_version(body: &Value) -> Option<u64> {
    body["model_version"]
        .as_str()?
        .strip_prefix("sasrec-online-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Asks for `user`'s recommendations until the online encoder's version is above
/// `after`, within a generous bound (the trainer shares the machine with everything).
async fn wait_for_version(s: &Server, user: &str, after: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let body = recommend(s, json!({"user_id": user, "n": 5})).await;
        if online_version(&body).is_some_and(|v| v > after) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no online encoder version above {after} within 2 minutes: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each of `users` users clicks 4 items of their category (user k likes category k % 3)
/// on a response served to them.
async fn clicks(s: &Server, prefix: &str, users: usize) {
    let mut events = Vec::new();
    for u in 0..users {
        let user = format!("{prefix}{u}");
        let body = recommend(s, json!({"user_id": user, "n": 5})).await;
        for k in 0..4 {
            let item = format!("p{}", u % 3 + 3 * ((u * 7 + k * 5) % 20));
            let mut ev = click(&format!("{user}-{k}"), &user, &item);
            ev["request_id"] = body["request_id"].clone();
            events.push(ev);
        }
    }
    let (status, summary) = s.post("/v1/events", Value::Array(events)).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["accepted"], json!(users * 4), "{summary}");
}

/// The scheduling policy (`SCHED_OTHER` 0, `SCHED_IDLE` 5) of each of `pid`'s threads,
/// by thread name.
#[cfg(target_os = "linux")]
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Field 41 of stat; the fields after the name (in parentheses) start at field 3.
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        let policy = after_name.split_whitespace().nth(41 - 3).unwrap();
        threads.push((name.trim().to_owned(), policy.parse().unwrap()));
    }
    threads
}

/// The training threads yield to serving at once (the idle policy, as shipped); the
/// encoder's serving thread, though built by the training thread, does not inherit it.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn training_threads_are_idle_and_the_encoders_serving_thread_is_not() {
    let path = catalog(60);
    let s = Server::start(&[
        "--catalog",
        path.to_str().unwrap(),
        "--encoder-online",
        "true",
        "--encoder-priority",
        "idle",
        "--learner",
        "live",
        "--q-priority",
        "idle",
    ]);
    // Few events, so that the idle trainer's first publication needs little CPU.
    clicks(&s, "a", 3).await;
    let first = wait_for_version(&s, "a0", 0).await;
    assert_eq!(first["ranker"], "transformer", "{first}");
    let threads = thread_policies(s.pid());
    let of = |name: &str| -> Vec<u32> {
        threads
            .iter()
            .filter(|(n, _)| n == name)
            .map(|&(_, p)| p)
            .collect()
    };
    // Thread names are cut to 15 bytes: "onrec-encoder-train" reads "onrec-encoder-t".
    for (name, policy) in [
        ("onrec-encoder-t", 5),
        ("onrec-learner", 5),
        ("onrec-encoder", 0),
    ] {
        let found = of(name);
        assert!(!found.is_empty(), "no thread {name}: {threads:?}");
        assert!(
            found.iter().all(|&p| p == policy),
            "{name} should have policy {policy}: {threads:?}"
        );
    }
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn a_fresh_catalog_gets_a_transformer_trained_from_its_own_events() {
    let path = catalog(60);
    let data = empty_dir("online");
    let args = [
        "--catalog",
        path.to_str().unwrap(),
        "--encoder-online",
        "true",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let s = Server::start(&args);

    let before = recommend(&s, json!({"user_id": "early", "n": 5})).await;
    assert_eq!(before["ranker"], "popularity", "{before}");
    assert_eq!(
        before["fallback"], "the encoder has not learned from any event yet",
        "{before}"
    );

    clicks(&s, "a", 30).await;
    let first = wait_for_version(&s, "a0", 0).await;
    assert_eq!(first["ranker"], "transformer", "{first}");
    let v1 = online_version(&first).unwrap();

    // More traffic, newer weights. A user with no history gets popularity until the
    // encoder has learned from 500 first choices (these are 60).
    clicks(&s, "b", 30).await;
    let later = wait_for_version(&s, "b1", v1).await;
    assert_eq!(later["ranker"], "transformer", "{later}");
    let newcomer = recommend(&s, json!({"user_id": "nobody-yet", "n": 5})).await;
    assert_eq!(newcomer["ranker"], "popularity", "{newcomer}");

    // An item added at run time joins the model: once it is clicked and trained on, a
    // history of it is one the encoder knows.
    let (status, body) = s
        .put(
            "/v1/items",
            json!([{"item_id": "fresh", "category": "c1", "title": "New in"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = s
        .post("/v1/events", json!([click("fresh-1", "c-user", "fresh")]))
        .await;
    assert_eq!(status, 200);
    let v2 = online_version(&later).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let body = recommend(
            &s,
            json!({"user_id": "c-user", "n": 5, "recent_items": ["fresh"]}),
        )
        .await;
        if online_version(&body).is_some_and(|v| v > v2) && body.get("fallback").is_none() {
            assert_eq!(body["ranker"], "transformer", "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the added item never joined the encoder: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metrics.contains("onrec_encoder_online_steps_total"),
        "{metrics}"
    );

    // A restart resumes the encoder: it ranks before any new event, at the version it had
    // (the item added at run time is not in the catalog file, so it is gone now).
    let stopped_at = online_version(&recommend(&s, json!({"user_id": "x", "n": 5})).await);
    let s = s.restart(&args).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = recommend(
            &s,
            json!({"user_id": "back", "n": 5, "recent_items": ["p1"]}),
        )
        .await;
        if let Some(v) = online_version(&body) {
            assert!(
                Some(v) >= stopped_at,
                "resumed at {v}, stopped at {stopped_at:?}: {body}"
            );
            assert!(body.get("fallback").is_none(), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the encoder was not resumed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every accepted event is in the event log, and onrec train learns from it.
    let log = data.join("events.jsonl");
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert_eq!(lines, 30 * 4 + 30 * 4 + 1, "one line per accepted event");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_onrec"))
        .args([
            "train", "--format", "events", "--epochs", "1", "--hidden", "16",
        ])
        .args(["--max-len", "8", "--layers", "1", "--interactions"])
        .arg(&log)
        .arg("--out")
        .arg(data.join("offline"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("offline").join("model.safetensors").exists());
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
}

#[tokio::test]
async fn a_graceful_restart_with_a_data_dir_keeps_users_dedupe_popularity_and_statistics() {
    let path = catalog(25);
    let data = empty_dir("state");
    // Bought items always hidden, so that the remembered purchase shows in the ranking.
    let args = [
        "--catalog",
        path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--hide-purchased",
        "always",
    ];
    let s = Server::start(&args);
    let served = recommend(&s, json!({"user_id": "u1", "n": 10})).await;
    let mut clicked = click("keep-1", "u1", "p7");
    clicked["request_id"] = served["request_id"].clone();
    let mut bought = click("keep-2", "u1", "p3");
    bought["type"] = json!("purchase");
    let (status, summary) = s.post("/v1/events", json!([clicked, bought])).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["accepted"], 2, "{summary}");
    let stats = |s: &Server| {
        let url = s.url("/v1/segments/default");
        let client = s.client.clone();
        async move {
            let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            (body["impressions"].clone(), body["reward"].clone())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    // 10 impressions, and the click (1) and the purchase (0.9 × 3) as rewards.
    while !matches!(stats(&s).await, (i, r) if i == json!(10.0) && r.as_f64().is_some_and(|r| r > 3.6))
    {
        assert!(
            Instant::now() < deadline,
            "impressions and rewards never recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = stats(&s).await;

    let s = s.restart(&args).await;
    // The statistics, as they were.
    assert_eq!(stats(&s).await, before);
    // The same event again is a duplicate.
    let (_, summary) = s
        .post("/v1/events", json!([click("keep-1", "u1", "p7")]))
        .await;
    assert_eq!(summary["duplicates"], 1, "{summary}");
    assert_eq!(summary["accepted"], 0, "{summary}");
    // The purchase is remembered: hidden from its buyer, and the most popular item for
    // everyone else (a purchase weighs 3, a click 1).
    let mine = recommend(&s, json!({"user_id": "u1", "n": 25})).await;
    assert!(
        mine["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["item_id"] != "p3"),
        "{mine}"
    );
    let theirs = recommend(&s, json!({"user_id": "u2", "n": 2})).await;
    assert_eq!(theirs["items"][0]["item_id"], "p3", "{theirs}");
    assert_eq!(theirs["items"][1]["item_id"], "p7", "{theirs}");
    assert!(data.join("state.json").exists());
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_killed_process_resumes_from_its_last_periodic_state() {
    let path = catalog(26);
    let data = empty_dir("kill");
    let args = [
        "--catalog",
        path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--state-interval",
        "1s",
    ];
    let s = Server::start(&args);
    let (_, summary) = s
        .post("/v1/events", json!([click("kill-1", "k1", "p5")]))
        .await;
    assert_eq!(summary["accepted"], 1, "{summary}");
    // Waits for a periodic save that holds the event (not a timing requirement).
    let state = data.join("state.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let saved: Option<Value> = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if saved.is_some_and(|v| v["seen_events"].as_array().is_some_and(|e| !e.is_empty())) {
            break;
        }
        assert!(Instant::now() < deadline, "no periodic state was written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.sigkill();
    let s = Server::start(&args);
    let (_, summary) = s
        .post("/v1/events", json!([click("kill-1", "k1", "p5")]))
        .await;
    assert_eq!(summary["duplicates"], 1, "{summary}");
    let _ = std::fs::remove_dir_all(&data);
}
