//! Encoder and retrieval speed: the encoder's forward pass per batch of users, the scoring
//! step (user vectors · item table) per batch and catalog size, with the bytes it reads so
//! that criterion reports its memory bandwidth, encode + top-100 for one user, and
//! encode + top-10 for one user through candle and through the CPU serving path, and one
//! step of the online encoder's training per catalog size. Weights
//! are random: speed does not depend on them. On CUDA it first checks that CPU and CUDA
//! compute the same user vectors.
//!
//! `cargo bench --bench encoder`; environment: ONREC_BENCH_DEVICE (cpu | cuda),
//! ONREC_BENCH_ITEMS (catalog sizes, default 10000,100000), ONREC_BENCH_BATCHES (default
//! 1,32,256), ONREC_BENCH_SHAPE (online: the online encoder's shape; default: a
//! checkpoint's).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use onrec_model::context::ContextIds;
use onrec_model::infer::{HostEncoder, TopK};
use onrec_model::sasrec::{Config, SasRec, init_seeded};
use onrec_model::serve::{Query, score_batch, user_vectors};

fn list(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var).map_or_else(
        |_| default.to_vec(),
        |v| {
            v.split(',')
                .map(|x| x.trim().parse().expect("a list of numbers"))
                .collect()
        },
    )
}

fn device() -> Device {
    let choice = std::env::var("ONREC_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    onrec_model::device::select(choice.parse().unwrap())
}

/// A seeded model on the CPU, and the same weights on `device`.
fn models(num_items: usize, device: &Device) -> (SasRec, SasRec) {
    let mut cfg = Config::for_items(num_items);
    if std::env::var("ONREC_BENCH_SHAPE").is_ok_and(|s| s == "online") {
        cfg = Config {
            max_len: 20,
            hidden: 32,
            layers: 1,
            ff: 64,
            ..cfg
        };
    }
    let varmap = VarMap::new();
    let cpu = SasRec::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    init_seeded(&varmap, 1).unwrap();
    let moved: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().to_device(device).unwrap()))
        .collect();
    let on_device =
        SasRec::load(VarBuilder::from_tensors(moved, DType::F32, device), &cfg).unwrap();
    (cpu, on_device)
}

fn queries(b: usize, num_items: usize) -> Vec<Query> {
    (0..b)
        .map(|u| Query {
            history: (0..50)
                .map(|i| ((u * 131 + i * 17) % num_items + 1) as u32)
                .collect(),
            context: ContextIds::from_parts(Some((u % 24) as u8), Some("mobile")),
            exclude: Vec::new(),
            k: 100,
            shift: None,
        })
        .collect()
}

fn agreement(device: &Device) {
    if device.is_cpu() {
        return;
    }
    let (cpu, gpu) = models(1682, device);
    let qs = queries(64, 1682);
    let refs: Vec<&Query> = qs.iter().collect();
    let a = user_vectors(&cpu, &Device::Cpu, &refs).unwrap();
    let b = user_vectors(&gpu, device, &refs)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("cpu vs {device:?}: max |difference| of 64 user vectors = {diff:e} (tolerance 1e-3)");
    assert!(diff < 1e-3, "CPU and GPU disagree");
}

fn encoder_forward(c: &mut Criterion) {
    let device = device();
    agreement(&device);
    let (_, m) = models(1682, &device);
    let mut group = c.benchmark_group("encoder_forward");
    for b in list("ONREC_BENCH_BATCHES", &[1, 32, 256]) {
        let qs = queries(b, 1682);
        let refs: Vec<&Query> = qs.iter().collect();
        group.throughput(Throughput::Elements(b as u64));
        group.bench_with_input(BenchmarkId::from_parameter(b), &refs, |bench, refs| {
            bench.iter(|| {
                let u = user_vectors(&m, &device, refs).unwrap();
                device.synchronize().unwrap();
                u
            });
        });
    }
    group.finish();
}

fn scoring(c: &mut Criterion) {
    let device = device();
    let mut group = c.benchmark_group("scoring");
    for items in list("ONREC_BENCH_ITEMS", &[10_000, 100_000]) {
        let table = Tensor::randn(0f32, 1.0, (items + 1, 64), &device).unwrap();
        for b in list("ONREC_BENCH_BATCHES", &[1, 32, 256]) {
            let users = Tensor::randn(0f32, 1.0, (b, 64), &device).unwrap();
            // The item table is read once per product: its size over the time is the bandwidth.
            group.throughput(Throughput::Bytes((items as u64 + 1) * 64 * 4));
            group.bench_with_input(
                BenchmarkId::new(format!("{items}_items"), b),
                &b,
                |bench, _| {
                    bench.iter(|| {
                        let s = users.matmul(&table.t().unwrap()).unwrap();
                        device.synchronize().unwrap();
                        s
                    });
                },
            );
        }
    }
    group.finish();
}

fn encode_and_retrieve(c: &mut Criterion) {
    let device = device();
    let mut group = c.benchmark_group("encode_and_top100_one_user");
    for items in list("ONREC_BENCH_ITEMS", &[10_000, 100_000]) {
        let (_, m) = models(items, &device);
        let qs = queries(1, items);
        let refs: Vec<&Query> = qs.iter().collect();
        group.bench_with_input(BenchmarkId::from_parameter(items), &items, |bench, _| {
            bench.iter(|| score_batch(&m, &device, &refs).unwrap());
        });
    }
    group.finish();
}

/// Encode + top-10 for one user, batch 1, on the CPU: candle's forward and product beside
/// the written-out serving path (`HostEncoder`), on the same weights. For the online
/// encoder's shape set ONREC_BENCH_SHAPE=online (width 32, 1 block, the last 20 items).
fn encode_and_top10(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_and_top10_one_user_cpu");
    for items in list("ONREC_BENCH_ITEMS", &[10_000, 100_000]) {
        let (m, _) = models(items, &Device::Cpu);
        let host = HostEncoder::of(&m).unwrap();
        let mut qs = queries(1, items);
        qs[0].k = 10;
        let refs: Vec<&Query> = qs.iter().collect();
        group.bench_with_input(BenchmarkId::new("candle", items), &items, |bench, _| {
            bench.iter(|| score_batch(&m, &Device::Cpu, &refs).unwrap());
        });
        group.bench_with_input(BenchmarkId::new("host", items), &items, |bench, _| {
            bench.iter(|| {
                let q = &qs[0];
                let user = host.head(&host.encode(&q.history), q.context);
                host.top_ks(&[TopK {
                    user: &user,
                    exclude: &q.exclude,
                    history: &q.history,
                    offsets: None,
                    k: q.k,
                }])
            });
        });
    }
    group.finish();
}

/// One step of the online encoder's training (default settings: batch 32, width 32, the
/// last 20 items, slates of 10) over catalogs of each size, to show how its cost grows
/// with the catalog. Interactions are added between timed steps whenever the trainer has
/// none pending.
fn online_training_step(c: &mut Criterion) {
    use onrec_model::online::{OnlineConfig, OnlineTrainer};
    use onrec_model::rng::SplitMix64;
    let mut group = c.benchmark_group("online_training_step_cpu");
    for items in list("ONREC_BENCH_ITEMS", &[10_000, 100_000]) {
        let categories: Vec<String> = (0..items).map(|i| format!("c{}", i % 50)).collect();
        let mut trainer =
            OnlineTrainer::new(OnlineConfig::default(), &categories, Device::Cpu).unwrap();
        let mut rng = SplitMix64::new(1);
        let mut user = 0u64;
        group.bench_with_input(BenchmarkId::from_parameter(items), &items, |bench, _| {
            bench.iter_custom(|iters| {
                let mut spent = std::time::Duration::ZERO;
                for _ in 0..iters {
                    while !trainer.pending() {
                        user += 1;
                        for _ in 0..5 {
                            let shown: Vec<u32> = (0..10)
                                .map(|_| 1 + rng.below(items as u64) as u32)
                                .collect();
                            trainer.observe(
                                &format!("u{}", user % 2000),
                                shown[0],
                                ContextIds::default(),
                                &shown,
                            );
                        }
                    }
                    let start = std::time::Instant::now();
                    trainer.step().unwrap();
                    spent += start.elapsed();
                }
                spent
            });
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    encoder_forward,
    scoring,
    encode_and_retrieve,
    encode_and_top10,
    online_training_step
);
criterion_main!(benches);
