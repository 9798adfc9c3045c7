//! Encoder and retrieval speed: the encoder's forward pass per batch of users, the scoring
//! step (user vectors · item table) per batch and catalog size, with the bytes it reads so
//! that criterion reports its memory bandwidth, and encode + top-100 for one user. Weights
//! are random: speed does not depend on them. On CUDA it first checks that CPU and CUDA
//! compute the same user vectors.
//!
//! `cargo bench --bench encoder`; environment: ONREC_BENCH_DEVICE (cpu | cuda),
//! ONREC_BENCH_ITEMS (catalog sizes, default 10000,100000), ONREC_BENCH_BATCHES (default
//! 1,32,256).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use onrec_model::context::ContextIds;
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
    let cfg = Config::for_items(num_items);
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

criterion_group!(benches, encoder_forward, scoring, encode_and_retrieve);
criterion_main!(benches);
