//! Fixed-rate load test of `POST /v1/recommend` against the real release binary.
//!
//! Open loop: requests are sent on a fixed schedule whatever the server does, and latency
//! is measured from each request's scheduled time, so a stalled server cannot hide its
//! queueing (no coordinated omission).
//!
//! `cargo bench --bench load -- --rate 500 --seconds 20 [--n 10] [--users 10000] [--warm 0.1]`;
//! ONREC_BIN picks another onrec binary, ONREC_LOAD_SERVER_ARGS adds server settings.
//! `--feedback F` posts a click for a share F of the responses (the learner then trains
//! during the run); `--ingest` instead posts event batches as fast as they are taken.
//! `--redis` keeps the bandit statistics in a `redis-server` of its own (`--redis aof`:
//! one that logs every write to an append-only file) and, at the end, compares the
//! impressions and rewards Redis holds with what the server served and attributed.

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/e2e/common.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use serde_json::json;

struct Args {
    rate: f64,
    seconds: f64,
    n: u32,
    users: u32,
    warm: f64,
    feedback: f64,
    ingest: bool,
    redis: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        rate: 500.0,
        seconds: 20.0,
        n: 10,
        users: 10_000,
        warm: 0.1,
        feedback: 0.0,
        ingest: false,
        redis: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--rate" => args.rate = value().parse().expect("--rate: a number"),
            "--seconds" => args.seconds = value().parse().expect("--seconds: a number"),
            "--n" => args.n = value().parse().expect("--n: an integer"),
            "--users" => args.users = value().parse().expect("--users: an integer"),
            "--warm" => args.warm = value().parse().expect("--warm: a fraction"),
            "--feedback" => args.feedback = value().parse().expect("--feedback: a fraction"),
            "--ingest" => args.ingest = true,
            "--redis" => {
                let kind = value();
                assert!(
                    kind == "plain" || kind == "aof",
                    "--redis: plain or aof, not {kind}"
                );
                args.redis = Some(kind);
            }
            "--bench" => {}
            other => panic!("unknown argument {other}; see the file's header"),
        }
    }
    args
}

/// Bucket lines of the server's own recommend latency histogram.
const RECOMMEND_BUCKETS: &str = r#"onrec_request_duration_seconds_bucket{transport="http",endpoint="recommend",outcome="ok",le=""#;

/// A quantile from a Prometheus histogram whose bucket lines start with `prefix` (up to
/// `le="`): the upper bound of the bucket where the quantile falls.
fn histogram_quantile(metrics: &str, prefix: &str, q: f64) -> Option<f64> {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                },
                count.trim().parse().ok()?,
            ))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

/// Posts batches of 100 click events from 4 concurrent clients for `seconds` and reports
/// the events per second the server accepted.
async fn ingest(server: &common::Server, args: &Args) {
    let url = server.url("/v1/events");
    let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..4u64 {
        let (client, url) = (server.client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            let mut k = 0u64;
            while Instant::now() < stop {
                let batch: Vec<serde_json::Value> = (0..100)
                    .map(|j| {
                        let user = format!("user-{}", (k * 100 + j) % 5000);
                        let item = format!("sku-{:05}", (k * 7 + j * 13) % 3000);
                        common::click(&format!("ing-{c}-{k}-{j}"), &user, &item)
                    })
                    .collect();
                k += 1;
                if let Ok(r) = client.post(&url).json(&batch).send().await
                    && let Ok(summary) = r.json::<serde_json::Value>().await
                {
                    accepted += summary["accepted"].as_u64().unwrap_or(0);
                }
            }
            accepted
        }));
    }
    let started = Instant::now();
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap_or(0);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ingest: {accepted} events accepted in {secs:.1}s = {:.0} events/s (batches of 100, 4 clients)",
        accepted as f64 / secs
    );
}

/// Impressions and reward over every segment in Redis.
async fn redis_totals(url: &str) -> (f64, f64) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("onrec:bandit:*:total")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (mut impressions, mut reward) = (0.0, 0.0);
    for key in keys {
        let (i, r): (Option<f64>, Option<f64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("i")
            .arg("r")
            .query_async(&mut conn)
            .await
            .unwrap();
        impressions += i.unwrap_or(0.0);
        reward += r.unwrap_or(0.0);
    }
    (impressions, reward)
}

/// Waits until the statistics in Redis stop changing, then prints them beside what the
/// server served (slots) and attributed (rewards), and what it dropped on the way.
async fn bandit_counts(server: &common::Server, url: &str) {
    let mut last = redis_totals(url).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = redis_totals(url).await;
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let (_, metrics) = server.get_text("/metrics").await;
    let served = common::metric(&metrics, "onrec_bandit_decisions_total");
    let rewarded = common::metric(&metrics, "onrec_bandit_reward_sum");
    let dropped = 0.0
        + common::metric(&metrics, "onrec_bandit_updates_dropped_total")
        + common::metric(&metrics, "onrec_bandit_store_dropped_updates_total")
        + common::metric(&metrics, "onrec_shared_writes_dropped_total");
    let (impressions, reward) = last;
    let verdict = |a: f64, b: f64| if a == b { "exact" } else { "DIFFERENT" };
    println!(
        "bandit counts in Redis: impressions {impressions} for {served} served ({}), reward {reward} for {rewarded} attributed ({}); updates dropped {dropped}",
        verdict(impressions, served),
        verdict(reward, rewarded),
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    // ONREC_LOAD_SERVER_ARGS adds server settings, e.g. "--device cuda --demo-items 100000".
    let extra = std::env::var("ONREC_LOAD_SERVER_ARGS").unwrap_or_default();
    let mut extra: Vec<&str> = extra.split_whitespace().collect();
    // Training at its shipped priority (the test helper otherwise runs it at normal).
    for flag in ["--encoder-priority", "--q-priority"] {
        if !extra.contains(&flag) {
            extra.extend([flag, "idle"]);
        }
    }
    let redis = args.redis.as_deref().map(|kind| match kind {
        "aof" => common::RedisServer::start_appendonly(),
        _ => common::RedisServer::start(),
    });
    let redis_url = redis.as_ref().map(common::RedisServer::url);
    if let Some(url) = &redis_url {
        extra.extend(["--redis-url", url.as_str()]);
    }
    let server = common::Server::start(&extra);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let url = server.url("/v1/recommend");

    // Give a share of the users (--warm, a tenth by default) some history, as feedback would.
    let events: Vec<_> = (0..(f64::from(args.users) * args.warm) as u32)
        .flat_map(|u| {
            (0..5).map(move |k| {
                common::click(
                    &format!("warm-{u}-{k}"),
                    &format!("user-{u}"),
                    &format!("sku-{:05}", (u * 7 + k * 13) % 3000),
                )
            })
        })
        .collect();
    for chunk in events.chunks(5000) {
        let (status, body) = server
            .post("/v1/events", serde_json::Value::Array(chunk.to_vec()))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    if extra.windows(2).any(|w| w == ["--demo-encoder", "true"]) {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let (_, body) = server
                .post("/v1/recommend", json!({"user_id": "user-0", "n": 1}))
                .await;
            if body["ranker"] == "transformer" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the demo encoder did not take over: {body}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Warm the connection pool and the server.
    for i in 0..200 {
        let body = json!({"user_id": format!("user-{i}"), "n": args.n});
        client.post(&url).json(&body).send().await.unwrap();
    }

    if args.ingest {
        ingest(&server, &args).await;
        return;
    }
    let total = (args.rate * args.seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, url, tx) = (client.clone(), url.clone(), tx.clone());
        let body =
            json!({"user_id": format!("user-{}", (i * 7919) % u64::from(args.users)), "n": args.n});
        // A share (--feedback) of the responses gets a click on its first item, sent after
        // the latency is taken, so that the learner trains while requests are measured.
        let feedback =
            args.feedback > 0.0 && (i as f64 * args.feedback).fract() + args.feedback >= 1.0;
        let events_url = server.url("/v1/events");
        tokio::spawn(async move {
            let answer: Option<serde_json::Value> = match client.post(&url).json(&body).send().await
            {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            };
            let _ = tx.send((scheduled.elapsed().as_secs_f64(), answer.is_some()));
            if let Some(a) = answer.filter(|_| feedback)
                && let Some(item) = a["items"][0]["item_id"].as_str()
            {
                let user = body["user_id"].as_str().unwrap_or("");
                let mut ev = common::click(&format!("fb-{i}"), user, item);
                ev["request_id"] = a["request_id"].clone();
                let _ = client.post(&events_url).json(&json!([ev])).send().await;
            }
        });
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0u64;
    while let Some((latency, ok)) = rx.recv().await {
        latencies.push(latency);
        errors += u64::from(!ok);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let ms = |p: f64| percentile(&latencies, p) * 1e3;
    println!(
        "POST /v1/recommend, n={}, {} users, open loop at {} req/s for {}s",
        args.n, args.users, args.rate, args.seconds
    );
    println!(
        "requests {total}  errors {errors}  achieved {:.0} req/s",
        total as f64 / elapsed
    );
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        ms(50.0),
        ms(90.0),
        ms(99.0),
        ms(99.9),
        latencies.last().copied().unwrap_or(f64::NAN) * 1e3
    );
    // Let the last feedback reach the learner before its counters are read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, metrics) = server.get_text("/metrics").await;
    let bound = |q| {
        histogram_quantile(&metrics, RECOMMEND_BUCKETS, q)
            .map_or("?".to_owned(), |s| format!("{:.3}", s * 1e3))
    };
    println!(
        "server-side (histogram bucket bounds) ms: p50 <= {}  p99 <= {}",
        bound(0.5),
        bound(0.99)
    );
    if let Some(url) = &redis_url {
        bandit_counts(&server, url).await;
    }
    let learner: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("onrec_learn_") && !l.contains('{'))
        .collect();
    if !learner.is_empty() {
        println!("learner: {}", learner.join("  "));
        let publish = |q| {
            histogram_quantile(
                &metrics,
                r#"onrec_learn_feedback_to_publish_seconds_bucket{le=""#,
                q,
            )
            .map_or("?".to_owned(), |s| format!("{s}"))
        };
        println!(
            "feedback to publish (bucket bounds) s: p50 <= {}  p99 <= {}",
            publish(0.5),
            publish(0.99)
        );
    }
}
