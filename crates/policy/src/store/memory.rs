//! The embedded store: statistics in this process, bounded in segments and items.
//!
//! It applies the same forward decay and the same limits as the Redis store (see
//! [`crate::stats`]), except that it counts items where Redis counts hash fields.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::{BATCH_MEMORY, BanditStore, StoreFuture};
use crate::error::StoreError;
use crate::stats::{
    ArmStats, BatchId, Clock, Decay, FORGET_BELOW, SegmentStats, SegmentSummary, StatUpdate,
    StatsConfig, SystemClock, check_all, summarize,
};

/// One segment, in stored (landmark-scaled) units.
#[derive(Debug, Default)]
struct Segment {
    landmark_ms: i64,
    last_write_ms: i64,
    totals: ArmStats,
    arms: HashMap<String, ArmStats>,
}

impl Segment {
    fn rebase(&mut self, factor: f64, now_ms: i64) {
        let scale = |a: &mut ArmStats| {
            a.impressions *= factor;
            a.reward *= factor;
        };
        scale(&mut self.totals);
        self.arms.values_mut().for_each(scale);
        self.arms
            .retain(|_, a| a.impressions.abs() >= FORGET_BELOW || a.reward.abs() >= FORGET_BELOW);
        self.landmark_ms = now_ms;
    }

    /// Drops the least shown arms until `keep` are left. It runs under the store's write
    /// lock, which requests wait on, so it copies no ids: the cut is found among the
    /// impression counts alone, and one pass drops every arm below it and as many at it
    /// as make up the number.
    fn prune_arms(&mut self, keep: usize) {
        let drop = self.arms.len().saturating_sub(keep);
        if drop == 0 {
            return;
        }
        let mut impressions: Vec<f64> = self.arms.values().map(|a| a.impressions).collect();
        let (below, &mut cut, _) = impressions.select_nth_unstable_by(drop - 1, f64::total_cmp);
        let mut at_cut = drop - below.iter().filter(|x| x.total_cmp(&cut).is_lt()).count();
        self.arms
            .retain(|_, a| match a.impressions.total_cmp(&cut) {
                Ordering::Less => false,
                Ordering::Equal if at_cut > 0 => {
                    at_cut -= 1;
                    false
                }
                _ => true,
            });
    }

    /// A stored value's decayed worth at `now_ms`.
    fn read(&self, decay: &Decay, stored: ArmStats, now_ms: i64) -> ArmStats {
        let f = decay.weight(self.landmark_ms, now_ms);
        ArmStats {
            impressions: stored.impressions * f,
            reward: stored.reward * f,
        }
    }
}

/// Most batch ids remembered, whatever their age.
const MAX_REMEMBERED_BATCHES: usize = 1 << 20;

/// The ids of the batches applied within [`BATCH_MEMORY`], oldest first.
#[derive(Debug, Default)]
struct AppliedBatches {
    ids: HashSet<BatchId>,
    order: VecDeque<(i64, BatchId)>,
}

impl AppliedBatches {
    /// Records `id` as applied at `now_ms`; false when it already was.
    fn insert(&mut self, id: BatchId, now_ms: i64) -> bool {
        let memory = i64::try_from(BATCH_MEMORY.as_millis()).unwrap_or(i64::MAX);
        while let Some(&(at, old)) = self.order.front() {
            if now_ms.saturating_sub(at) < memory && self.order.len() < MAX_REMEMBERED_BATCHES {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&old);
        }
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back((now_ms, id));
        true
    }
}

/// Statistics in this process's memory.
#[derive(Debug)]
pub struct MemoryStore {
    segments: RwLock<HashMap<String, Segment>>,
    applied: Mutex<AppliedBatches>,
    config: StatsConfig,
    decay: Decay,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new(config: StatsConfig) -> Result<Self, StoreError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// An empty store on `clock`.
    pub fn with_clock(config: StatsConfig, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        config.validate()?;
        Ok(Self {
            segments: RwLock::new(HashMap::new()),
            applied: Mutex::new(AppliedBatches::default()),
            decay: Decay::new(config.half_life),
            config,
            clock,
        })
    }

    fn fetch_now(&self, segment: &str, item_ids: &[&str]) -> SegmentStats {
        let now = self.clock.now_ms();
        let segments = self.segments.read();
        let Some(seg) = segments.get(segment) else {
            return SegmentStats::default();
        };
        let totals = seg.read(&self.decay, seg.totals, now);
        SegmentStats {
            total_impressions: totals.impressions,
            total_reward: totals.reward,
            arms: item_ids
                .iter()
                .filter_map(|&id| {
                    let a = seg.arms.get(id)?;
                    Some((id.to_owned(), seg.read(&self.decay, *a, now)))
                })
                .collect(),
        }
    }

    fn record_now(&self, id: BatchId, updates: &[StatUpdate]) -> Result<(), StoreError> {
        check_all(updates)?;
        let now = self.clock.now_ms();
        let mut applied = self.applied.lock();
        if !applied.insert(id, now) {
            return Ok(());
        }
        let mut segments = self.segments.write();
        for u in updates {
            if u.impressions == 0.0 && u.reward == 0.0 {
                continue;
            }
            if !segments.contains_key(&u.segment) {
                if segments.len() >= self.config.max_segments {
                    evict_oldest(&mut segments, self.config.segment_prune_target() - 1);
                }
                segments.insert(
                    u.segment.clone(),
                    Segment {
                        landmark_ms: now,
                        ..Segment::default()
                    },
                );
            }
            let Some(seg) = segments.get_mut(&u.segment) else {
                continue;
            };
            if self.decay.needs_rebase(now, seg.landmark_ms) {
                seg.rebase(self.decay.weight(seg.landmark_ms, now), now);
            }
            let w = self
                .decay
                .weight(u.at_ms.unwrap_or(now).min(now), seg.landmark_ms);
            seg.last_write_ms = now;
            seg.totals.impressions += u.impressions * w;
            seg.totals.reward += u.reward * w;
            // The id is copied only for an arm the segment does not have yet.
            let arm = match seg.arms.get_mut(&u.item_id) {
                Some(arm) => arm,
                None => seg.arms.entry(u.item_id.clone()).or_default(),
            };
            arm.impressions += u.impressions * w;
            arm.reward += u.reward * w;
            if seg.arms.len() > self.config.max_arms_per_segment {
                seg.prune_arms(self.config.prune_target());
            }
        }
        Ok(())
    }

    fn summary_now(&self, segment: &str, top: usize) -> SegmentSummary {
        let now = self.clock.now_ms();
        let segments = self.segments.read();
        let Some(seg) = segments.get(segment) else {
            return summarize(segment, ArmStats::default(), [], top);
        };
        summarize(
            segment,
            seg.read(&self.decay, seg.totals, now),
            seg.arms
                .iter()
                .map(|(id, a)| (id.clone(), seg.read(&self.decay, *a, now))),
            top,
        )
    }

    fn arms_now(&self, segment: &str) -> Vec<(String, ArmStats)> {
        let now = self.clock.now_ms();
        let segments = self.segments.read();
        segments.get(segment).map_or_else(Vec::new, |seg| {
            seg.arms
                .iter()
                .map(|(id, a)| (id.clone(), seg.read(&self.decay, *a, now)))
                .collect()
        })
    }

    /// Segments held (for tests and metrics).
    pub fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    /// Items held in `segment`.
    pub fn arm_count(&self, segment: &str) -> usize {
        self.segments
            .read()
            .get(segment)
            .map_or(0, |s| s.arms.len())
    }
}

/// Drops the least recently written segments until `keep` are left.
fn evict_oldest(segments: &mut HashMap<String, Segment>, keep: usize) {
    let mut by_age: Vec<(i64, String)> = segments
        .iter()
        .map(|(name, s)| (s.last_write_ms, name.clone()))
        .collect();
    let drop = by_age.len().saturating_sub(keep);
    if drop == 0 {
        return;
    }
    by_age.select_nth_unstable(drop - 1);
    for (_, name) in &by_age[..drop] {
        segments.remove(name);
    }
}

impl BanditStore for MemoryStore {
    fn fetch<'a>(
        &'a self,
        segment: &'a str,
        item_ids: &'a [&'a str],
    ) -> StoreFuture<'a, SegmentStats> {
        let stats = self.fetch_now(segment, item_ids);
        Box::pin(async move { Ok(stats) })
    }

    fn record_batch<'a>(&'a self, id: BatchId, updates: &'a [StatUpdate]) -> StoreFuture<'a, ()> {
        let result = self.record_now(id, updates);
        Box::pin(async move { result })
    }

    fn segment_summary<'a>(
        &'a self,
        segment: &'a str,
        top: usize,
    ) -> StoreFuture<'a, SegmentSummary> {
        let summary = self.summary_now(segment, top);
        Box::pin(async move { Ok(summary) })
    }

    fn arms<'a>(&'a self, segment: &'a str) -> StoreFuture<'a, Vec<(String, ArmStats)>> {
        let arms = self.arms_now(segment);
        Box::pin(async move { Ok(arms) })
    }

    fn segments(&self) -> StoreFuture<'_, Vec<String>> {
        let mut names: Vec<String> = self.segments.read().keys().cloned().collect();
        names.sort();
        Box::pin(async move { Ok(names) })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn half_life(&self) -> Option<Duration> {
        self.config.half_life
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ManualClock;

    const HOUR: i64 = 3_600_000;

    fn block<T>(f: StoreFuture<'_, T>) -> Result<T, StoreError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn decaying(clock: &Arc<ManualClock>) -> MemoryStore {
        MemoryStore::with_clock(
            StatsConfig {
                half_life: Some(Duration::from_secs(3600)),
                ..StatsConfig::default()
            },
            clock.clone(),
        )
        .unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn records_and_fetches_sums() {
        let store = MemoryStore::new(StatsConfig::default()).unwrap();
        let updates = [
            StatUpdate::impression("s", "a"),
            StatUpdate::impression("s", "a"),
            StatUpdate::reward("s", "a", 2.5),
            StatUpdate::impression("s", "b"),
            StatUpdate::impression("t", "a"),
        ];
        block(store.record(&updates)).unwrap();
        let stats = block(store.fetch("s", &["a", "b", "c"])).unwrap();
        assert_eq!(stats.total_impressions, 3.0);
        assert_eq!(stats.total_reward, 2.5);
        assert_eq!(
            stats.arm("a"),
            ArmStats {
                impressions: 2.0,
                reward: 2.5
            }
        );
        assert_eq!(stats.arm("b").impressions, 1.0);
        assert!(!stats.arms.contains_key("c"));
        assert_eq!(block(store.segments()).unwrap(), ["s", "t"]);
        let summary = block(store.segment_summary("s", 1)).unwrap();
        assert_eq!(summary.arms, 2);
        assert_eq!(summary.top[0].item_id, "a");
        assert_eq!(summary.top[0].mean, 1.25);
        // A bad update refuses the whole batch.
        let bad = [
            StatUpdate::impression("s", "a"),
            StatUpdate::reward("s", "a", f64::INFINITY),
        ];
        assert!(block(store.record(&bad)).is_err());
        assert_eq!(
            block(store.fetch("s", &["a"]))
                .unwrap()
                .arm("a")
                .impressions,
            2.0
        );
    }

    #[test]
    fn old_statistics_weigh_less() {
        let clock = Arc::new(ManualClock::new(1_000 * HOUR));
        let store = decaying(&clock);
        let ten = |item: &str| {
            vec![
                StatUpdate {
                    impressions: 10.0,
                    reward: 4.0,
                    ..StatUpdate::impression("s", item)
                };
                1
            ]
        };
        block(store.record(&ten("old"))).unwrap();
        clock.advance(Duration::from_secs(2 * 3600));
        block(store.record(&ten("new"))).unwrap();
        let s = block(store.fetch("s", &["old", "new"])).unwrap();
        assert!(close(s.arm("old").impressions, 2.5));
        assert!(close(s.arm("old").reward, 1.0));
        assert!(close(s.arm("new").impressions, 10.0));
        assert!(close(s.total_impressions, 12.5));
        // The means are unchanged by decay; only the weight of the evidence is.
        assert!(close(s.arm("old").mean().unwrap(), 0.4));
        clock.advance(Duration::from_secs(3600));
        let s = block(store.fetch("s", &["old", "new"])).unwrap();
        assert!(close(s.arm("old").impressions, 1.25));
        assert!(close(s.arm("new").impressions, 5.0));
    }

    #[test]
    fn late_updates_land_at_their_time() {
        let clock = Arc::new(ManualClock::new(100 * HOUR));
        let store = decaying(&clock);
        block(store.record(&[StatUpdate::impression("s", "a")])).unwrap();
        let late = StatUpdate::reward("s", "a", 8.0).at(99 * HOUR);
        // A time ahead of the clock counts as now.
        let early = StatUpdate::reward("s", "b", 8.0).at(200 * HOUR);
        block(store.record(&[late, early])).unwrap();
        let s = block(store.fetch("s", &["a", "b"])).unwrap();
        assert!(close(s.arm("a").reward, 4.0));
        assert!(close(s.arm("b").reward, 8.0));
    }

    #[test]
    fn rebasing_keeps_values_and_forgets_dead_arms() {
        let clock = Arc::new(ManualClock::new(0));
        let store = decaying(&clock);
        block(store.record(&[StatUpdate::impression("s", "dead")])).unwrap();
        for _ in 0..100 {
            clock.advance(Duration::from_secs(3600));
            block(store.record(&[StatUpdate::impression("s", "live")])).unwrap();
        }
        let s = block(store.fetch("s", &["dead", "live"])).unwrap();
        // Σ 2^-k for k = 0..100 ≈ 2.
        assert!(close(s.arm("live").impressions, 2.0), "{s:?}");
        assert!(!s.arms.contains_key("dead"));
        assert!(s.total_impressions.is_finite() && close(s.total_impressions, 2.0));
    }

    #[test]
    fn pruning_keeps_the_most_shown_arms_ties_included() {
        // 30 arms shown 0, 1 or 2 times (ten each), and one never shown but rewarded.
        let mut seg = Segment::default();
        for i in 0..30 {
            let impressions = f64::from(i % 3);
            seg.arms.insert(
                format!("item-{i}"),
                ArmStats {
                    impressions,
                    reward: 0.0,
                },
            );
        }
        seg.arms.insert(
            "clicked".into(),
            ArmStats {
                impressions: 0.0,
                reward: 1.0,
            },
        );
        let before = seg.arms.clone();
        // 16 go: the 11 shown 0 times and 5 of the 10 shown once.
        seg.prune_arms(15);
        assert_eq!(seg.arms.len(), 15);
        let shown =
            |seg: &Segment, n: f64| seg.arms.values().filter(|a| a.impressions == n).count();
        assert_eq!(
            (shown(&seg, 0.0), shown(&seg, 1.0), shown(&seg, 2.0)),
            (0, 5, 10)
        );
        assert!(seg.arms.iter().all(|(id, a)| before[id] == *a));
        seg.prune_arms(15);
        assert_eq!(seg.arms.len(), 15, "nothing to drop");
        seg.prune_arms(3);
        assert_eq!((seg.arms.len(), shown(&seg, 2.0)), (3, 3));
    }

    #[test]
    fn segments_and_arms_are_bounded() {
        let clock = Arc::new(ManualClock::new(0));
        let store = MemoryStore::with_clock(
            StatsConfig {
                half_life: None,
                max_segments: 8,
                max_arms_per_segment: 16,
            },
            clock.clone(),
        )
        .unwrap();
        for i in 0..40 {
            clock.advance(Duration::from_millis(1));
            // "busy" stays recently written; the others age out.
            let updates = [
                StatUpdate::impression("busy", format!("item-{i}")),
                StatUpdate::impression(format!("seg-{i}"), "x"),
                StatUpdate::impression("busy", "star"),
            ];
            block(store.record(&updates)).unwrap();
            assert!(store.segment_count() <= 8);
            assert!(store.arm_count("busy") <= 16);
        }
        let names = block(store.segments()).unwrap();
        assert!(names.contains(&"busy".to_string()) && names.contains(&"seg-39".to_string()));
        // The most shown item survives pruning.
        let s = block(store.fetch("busy", &["star"])).unwrap();
        assert_eq!(s.arm("star").impressions, 40.0);
        assert_eq!(s.total_impressions, 80.0);
    }
}
