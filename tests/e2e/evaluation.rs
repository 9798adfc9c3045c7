//! Evaluation: the decision log written to rotating files and to a Redis stream, and
//! off-policy estimates over HTTP, gRPC and `onrec ope` on the written files.

use std::process::Command;
use std::time::Duration;

use onrec_proto::v1 as pb;
use serde_json::{Value, json};

use crate::common::{RedisServer, Server, item_ids};

/// Serves `users` one slate of 3 each and clicks the second slot of every other one.
async fn traffic(s: &Server, users: usize) -> usize {
    let mut clicks = 0;
    for u in 0..users {
        let user = format!("u{u}");
        let (status, body) = s
            .post("/v1/recommend", json!({"user_id": user, "n": 3}))
            .await;
        assert_eq!(status, 200, "{body}");
        if u % 2 == 0 {
            let item = &item_ids(&body)[1];
            let click = json!({"event_id": format!("c{u}"), "user_id": user, "item_id": item,
                "type": "click", "request_id": body["request_id"]});
            let (status, summary) = s.post("/v1/events", json!([click])).await;
            assert_eq!(status, 200, "{summary}");
            clicks += 1;
        }
    }
    clicks
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

// Multi-threaded: the gRPC channel's connection task must run to answer the server's
// GOAWAY while this thread waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_log_rotates_on_disk_and_feeds_off_policy_estimates() {
    let dir = std::env::temp_dir().join(format!("onrec-e2e-dlog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("decisions.jsonl");
    let path_arg = path.to_str().unwrap();
    let mut s = Server::start(&[
        "--policy",
        "epsilon_greedy",
        "--epsilon",
        "0.5",
        "--candidates",
        "10",
        "--decision-log",
        "file",
        "--decision-log-path",
        path_arg,
        "--decision-log-max-bytes",
        "8000",
    ]);
    let (status, body) = s
        .post("/v1/ope", json!({"policy": {"kind": "greedy"}}))
        .await;
    assert_eq!(status, 409, "nothing logged yet: {body}");
    assert_eq!(body["code"], "failed_precondition");

    let clicks = traffic(&s, 40).await;

    // The logging policy as the target: every weight is 1, so IPS is the observed value.
    let same = json!({"policy": {"kind": "epsilon_greedy", "epsilon": 0.5}, "seed": 3});
    let (status, report) = s.post("/v1/ope", same).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["counts"]["decisions"], 40);
    assert_eq!(report["counts"]["rewards"], clicks);
    let logged = f(&report["per_decision"]["logged"]["value"]);
    assert!((logged - clicks as f64 / 40.0).abs() < 1e-9, "{report}");
    assert!((f(&report["per_decision"]["ips"]["value"]) - logged).abs() < 1e-9);
    let ips = &report["per_decision"]["ips"];
    assert!(f(&ips["low"]) <= f(&ips["value"]) && f(&ips["value"]) <= f(&ips["high"]));

    // gRPC runs the same estimators on the same log.
    let mut grpc = s.grpc().await;
    let answer = grpc
        .evaluate_policy(pb::EvaluatePolicyRequest {
            policy: Some(pb::PolicyConfig {
                kind: Some(pb::policy_config::Kind::EpsilonGreedy(
                    pb::EpsilonGreedyPolicy {
                        epsilon: 0.5,
                        ..Default::default()
                    },
                )),
            }),
            seed: Some(3),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.decisions, 40);
    let grpc_ips = answer.per_decision.unwrap().ips.unwrap();
    assert_eq!(grpc_ips.value, f(&ips["value"]));
    assert_eq!(
        (grpc_ips.low, grpc_ips.high),
        (f(&ips["low"]), f(&ips["high"]))
    );

    // Bad candidates are named.
    for (body, field) in [
        (json!({"policy": {"kind": "softmax"}}), "policy"),
        (
            json!({"policy": {"kind": "greedy"}, "confidence": 2}),
            "confidence",
        ),
        (
            json!({"policy": {"kind": "greedy"}, "segments": {"m": {"kind": "epsilon_greedy", "epsilon": 3}}}),
            "segments.m.epsilon",
        ),
    ] {
        let (status, err) = s.post("/v1/ope", body).await;
        assert_eq!(status, 400, "{err}");
        assert!(
            err["field"].as_str().unwrap().starts_with(field),
            "{err} should name {field}"
        );
    }
    let status = grpc
        .evaluate_policy(pb::EvaluatePolicyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Shutdown flushes the log; the files hold every decision and reward, rotated.
    s.terminate();
    let exit = s.wait(Duration::from_secs(20));
    assert!(
        exit.is_some_and(|st| st.success()),
        "{exit:?}: {:#?}",
        s.drain_log()
    );
    let rotated = std::fs::read_dir(&dir).unwrap().count() - 1;
    assert!(
        rotated >= 2,
        "the 8000-byte limit rotated the file ({rotated})"
    );
    let out = ope_cli(&[
        "--log",
        path_arg,
        "--policy",
        r#"{"policy": {"kind": "epsilon_greedy", "epsilon": 0.5}}"#,
    ]);
    assert_eq!(out["counts"]["decisions"], 40, "{out}");
    assert_eq!(out["counts"]["rewards"], clicks);
    assert!((f(&out["per_decision"]["ips"]["value"]) - logged).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small fresh shop simulated with the service as shipped, its decision logs in `dir`:
/// the report, and the request ids of the `onrec` log in order.
fn simulate_small_shop(dir: &std::path::Path) -> (Value, Vec<String>) {
    let _ = std::fs::remove_dir_all(dir);
    let dir_arg = dir.display().to_string();
    let mut report = onrec_json(&[
        "simulate",
        "--scenario",
        "fresh",
        "--rounds",
        "300",
        "--users",
        "60",
        "--items",
        "40",
        "--categories",
        "4",
        "--policies",
        "uniform,onrec",
        "--json",
        "--log-dir",
        &dir_arg,
    ]);
    for policy in report["policies"].as_array_mut().unwrap() {
        policy.as_object_mut().unwrap().remove("wall_seconds");
    }
    let ids = std::fs::read_to_string(dir.join("onrec.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["type"] == "decision")
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    (report, ids)
}

#[test]
fn a_simulated_fresh_shop_logs_the_shipped_service_for_ope_and_replays_exactly() {
    let dir = std::env::temp_dir().join(format!("onrec-sim-log-{}", std::process::id()));
    let (report, ids) = simulate_small_shop(&dir);
    let onrec = &report["policies"][1];
    assert_eq!(
        (&onrec["policy"], &onrec["rounds"]),
        (&json!("onrec"), &json!(300))
    );
    // What the served slots' click logits were made of, term by term.
    for term in ["appeal", "taste", "affinity", "context"] {
        assert!(
            onrec["logit_terms"][term]
                .as_f64()
                .is_some_and(f64::is_finite),
            "{term}: {onrec}"
        );
    }
    // The service as shipped wrote a decision per round; the log takes `onrec ope`.
    let log = dir.join("onrec.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let decisions = text
        .lines()
        .filter(|l| l.contains(r#""type":"decision""#))
        .count();
    assert_eq!(decisions, 300);
    let estimate = ope_cli(&[
        "--log",
        &log.display().to_string(),
        "--policy",
        r#"{"policy": {"kind": "greedy"}}"#,
    ]);
    assert_eq!(estimate["counts"]["decisions"], 300, "{estimate}");
    let rewards = estimate["counts"]["rewards"].as_u64().unwrap();
    assert!(
        rewards >= onrec["clicks"].as_u64().unwrap(),
        "every click is a reward: {estimate}"
    );
    assert_eq!(estimate["counts"]["orphan_rewards"], 0, "{estimate}");
    // The same seed replays the run exactly: the same requests, slates, clicks, learning.
    let again = dir.with_extension("again");
    let (replayed, replayed_ids) = simulate_small_shop(&again);
    assert_eq!(replayed, report);
    assert_eq!(replayed_ids, ids);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&again).unwrap();
}

/// `onrec ope ARGS --json`, parsed.
fn ope_cli(args: &[&str]) -> Value {
    let mut all = vec!["ope"];
    all.extend_from_slice(args);
    all.push("--json");
    onrec_json(&all)
}

/// `onrec ARGS`, which must succeed, its output parsed as JSON.
fn onrec_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_onrec"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onrec {} failed: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_decision_log_goes_to_a_capped_redis_stream() {
    let redis = RedisServer::start();
    let mut s = Server::start(&[
        "--redis-url",
        &redis.url(),
        "--decision-log",
        "redis",
        "--decision-log-stream",
        "test:decisions",
    ]);
    let clicks = traffic(&s, 6).await;
    s.terminate();
    assert!(
        s.wait(Duration::from_secs(20))
            .is_some_and(|st| st.success())
    );
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--raw",
            "XRANGE",
            "test:decisions",
            "-",
            "+",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let records: Vec<Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |t: &str| records.iter().filter(|r| r["type"] == t).count();
    assert_eq!((count("decision"), count("reward")), (6, clicks), "{text}");

    // `onrec ope` reads the stream back.
    let url = redis.url();
    let report = ope_cli(&[
        "--format",
        "redis",
        "--log",
        &url,
        "--stream",
        "test:decisions",
        "--policy",
        r#"{"policy": {"kind": "greedy"}}"#,
    ]);
    assert_eq!(report["counts"]["decisions"], 6, "{report}");
    assert_eq!(report["counts"]["rewards"], clicks);
    // And through a Sentinel that names the server, as the service can be told.
    let sentinel = RedisServer::start_sentinel(&redis);
    let through = format!("redis+sentinel://127.0.0.1:{}/shop", sentinel.port);
    let again = ope_cli(&[
        "--format",
        "redis",
        "--log",
        &through,
        "--stream",
        "test:decisions",
        "--policy",
        r#"{"policy": {"kind": "greedy"}}"#,
    ]);
    assert_eq!(again["counts"], report["counts"], "{again}");

    // A sink that needs Redis without a URL is refused at start, naming the setting.
    let err = Server::try_start(&["--decision-log", "redis"])
        .err()
        .unwrap();
    assert!(err.contains("redis_url"), "{err}");
}
