//! The request-path façade: segment, policy, statistics and fallback in one call.

use std::collections::HashMap;
use std::sync::Arc;

use rand::Rng;

use crate::error::ConfigError;
use crate::policy::{Candidate, Policy, PolicyConfig, Slot, exploit};
use crate::segment::{DEFAULT_SEGMENT, SegmentConfig, UserFacts};
use crate::stats::{SegmentStats, StatUpdate};
use crate::store::BanditStore;

/// A re-ranked slate.
#[derive(Debug, Clone, PartialEq)]
pub struct Reranked {
    /// The final slots, in order.
    pub slots: Vec<Slot>,
    /// The `kind` of the policy that chose them (`greedy` on a fallback).
    pub policy: &'static str,
    /// The segment's policy as it was applied: [`Policy::impersonal`] when the
    /// candidates came with no personal ranking.
    pub config: PolicyConfig,
    /// Whether the statistics could not be read, so the ranker's order was kept.
    pub fallback: bool,
}

/// Pseudo-impressions a segment's UCB1 or Thompson statistics take from the other
/// segments' per item, unless configured (see [`Explorer::with_prior`]): in the
/// simulator's fresh shops (three kinds of goods, three seeds) it did best of 0, 3, 10,
/// 30 and 100, by about a quarter of a CTR point over none.
pub const DEFAULT_PRIOR_IMPRESSIONS: f64 = 10.0;

/// Most other segments pooled into a segment's prior: the configured ones, in name order.
pub const MAX_PRIOR_SEGMENTS: usize = 16;

/// Segments, their policies and the statistics store, ready for requests.
#[derive(Debug, Clone)]
pub struct Explorer {
    config: SegmentConfig,
    policies: HashMap<String, Policy>,
    default: Policy,
    store: Arc<dyn BanditStore>,
    /// The configured segment names (`default`, rules, policies), sorted.
    configured: Vec<String>,
    prior_impressions: f64,
}

impl Explorer {
    /// Validates `config` and builds every segment's policy.
    pub fn new(config: SegmentConfig, store: Arc<dyn BanditStore>) -> Result<Self, ConfigError> {
        config.validate()?;
        let policies = config
            .policies
            .iter()
            .map(|(name, p)| Ok((name.clone(), Policy::from_config(p)?)))
            .collect::<Result<HashMap<_, _>, ConfigError>>()?;
        let default = policies
            .get(DEFAULT_SEGMENT)
            .cloned()
            .unwrap_or_else(Policy::greedy);
        let mut configured: Vec<String> = std::iter::once(DEFAULT_SEGMENT.to_owned())
            .chain(config.rules.iter().map(|r| r.name.clone()))
            .chain(config.policies.keys().cloned())
            .collect();
        configured.sort();
        configured.dedup();
        Ok(Self {
            config,
            policies,
            default,
            store,
            configured,
            prior_impressions: DEFAULT_PRIOR_IMPRESSIONS,
        })
    }

    /// The same, with UCB1 and Thompson shrinking a segment's statistics toward the other
    /// configured segments' (empirical Bayes, see [`SegmentStats::shrunk_toward`]) by at
    /// most `impressions` pseudo-impressions per item; 0 turns the prior off. A new
    /// segment then starts from what the others learned rather than from zero.
    pub fn with_prior(mut self, impressions: f64) -> Result<Self, ConfigError> {
        if !(impressions.is_finite() && impressions >= 0.0) {
            return Err(ConfigError::new(
                "segment_prior",
                format!("is {impressions}; must be a finite number >= 0"),
            ));
        }
        self.prior_impressions = impressions;
        Ok(self)
    }

    /// The segments whose statistics are `segment`'s prior: the other configured ones.
    fn prior_segments(&self, segment: &str) -> Vec<&str> {
        if self.prior_impressions <= 0.0 {
            return Vec::new();
        }
        self.configured
            .iter()
            .map(String::as_str)
            .filter(|&s| s != segment)
            .take(MAX_PRIOR_SEGMENTS)
            .collect()
    }

    /// The segment configuration.
    pub fn config(&self) -> &SegmentConfig {
        &self.config
    }

    /// The statistics store.
    pub fn store(&self) -> &Arc<dyn BanditStore> {
        &self.store
    }

    /// The segment of a request (see [`SegmentConfig::resolve`]).
    pub fn segment(&self, explicit: Option<&str>, facts: &UserFacts<'_>) -> String {
        self.config.resolve(explicit, facts)
    }

    /// The policy serving `segment`.
    pub fn policy(&self, segment: &str) -> &Policy {
        self.policies.get(segment).unwrap_or(&self.default)
    }

    /// Re-ranks `candidates` (best first) into `n` slots with `segment`'s policy, or its
    /// [`Policy::impersonal`] form unless the candidates' scores are a `personal`
    /// ranking. When the statistics cannot be read in time, keeps the ranker's order
    /// (propensity 1, nothing explored) and counts `onrec_bandit_fallbacks_total`. The
    /// future is `Send` when the RNG is (e.g. `SmallRng`).
    pub async fn rerank<R: Rng + ?Sized>(
        &self,
        segment: &str,
        (candidates, personal): (&[Candidate], bool),
        n: usize,
        rng: &mut R,
    ) -> Reranked {
        let policy = if personal {
            self.policy(segment).clone()
        } else {
            self.policy(segment).impersonal()
        };
        let stats = if policy.needs_stats() && !candidates.is_empty() && n > 0 {
            let ids: Vec<&str> = candidates.iter().map(|c| c.item_id.as_str()).collect();
            let others = if policy.explores_by_item() {
                self.prior_segments(segment)
            } else {
                Vec::new()
            };
            let fetched = if others.is_empty() {
                self.store.fetch(segment, &ids).await
            } else {
                self.store
                    .fetch_with_prior(segment, &others, &ids)
                    .await
                    .map(|(own, prior)| own.shrunk_toward(&prior, self.prior_impressions))
            };
            match fetched {
                Ok(stats) => stats,
                Err(e) => {
                    metrics::counter!("onrec_bandit_fallbacks_total").increment(1);
                    tracing::debug!(segment, error = %e, "exploit-only fallback");
                    return Reranked {
                        slots: exploit(candidates, n),
                        policy: Policy::greedy().kind(),
                        config: policy.config().clone(),
                        fallback: true,
                    };
                }
            }
        } else {
            SegmentStats::default()
        };
        Reranked {
            slots: policy.select(candidates, &stats, n, rng),
            policy: policy.kind(),
            config: policy.config().clone(),
            fallback: false,
        }
    }

    /// One impression per slot of a served slate, for [`BanditStore::record`].
    pub fn impressions(segment: &str, slots: &[Slot]) -> Vec<StatUpdate> {
        slots
            .iter()
            .map(|s| StatUpdate::impression(segment, s.item_id.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;
    use crate::error::StoreError;
    use crate::policy::PolicyConfig;
    use crate::stats::{ArmStats, BatchId, SegmentSummary, StatsConfig};
    use crate::store::StoreFuture;
    use crate::store::memory::MemoryStore;

    #[derive(Debug)]
    struct Down;

    impl BanditStore for Down {
        fn fetch<'a>(&'a self, _: &'a str, _: &'a [&'a str]) -> StoreFuture<'a, SegmentStats> {
            Box::pin(async { Err(StoreError::Timeout(Duration::from_millis(20))) })
        }
        fn record_batch<'a>(&'a self, _: BatchId, _: &'a [StatUpdate]) -> StoreFuture<'a, ()> {
            Box::pin(async { Err(StoreError::Unavailable("down".into())) })
        }
        fn segment_summary<'a>(&'a self, _: &'a str, _: usize) -> StoreFuture<'a, SegmentSummary> {
            Box::pin(async { Err(StoreError::Unavailable("down".into())) })
        }
        fn arms<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Vec<(String, ArmStats)>> {
            Box::pin(async { Err(StoreError::Unavailable("down".into())) })
        }
        fn segments(&self) -> StoreFuture<'_, Vec<String>> {
            Box::pin(async { Err(StoreError::Unavailable("down".into())) })
        }
        fn ping(&self) -> StoreFuture<'_, ()> {
            Box::pin(async { Err(StoreError::Unavailable("down".into())) })
        }
    }

    fn config() -> SegmentConfig {
        let mut cfg = SegmentConfig::default();
        // The segment's bandit alone, so its trying of untried items shows.
        cfg.policies.insert(
            "default".into(),
            PolicyConfig::Ucb1 {
                c: 1.0,
                personal: 0.0,
            },
        );
        cfg.policies
            .insert("fixed".into(), PolicyConfig::epsilon_greedy(1.0));
        cfg
    }

    fn candidates() -> Vec<Candidate> {
        (0..4)
            .map(|i| Candidate::new(format!("item-{i}"), 4.0 - f64::from(i)))
            .collect()
    }

    #[tokio::test]
    async fn falls_back_to_the_ranker_order_when_the_store_fails() {
        let explorer = Explorer::new(config(), Arc::new(Down)).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let r = explorer
            .rerank("vip", (&candidates(), true), 3, &mut rng)
            .await;
        assert!(r.fallback);
        assert_eq!(r.policy, "greedy");
        assert_eq!(r.slots, exploit(&candidates(), 3));
        // A policy that needs no statistics does not ask for them.
        let r = explorer
            .rerank("fixed", (&candidates(), true), 3, &mut rng)
            .await;
        assert!(!r.fallback);
        assert_eq!(r.policy, "epsilon_greedy");
    }

    #[tokio::test]
    async fn candidates_without_a_personal_ranking_are_served_on_the_statistics_alone() {
        let store = Arc::new(MemoryStore::new(StatsConfig::default()).unwrap());
        // item-3, last in ranking order, earned a reward on half of its 200 impressions;
        // the others on 2 of theirs.
        let mut updates = Vec::new();
        for c in candidates() {
            updates.push(StatUpdate {
                impressions: 200.0,
                ..StatUpdate::impression("t", c.item_id.clone())
            });
            let reward = if c.item_id == "item-3" { 100.0 } else { 2.0 };
            updates.push(StatUpdate::reward("t", c.item_id.clone(), reward));
        }
        store.record(&updates).await.unwrap();
        let mut cfg = SegmentConfig::default();
        cfg.policies.insert(
            "t".into(),
            PolicyConfig::Thompson {
                alpha: 1.0,
                beta: 1.0,
                draws: 100,
                personal: 1.0,
            },
        );
        let explorer = Explorer::new(cfg, store).unwrap().with_prior(0.0).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let personal = explorer
            .rerank("t", (&candidates(), true), 1, &mut rng)
            .await;
        assert_eq!(
            personal.slots[0].item_id, "item-0",
            "the personal ranking alone"
        );
        let PolicyConfig::Thompson { personal: w, .. } = personal.config else {
            panic!("{:?}", personal.config);
        };
        assert_eq!(w, 1.0);
        let popular = explorer
            .rerank("t", (&candidates(), false), 1, &mut rng)
            .await;
        assert_eq!(popular.slots[0].item_id, "item-3", "the statistics alone");
        let PolicyConfig::Thompson { personal: w, .. } = popular.config else {
            panic!("{:?}", popular.config);
        };
        assert_eq!(w, 0.0, "the decision log records the policy as applied");
    }

    #[tokio::test]
    async fn ucb_tries_untried_items_as_impressions_are_recorded() {
        let store = Arc::new(MemoryStore::new(StatsConfig::default()).unwrap());
        let explorer = Explorer::new(config(), store.clone()).unwrap();
        assert_eq!(explorer.policy("anything").kind(), "ucb1");
        let mut rng = SmallRng::seed_from_u64(1);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let r = explorer
                .rerank("s", (&candidates(), true), 1, &mut rng)
                .await;
            assert!(!r.fallback);
            seen.push(r.slots[0].item_id.clone());
            store
                .record(&Explorer::impressions("s", &r.slots))
                .await
                .unwrap();
        }
        assert_eq!(seen, ["item-0", "item-1", "item-2", "item-3"]);
    }

    #[tokio::test]
    async fn a_new_segment_starts_from_what_the_configured_segments_learned() {
        let store = Arc::new(MemoryStore::new(StatsConfig::default()).unwrap());
        // In the configured segment "fixed", item-3 earned a reward on half of its 20
        // impressions, the others on none of theirs.
        let mut updates = Vec::new();
        for c in candidates() {
            updates.push(StatUpdate {
                impressions: 20.0,
                ..StatUpdate::impression("fixed", c.item_id.clone())
            });
        }
        updates.push(StatUpdate::reward("fixed", "item-3", 10.0));
        store.record(&updates).await.unwrap();
        let first = |explorer: Explorer| async move {
            let mut rng = SmallRng::seed_from_u64(1);
            let r = explorer
                .rerank("vip", (&candidates(), true), 1, &mut rng)
                .await;
            r.slots[0].item_id.clone()
        };
        let with = Explorer::new(config(), store.clone()).unwrap();
        assert_eq!(first(with).await, "item-3", "the prior's best item first");
        let without = Explorer::new(config(), store.clone())
            .unwrap()
            .with_prior(0.0)
            .unwrap();
        assert_eq!(
            first(without).await,
            "item-0",
            "untried items in ranking order"
        );
        assert_eq!(
            Explorer::new(config(), store)
                .unwrap()
                .with_prior(-1.0)
                .unwrap_err()
                .field,
            "segment_prior"
        );
    }

    #[test]
    fn invalid_policies_are_refused() {
        let mut cfg = config();
        cfg.policies.insert("bad".into(), PolicyConfig::ucb1(-2.0));
        let err = Explorer::new(cfg, Arc::new(Down)).unwrap_err();
        assert_eq!(err.field, "policies.bad.c");
    }
}
