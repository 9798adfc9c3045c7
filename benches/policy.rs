//! Latency the exploration step adds to a request: `Explorer::rerank` of 50 candidates
//! into 10 slots, per policy, with statistics in memory and in a real Redis (its own
//! `redis-server` on a free port, behind the resilient wrapper as in the service).
//!
//! `cargo bench --bench policy`

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/e2e/common.rs"]
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::Instant;

use onrec_policy::{
    BanditStore, Candidate, Explorer, MemoryStore, PolicyConfig, RedisConfig, RedisStore,
    ResilientConfig, ResilientStore, SegmentConfig, StatUpdate, StatsConfig,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;

const ROUNDS: usize = 3000;

fn policies() -> Vec<PolicyConfig> {
    vec![
        PolicyConfig::Greedy {},
        PolicyConfig::epsilon_greedy(0.1),
        PolicyConfig::EpsilonGreedy {
            epsilon: 0.1,
            epsilon_min: 0.01,
            decay_impressions: Some(10_000.0),
        },
        PolicyConfig::ucb1(1.0),
        PolicyConfig::thompson(1.0, 1.0, 200),
    ]
}

async fn measure(store: Arc<dyn BanditStore>, label: &str) {
    let candidates: Vec<Candidate> = (0..50)
        .map(|i| Candidate::new(format!("sku-{i:05}"), 100.0 - f64::from(i)))
        .collect();
    let warm: Vec<StatUpdate> = candidates
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            [
                StatUpdate::impression("bench", c.item_id.clone()),
                StatUpdate::reward("bench", c.item_id.clone(), (i % 3) as f64),
            ]
        })
        .collect();
    store.record(&warm).await.unwrap();
    for policy in policies() {
        let mut segments = SegmentConfig::default();
        segments.policies.insert("bench".into(), policy.clone());
        let explorer = Explorer::new(segments, Arc::clone(&store)).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut times = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let slate = explorer
                .rerank("bench", (&candidates, true), 10, &mut rng)
                .await;
            times.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(!slate.fallback);
        }
        times.sort_by(f64::total_cmp);
        let q = |p: f64| times[((p * times.len() as f64) as usize).min(times.len() - 1)];
        let kind = if matches!(
            policy,
            PolicyConfig::EpsilonGreedy {
                decay_impressions: Some(_),
                ..
            }
        ) {
            "epsilon_greedy (decaying)"
        } else {
            policy.kind()
        };
        println!(
            "{label:<6} {kind:<26} p50 {:>8.1} us   p99 {:>8.1} us",
            q(0.50),
            q(0.99)
        );
    }
}

#[tokio::main]
async fn main() {
    measure(
        Arc::new(MemoryStore::new(StatsConfig::default()).unwrap()),
        "memory",
    )
    .await;
    let redis = common::RedisServer::start();
    let store = RedisStore::new(RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    })
    .unwrap();
    let store = Arc::new(ResilientStore::new(
        Arc::new(store),
        ResilientConfig::default(),
    ));
    assert!(store.check().await, "redis answers");
    measure(store, "redis").await;
}
