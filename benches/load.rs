//! Fixed-rate load test of `POST /v1/recommend` against the real release binary.
//!
//! Open loop: requests are sent on a fixed schedule whatever the server does, and latency
//! is measured from each request's scheduled time, so a stalled server cannot hide its
//! queueing (no coordinated omission).
//!
//! `cargo bench --bench load -- --rate 500 --seconds 20 [--n 10] [--users 10000] [--warm 0.1]`;
//! ONREC_BIN picks another onrec binary, ONREC_LOAD_SERVER_ARGS adds server settings.

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
}

fn parse_args() -> Args {
    let mut args = Args {
        rate: 500.0,
        seconds: 20.0,
        n: 10,
        users: 10_000,
        warm: 0.1,
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
            "--bench" => {}
            other => panic!("unknown argument {other}; see the file's header"),
        }
    }
    args
}

/// The server's own latency quantile from its Prometheus histogram: the upper bound of
/// the bucket where the quantile falls.
fn server_quantile(metrics: &str, q: f64) -> Option<f64> {
    let prefix = r#"onrec_request_duration_seconds_bucket{transport="http",endpoint="recommend",outcome="ok",le=""#;
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
    let extra: Vec<&str> = extra.split_whitespace().collect();
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
        tokio::spawn(async move {
            let ok = match client.post(&url).json(&body).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            let _ = tx.send((scheduled.elapsed().as_secs_f64(), ok));
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
    let (_, metrics) = server.get_text("/metrics").await;
    let bound =
        |q| server_quantile(&metrics, q).map_or("?".to_owned(), |s| format!("{:.3}", s * 1e3));
    println!(
        "server-side (histogram bucket bounds) ms: p50 <= {}  p99 <= {}",
        bound(0.5),
        bound(0.99)
    );
}
