//! Bandit statistics: what the stores keep per (segment, item), and how it decays.
//!
//! Decay is forward decay against a per-segment landmark time `l`: a value v recorded at
//! time t is stored as v·2^((t − l)/h) and read at time `now` as stored·2^((l − now)/h),
//! for half-life h. Recording stays a plain increment (atomic `HINCRBYFLOAT` in Redis) and
//! all arms of a segment decay together without being touched. When `now − l` passes
//! [`REBASE_HALF_LIVES`] half-lives, the next write multiplies every stored value by
//! 2^((l − now)/h) and moves `l` to `now`, so stored values stay finite; arms whose values
//! fall below [`FORGET_BELOW`] are dropped then.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::StoreError;

/// Half-lives after which a segment's landmark moves forward (2^64 still leaves f64 ample room).
pub const REBASE_HALF_LIVES: f64 = 64.0;
/// Decayed impressions and reward below which an arm is forgotten at a rebase.
pub const FORGET_BELOW: f64 = 1e-6;

/// Impressions and reward sum of one item in one segment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArmStats {
    /// Times the item was shown (decayed, hence a real number).
    pub impressions: f64,
    /// Sum of the rewards the item earned (decayed).
    pub reward: f64,
}

impl ArmStats {
    /// Mean reward per impression; `None` before the first impression.
    pub fn mean(&self) -> Option<f64> {
        (self.impressions > 0.0).then(|| self.reward / self.impressions)
    }
}

/// What a policy knows about one segment: its totals and the arms it asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentStats {
    /// Impressions in the segment over all items (the N of UCB1).
    pub total_impressions: f64,
    /// Reward in the segment over all items.
    pub total_reward: f64,
    /// Per item; items never recorded are absent.
    pub arms: HashMap<String, ArmStats>,
}

impl SegmentStats {
    /// The statistics of `item_id`, zero when absent.
    pub fn arm(&self, item_id: &str) -> ArmStats {
        self.arms.get(item_id).copied().unwrap_or_default()
    }

    /// Adds `other`'s totals and arms to these: the statistics of the segments pooled.
    pub fn pool(&mut self, other: &SegmentStats) {
        self.total_impressions += other.total_impressions;
        self.total_reward += other.total_reward;
        for (id, arm) in &other.arms {
            let mine = self.arms.entry(id.clone()).or_default();
            mine.impressions += arm.impressions;
            mine.reward += arm.reward;
        }
    }

    /// These statistics shrunk toward `prior` (empirical Bayes): every item the prior has
    /// seen gains min(its prior impressions, `strength`) pseudo-impressions at its prior
    /// mean reward, and the totals gain the same. A segment with little traffic then
    /// starts from what the other segments learned of an item instead of from nothing,
    /// and its own impressions outweigh the prior once they pass `strength`.
    pub fn shrunk_toward(&self, prior: &SegmentStats, strength: f64) -> SegmentStats {
        let mut out = self.clone();
        if strength.is_nan() || strength <= 0.0 {
            return out;
        }
        for (id, p) in &prior.arms {
            let Some(mean) = p.mean().filter(|m| m.is_finite()) else {
                continue;
            };
            let weight = p.impressions.min(strength);
            let arm = out.arms.entry(id.clone()).or_default();
            arm.impressions += weight;
            arm.reward += weight * mean;
            out.total_impressions += weight;
            out.total_reward += weight * mean;
        }
        out
    }
}

/// The identity of a batch of updates: a store applies a batch id at most once, so a
/// writer that re-sends a batch whose answer it never got cannot count it twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId(u128);

impl BatchId {
    /// A new random id (a version-4 UUID: 122 random bits), so two writers never draw
    /// the same one.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }
}

impl BatchId {
    /// The id of the batch that `key` names, the same in every process and build (a
    /// 128-bit FNV-1a hash): a writer that derives its batch ids from what they count (a
    /// response's id, an event's id) makes a batch written twice, from anywhere, count once.
    pub fn of(key: &str) -> Self {
        Self(stable_digest(key))
    }
}

/// A 128-bit FNV-1a hash of `key`: stable across processes, builds and platforms.
pub fn stable_digest(key: &str) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    key.bytes()
        .fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

impl fmt::LowerHex for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// An increment to one (segment, item): impressions shown and reward earned.
#[derive(Debug, Clone, PartialEq)]
pub struct StatUpdate {
    /// The segment the item was shown in.
    pub segment: String,
    /// The item.
    pub item_id: String,
    /// Impressions to add.
    pub impressions: f64,
    /// Reward to add (clicks, purchases, value; policies expect non-negative rewards).
    pub reward: f64,
    /// When it happened, in milliseconds since the Unix epoch; `None` means now. Only
    /// matters with decay; times ahead of the store's clock count as now.
    pub at_ms: Option<i64>,
}

impl StatUpdate {
    /// One impression of `item_id` in `segment`, now.
    pub fn impression(segment: impl Into<String>, item_id: impl Into<String>) -> Self {
        Self {
            segment: segment.into(),
            item_id: item_id.into(),
            impressions: 1.0,
            reward: 0.0,
            at_ms: None,
        }
    }

    /// A reward of `value` for `item_id` in `segment`, now.
    pub fn reward(segment: impl Into<String>, item_id: impl Into<String>, value: f64) -> Self {
        Self {
            segment: segment.into(),
            item_id: item_id.into(),
            impressions: 0.0,
            reward: value,
            at_ms: None,
        }
    }

    /// The same update, as of `at_ms`.
    pub fn at(mut self, at_ms: i64) -> Self {
        self.at_ms = Some(at_ms);
        self
    }

    /// Checks that the update can be stored.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.segment.is_empty() || self.item_id.is_empty() {
            return Err(StoreError::InvalidUpdate(
                "segment and item_id must not be empty".into(),
            ));
        }
        if !self.impressions.is_finite() || !self.reward.is_finite() {
            return Err(StoreError::InvalidUpdate(format!(
                "{}/{}: impressions and reward must be finite",
                self.segment, self.item_id
            )));
        }
        Ok(())
    }
}

/// Checks every update of a batch; the error names the first bad one.
pub(crate) fn check_all(updates: &[StatUpdate]) -> Result<(), StoreError> {
    updates.iter().try_for_each(StatUpdate::check)
}

/// One item of a segment summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmSummary {
    /// The item.
    pub item_id: String,
    /// Decayed impressions.
    pub impressions: f64,
    /// Decayed reward.
    pub reward: f64,
    /// Reward per impression.
    pub mean: f64,
}

/// A segment at a glance, for the operations endpoints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentSummary {
    /// The segment.
    pub segment: String,
    /// Decayed impressions over all items.
    pub impressions: f64,
    /// Decayed reward over all items.
    pub reward: f64,
    /// Items with statistics.
    pub arms: usize,
    /// The best items by mean reward among those with at least one (decayed) impression,
    /// best first; ties go to more impressions, then to the smaller id.
    pub top: Vec<ArmSummary>,
}

/// Builds a summary from decayed values.
pub(crate) fn summarize(
    segment: &str,
    totals: ArmStats,
    arms: impl IntoIterator<Item = (String, ArmStats)>,
    top: usize,
) -> SegmentSummary {
    let mut count = 0;
    let mut ranked: Vec<ArmSummary> = arms
        .into_iter()
        .inspect(|_| count += 1)
        .filter(|(_, a)| a.impressions >= 1.0)
        .map(|(item_id, a)| ArmSummary {
            mean: a.reward / a.impressions,
            item_id,
            impressions: a.impressions,
            reward: a.reward,
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.mean
            .total_cmp(&a.mean)
            .then(b.impressions.total_cmp(&a.impressions))
            .then_with(|| a.item_id.cmp(&b.item_id))
    });
    ranked.truncate(top);
    SegmentSummary {
        segment: segment.to_owned(),
        impressions: totals.impressions,
        reward: totals.reward,
        arms: count,
        top: ranked,
    }
}

/// Limits and decay of a statistics store.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsConfig {
    /// Time for statistics to lose half their weight; `None` keeps them forever.
    pub half_life: Option<Duration>,
    /// Segments kept; beyond it the least recently written are dropped.
    pub max_segments: usize,
    /// Items kept per segment; beyond it the least shown are dropped (down to 7/8 of it).
    pub max_arms_per_segment: usize,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            half_life: None,
            max_segments: 10_000,
            max_arms_per_segment: 50_000,
        }
    }
}

impl StatsConfig {
    /// Checks the limits.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.max_segments == 0 || self.max_arms_per_segment == 0 {
            return Err(StoreError::Config(
                "max_segments and max_arms_per_segment must be at least 1".into(),
            ));
        }
        if self.half_life.is_some_and(|h| h.as_millis() == 0) {
            return Err(StoreError::Config("half_life must be at least 1ms".into()));
        }
        Ok(())
    }

    /// Arms left after pruning a segment that went over its limit.
    pub(crate) fn prune_target(&self) -> usize {
        (self.max_arms_per_segment - self.max_arms_per_segment / 8).max(1)
    }

    /// Segments left after dropping the oldest ones of a store over its limit.
    pub(crate) fn segment_prune_target(&self) -> usize {
        (self.max_segments - self.max_segments / 8).max(1)
    }
}

/// The forward-decay arithmetic shared by the stores and the retry buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Decay {
    /// Half-life in milliseconds; 0 means no decay.
    half_life_ms: f64,
}

impl Decay {
    pub(crate) fn new(half_life: Option<Duration>) -> Self {
        Self {
            half_life_ms: half_life.map_or(0.0, |h| h.as_secs_f64() * 1000.0),
        }
    }

    /// Half-life in whole milliseconds, 0 for none (the Redis script's argument).
    pub(crate) fn half_life_ms(&self) -> f64 {
        self.half_life_ms
    }

    pub(crate) fn enabled(&self) -> bool {
        self.half_life_ms > 0.0
    }

    /// 2^((at − landmark)/h): the stored weight of a unit recorded at `at_ms`, or the read
    /// factor when `at_ms` is the landmark and `landmark_ms` is now.
    pub(crate) fn weight(&self, at_ms: i64, landmark_ms: i64) -> f64 {
        if !self.enabled() {
            return 1.0;
        }
        // `powf` rather than `exp2`: the Redis script computes the same power with C's pow.
        2f64.powf((at_ms - landmark_ms) as f64 / self.half_life_ms)
    }

    /// Whether a segment with this landmark must be rebased before a write at `now_ms`.
    pub(crate) fn needs_rebase(&self, now_ms: i64, landmark_ms: i64) -> bool {
        self.enabled() && (now_ms - landmark_ms) as f64 > REBASE_HALF_LIVES * self.half_life_ms
    }
}

/// Where the stores get the time from; tests inject a [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        Self(AtomicI64::new(now_ms))
    }

    /// Sets the time.
    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(arms: &[(&str, f64, f64)]) -> SegmentStats {
        let mut s = SegmentStats::default();
        for &(id, impressions, reward) in arms {
            s.total_impressions += impressions;
            s.total_reward += reward;
            s.arms.insert(
                id.to_owned(),
                ArmStats {
                    impressions,
                    reward,
                },
            );
        }
        s
    }

    #[test]
    fn a_segment_is_shrunk_toward_its_prior_by_at_most_strength_impressions() {
        let own = stats(&[("a", 4.0, 2.0)]);
        let mut prior = stats(&[("a", 100.0, 10.0), ("b", 3.0, 3.0)]);
        prior.pool(&stats(&[("a", 100.0, 10.0)]));
        assert_eq!(
            prior.arm("a"),
            ArmStats {
                impressions: 200.0,
                reward: 20.0
            }
        );
        let s = own.shrunk_toward(&prior, 10.0);
        // a: 10 pseudo-impressions at the prior's 0.1; b: its 3 at 1.0; c: unknown.
        assert_eq!(
            s.arm("a"),
            ArmStats {
                impressions: 14.0,
                reward: 3.0
            }
        );
        assert_eq!(
            s.arm("b"),
            ArmStats {
                impressions: 3.0,
                reward: 3.0
            }
        );
        assert_eq!(s.arm("c"), ArmStats::default());
        assert_eq!((s.total_impressions, s.total_reward), (17.0, 6.0));
        assert_eq!(own.shrunk_toward(&prior, 0.0), own, "strength 0: no prior");
    }

    const HOUR: i64 = 3_600_000;

    #[test]
    fn batch_ids_of_keys_are_fixed_and_distinct() {
        // FNV-1a 128 of the empty string is its offset basis; of "a", a published value.
        assert_eq!(stable_digest(""), 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d);
        assert_eq!(
            stable_digest("a"),
            0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964
        );
        assert_eq!(BatchId::of("r:1"), BatchId::of("r:1"));
        assert_ne!(BatchId::of("r:1"), BatchId::of("r:2"));
        assert_ne!(BatchId::of("r:1"), BatchId::of("e:1"));
    }

    #[test]
    fn weight_halves_every_half_life() {
        let d = Decay::new(Some(Duration::from_secs(3600)));
        assert_eq!(d.weight(0, 0), 1.0);
        assert!((d.weight(HOUR, 0) - 2.0).abs() < 1e-12);
        assert!((d.weight(0, 2 * HOUR) - 0.25).abs() < 1e-12);
        assert!(!d.needs_rebase(64 * HOUR, 0));
        assert!(d.needs_rebase(64 * HOUR + 1, 0));
        let none = Decay::new(None);
        assert_eq!(none.weight(123 * HOUR, 0), 1.0);
        assert!(!none.needs_rebase(i64::MAX / 2, 0));
    }

    #[test]
    fn summary_ranks_by_mean_and_skips_arms_below_one_impression() {
        let arms = [
            ("a", 10.0, 1.0),
            ("b", 10.0, 5.0),
            ("c", 0.5, 0.5),
            ("d", 20.0, 10.0),
        ]
        .map(|(id, i, r)| {
            (
                id.to_string(),
                ArmStats {
                    impressions: i,
                    reward: r,
                },
            )
        });
        let s = summarize("seg", ArmStats::default(), arms, 2);
        assert_eq!(s.arms, 4);
        let ids: Vec<_> = s.top.iter().map(|a| a.item_id.as_str()).collect();
        assert_eq!(ids, ["d", "b"]);
        assert_eq!(s.top[0].mean, 0.5);
    }

    #[test]
    fn updates_are_checked() {
        assert!(StatUpdate::impression("s", "i").check().is_ok());
        assert!(StatUpdate::impression("", "i").check().is_err());
        assert!(StatUpdate::reward("s", "i", f64::NAN).check().is_err());
    }

    #[test]
    fn manual_clock_moves_when_told() {
        let c = ManualClock::new(5);
        c.advance(Duration::from_millis(10));
        assert_eq!(c.now_ms(), 15);
        c.set(1);
        assert_eq!(c.now_ms(), 1);
    }
}
