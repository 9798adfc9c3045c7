//! Popularity with exponential time decay: the cold-start ranker and fallback.
//!
//! An item's score at time t is Σ wₑ·exp(−(t − tₑ)/τ) over its events e, with τ set from
//! the half-life. Scores are stored relative to an anchor time, so an event costs O(1) and
//! the decay of all items at once is never computed: it is the same factor for every item
//! and does not change the order. Because the sum is order-independent, out-of-order
//! events land exactly where their timestamps put them.

/// Exponent past which the anchor moves forward, to keep stored values finite.
const REBASE_EXPONENT: f64 = 50.0;

/// Decayed popularity scores for items by dense index.
#[derive(Debug, Clone)]
pub struct Popularity {
    /// Stored score × exp((anchor − t)/τ) gives the score at t.
    stored: Vec<f64>,
    anchor_ms: i64,
    tau_ms: f64,
}

impl Popularity {
    /// Scores that halve every `half_life_ms` (at least 1 ms), anchored at `now_ms`.
    pub fn new(half_life_ms: f64, now_ms: i64) -> Self {
        Self {
            stored: Vec::new(),
            anchor_ms: now_ms,
            tau_ms: half_life_ms.max(1.0) / std::f64::consts::LN_2,
        }
    }

    /// Makes room for items up to index `len - 1`, new ones at zero.
    pub fn grow(&mut self, len: usize) {
        if self.stored.len() < len {
            self.stored.resize(len, 0.0);
        }
    }

    /// Adds `weight` to item `idx` as of `at_ms`.
    pub fn add(&mut self, idx: u32, weight: f64, at_ms: i64) {
        let mut exponent = (at_ms - self.anchor_ms) as f64 / self.tau_ms;
        if exponent > REBASE_EXPONENT {
            let factor = (-exponent).exp();
            self.stored.iter_mut().for_each(|s| *s *= factor);
            self.anchor_ms = at_ms;
            exponent = 0.0;
        }
        self.grow(idx as usize + 1);
        self.stored[idx as usize] += weight * exponent.exp();
    }

    /// The value that orders items: larger is more popular, at any single point in time.
    pub fn rank_key(&self, idx: u32) -> f64 {
        self.stored.get(idx as usize).copied().unwrap_or(0.0)
    }

    /// Item `idx`'s decayed score at `now_ms`.
    pub fn score_at(&self, idx: u32, now_ms: i64) -> f64 {
        self.rank_key(idx) * (-((now_ms - self.anchor_ms) as f64) / self.tau_ms).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn score_halves_every_half_life() {
        let mut p = Popularity::new(HOUR as f64, 0);
        p.add(0, 8.0, 0);
        assert!((p.score_at(0, 0) - 8.0).abs() < 1e-9);
        assert!((p.score_at(0, HOUR) - 4.0).abs() < 1e-9);
        assert!((p.score_at(0, 3 * HOUR) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn recent_events_outweigh_old_ones() {
        let mut p = Popularity::new(HOUR as f64, 0);
        p.add(0, 3.0, 0);
        p.add(1, 1.0, 2 * HOUR);
        // At 2h: item 0 is worth 3/4 = 0.75 < 1.
        assert!(p.rank_key(1) > p.rank_key(0));
        assert!((p.score_at(0, 2 * HOUR) - 0.75).abs() < 1e-9);
    }

    #[test]
    fn order_of_arrival_does_not_matter() {
        let mut a = Popularity::new(HOUR as f64, 0);
        let mut b = Popularity::new(HOUR as f64, 0);
        a.add(0, 1.0, 5 * HOUR);
        a.add(0, 1.0, HOUR);
        b.add(0, 1.0, HOUR);
        b.add(0, 1.0, 5 * HOUR);
        assert!((a.score_at(0, 6 * HOUR) - b.score_at(0, 6 * HOUR)).abs() < 1e-12);
    }

    #[test]
    fn rebasing_keeps_scores_finite_and_correct() {
        let mut p = Popularity::new(1000.0, 0);
        p.add(0, 1.0, 0);
        let far = 1000 * 200; // 200 half-lives: exp(138) would overflow the stored scale
        p.add(1, 1.0, far);
        assert!(p.rank_key(0).is_finite() && p.rank_key(1).is_finite());
        assert!((p.score_at(1, far) - 1.0).abs() < 1e-9);
        assert!(p.score_at(0, far) < 1e-50);
    }
}
