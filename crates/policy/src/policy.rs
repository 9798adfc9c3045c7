//! Exploration policies: they re-rank the ranker's candidates into the final slate.
//!
//! Every policy fills slots 1..n in order from the candidates not yet placed (the
//! *remaining* ones), and gives each slot its `propensity`: the probability that the
//! policy put that item in that slot, given the items of the earlier slots. The
//! candidates come best first; "the best remaining" is the first remaining one in that
//! order. With fewer candidates than n, all of them are returned.
//!
//! - `greedy`: the ranker's order. Propensity 1, never explored.
//! - `epsilon_greedy`: per slot, with probability 1 − ε the best remaining candidate,
//!   with probability ε one drawn uniformly from the remaining ones (possibly the best).
//!   Propensity, exact: (1 − ε)·[item is the best remaining] + ε/|remaining|. `explored`:
//!   the item is not the best remaining. ε is fixed, or decays with the segment's traffic
//!   N (its total impressions): ε_N = max(ε_min, ε / (1 + N/decay_impressions)).
//! - `ucb1`: by the bound mean reward + c·√(ln N / nᵢ) over the segment's statistics,
//!   mixed with the personal ranking (see below); an item never shown in the segment
//!   counts as shown once with the segment's mean reward. With `personal` 0, candidates
//!   never shown come first, in ranking order, then the others by bound. Ties keep
//!   ranking order. Deterministic: propensity 1; `explored`: the item differs from the
//!   ranker's item at that slot.
//! - `thompson`: per slot, a fresh draw θᵢ ~ Beta(α + sᵢ, β + nᵢ − sᵢ) for every
//!   candidate, with nᵢ its impressions and sᵢ its reward clamped to [0, nᵢ], mixed with
//!   the personal ranking (see below); the largest remaining value takes the slot. The propensity is a Monte Carlo estimate: `draws` further joint
//!   draws, shared by all slots, plus the draw that chose the item; the propensity is the
//!   share of these `draws + 1` draws in which the item has the largest θ among the
//!   remaining candidates. It is never 0; for a true probability p its bias is
//!   (1 − p)/(draws + 1) and its standard error √(draws·p(1 − p))/(draws + 1), at most
//!   1/(2√draws). It costs (draws + n) · candidates Beta samples per request.
//!   `explored`: the item is not the best remaining in ranking order.
//!
//! UCB1 and Thompson explore on top of the personal ranking instead of replacing it:
//! each candidate's value is `personal`·z(ranker score) + (1 − `personal`)·z(bandit
//! value), both standardised over the candidates, so two users of one segment still get
//! different slates, and the segment's statistics move items up and down within them.
//! `personal` 0 is the segment bandit alone, and so is a policy for candidates that come
//! with no personal ranking ([`Policy::impersonal`]).
//!
//! All randomness comes from the caller's RNG, so a seeded RNG replays a slate exactly.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::beta::{BetaDraw, Scratch};
use crate::draws::Draws;
use crate::error::ConfigError;
use crate::stats::SegmentStats;

/// Most Monte Carlo draws a Thompson policy may ask for.
pub const MAX_DRAWS: u32 = 100_000;

/// One item the ranker proposes; a candidate list comes best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The item.
    pub item_id: String,
    /// The ranker's score.
    pub score: f64,
}

impl Candidate {
    /// A candidate.
    pub fn new(item_id: impl Into<String>, score: f64) -> Self {
        Self {
            item_id: item_id.into(),
            score,
        }
    }
}

/// One position of the final slate.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// The item placed here.
    pub item_id: String,
    /// The ranker's score of the item.
    pub score: f64,
    /// Probability that the policy placed this item here, given the earlier slots.
    pub propensity: f64,
    /// Whether the item differs from what exploiting would have placed here.
    pub explored: bool,
}

fn one() -> f64 {
    1.0
}

fn default_draws() -> u32 {
    200
}

fn default_personal() -> f64 {
    DEFAULT_PERSONAL
}

/// Weight of the personal ranking in UCB1 and Thompson unless configured: in the
/// simulator's fresh shop, Thompson with 0.7 did better than with 0.5 and than on the
/// segment's statistics alone (0).
pub const DEFAULT_PERSONAL: f64 = 0.7;

/// A segment's policy, as configured (`kind` selects the variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyConfig {
    /// The ranker's order; no exploration. (A struct variant, so that stray fields are
    /// rejected like everywhere else.)
    Greedy {},
    /// Exploit with probability 1 − ε, explore uniformly with probability ε, per slot.
    EpsilonGreedy {
        /// ε, or ε at zero traffic when it decays: 0..=1.
        epsilon: f64,
        /// Floor of a decaying ε: 0..=1 (a floor above `epsilon` holds a decaying ε there).
        #[serde(default)]
        epsilon_min: f64,
        /// Impressions after which a decaying ε has halved; absent keeps ε fixed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decay_impressions: Option<f64>,
    },
    /// Upper confidence bound: mean reward + c·√(ln N / nᵢ), mixed with the personal
    /// ranking.
    Ucb1 {
        /// Weight of the confidence bonus, ≥ 0 (scale it with the reward's range).
        #[serde(default = "one")]
        c: f64,
        /// Weight of the personal ranking against the bound: 0..=1.
        #[serde(default = "default_personal")]
        personal: f64,
    },
    /// Thompson sampling with a Beta posterior per item.
    Thompson {
        /// Prior successes α₀ > 0.
        #[serde(default = "one")]
        alpha: f64,
        /// Prior failures β₀ > 0.
        #[serde(default = "one")]
        beta: f64,
        /// Monte Carlo draws for the propensity estimate: 1..=100000.
        #[serde(default = "default_draws")]
        draws: u32,
        /// Weight of the personal ranking against the draw: 0..=1.
        #[serde(default = "default_personal")]
        personal: f64,
    },
}

impl PolicyConfig {
    /// ε-greedy with a fixed ε (no decay).
    pub fn epsilon_greedy(epsilon: f64) -> Self {
        Self::EpsilonGreedy {
            epsilon,
            epsilon_min: 0.0,
            decay_impressions: None,
        }
    }

    /// UCB1 with bonus weight `c`, mixed with the personal ranking by default.
    pub fn ucb1(c: f64) -> Self {
        Self::Ucb1 {
            c,
            personal: DEFAULT_PERSONAL,
        }
    }

    /// Thompson sampling with prior (α, β) and `draws` propensity draws, mixed with the
    /// personal ranking by default.
    pub fn thompson(alpha: f64, beta: f64, draws: u32) -> Self {
        Self::Thompson {
            alpha,
            beta,
            draws,
            personal: DEFAULT_PERSONAL,
        }
    }

    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Greedy {} => "greedy",
            Self::EpsilonGreedy { .. } => "epsilon_greedy",
            Self::Ucb1 { .. } => "ucb1",
            Self::Thompson { .. } => "thompson",
        }
    }

    /// Checks the parameters; the error names the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let finite = |field: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(ConfigError::new(field, format!("is {v}; must be finite")))
            }
        };
        let weight = |v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    "personal",
                    format!("is {v}; must be 0..=1"),
                ))
            }
        };
        match *self {
            Self::Greedy {} => Ok(()),
            Self::EpsilonGreedy {
                epsilon,
                epsilon_min,
                decay_impressions,
            } => {
                finite("epsilon", epsilon)?;
                finite("epsilon_min", epsilon_min)?;
                if !(0.0..=1.0).contains(&epsilon) {
                    return Err(ConfigError::new(
                        "epsilon",
                        format!("is {epsilon}; must be 0..=1"),
                    ));
                }
                if !(0.0..=1.0).contains(&epsilon_min) {
                    return Err(ConfigError::new(
                        "epsilon_min",
                        format!("is {epsilon_min}; must be 0..=1"),
                    ));
                }
                if let Some(d) = decay_impressions {
                    finite("decay_impressions", d)?;
                    if d <= 0.0 {
                        return Err(ConfigError::new(
                            "decay_impressions",
                            format!("is {d}; must be > 0"),
                        ));
                    }
                }
                Ok(())
            }
            Self::Ucb1 { c, personal } => {
                finite("c", c)?;
                if c < 0.0 {
                    return Err(ConfigError::new("c", format!("is {c}; must be >= 0")));
                }
                weight(personal)
            }
            Self::Thompson {
                alpha,
                beta,
                draws,
                personal,
            } => {
                weight(personal)?;
                for (field, v) in [("alpha", alpha), ("beta", beta)] {
                    finite(field, v)?;
                    if v <= 0.0 {
                        return Err(ConfigError::new(field, format!("is {v}; must be > 0")));
                    }
                }
                if !(1..=MAX_DRAWS).contains(&draws) {
                    return Err(ConfigError::new(
                        "draws",
                        format!("is {draws}; must be 1..={MAX_DRAWS}"),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// A validated policy, ready to select slates.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    config: PolicyConfig,
}

/// The exploit-only slate: the first `n` candidates, propensity 1, never explored. It is
/// also the fallback when a policy's statistics cannot be read.
pub fn exploit(candidates: &[Candidate], n: usize) -> Vec<Slot> {
    candidates
        .iter()
        .take(n)
        .map(|c| Slot {
            item_id: c.item_id.clone(),
            score: c.score,
            propensity: 1.0,
            explored: false,
        })
        .collect()
}

impl Policy {
    /// A policy from its configuration, which is validated.
    pub fn from_config(config: &PolicyConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config: config.clone(),
        })
    }

    /// The policy that never explores.
    pub fn greedy() -> Self {
        Self {
            config: PolicyConfig::Greedy {},
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The policy for candidates whose scores are no personal ranking (popularity, for a
    /// user the encoder cannot rank): UCB1 and Thompson on the segment's statistics alone
    /// (`personal` 0); other kinds as they are.
    pub fn impersonal(&self) -> Policy {
        let mut config = self.config.clone();
        if let PolicyConfig::Ucb1 { personal, .. } | PolicyConfig::Thompson { personal, .. } =
            &mut config
        {
            *personal = 0.0;
        }
        Self { config }
    }

    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        self.config.kind()
    }

    /// Whether selecting needs the segment's statistics (if not, skip fetching them).
    pub fn needs_stats(&self) -> bool {
        match self.config {
            PolicyConfig::Greedy {} => false,
            PolicyConfig::EpsilonGreedy {
                decay_impressions, ..
            } => decay_impressions.is_some(),
            PolicyConfig::Ucb1 { .. } | PolicyConfig::Thompson { .. } => true,
        }
    }

    /// Whether it explores by each item's statistics (UCB1, Thompson), which a segment's
    /// prior then informs.
    pub fn explores_by_item(&self) -> bool {
        matches!(
            self.config,
            PolicyConfig::Ucb1 { .. } | PolicyConfig::Thompson { .. }
        )
    }

    /// The exploration rate ε for a segment with these statistics (0 for other kinds).
    pub fn epsilon(&self, stats: &SegmentStats) -> f64 {
        match self.config {
            PolicyConfig::EpsilonGreedy {
                epsilon,
                epsilon_min,
                decay_impressions: Some(d),
            } => {
                let n = stats.total_impressions.max(0.0);
                (epsilon / (1.0 + n / d)).max(epsilon_min)
            }
            PolicyConfig::EpsilonGreedy { epsilon, .. } => epsilon,
            _ => 0.0,
        }
    }

    /// The slate for `n` slots from `candidates` (best first), with the segment's
    /// statistics. See the module documentation for each policy's semantics.
    pub fn select<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        stats: &SegmentStats,
        n: usize,
        rng: &mut R,
    ) -> Vec<Slot> {
        match self.config {
            PolicyConfig::Greedy {} => exploit(candidates, n),
            PolicyConfig::EpsilonGreedy { .. } => {
                epsilon_greedy(candidates, self.epsilon(stats), n, rng)
            }
            PolicyConfig::Ucb1 { c, personal } => {
                let order = ucb_order(candidates, stats, c, personal);
                order
                    .iter()
                    .take(n)
                    .enumerate()
                    .map(|(k, &i)| Slot {
                        item_id: candidates[i].item_id.clone(),
                        score: candidates[i].score,
                        propensity: 1.0,
                        explored: i != k,
                    })
                    .collect()
            }
            PolicyConfig::Thompson {
                alpha,
                beta,
                draws,
                personal,
            } => {
                let posteriors = Posteriors::new(candidates, stats, alpha, beta);
                let mix = Mix::new(candidates, personal);
                thompson(candidates, &posteriors, &mix, draws as usize, n, rng)
            }
        }
    }

    /// The probability of each candidate (by index) to fill the next slot, given that the
    /// candidates at indices `placed` fill the earlier ones. Exact for all kinds but
    /// Thompson, which estimates it from `draws` joint draws (so the values sum to 1).
    pub fn slot_probabilities<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        stats: &SegmentStats,
        placed: &[usize],
        rng: &mut R,
    ) -> Vec<f64> {
        let mut taken = vec![false; candidates.len()];
        for &i in placed {
            if let Some(t) = taken.get_mut(i) {
                *t = true;
            }
        }
        let remaining: Vec<usize> = (0..candidates.len()).filter(|&i| !taken[i]).collect();
        let mut p = vec![0.0; candidates.len()];
        let Some(&best) = remaining.first() else {
            return p;
        };
        match self.config {
            PolicyConfig::Greedy {} => p[best] = 1.0,
            PolicyConfig::EpsilonGreedy { .. } => {
                let eps = self.epsilon(stats);
                for &i in &remaining {
                    p[i] = eps / remaining.len() as f64;
                }
                p[best] += 1.0 - eps;
            }
            PolicyConfig::Ucb1 { c, personal } => {
                if let Some(&next) = ucb_order(candidates, stats, c, personal)
                    .iter()
                    .find(|&&i| !taken[i])
                {
                    p[next] = 1.0;
                }
            }
            PolicyConfig::Thompson { .. } => {
                p = win_shares(&self.mixed_draws(candidates, stats, rng), &taken);
            }
        }
        p
    }

    /// A Thompson policy's `draws` joint draws of the candidates' values, each mixed with
    /// the personal ranking as [`Policy::select`] mixes it; none for other policies.
    fn mixed_draws<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        stats: &SegmentStats,
        rng: &mut R,
    ) -> Draws {
        let PolicyConfig::Thompson {
            alpha,
            beta,
            draws,
            personal,
        } = self.config
        else {
            return Draws::zeros(0, candidates.len());
        };
        Mix::new(candidates, personal).draws(
            &Posteriors::new(candidates, stats, alpha, beta),
            draws as usize,
            rng,
        )
    }
}

/// For the draws of `mixed`, the share of draws in which each candidate is the best of
/// those not `taken` (at least one is not).
fn win_shares(mixed: &Draws, taken: &[bool]) -> Vec<f64> {
    let mut p = vec![0.0; taken.len()];
    for i in mixed.best(0..mixed.rows(), taken) {
        p[i] += 1.0;
    }
    p.iter_mut().for_each(|v| *v /= mixed.rows().max(1) as f64);
    p
}

fn epsilon_greedy<R: Rng + ?Sized>(
    candidates: &[Candidate],
    eps: f64,
    n: usize,
    rng: &mut R,
) -> Vec<Slot> {
    let mut remaining: Vec<usize> = (0..candidates.len()).collect();
    let mut slots = Vec::with_capacity(n.min(candidates.len()));
    while slots.len() < n && !remaining.is_empty() {
        let len = remaining.len();
        // Exploring may land on the best remaining candidate too; then it is no exploration.
        let pos = if eps > 0.0 && rng.random::<f64>() < eps {
            rng.random_range(0..len)
        } else {
            0
        };
        let i = remaining.remove(pos);
        let exploit_share = if pos == 0 { 1.0 - eps } else { 0.0 };
        slots.push(Slot {
            item_id: candidates[i].item_id.clone(),
            score: candidates[i].score,
            propensity: exploit_share + eps / len as f64,
            explored: pos != 0,
        });
    }
    slots
}

/// Standard scores of `values` (all 0 when they do not vary), so that scores of
/// different scales mix.
pub fn z(values: &[f64]) -> Vec<f64> {
    let mut z = values.to_vec();
    standardise(&mut z);
    z
}

/// [`z`] in place.
fn standardise(values: &mut [f64]) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    for v in values {
        *v = if sd > 1e-12 { (*v - mean) / sd } else { 0.0 };
    }
}

/// Mixes bandit values with the personal ranking: w·z(score) + (1 − w)·z(value).
struct Mix {
    /// w·z(score) per candidate; `None` when w is 0 (the values are used as they are).
    personal: Option<Vec<f64>>,
    weight: f64,
}

impl Mix {
    fn new(candidates: &[Candidate], weight: f64) -> Self {
        let scores: Vec<f64> = candidates.iter().map(|c| c.score).collect();
        Self {
            personal: (weight > 0.0).then(|| z(&scores).into_iter().map(|v| weight * v).collect()),
            weight,
        }
    }

    fn apply(&self, values: &[f64]) -> Vec<f64> {
        let mut mixed = values.to_vec();
        self.apply_in_place(&mut mixed);
        mixed
    }

    /// [`Mix::apply`] without allocating: `values` become the mixed values.
    fn apply_in_place(&self, values: &mut [f64]) {
        let Some(personal) = &self.personal else {
            return;
        };
        standardise(values);
        for (v, p) in values.iter_mut().zip(personal) {
            *v = p + (1.0 - self.weight) * *v;
        }
    }

    /// Draws `draws` joint values from `posteriors` and mixes each draw.
    fn draws<R: Rng + ?Sized>(&self, posteriors: &Posteriors, draws: usize, rng: &mut R) -> Draws {
        let mut theta = posteriors.sample(draws, rng);
        if let Some(personal) = &self.personal {
            theta.mix(personal, self.weight);
        }
        theta
    }
}

/// Candidate indices in UCB1 order (see the module documentation).
fn ucb_order(candidates: &[Candidate], stats: &SegmentStats, c: f64, personal: f64) -> Vec<usize> {
    if personal > 0.0 {
        let n = stats.total_impressions.max(0.0);
        let ln_n = (n + 1.0).ln();
        let mean = if n > 0.0 { stats.total_reward / n } else { 0.0 };
        let bounds: Vec<f64> = candidates
            .iter()
            .map(|cand| {
                let arm = stats.arm(&cand.item_id);
                let (shown, reward) = if arm.impressions > 0.0 {
                    (arm.impressions, arm.reward)
                } else {
                    (1.0, mean)
                };
                reward / shown + c * (ln_n / shown).sqrt()
            })
            .collect();
        let keys = Mix::new(candidates, personal).apply(&bounds);
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]));
        return order;
    }
    let ln_n = stats.total_impressions.max(1.0).ln();
    // None: never shown, goes first.
    let keys: Vec<Option<f64>> = candidates
        .iter()
        .map(|cand| {
            let arm = stats.arm(&cand.item_id);
            (arm.impressions > 0.0)
                .then(|| arm.reward / arm.impressions + c * (ln_n / arm.impressions).sqrt())
        })
        .collect();
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Stable sort: ties keep ranking order.
    order.sort_by(|&a, &b| match (keys[a], keys[b]) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => y.total_cmp(&x),
    });
    order
}

impl Policy {
    /// [`Policy::slot_probabilities`] for every slot of `slate` (candidate indices): row
    /// k is the distribution over candidates of slot k with `slate[..k]` placed. A
    /// Thompson policy's rows come from one set of `draws` joint draws, shared by the
    /// slots, so a slate costs one slot's sampling.
    pub fn slate_probabilities<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        stats: &SegmentStats,
        slate: &[usize],
        rng: &mut R,
    ) -> Vec<Vec<f64>> {
        if !matches!(self.config, PolicyConfig::Thompson { .. }) {
            return (0..slate.len())
                .map(|k| self.slot_probabilities(candidates, stats, &slate[..k], rng))
                .collect();
        }
        let m = candidates.len();
        let mixed = self.mixed_draws(candidates, stats, rng);
        let mut taken = vec![false; m];
        (0..slate.len())
            .map(|k| {
                if let Some(t) = k.checked_sub(1).and_then(|j| taken.get_mut(slate[j])) {
                    *t = true;
                }
                if taken.iter().all(|&t| t) {
                    return vec![0.0; m];
                }
                win_shares(&mixed, &taken)
            })
            .collect()
    }
}

/// Beta posteriors of the candidates, in candidate order.
struct Posteriors {
    dists: Vec<Result<BetaDraw, f64>>,
}

impl Posteriors {
    fn new(candidates: &[Candidate], stats: &SegmentStats, alpha: f64, beta: f64) -> Self {
        let dists = candidates
            .iter()
            .map(|cand| {
                let arm = stats.arm(&cand.item_id);
                let n = if arm.impressions.is_finite() {
                    arm.impressions.max(0.0)
                } else {
                    0.0
                };
                let s = if arm.reward.is_finite() {
                    arm.reward.clamp(0.0, n)
                } else {
                    0.0
                };
                let (a, b) = (alpha + s, beta + n - s);
                // Parameters are positive and finite by construction; should the
                // distribution still refuse them, its mean is a sane stand-in.
                BetaDraw::new(a, b).ok_or(a / (a + b))
            })
            .collect();
        Self { dists }
    }

    /// `rows` joint draws of every candidate's θ.
    fn sample<R: Rng + ?Sized>(&self, rows: usize, rng: &mut R) -> Draws {
        let mut theta = Draws::zeros(rows, self.dists.len());
        let mut scratch = Scratch::default();
        for (column, dist) in theta.columns_mut().zip(&self.dists) {
            match dist {
                Ok(beta) => beta.fill(column, &mut scratch, rng),
                Err(mean) => column.fill(*mean),
            }
        }
        theta
    }
}

fn thompson<R: Rng + ?Sized>(
    candidates: &[Candidate],
    posteriors: &Posteriors,
    mix: &Mix,
    draws: usize,
    n: usize,
    rng: &mut R,
) -> Vec<Slot> {
    let m = candidates.len();
    let slots_n = n.min(m);
    if slots_n == 0 {
        return Vec::new();
    }
    // Each slot's own draw first, then the estimate's draws; every candidate is drawn in
    // each, so that the mix standardises over the same set.
    let theta = mix.draws(posteriors, slots_n + draws, rng);
    let estimate = slots_n..slots_n + draws;
    let mut taken = vec![false; m];
    // The best remaining candidate of every estimate draw: it changes only in the draws
    // whose best was taken, and there to the best of the rest.
    let mut best = theta.best(estimate.clone(), &taken);
    let mut slots = Vec::with_capacity(slots_n);
    for k in 0..slots_n {
        let chosen = theta.best_of(k, &taken);
        let wins = best.iter().filter(|&&b| b == chosen).count();
        slots.push(Slot {
            item_id: candidates[chosen].item_id.clone(),
            score: candidates[chosen].score,
            propensity: (wins + 1) as f64 / (draws + 1) as f64,
            explored: taken.iter().position(|&t| !t) != Some(chosen),
        });
        taken[chosen] = true;
        if wins > 0 && k + 1 < slots_n {
            best = theta.best(estimate.clone(), &taken);
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use rand_distr::{Beta, Distribution};

    use super::*;
    use crate::stats::ArmStats;

    fn candidates(m: usize) -> Vec<Candidate> {
        (0..m)
            .map(|i| Candidate::new(format!("item-{i}"), (m - i) as f64))
            .collect()
    }

    fn stats(arms: &[(&str, f64, f64)]) -> SegmentStats {
        SegmentStats {
            total_impressions: arms.iter().map(|a| a.1).sum(),
            total_reward: arms.iter().map(|a| a.2).sum(),
            arms: arms
                .iter()
                .map(|&(id, impressions, reward)| {
                    (
                        id.to_string(),
                        ArmStats {
                            impressions,
                            reward,
                        },
                    )
                })
                .collect(),
        }
    }

    fn eps_policy(epsilon: f64) -> Policy {
        Policy::from_config(&PolicyConfig::EpsilonGreedy {
            epsilon,
            epsilon_min: 0.0,
            decay_impressions: None,
        })
        .unwrap()
    }

    /// Thompson on the segment's statistics alone.
    fn thompson_policy(draws: u32) -> Policy {
        Policy::from_config(&PolicyConfig::Thompson {
            alpha: 1.0,
            beta: 1.0,
            draws,
            personal: 0.0,
        })
        .unwrap()
    }

    #[test]
    fn slate_probabilities_follow_each_slot_with_the_earlier_ones_placed() {
        let c = candidates(6);
        let s = stats(&[
            ("item-0", 40.0, 4.0),
            ("item-1", 40.0, 12.0),
            ("item-2", 40.0, 8.0),
            ("item-3", 5.0, 1.0),
        ]);
        let slate = [1, 2, 0];
        let mut rng = SmallRng::seed_from_u64(5);
        let eps = eps_policy(0.3);
        let rows = eps.slate_probabilities(&c, &s, &slate, &mut rng);
        for (k, row) in rows.iter().enumerate() {
            assert_eq!(
                row,
                &eps.slot_probabilities(&c, &s, &slate[..k], &mut rng),
                "slot {k}"
            );
        }
        // Thompson: one set of draws for the slate, each row as the slot's own estimate.
        let thompson = thompson_policy(20_000);
        let rows = thompson.slate_probabilities(&c, &s, &slate, &mut rng);
        assert_eq!(rows.len(), 3);
        for (k, row) in rows.iter().enumerate() {
            let alone = thompson.slot_probabilities(&c, &s, &slate[..k], &mut rng);
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9, "slot {k}");
            for &placed in &slate[..k] {
                assert_eq!(row[placed], 0.0, "slot {k} cannot take {placed} again");
            }
            for (i, (a, b)) in row.iter().zip(&alone).enumerate() {
                assert!((a - b).abs() < 0.03, "slot {k}, item {i}: {a} vs {b}");
            }
        }
    }

    /// |observed − expected| within 4 standard deviations of a binomial count.
    fn assert_binomial(observed: usize, trials: usize, p: f64, what: &str) {
        let mean = trials as f64 * p;
        let sd = (trials as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (observed as f64 - mean).abs() <= 4.0 * sd.max(0.5),
            "{what}: observed {observed} of {trials}, expected {mean:.1} ± {sd:.1}"
        );
    }

    #[test]
    fn greedy_keeps_the_ranker_order() {
        let c = candidates(5);
        let mut rng = SmallRng::seed_from_u64(1);
        let slots = Policy::greedy().select(&c, &SegmentStats::default(), 3, &mut rng);
        let ids: Vec<_> = slots.iter().map(|s| s.item_id.as_str()).collect();
        assert_eq!(ids, ["item-0", "item-1", "item-2"]);
        assert!(slots.iter().all(|s| s.propensity == 1.0 && !s.explored));
        assert_eq!(slots[0].score, 5.0);
    }

    #[test]
    fn fewer_candidates_than_slots_returns_them_all() {
        let c = candidates(3);
        let s = stats(&[("item-1", 10.0, 5.0)]);
        let mut rng = SmallRng::seed_from_u64(2);
        for config in [
            PolicyConfig::Greedy {},
            PolicyConfig::EpsilonGreedy {
                epsilon: 0.5,
                epsilon_min: 0.0,
                decay_impressions: None,
            },
            PolicyConfig::ucb1(1.0),
            PolicyConfig::thompson(1.0, 1.0, 50),
        ] {
            let p = Policy::from_config(&config).unwrap();
            let slots = p.select(&c, &s, 10, &mut rng);
            let mut ids: Vec<_> = slots.iter().map(|s| s.item_id.clone()).collect();
            ids.sort();
            assert_eq!(ids, ["item-0", "item-1", "item-2"], "{}", p.kind());
            assert!(p.select(&[], &s, 10, &mut rng).is_empty());
            assert!(p.select(&c, &s, 0, &mut rng).is_empty());
        }
    }

    #[test]
    fn epsilon_greedy_explores_at_rate_epsilon() {
        let c = candidates(10);
        let eps = 0.2;
        let p = eps_policy(eps);
        let mut rng = SmallRng::seed_from_u64(42);
        let trials = 20_000;
        let (mut explored_first, mut explored_any) = (0, 0);
        for _ in 0..trials {
            let slots = p.select(&c, &SegmentStats::default(), 3, &mut rng);
            explored_first += usize::from(slots[0].explored);
            explored_any += slots.iter().filter(|s| s.explored).count();
        }
        // Exploring picks the best item 1 time in 10, and that is no exploration.
        assert_binomial(explored_first, trials, eps * 0.9, "slot 1");
        // Slots 2 and 3 explore among 9 and 8 remaining candidates.
        let per_trial = eps * (0.9 + 8.0 / 9.0 + 7.0 / 8.0);
        let expected = trials as f64 * per_trial;
        assert!(
            (explored_any as f64 - expected).abs() < 4.0 * (trials as f64 * 3.0 * 0.25).sqrt(),
            "all slots: {explored_any} vs {expected:.0}"
        );
    }

    #[test]
    fn epsilon_greedy_propensities_are_exact_and_match_frequencies() {
        let c = candidates(6);
        let p = eps_policy(0.3);
        let none = SegmentStats::default();
        let mut rng = SmallRng::seed_from_u64(7);
        let probs = p.slot_probabilities(&c, &none, &[], &mut rng);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((probs[0] - (0.7 + 0.05)).abs() < 1e-12);
        assert!((probs[3] - 0.05).abs() < 1e-12);

        let trials = 20_000;
        let mut first = [0usize; 6];
        // Slot 2 given that slot 1 holds item-0: its remaining are items 1..=5.
        let mut second_after_best = [0usize; 6];
        let mut after_best = 0;
        for _ in 0..trials {
            let slots = p.select(&c, &none, 2, &mut rng);
            let i0 = idx(&slots[0].item_id);
            let i1 = idx(&slots[1].item_id);
            assert!((slots[0].propensity - probs[i0]).abs() < 1e-12);
            let cond = p.slot_probabilities(&c, &none, &[i0], &mut rng);
            assert!((slots[1].propensity - cond[i1]).abs() < 1e-12);
            assert!((cond.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            first[i0] += 1;
            if i0 == 0 {
                after_best += 1;
                second_after_best[i1] += 1;
            }
        }
        // Chi-square with 5 degrees of freedom; 20.52 is its 0.999 quantile.
        let chi2: f64 = (0..6)
            .map(|i| {
                let e = trials as f64 * probs[i];
                (first[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 20.52, "chi-square {chi2}: {first:?}");
        let cond = p.slot_probabilities(&c, &none, &[0], &mut rng);
        assert_eq!(cond[0], 0.0);
        for i in 1..6 {
            assert_binomial(second_after_best[i], after_best, cond[i], "slot 2");
        }
    }

    fn idx(item: &str) -> usize {
        item.trim_start_matches("item-").parse().unwrap()
    }

    #[test]
    fn epsilon_decays_with_traffic_down_to_its_floor() {
        let p = Policy::from_config(&PolicyConfig::EpsilonGreedy {
            epsilon: 0.4,
            epsilon_min: 0.05,
            decay_impressions: Some(1000.0),
        })
        .unwrap();
        assert!(p.needs_stats());
        let at = |n: f64| {
            p.epsilon(&SegmentStats {
                total_impressions: n,
                ..SegmentStats::default()
            })
        };
        assert!((at(0.0) - 0.4).abs() < 1e-12);
        assert!((at(1000.0) - 0.2).abs() < 1e-12);
        assert!((at(3000.0) - 0.1).abs() < 1e-12);
        assert!((at(1e9) - 0.05).abs() < 1e-12);
        assert!(!eps_policy(0.1).needs_stats());
        assert_eq!(eps_policy(0.1).epsilon(&SegmentStats::default()), 0.1);
    }

    #[test]
    fn epsilon_zero_is_greedy_and_one_is_uniform() {
        let c = candidates(4);
        let mut rng = SmallRng::seed_from_u64(3);
        let slots = eps_policy(0.0).select(&c, &SegmentStats::default(), 4, &mut rng);
        assert_eq!(slots, exploit(&c, 4));
        let probs =
            eps_policy(1.0).slot_probabilities(&c, &SegmentStats::default(), &[2], &mut rng);
        assert_eq!(probs, [1.0 / 3.0, 1.0 / 3.0, 0.0, 1.0 / 3.0]);
    }

    #[test]
    fn ucb_puts_untried_first_then_the_best_bound() {
        let c = candidates(5);
        let p = Policy::from_config(&PolicyConfig::Ucb1 {
            c: 1.0,
            personal: 0.0,
        })
        .unwrap();
        // item-0 and item-2 never shown; item-1 strong; item-3 weak but barely tried.
        let s = stats(&[
            ("item-1", 100.0, 60.0),
            ("item-3", 2.0, 0.0),
            ("item-4", 100.0, 10.0),
        ]);
        let mut rng = SmallRng::seed_from_u64(4);
        let slots = p.select(&c, &s, 5, &mut rng);
        let ids: Vec<_> = slots.iter().map(|s| s.item_id.as_str()).collect();
        // Bounds: item-1 0.6 + √(ln 202/100) ≈ 0.83; item-3 0 + √(ln 202/2) ≈ 1.63;
        // item-4 0.1 + 0.23 ≈ 0.33.
        assert_eq!(ids, ["item-0", "item-2", "item-3", "item-1", "item-4"]);
        let explored: Vec<_> = slots.iter().map(|s| s.explored).collect();
        assert_eq!(explored, [false, true, true, true, false]);
        assert!(slots.iter().all(|s| s.propensity == 1.0));
        let probs = p.slot_probabilities(&c, &s, &[0, 2], &mut rng);
        assert_eq!(probs, [0.0, 0.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn z_scores_mix_scales() {
        let z1 = z(&[1.0, 2.0, 3.0]);
        assert!((z1[0] + z1[2]).abs() < 1e-12 && z1[1].abs() < 1e-12);
        assert_eq!(z(&[5.0, 5.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn ucb_and_thompson_explore_on_top_of_the_personal_ranking() {
        // item-2 earns most in the segment; two users rank the candidates oppositely.
        let s = stats(&[
            ("item-0", 100.0, 5.0),
            ("item-1", 100.0, 5.0),
            ("item-2", 100.0, 50.0),
            ("item-3", 100.0, 5.0),
            ("item-4", 100.0, 5.0),
        ]);
        let a = candidates(5);
        let b: Vec<Candidate> = a
            .iter()
            .rev()
            .enumerate()
            .map(|(k, c)| Candidate::new(c.item_id.clone(), (5 - k) as f64))
            .collect();
        let mut rng = SmallRng::seed_from_u64(5);
        let first = |p: &Policy, c: &[Candidate], rng: &mut SmallRng| {
            p.select(c, &s, 3, rng)[0].item_id.clone()
        };
        let mixed = Policy::from_config(&PolicyConfig::ucb1(1.0)).unwrap();
        assert_eq!(first(&mixed, &a, &mut rng), "item-0");
        assert_eq!(first(&mixed, &b, &mut rng), "item-4");
        let alone = Policy::from_config(&PolicyConfig::Ucb1 {
            c: 1.0,
            personal: 0.0,
        })
        .unwrap();
        assert_eq!(first(&alone, &a, &mut rng), "item-2");
        assert_eq!(first(&alone, &b, &mut rng), "item-2");
        // Thompson: the user's own first choice is the likeliest first slot, and the
        // propensities still sum to one.
        let thompson = Policy::from_config(&PolicyConfig::thompson(1.0, 1.0, 400)).unwrap();
        for (c, own) in [(&a, 0), (&b, 0)] {
            let p = thompson.slot_probabilities(c, &s, &[], &mut rng);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!(p[own] > 0.5, "{p:?}");
        }
    }

    #[test]
    fn thompson_slot_propensities_sum_to_one_and_match_frequencies() {
        let c = candidates(5);
        let s = stats(&[
            ("item-0", 20.0, 4.0),
            ("item-1", 20.0, 8.0),
            ("item-2", 5.0, 2.0),
            ("item-3", 40.0, 30.0),
        ]);
        let p = thompson_policy(200);
        let mut rng = SmallRng::seed_from_u64(11);
        let estimate = p.slot_probabilities(&c, &s, &[], &mut rng);
        assert!((estimate.iter().sum::<f64>() - 1.0).abs() < 1e-12);

        // A precise reference from many draws.
        let precise = thompson_policy(MAX_DRAWS).slot_probabilities(&c, &s, &[], &mut rng);
        let trials = 20_000;
        let mut counts = [0usize; 5];
        let (mut err_sum, mut sq_err_sum, mut expected_sq_err) = (0.0, 0.0, 0.0);
        for _ in 0..trials {
            let slot = &p.select(&c, &s, 1, &mut rng)[0];
            let i = idx(&slot.item_id);
            counts[i] += 1;
            let pi = precise[i];
            assert!(slot.propensity > 0.0 && (slot.propensity - pi).abs() < 0.2);
            // The estimate is (wins + 1)/201 with wins ~ Binomial(200, pᵢ): its error has
            // variance 200·pᵢ(1 − pᵢ)/201² and bias (1 − pᵢ)/201.
            let err = slot.propensity - pi;
            err_sum += err;
            sq_err_sum += err * err;
            expected_sq_err += (200.0 * pi * (1.0 - pi) + (1.0 - pi).powi(2)) / 201f64.powi(2);
        }
        let ratio = sq_err_sum / expected_sq_err;
        assert!((0.85..1.15).contains(&ratio), "squared error ratio {ratio}");
        for i in 0..5 {
            // Sampling error of the counts plus that of the reference estimate.
            let pi = precise[i];
            let sd = (trials as f64 * pi * (1.0 - pi)).sqrt()
                + trials as f64 * (pi * (1.0 - pi) / f64::from(MAX_DRAWS)).sqrt();
            assert!(
                (counts[i] as f64 - trials as f64 * pi).abs() <= 4.0 * sd.max(0.5),
                "item-{i}: {} vs {:.1}",
                counts[i],
                trials as f64 * pi
            );
        }
        // The estimator's bias is at most (1 − p)/(draws + 1) per slot.
        assert!((err_sum / trials as f64).abs() < 1.0 / 201.0);
    }

    /// The first of `among` with the largest θ.
    fn argmax(theta: &[f64], among: &[usize]) -> usize {
        let mut best = among[0];
        for &i in &among[1..] {
            if theta[i] > theta[best] {
                best = i;
            }
        }
        best
    }

    #[test]
    fn thompson_chooses_as_one_beta_draw_at_a_time_would() {
        // Posteriors from small to large, mixed with a personal ranking.
        let c = candidates(8);
        let arms: Vec<(String, f64, f64)> = (0..8)
            .map(|i| {
                let shown = [3.0, 40.0, 400.0, 5_000.0, 60_000.0][i % 5];
                let rate = 0.05 + 0.01 * i as f64;
                (format!("item-{i}"), shown, shown * rate)
            })
            .collect();
        let arms: Vec<(&str, f64, f64)> = arms
            .iter()
            .map(|(id, n, r)| (id.as_str(), *n, *r))
            .collect();
        let s = stats(&arms);
        let policy = Policy::from_config(&PolicyConfig::thompson(1.0, 1.0, MAX_DRAWS)).unwrap();
        let mut rng = SmallRng::seed_from_u64(17);
        let batched = policy.slot_probabilities(&c, &s, &[2], &mut rng);
        // The reference: rand_distr's Beta sampler, one draw at a time, mixed the same way.
        let PolicyConfig::Thompson { personal, .. } = policy.config else {
            unreachable!()
        };
        let mix = Mix::new(&c, personal);
        let betas: Vec<Beta<f64>> = arms
            .iter()
            .map(|&(_, n, r)| Beta::new(1.0 + r, 1.0 + n - r).unwrap())
            .collect();
        let remaining: Vec<usize> = (0..8).filter(|&i| i != 2).collect();
        let trials = 100_000;
        let mut counts = [0.0; 8];
        for _ in 0..trials {
            let theta: Vec<f64> = betas.iter().map(|b| b.sample(&mut rng)).collect();
            counts[argmax(&mix.apply(&theta), &remaining)] += 1.0;
        }
        for i in 0..8 {
            let p = counts[i] / f64::from(trials);
            // Both are shares of 100,000 independent draws.
            let sd = (2.0 * p * (1.0 - p) / f64::from(trials)).sqrt();
            assert!(
                (batched[i] - p).abs() <= 5.0 * sd + 1e-4,
                "item-{i}: {} batched, {p} one at a time",
                batched[i]
            );
        }
    }

    #[test]
    fn thompson_later_slots_are_conditional_on_earlier_ones() {
        let c = candidates(4);
        let s = stats(&[
            ("item-0", 1000.0, 100.0),
            ("item-1", 1000.0, 200.0),
            ("item-2", 1000.0, 800.0),
            ("item-3", 1000.0, 900.0),
        ]);
        let p = thompson_policy(500);
        let mut rng = SmallRng::seed_from_u64(5);
        let slots = p.select(&c, &s, 2, &mut rng);
        assert_eq!(slots[0].item_id, "item-3");
        // Given item-3 is placed, item-2 is the best of the rest by far.
        assert_eq!(slots[1].item_id, "item-2");
        assert!(slots[0].explored && slots[1].explored);
        let probs = p.slot_probabilities(&c, &s, &[3], &mut rng);
        assert_eq!(probs[3], 0.0);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(probs[2] > 0.5);
    }

    #[test]
    fn thompson_clamps_rewards_to_impressions() {
        let c = candidates(2);
        // Rewards above impressions (e.g. several purchases) count as all successes.
        let s = stats(&[("item-0", 10.0, 0.0), ("item-1", 10.0, 500.0)]);
        let p = thompson_policy(100);
        let mut rng = SmallRng::seed_from_u64(6);
        let probs = p.slot_probabilities(&c, &s, &[], &mut rng);
        assert!(probs[1] > 0.95);
        let neg = stats(&[("item-0", 10.0, -50.0)]);
        let probs = p.slot_probabilities(&c, &neg, &[], &mut rng);
        // Beta(1, 11) against Beta(1, 1): the untried item wins.
        assert!(probs[1] > 0.8);
    }

    #[test]
    fn seeded_rngs_replay_slates() {
        let c = candidates(8);
        let s = stats(&[("item-1", 5.0, 1.0)]);
        let p = thompson_policy(50);
        let a = p.select(&c, &s, 4, &mut SmallRng::seed_from_u64(9));
        let b = p.select(&c, &s, 4, &mut SmallRng::seed_from_u64(9));
        assert_eq!(a, b);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let bad = [
            (
                PolicyConfig::EpsilonGreedy {
                    epsilon: 0.1,
                    epsilon_min: 1.2,
                    decay_impressions: None,
                },
                "epsilon_min",
            ),
            (
                PolicyConfig::EpsilonGreedy {
                    epsilon: 0.1,
                    epsilon_min: 0.0,
                    decay_impressions: Some(0.0),
                },
                "decay_impressions",
            ),
            (PolicyConfig::ucb1(-1.0), "c"),
            (PolicyConfig::ucb1(f64::NAN), "c"),
            (
                PolicyConfig::Ucb1 {
                    c: 1.0,
                    personal: 1.5,
                },
                "personal",
            ),
            (PolicyConfig::thompson(0.0, 1.0, 10), "alpha"),
            (PolicyConfig::thompson(1.0, 1.0, 0), "draws"),
        ];
        for (config, field) in bad {
            assert_eq!(Policy::from_config(&config).unwrap_err().field, field);
        }
    }
}
