//! Encoder and retrieval speed on the CPU: the encoder's forward pass for batches of 1, 32
//! and 256 users, and top-K retrieval (user vector · item table, then the top 100) over
//! catalogs of 10k and 100k items. Weights are random: speed does not depend on them.
//!
//! `cargo bench --bench encoder`

#![allow(clippy::unwrap_used, missing_docs)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use onrec_model::context::ContextIds;
use onrec_model::sasrec::{Config, SasRec, init_seeded};
use onrec_model::serve::{Query, score_batch, top_k, user_vectors};

fn model(num_items: usize) -> SasRec {
    let varmap = VarMap::new();
    let model = SasRec::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &Config::for_items(num_items),
    )
    .unwrap();
    init_seeded(&varmap, 1).unwrap();
    model
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
        })
        .collect()
}

fn encoder_forward(c: &mut Criterion) {
    let m = model(1682);
    let mut group = c.benchmark_group("encoder_forward");
    for b in [1usize, 32, 256] {
        let qs = queries(b, 1682);
        let refs: Vec<&Query> = qs.iter().collect();
        group.throughput(Throughput::Elements(b as u64));
        group.bench_with_input(BenchmarkId::from_parameter(b), &refs, |bench, refs| {
            bench.iter(|| user_vectors(&m, &Device::Cpu, refs).unwrap());
        });
    }
    group.finish();
}

fn retrieval(c: &mut Criterion) {
    let mut group = c.benchmark_group("top_k_retrieval");
    for items in [10_000usize, 100_000] {
        let table = Tensor::randn(0f32, 1.0, (items + 1, 64), &Device::Cpu).unwrap();
        let user = Tensor::randn(0f32, 1.0, (1, 64), &Device::Cpu).unwrap();
        group.throughput(Throughput::Elements(items as u64));
        group.bench_with_input(BenchmarkId::from_parameter(items), &items, |bench, _| {
            bench.iter(|| {
                let scores = user
                    .matmul(&table.t().unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                top_k(scores, &[], 100)
            });
        });
    }
    group.finish();
}

fn recommend_end_to_end(c: &mut Criterion) {
    let m = model(10_000);
    let qs = queries(1, 10_000);
    let refs: Vec<&Query> = qs.iter().collect();
    c.bench_function("encode_and_retrieve_10k_items_batch_1", |bench| {
        bench.iter(|| score_batch(&m, &Device::Cpu, &refs).unwrap());
    });
}

criterion_group!(benches, encoder_forward, retrieval, recommend_end_to_end);
criterion_main!(benches);
