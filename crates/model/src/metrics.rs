//! Full-ranking metrics: HR@{10,20}, NDCG@{10,20}, MRR@10 over every item of the catalog.
//!
//! The target's rank is the number of other items that score at least as high as it:
//! ties count against the model, so a constant scorer cannot look good.

use serde::Serialize;

/// Whether items the user already had are left in the ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryMode {
    /// Left in (RecBole's sequential protocol; what published numbers compare with).
    Included,
    /// Removed, except the target itself (what serving does).
    Excluded,
}

/// Sums of per-case metrics; [`Metrics::mean`] divides by the count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Hit rate at 10.
    pub hr10: f64,
    /// Hit rate at 20.
    pub hr20: f64,
    /// Normalised discounted cumulative gain at 10.
    pub ndcg10: f64,
    /// Normalised discounted cumulative gain at 20.
    pub ndcg20: f64,
    /// Mean reciprocal rank, cut at 10.
    pub mrr10: f64,
    /// Cases counted.
    pub cases: usize,
}

impl Metrics {
    /// Adds one case whose target ranked `rank` (0 = first).
    pub fn add_rank(&mut self, rank: usize) {
        let r = rank as f64;
        if rank < 10 {
            self.hr10 += 1.0;
            self.ndcg10 += 1.0 / (r + 2.0).log2();
            self.mrr10 += 1.0 / (r + 1.0);
        }
        if rank < 20 {
            self.hr20 += 1.0;
            self.ndcg20 += 1.0 / (r + 2.0).log2();
        }
        self.cases += 1;
    }

    /// Adds another set of sums.
    pub fn merge(&mut self, o: &Metrics) {
        self.hr10 += o.hr10;
        self.hr20 += o.hr20;
        self.ndcg10 += o.ndcg10;
        self.ndcg20 += o.ndcg20;
        self.mrr10 += o.mrr10;
        self.cases += o.cases;
    }

    /// The averages over the cases.
    pub fn mean(&self) -> Metrics {
        let n = self.cases.max(1) as f64;
        Metrics {
            hr10: self.hr10 / n,
            hr20: self.hr20 / n,
            ndcg10: self.ndcg10 / n,
            ndcg20: self.ndcg20 / n,
            mrr10: self.mrr10 / n,
            cases: self.cases,
        }
    }
}

/// The metrics' names, in the order of [`Metrics::values`].
pub const METRIC_NAMES: [&str; 5] = ["HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR@10"];

impl Metrics {
    /// HR@10, HR@20, NDCG@10, NDCG@20 and MRR@10, in that order.
    pub fn values(&self) -> [f64; 5] {
        [self.hr10, self.hr20, self.ndcg10, self.ndcg20, self.mrr10]
    }

    /// The five metrics of one case whose target ranked `rank`.
    pub fn of_rank(rank: usize) -> [f64; 5] {
        let mut m = Metrics::default();
        m.add_rank(rank);
        m.values()
    }
}

/// A two-sided confidence interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Interval {
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// Percentile bootstrap over cases (users): for each of the five metrics, the
/// `confidence` interval of the mean of `per_case` (one row per case, in
/// [`Metrics::values`] order), from `resamples` resamples of the cases with replacement
/// drawn from `seed`. The same seed gives the same intervals.
pub fn bootstrap(
    per_case: &[[f64; 5]],
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> [Interval; 5] {
    let n = per_case.len();
    if n == 0 || resamples == 0 {
        return [Interval::default(); 5];
    }
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut means: Vec<[f64; 5]> = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let mut sum = [0.0; 5];
        for _ in 0..n {
            let row = &per_case[rng.below(n as u64) as usize];
            for (s, v) in sum.iter_mut().zip(row) {
                *s += v;
            }
        }
        means.push(sum.map(|s| s / n as f64));
    }
    let tail = (1.0 - confidence) / 2.0;
    let at = |q: f64| ((q * (resamples - 1) as f64).round() as usize).min(resamples - 1);
    std::array::from_fn(|k| {
        let mut column: Vec<f64> = means.iter().map(|m| m[k]).collect();
        column.sort_by(f64::total_cmp);
        Interval {
            low: column[at(tail)],
            high: column[at(1.0 - tail)],
        }
    })
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HR@10 {:.4}  HR@20 {:.4}  NDCG@10 {:.4}  NDCG@20 {:.4}  MRR@10 {:.4}",
            self.hr10, self.hr20, self.ndcg10, self.ndcg20, self.mrr10
        )
    }
}

/// Rank of `target` among `scores[1..]` (index 0 is padding and never ranked). In
/// [`HistoryMode::Excluded`], the `history` items other than the target are skipped.
pub fn rank_of(scores: &[f32], target: u32, history: &[u32], mode: HistoryMode) -> usize {
    let t = scores[target as usize];
    let mut rank = scores
        .iter()
        .enumerate()
        .skip(1)
        .filter(|&(i, &s)| i != target as usize && s >= t)
        .count();
    if mode == HistoryMode::Excluded {
        let mut seen: Vec<u32> = history.iter().copied().filter(|&h| h != target).collect();
        seen.sort_unstable();
        seen.dedup();
        rank -= seen.iter().filter(|&&h| scores[h as usize] >= t).count();
    }
    rank
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_ranks_and_metrics() {
        // Index 0 is padding; items 1..=5.
        let scores = [99.0, 0.1, 0.9, 0.5, 0.7, 0.3];
        assert_eq!(rank_of(&scores, 2, &[], HistoryMode::Included), 0);
        assert_eq!(rank_of(&scores, 3, &[], HistoryMode::Included), 2);
        assert_eq!(rank_of(&scores, 3, &[2, 4], HistoryMode::Excluded), 0);
        // The target itself in the history is not removed.
        assert_eq!(rank_of(&scores, 3, &[3, 2], HistoryMode::Excluded), 1);
        // Ties count against the target.
        assert_eq!(
            rank_of(&[0.0, 1.0, 1.0, 1.0], 2, &[], HistoryMode::Included),
            2
        );

        let mut m = Metrics::default();
        m.add_rank(0); // hr 1, ndcg 1, mrr 1
        m.add_rank(2); // hr 1, ndcg 1/log2(4) = 0.5, mrr 1/3
        m.add_rank(15); // hr@10 0, hr@20 1, ndcg@20 1/log2(17)
        m.add_rank(40); // nothing
        let m = m.mean();
        assert!((m.hr10 - 0.5).abs() < 1e-12);
        assert!((m.hr20 - 0.75).abs() < 1e-12);
        assert!((m.ndcg10 - 1.5 / 4.0).abs() < 1e-12);
        assert!((m.ndcg20 - (1.5 + 1.0 / 17f64.log2()) / 4.0).abs() < 1e-12);
        assert!((m.mrr10 - (1.0 + 1.0 / 3.0) / 4.0).abs() < 1e-12);
        assert_eq!(m.cases, 4);
        assert_eq!(Metrics::of_rank(2)[2], 0.5);
    }

    #[test]
    fn bootstrap_intervals_hold_the_mean_shrink_with_more_cases_and_replay() {
        // Half the cases hit at rank 0, half miss.
        let cases = |n: usize| -> Vec<[f64; 5]> {
            (0..n)
                .map(|i| Metrics::of_rank(if i % 2 == 0 { 0 } else { 100 }))
                .collect()
        };
        let small = bootstrap(&cases(100), 1000, 0.95, 7);
        let large = bootstrap(&cases(10_000), 1000, 0.95, 7);
        for iv in [small[0], large[0]] {
            assert!(iv.low < 0.5 && 0.5 < iv.high, "{iv:?}");
        }
        // About ±1.96·√(0.25/n): 0.098 at 100 cases, 0.0098 at 10,000.
        let width = |iv: Interval| iv.high - iv.low;
        assert!((0.15..0.25).contains(&width(small[0])), "{small:?}");
        assert!((0.015..0.025).contains(&width(large[0])), "{large:?}");
        assert_eq!(bootstrap(&cases(100), 1000, 0.95, 7), small);
        // Every case the same: no spread at all.
        let same = bootstrap(&[Metrics::of_rank(3); 50], 200, 0.95, 1);
        assert_eq!(same[2].low, same[2].high);
        assert_eq!(bootstrap(&[], 100, 0.95, 1), [Interval::default(); 5]);
    }
}
