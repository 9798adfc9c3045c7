//! Scoring evaluation cases with the encoder or the popularity baseline, both ways
//! (history left in, history excluded), over the full item vocabulary.

use candle_core::Device;
use serde::Serialize;

use crate::ModelError;
use crate::data::{Case, Split};
use crate::metrics::{HistoryMode, Metrics, rank_of};
use crate::sasrec::SasRec;

/// Metrics for both history modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Report {
    /// History items left in the ranking (RecBole's sequential protocol).
    pub history_included: Metrics,
    /// History items removed from the ranking (what serving does).
    pub history_excluded: Metrics,
}

/// The rank of every case's target (0 = first), both ways, in the order of the cases.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ranks {
    /// History items left in the ranking.
    pub included: Vec<usize>,
    /// History items removed from the ranking.
    pub excluded: Vec<usize>,
}

impl Ranks {
    /// The metrics' averages.
    pub fn report(&self) -> Report {
        let mean = |ranks: &[usize]| {
            let mut m = Metrics::default();
            for &r in ranks {
                m.add_rank(r);
            }
            m.mean()
        };
        Report {
            history_included: mean(&self.included),
            history_excluded: mean(&self.excluded),
        }
    }
}

/// Ranks every case's target against the scores `score` gives its batch of cases.
pub fn rank_all(
    cases: &[Case],
    batch: usize,
    mut score: impl FnMut(&[Case]) -> Result<Vec<Vec<f32>>, ModelError>,
) -> Result<Ranks, ModelError> {
    let mut ranks = Ranks::default();
    for chunk in cases.chunks(batch.max(1)) {
        let scores = score(chunk)?;
        for (case, s) in chunk.iter().zip(&scores) {
            let rank = |mode| rank_of(s, case.target, &case.history, mode);
            ranks.included.push(rank(HistoryMode::Included));
            ranks.excluded.push(rank(HistoryMode::Excluded));
        }
    }
    Ok(ranks)
}

/// Encoder scores for a batch of cases: `[cases, num_items + 1]`.
pub fn encoder_scores(
    model: &SasRec,
    cases: &[Case],
    device: &Device,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let histories: Vec<&[u32]> = cases.iter().map(|c| c.history.as_slice()).collect();
    let contexts: Vec<_> = cases.iter().map(|c| c.context).collect();
    let (ids, hours, devices) = model.batch(&histories, &contexts, device)?;
    let users = model.user_vectors(&ids, &hours, &devices)?;
    let mut scores = model.scores(&users)?.to_vec2::<f32>()?;
    if let Some(w) = model.repeat_weight()? {
        for (s, case) in scores.iter_mut().zip(cases) {
            SasRec::add_repeat(w, s, &case.history);
        }
    }
    Ok(scores)
}

/// Evaluates the encoder on `cases`.
pub fn evaluate(model: &SasRec, cases: &[Case], device: &Device) -> Result<Report, ModelError> {
    Ok(encoder_ranks(model, cases, device)?.report())
}

/// The encoder's rank of every case's target.
pub fn encoder_ranks(model: &SasRec, cases: &[Case], device: &Device) -> Result<Ranks, ModelError> {
    rank_all(cases, 256, |chunk| encoder_scores(model, chunk, device))
}

/// Interaction counts per item index: the training sequences, plus the validation targets
/// when scoring the test cases (everything before the test items).
pub fn popularity_scores(split: &Split, num_items: usize, for_test: bool) -> Vec<f32> {
    let mut counts = vec![0f32; num_items + 1];
    for step in split.train.iter().flatten() {
        counts[step.item as usize] += 1.0;
    }
    if for_test {
        for case in &split.valid {
            counts[case.target as usize] += 1.0;
        }
    }
    counts
}

/// Evaluates the popularity baseline on the test cases.
pub fn evaluate_popularity(split: &Split, num_items: usize) -> Result<Report, ModelError> {
    Ok(popularity_ranks(split, num_items)?.report())
}

/// The popularity baseline's rank of every test case's target.
pub fn popularity_ranks(split: &Split, num_items: usize) -> Result<Ranks, ModelError> {
    let scores = popularity_scores(split, num_items, true);
    rank_all(&split.test, 256, |chunk| {
        Ok(vec![scores.clone(); chunk.len()])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ContextIds;

    #[test]
    fn popularity_ranks_by_counts_and_modes_differ() {
        let step = |item| crate::data::Step {
            item,
            context: ContextIds::default(),
        };
        let split = Split {
            train: vec![vec![step(1), step(1), step(2)], vec![step(1), step(3)]],
            valid: vec![Case {
                history: vec![1, 1, 2],
                target: 3,
                context: ContextIds::default(),
            }],
            test: vec![Case {
                history: vec![1, 1, 2, 3],
                target: 2,
                context: ContextIds::default(),
            }],
        };
        // Counts: item 1: 3, item 2: 1, item 3: 1 + 1 (valid) = 2.
        assert_eq!(popularity_scores(&split, 3, true), vec![0.0, 3.0, 1.0, 2.0]);
        let r = evaluate_popularity(&split, 3).unwrap();
        // Target 2 ranks third with history in, first with items 1 and 3 removed.
        assert!((r.history_included.ndcg10 - 1.0 / 4f64.log2()).abs() < 1e-12);
        assert!((r.history_excluded.ndcg10 - 1.0).abs() < 1e-12);
    }
}
