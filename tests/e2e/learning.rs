//! Online learning through the real binary: feedback that keeps rewarding one item in one
//! context makes the Q-network rank it up there, and a restart resumes what was learned.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Server, click};

fn version_of(body: &Value) -> Option<u64> {
    body["model_version"]
        .as_str()?
        .split("+q")
        .nth(1)?
        .parse()
        .ok()
}

async fn rank_of(s: &Server, user: &str, hour: u32, item: &str) -> (Option<usize>, Value) {
    let (status, body) = s
        .post(
            "/v1/recommend",
            json!({"user_id": user, "n": 5, "context": {"hour": hour}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let pos = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .position(|i| i["item_id"] == item);
    (pos, body)
}

/// The Q-network weights version the server last published, from its metrics.
async fn weights_version(s: &Server) -> f64 {
    let (_, metrics) = s.get_text("/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("onrec_learn_weights_version "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits (at most a generous minute) until weights newer than `after` are published.
async fn next_weights(s: &Server, after: f64) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = weights_version(s).await;
        if now > after {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new Q weights within a minute (still version {now})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rewarded_item_climbs_in_its_context_and_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("onrec-learner-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = [
        "--learner",
        "live",
        "--q-weight",
        "1.0",
        "--q-min-updates",
        "50",
        "--candidates",
        "30",
        "--demo-items",
        "200",
        "--learner-dir",
        dir.to_str().unwrap(),
        // Clicks must not move popularity here: only the Q-network may move the item.
        "--weight-click",
        "0",
    ];
    let s = Server::start(&args);
    let (_, first) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "probe", "n": 30, "context": {"hour": 9}}),
        )
        .await;
    let target = first["items"][24]["item_id"].as_str().unwrap().to_owned();
    assert_eq!(
        rank_of(&s, "before", 9, &target).await.0,
        None,
        "the target starts outside the top 5"
    );

    // One click per response on the target, for new users at 9 o'clock. The guard bounds
    // the number of events; the assertion is that it climbs within them.
    let mut climbed = None;
    let mut published = weights_version(&s).await;
    for round in 0..400 {
        let user = format!("learner-{round}");
        let (_, body) = s
            .post(
                "/v1/recommend",
                json!({"user_id": user, "n": 30, "context": {"hour": 9}}),
            )
            .await;
        let mut ev = click(&format!("q-{round}"), &user, &target);
        ev["request_id"] = body["request_id"].clone();
        let (status, summary) = s.post("/v1/events", json!([ev])).await;
        assert_eq!(
            (status, summary["accepted"].clone()),
            (200, json!(1)),
            "{summary}"
        );
        if round % 10 == 9 {
            // Checked once the learner has published weights trained after these events,
            // however busy the machine is.
            published = next_weights(&s, published).await;
            let (pos, body) = rank_of(&s, &format!("check-{round}"), 9, &target).await;
            if pos.is_some() {
                climbed = Some((round + 1, version_of(&body)));
                break;
            }
        }
    }
    let (events, version) =
        climbed.expect("the rewarded item never reached the top 5 in 400 events");
    let version = version.expect("a live Q version in model_version");
    println!("the target reached the top 5 after {events} clicks (Q weights version {version})");
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(metrics.contains("onrec_learn_updates_total"), "{metrics}");

    let s = s.restart(&args).await;
    let (pos, body) = rank_of(&s, "after-restart", 9, &target).await;
    assert!(pos.is_some(), "the learned ranking was not resumed: {body}");
    assert!(version_of(&body).is_some_and(|v| v >= version), "{body}");
    std::fs::remove_dir_all(&dir).unwrap();
}
