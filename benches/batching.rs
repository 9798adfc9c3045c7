//! Dynamic batching on the CPU: throughput and latency of the encoder's request path
//! (encode the history, score the whole catalog, keep the top 100) with 64 concurrent
//! clients: without batching (max batch 1), and batching with several windows. A window of
//! 0 batches only what is already queued.
//!
//! `cargo bench --bench batching [-- --items 10000 --clients 64 --seconds 5]`

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use onrec_model::context::ContextIds;
use onrec_model::sasrec::{Config, SasRec, init_seeded};
use onrec_model::serve::{Batching, Encoder, Query};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn model(items: usize) -> SasRec {
    let varmap = VarMap::new();
    let m = SasRec::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &Config::for_items(items),
    )
    .unwrap();
    init_seeded(&varmap, 1).unwrap();
    m
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (items, clients, seconds) = (
        arg("--items", 10_000),
        arg("--clients", 64),
        arg("--seconds", 5),
    );
    println!("{clients} clients, {items} items, top 100, {seconds}s per setting");
    for (max_batch, window_us) in [(1usize, 0u64), (64, 0), (64, 200), (64, 1000), (64, 5000)] {
        let encoder = Encoder::start(
            model(items),
            Device::Cpu,
            4096,
            Batching {
                max_batch,
                window: Duration::from_micros(window_us),
            },
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (encoder, stop) = (encoder.clone(), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let query = Query {
                        history: (0..20)
                            .map(|k| ((c * 7919 + i * 31 + k * 17) % items + 1) as u32)
                            .collect(),
                        context: ContextIds::from_parts(Some((i % 24) as u8), None),
                        exclude: Vec::new(),
                        k: 100,
                        shift: None,
                    };
                    let t = Instant::now();
                    encoder.top_k(query).await.unwrap();
                    latencies.push(t.elapsed().as_secs_f64());
                    i += 1;
                }
                latencies
            }));
        }
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds as u64)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all: Vec<f64> = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort_by(f64::total_cmp);
        let q = |p: f64| all[((p * all.len() as f64) as usize).min(all.len() - 1)] * 1e3;
        println!(
            "max batch {max_batch:>2}, window {window_us:>5} us: {:>7.0} requests/s   latency p50 {:>7.2} ms  p99 {:>7.2} ms",
            all.len() as f64 / elapsed,
            q(0.5),
            q(0.99)
        );
    }
}
