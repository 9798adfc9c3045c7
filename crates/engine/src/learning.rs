//! The online Q-network on the request and feedback paths: re-scoring the ranker's
//! candidates with the latest published weights, and turning attributed feedback into
//! transitions for the learner.

use std::sync::Arc;

use onrec_learn::{Learner, State, Transition};
use onrec_model::context::ContextIds;
use onrec_policy::policy::z;

/// Whether Q-values change responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QMode {
    /// Computed and compared with the ranking (metric, debug log), never applied.
    Shadow,
    /// Mixed into the ranking once the weights have trained `min_updates` steps.
    Live,
}

/// How the Q-network takes part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QSettings {
    /// Shadow or live.
    pub mode: QMode,
    /// Weight w of Q in the final score (1 − w)·z(ranker) + w·z(Q); 1 ranks by Q alone.
    pub weight: f64,
    /// Training steps the published weights need before they are applied.
    pub min_updates: u64,
    /// On a response's first feedback, its other slots become reward-0 transitions.
    pub negatives: bool,
}

/// What a response remembers for the learner.
#[derive(Debug, Clone)]
pub struct Decision {
    state: State,
    /// Catalog indices of the ranker's candidates (the actions that were available).
    candidates: Vec<u32>,
    /// Catalog indices of the served slots.
    slate: Vec<u32>,
    negatives_done: bool,
}

/// A learner attached to the engine. Its item index i + 1 is the catalog's index i: the
/// learner starts with the catalog's items in index order and grows as items are added.
#[derive(Debug)]
pub struct LearnerLink {
    learner: Arc<Learner>,
    settings: QSettings,
}

/// The Q-network's index of a catalog item: catalog index + 1, or 0 (unknown) for an
/// item beyond the `known` items.
fn q_index(catalog: u32, known: usize) -> u32 {
    if (catalog as usize) < known {
        catalog + 1
    } else {
        0
    }
}

impl LearnerLink {
    /// Links `learner`, whose items are the catalog's in index order.
    pub fn new(learner: Arc<Learner>, settings: QSettings) -> Self {
        Self { learner, settings }
    }

    /// The learner.
    pub fn learner(&self) -> &Arc<Learner> {
        &self.learner
    }

    /// The state of a user with `history` (catalog indices, oldest first) in `context`,
    /// with the encoder's user vector when the encoder ranked the request (one of another
    /// width than the network takes is left out).
    pub fn state(&self, history: &[u32], context: ContextIds, user: Option<Arc<[f32]>>) -> State {
        let known = self.learner.items();
        State {
            history: history.iter().map(|&c| q_index(c, known)).collect(),
            context,
            user: user.filter(|u| u.len() == self.learner.q_config().user_dim),
        }
    }

    /// Re-scores `candidates` (catalog index, ranker score; best first) with the published
    /// Q-network. In live mode with trained-enough weights, reorders them by the mixed
    /// score and returns the weights' version; in shadow mode leaves them as they are.
    /// Either way it records how far the top `n` of both orders agree.
    pub fn rescore(
        &self,
        state: &State,
        candidates: &mut Vec<(u32, f64)>,
        n: usize,
    ) -> Option<u64> {
        if candidates.is_empty() {
            return None;
        }
        let published = self.learner.current();
        // Items added since these weights were published are unknown to them: they are
        // left out of the forward pass and get the mean Q of the rest (neutral once mixed).
        let known = published.net.num_items();
        let fitted;
        let state = if state.history.iter().any(|&i| i as usize > known) {
            fitted = State {
                history: state
                    .history
                    .iter()
                    .map(|&i| if i as usize > known { 0 } else { i })
                    .collect(),
                ..state.clone()
            };
            &fitted
        } else {
            state
        };
        let actions: Vec<u32> = candidates.iter().map(|&(c, _)| q_index(c, known)).collect();
        let scored: Vec<u32> = actions.iter().copied().filter(|&a| a != 0).collect();
        let q = match published.net.q_values_of(&[state], &[&scored]) {
            Ok(mut q) => q.pop().unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "Q-network forward failed; ranking kept");
                return None;
            }
        };
        let mean = q.iter().map(|&v| f64::from(v)).sum::<f64>() / q.len().max(1) as f64;
        let mut values = q.into_iter().map(f64::from);
        let q: Vec<f64> = actions
            .iter()
            .map(|&a| {
                if a == 0 {
                    mean
                } else {
                    values.next().unwrap_or(mean)
                }
            })
            .collect();
        let ranker: Vec<f64> = candidates.iter().map(|&(_, s)| s).collect();
        let w = self.settings.weight;
        let mixed: Vec<f64> = z(&ranker)
            .iter()
            .zip(z(&q))
            .map(|(r, q)| (1.0 - w) * r + w * q)
            .collect();
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by(|&a, &b| mixed[b].total_cmp(&mixed[a]).then(a.cmp(&b)));
        let top = n.min(candidates.len());
        let agree = order[..top].iter().filter(|&&i| i < top).count();
        metrics::histogram!("onrec_learn_shadow_agreement")
            .record(agree as f64 / top.max(1) as f64);
        let live =
            self.settings.mode == QMode::Live && published.updates >= self.settings.min_updates;
        if !live {
            tracing::debug!(q_top = ?order[..top].iter().map(|&i| candidates[i].0).collect::<Vec<_>>(), "shadow Q ranking");
            return None;
        }
        *candidates = order
            .into_iter()
            .map(|i| (candidates[i].0, mixed[i]))
            .collect();
        Some(published.version)
    }

    /// What a served response remembers for the learner.
    pub fn decision(&self, state: State, candidates: Vec<u32>, slate: Vec<u32>) -> Decision {
        Decision {
            state,
            candidates,
            slate,
            negatives_done: false,
        }
    }

    /// Hands the learner the transitions of feedback on `item` (catalog index) with
    /// `reward`: the rewarded one, and on the response's first feedback reward-0 ones for
    /// its other slots. A full learner queue drops them (the learner counts it).
    ///
    /// The next state is the history with the item appended, in the same context and with
    /// the same user vector: the encoder's vector for the longer history would take an
    /// encoder pass on the event path, and the history part of the state carries the step.
    pub fn feedback(&self, decision: &mut Decision, item: u32, reward: f64) {
        let known = self.learner.items();
        let mut out = Vec::new();
        let next_candidates = |taken: u32| -> Vec<u32> {
            decision
                .candidates
                .iter()
                .filter(|&&c| c != taken)
                .map(|&c| q_index(c, known))
                .collect()
        };
        let mut next_history = decision.state.history.clone();
        next_history.push(q_index(item, known));
        out.push(Transition {
            state: decision.state.clone(),
            action: q_index(item, known),
            reward: reward as f32,
            next_state: Some(State {
                history: next_history,
                context: decision.state.context,
                user: decision.state.user.clone(),
            }),
            next_candidates: next_candidates(item),
        });
        if self.settings.negatives && !decision.negatives_done {
            decision.negatives_done = true;
            for &other in decision.slate.iter().filter(|&&c| c != item) {
                out.push(Transition {
                    state: decision.state.clone(),
                    action: q_index(other, known),
                    reward: 0.0,
                    next_state: Some(decision.state.clone()),
                    next_candidates: next_candidates(other),
                });
            }
        }
        for t in out {
            if let Err(e) = self.learner.submit(t) {
                tracing::debug!(error = %e, "transition not taken");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_keeps_a_user_vector_of_the_networks_width() {
        let mut config = onrec_learn::LearnConfig::default();
        config.q.user_dim = 3;
        let ids = (0..5).map(|i| format!("i{i}")).collect();
        let learner = Arc::new(Learner::start(config, ids, None).unwrap());
        let settings = QSettings {
            mode: QMode::Live,
            weight: 0.5,
            min_updates: 0,
            negatives: true,
        };
        let link = LearnerLink::new(learner.clone(), settings);
        let ctx = ContextIds::from_parts(Some(9), None);
        let u: Arc<[f32]> = Arc::from([0.1f32, 0.2, 0.3].as_slice());
        let s = link.state(&[0, 4, 7], ctx, Some(u.clone()));
        assert_eq!(
            s.history,
            [1, 5, 0],
            "catalog index + 1; beyond the known items 0"
        );
        assert_eq!(s.user.as_deref(), Some(&[0.1f32, 0.2, 0.3][..]));
        let wrong: Arc<[f32]> = Arc::from([1.0f32; 4].as_slice());
        assert_eq!(link.state(&[0], ctx, Some(wrong)).user, None);
        let mut decision = link.decision(s, vec![0, 1, 2], vec![0, 1]);
        link.feedback(&mut decision, 1, 1.0);
        assert_eq!(learner.accepted(), 2);
        learner.shutdown().unwrap();
    }
}
