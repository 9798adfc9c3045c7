//! Bandit simulations: Bernoulli arms with known means, statistics in the memory store.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use onrec_policy::{
    BanditStore, Candidate, Explorer, MemoryStore, Policy, PolicyConfig, SegmentConfig, StatUpdate,
    StatsConfig,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Click probabilities of the candidates, in ranking order: the ranker is wrong, the best
/// item (0.8) is third.
const MEANS: [f64; 5] = [0.3, 0.1, 0.8, 0.2, 0.4];
const BEST: &str = "item-2";

fn candidates() -> Vec<Candidate> {
    (0..MEANS.len())
        .map(|i| Candidate::new(format!("item-{i}"), (MEANS.len() - i) as f64))
        .collect()
}

/// Plays `rounds` one-slot rounds; returns the item shown in each.
async fn simulate(config: PolicyConfig, rounds: usize, seed: u64) -> Vec<String> {
    let store = MemoryStore::new(StatsConfig::default()).unwrap();
    let policy = Policy::from_config(&config).unwrap();
    let cands = candidates();
    let ids: Vec<&str> = cands.iter().map(|c| c.item_id.as_str()).collect();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut shown = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let stats = store.fetch("sim", &ids).await.unwrap();
        let slot = policy.select(&cands, &stats, 1, &mut rng).remove(0);
        let i: usize = slot.item_id["item-".len()..].parse().unwrap();
        let reward = if rng.random::<f64>() < MEANS[i] {
            1.0
        } else {
            0.0
        };
        let updates = [
            StatUpdate::impression("sim", &slot.item_id),
            StatUpdate::reward("sim", &slot.item_id, reward),
        ];
        store.record(&updates).await.unwrap();
        shown.push(slot.item_id);
    }
    shown
}

fn share_of_best(shown: &[String]) -> f64 {
    shown.iter().filter(|s| *s == BEST).count() as f64 / shown.len() as f64
}

#[tokio::test]
async fn ucb_tries_every_candidate_once_then_concentrates_on_the_best() {
    // The segment's bandit alone: the candidates' ranking says nothing here.
    let shown = simulate(
        PolicyConfig::Ucb1 {
            c: 1.0,
            personal: 0.0,
        },
        3000,
        1,
    )
    .await;
    // Untried candidates come first, in ranking order, so no item repeats before all ran.
    let first: Vec<&str> = shown[..5].iter().map(String::as_str).collect();
    assert_eq!(first, ["item-0", "item-1", "item-2", "item-3", "item-4"]);
    let late = share_of_best(&shown[2000..]);
    assert!(late > 0.9, "best arm share in the last 1000 rounds: {late}");
    assert!(share_of_best(&shown[..500]) < late);
}

#[tokio::test]
async fn thompson_converges_to_the_best_arm() {
    let config = PolicyConfig::Thompson {
        alpha: 1.0,
        beta: 1.0,
        draws: 50,
        personal: 0.0,
    };
    let shown = simulate(config, 3000, 2).await;
    let late = share_of_best(&shown[2000..]);
    assert!(
        late > 0.95,
        "best arm share in the last 1000 rounds: {late}"
    );
}

#[tokio::test]
async fn decaying_epsilon_greedy_explores_less_as_traffic_grows() {
    let config = PolicyConfig::EpsilonGreedy {
        epsilon: 0.5,
        epsilon_min: 0.05,
        decay_impressions: Some(200.0),
    };
    // ε-greedy exploits the ranker's order, so the share of item-0 tracks 1 − ε + ε/5.
    let shown = simulate(config, 4000, 3).await;
    let top = |s: &[String]| s.iter().filter(|x| *x == "item-0").count() as f64 / s.len() as f64;
    let early = top(&shown[..200]);
    let late = top(&shown[3000..]);
    // ε over the first 200 rounds averages ≈ 0.35; over the last 1000 it is 0.05.
    assert!(early < 0.8, "early exploitation share {early}");
    assert!(late > 0.9, "late exploitation share {late}");
}

#[tokio::test]
async fn explorer_serves_segments_with_their_own_policies_and_statistics() {
    let config: SegmentConfig = toml::from_str(
        r#"
        [[rules]]
        name = "mobile"
        device = "mobile"

        [policies.default]
        kind = "ucb1"
        personal = 0.0

        [policies.mobile]
        kind = "greedy"
        "#,
    )
    .unwrap();
    let store = Arc::new(MemoryStore::new(StatsConfig::default()).unwrap());
    let explorer = Explorer::new(config, store.clone()).unwrap();
    let mobile = onrec_policy::UserFacts {
        device: Some("mobile"),
        ..Default::default()
    };
    assert_eq!(explorer.segment(None, &mobile), "mobile");
    let mut rng = SmallRng::seed_from_u64(4);
    let cands = candidates();
    // Impressions in the default segment do not move the mobile one.
    for _ in 0..3 {
        let r = explorer
            .rerank("default", (&cands, true), 2, &mut rng)
            .await;
        store
            .record(&Explorer::impressions("default", &r.slots))
            .await
            .unwrap();
    }
    let r = explorer.rerank("mobile", (&cands, true), 2, &mut rng).await;
    assert_eq!(r.policy, "greedy");
    assert_eq!(r.slots[0].item_id, "item-0");
    let d = store.fetch("default", &["item-4"]).await.unwrap();
    assert_eq!(d.total_impressions, 6.0);
    // Rounds 1–3 showed items 0–1, 2–3, then 4 and (all tried) the best bound.
    assert_eq!(d.arm("item-4").impressions, 1.0);
    assert_eq!(store.segments().await.unwrap(), ["default"]);
}
