//! Serving speed over HTTP, side by side in one run: the real release binary as shipped
//! (its default configuration over a catalog of `--items` items) and a bare axum server
//! built here that answers every request with a top-n-sized JSON body and does no work.
//!
//! Before measuring, every user gets a history (5 clicks) and then clicks the first item
//! of a served response, until the online encoder ranks them and the Q-network re-scores
//! (`model_version` ends in `+q…`): each measured request takes the whole path, encoder →
//! Q re-score → policy. Closed loop: each of `--connections` clients sends its next
//! request when the last one is answered, for `--seconds`; both servers get the same
//! clients, on the same machine, one after the other.
//!
//! With `--ingest-rate R`, it then measures one connection again while click events are
//! posted at R events/s (batches of 100; the encoder trains on them as they come).
//!
//! `cargo bench --bench serving -- [--items 100000] [--connections 1,32] [--seconds 10]
//! [--users 1000] [--n 10] [--ingest-rate 50000]`; ONREC_BIN picks another onrec binary, ONREC_LOAD_SERVER_ARGS
//! adds server settings.

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/e2e/common.rs"]
#[allow(dead_code)]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    items: usize,
    connections: Vec<usize>,
    seconds: f64,
    users: usize,
    n: u32,
    ingest_rate: f64,
}

fn parse_args() -> Args {
    let mut args = Args {
        items: 100_000,
        connections: vec![1, 32],
        seconds: 10.0,
        users: 1000,
        n: 10,
        ingest_rate: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--items" => args.items = value().parse().expect("--items: an integer"),
            "--connections" => {
                args.connections = value()
                    .split(',')
                    .map(|c| c.trim().parse().expect("--connections: integers"))
                    .collect();
            }
            "--seconds" => args.seconds = value().parse().expect("--seconds: a number"),
            "--users" => args.users = value().parse().expect("--users: an integer"),
            "--n" => args.n = value().parse().expect("--n: an integer"),
            "--ingest-rate" => {
                args.ingest_rate = value().parse().expect("--ingest-rate: events per second");
            }
            "--bench" => {}
            other => panic!("unknown argument {other}; see the file's header"),
        }
    }
    assert!(args.items >= 100, "--items: at least 100");
    args
}

/// A catalog file of `items` items in 20 categories.
fn write_catalog(items: usize, path: &std::path::Path) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..items {
        let line = json!({
            "item_id": sku(i),
            "category": format!("category-{}", i % 20),
            "title": format!("Product {i}"),
        });
        writeln!(out, "{line}").unwrap();
    }
    out.flush().unwrap();
}

fn sku(i: usize) -> String {
    format!("sku-{i:07}")
}

fn user(u: usize) -> String {
    format!("user-{u}")
}

/// Gives every user a history, then has them click what they are served (with its
/// `request_id`) until the encoder ranks them and the Q-network re-scores; returns the
/// last response.
async fn warm(server: &common::Server, args: &Args) -> Value {
    let events: Vec<Value> = (0..args.users)
        .flat_map(|u| {
            (0..5).map(move |k| {
                common::click(
                    &format!("warm-{u}-{k}"),
                    &user(u),
                    &sku((u * 7919 + k * 104_729) % args.items),
                )
            })
        })
        .collect();
    for chunk in events.chunks(5000) {
        let (status, body) = server
            .post("/v1/events", Value::Array(chunk.to_vec()))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut round = 0usize;
    loop {
        let u = round % args.users;
        let (status, body) = server
            .post("/v1/recommend", json!({"user_id": user(u), "n": args.n}))
            .await;
        if status == 200 {
            let version = body["model_version"].as_str().unwrap_or_default();
            if body["ranker"] == "transformer" && version.contains("+q") {
                return body;
            }
            if let Some(item) = body["items"][0]["item_id"].as_str() {
                let mut click = common::click(&format!("round-{round}"), &user(u), item);
                click["request_id"] = body["request_id"].clone();
                server.post("/v1/events", json!([click])).await;
            }
        }
        assert!(
            Instant::now() < deadline,
            "after 10 minutes of feedback the encoder and the Q-network do not rank yet: {body}"
        );
        round += 1;
    }
}

/// Waits (at most 5 minutes) until the encoder and the Q-network have trained on all
/// the feedback, so that requests are measured on their own; returns the seconds waited.
async fn learners_at_rest(server: &common::Server) -> f64 {
    let started = Instant::now();
    let steps = async || {
        let (_, m) = server.get_text("/metrics").await;
        (
            common::metric(&m, "onrec_encoder_online_steps_total"),
            common::metric(&m, "onrec_learn_updates_total"),
        )
    };
    let mut last = steps().await;
    while started.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = steps().await;
        if now == last {
            break;
        }
        last = now;
    }
    started.elapsed().as_secs_f64()
}

/// What one closed-loop run measured.
struct Run {
    requests: usize,
    errors: usize,
    seconds: f64,
    latencies: Vec<f64>,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1] * 1e3
    }
}

/// `connections` clients, each on its own connection, post recommend requests for the
/// users in turn for `seconds`.
async fn closed_loop(url: &str, args: &Args, seconds: f64, connections: usize) -> Run {
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        let (url, users, n) = (url.to_owned(), args.users, args.n);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut i = c;
            while Instant::now() < stop {
                let body = json!({"user_id": user(i % users), "n": n});
                i += connections;
                let sent = Instant::now();
                let ok = match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                latencies.push(sent.elapsed().as_secs_f64());
                errors += usize::from(!ok);
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Run {
        requests: latencies.len(),
        errors,
        seconds,
        latencies,
    }
}

/// A bare axum server on its own runtime (as many worker threads as onrec's) that
/// answers every `POST /v1/recommend` with `body`.
fn bare_axum(body: Value) -> std::net::SocketAddr {
    let body: Arc<[u8]> = Arc::from(serde_json::to_vec(&body).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/recommend",
                axum::routing::post(move |_: axum::body::Bytes| {
                    let body = body.clone();
                    async move {
                        (
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            body.to_vec(),
                        )
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let dir = std::env::temp_dir().join(format!("onrec-serving-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let catalog = dir.join("catalog.jsonl");
    write_catalog(args.items, &catalog);
    let extra = std::env::var("ONREC_LOAD_SERVER_ARGS").unwrap_or_default();
    let catalog_arg = catalog.display().to_string();
    // The shipped defaults (the test helper otherwise turns learning off), over the catalog.
    let mut server_args = vec![
        "--catalog",
        catalog_arg.as_str(),
        "--encoder-online",
        "true",
        "--policy",
        "thompson",
        "--learner",
        "live",
        "--encoder-priority",
        "idle",
        "--q-priority",
        "idle",
    ];
    server_args.extend(extra.split_whitespace());
    let server = common::Server::start(&server_args);
    let warming = Instant::now();
    let sample = warm(&server, &args).await;
    println!(
        "onrec over {} items, {} users with a history; encoder and Q-network rank after {:.0} s of feedback ({})",
        args.items,
        args.users,
        warming.elapsed().as_secs_f64(),
        sample["model_version"].as_str().unwrap_or_default(),
    );
    println!(
        "the learners rested after {:.0} s more",
        learners_at_rest(&server).await
    );
    let bare = bare_axum(sample);
    let onrec_url = server.url("/v1/recommend");
    let bare_url = format!("http://{bare}/v1/recommend");
    // Warm both servers and their connections.
    closed_loop(&onrec_url, &args, 1.0, 4).await;
    closed_loop(&bare_url, &args, 1.0, 4).await;
    println!(
        "| connections | onrec req/s | onrec p50 ms | onrec p99 ms | bare axum req/s | bare axum p50 ms | ratio | errors |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for &c in &args.connections {
        let ours = closed_loop(&onrec_url, &args, args.seconds, c).await;
        let theirs = closed_loop(&bare_url, &args, args.seconds, c).await;
        println!(
            "| {c} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.1}% | {} |",
            ours.per_second(),
            ours.ms(50.0),
            ours.ms(99.0),
            theirs.per_second(),
            theirs.ms(50.0),
            100.0 * ours.per_second() / theirs.per_second(),
            ours.errors + theirs.errors,
        );
    }
    if args.ingest_rate > 0.0 {
        let alone = closed_loop(&onrec_url, &args, args.seconds, 1).await;
        let (during, accepted) = while_ingesting(&server, &onrec_url, &args).await;
        println!(
            "1 connection while {:.0} events/s were taken (batches of 100): p50 {:.2} ms, p99 {:.2} ms; alone just before: p50 {:.2} ms, p99 {:.2} ms ({:.2}× the p99)",
            accepted,
            during.ms(50.0),
            during.ms(99.0),
            alone.ms(50.0),
            alone.ms(99.0),
            during.ms(99.0) / alone.ms(99.0),
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A closed loop of one connection while click events are posted at `--ingest-rate` (open
/// loop, batches of 100, for new and known users); returns it and the events/s taken.
async fn while_ingesting(server: &common::Server, url: &str, args: &Args) -> (Run, f64) {
    let events = server.url("/v1/events");
    let interval = Duration::from_secs_f64(100.0 / args.ingest_rate);
    let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
    let client = reqwest::Client::new();
    let (items, users) = (args.items, args.users * 10);
    let ingest = tokio::spawn(async move {
        let started = Instant::now();
        let mut posts = Vec::new();
        let mut k = 0usize;
        while Instant::now() < stop {
            tokio::time::sleep_until((started + interval.mul_f64(k as f64)).into()).await;
            let batch: Vec<Value> = (0..100)
                .map(|j| {
                    let n = k * 100 + j;
                    common::click(
                        &format!("ingest-{n}"),
                        &user(n * 7 % users),
                        &sku(n * 104_729 % items),
                    )
                })
                .collect();
            let (client, events) = (client.clone(), events.clone());
            posts.push(tokio::spawn(async move {
                match client.post(&events).json(&batch).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["accepted"].as_u64()),
                    Err(_) => None,
                }
                .unwrap_or(0)
            }));
            k += 1;
        }
        let mut accepted = 0;
        for p in posts {
            accepted += p.await.unwrap_or(0);
        }
        accepted as f64 / started.elapsed().as_secs_f64()
    });
    let run = closed_loop(url, args, args.seconds, 1).await;
    (run, ingest.await.unwrap())
}
