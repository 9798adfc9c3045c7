//! The online Q-network on the request and feedback paths: re-scoring the ranker's
//! candidates with the latest weights, and turning attributed feedback into transitions.
//!
//! The weights are trained in this process by a [`Learner`] (one process, or the learner
//! of a deployment), or, on a serve replica, followed: the learner publishes them to the
//! shared state, the replica loads each publication ([`Followed`]) and sends the feedback
//! on its responses there ([`SharedFeedback`]) for the learner to train on. Decisions are
//! kept in catalog indices and feedback crosses processes by item id, so processes whose
//! catalogs list items in another order still agree.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use onrec_learn::{Learner, Published, QNet, State, Transition};
use onrec_model::context::ContextIds;
use onrec_policy::policy::z;
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::shared::RedisShared;

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

/// A request as the Q-network sees it, in catalog indices: the user's history (oldest
/// first), the context, and the encoder's user vector when the encoder ranked it.
#[derive(Debug, Clone, Default)]
pub struct Situation {
    /// Catalog indices of the history, oldest first.
    pub history: Vec<u32>,
    /// The request's context.
    pub context: ContextIds,
    /// The encoder's user vector.
    pub user: Option<Arc<[f32]>>,
}

/// What a response remembers for the learner.
#[derive(Debug, Clone)]
pub struct Decision {
    situation: Situation,
    /// Catalog indices of the ranker's candidates (the actions that were available).
    candidates: Vec<u32>,
    /// Catalog indices of the served slots.
    slate: Vec<u32>,
    negatives_done: bool,
}

/// Feedback on a response, for the learner process: the decision by item id, the item
/// chosen, its reward, and whether the response's other slots are still to be learned
/// as unchosen (its first feedback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedFeedback {
    /// The history, oldest first.
    #[serde(rename = "h")]
    pub history: Vec<String>,
    /// The request's context.
    #[serde(rename = "c")]
    pub context: ContextIds,
    /// The encoder's user vector.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Vec<f32>>,
    /// The ranker's candidates.
    #[serde(rename = "k")]
    pub candidates: Vec<String>,
    /// The served slots.
    #[serde(rename = "s")]
    pub slate: Vec<String>,
    /// The item the feedback is on.
    #[serde(rename = "i")]
    pub item: String,
    /// Its reward.
    #[serde(rename = "r")]
    pub reward: f64,
    /// Whether the other slots become reward-0 transitions.
    #[serde(rename = "n")]
    pub negatives: bool,
}

/// Weights the learner process published, as this process applies them.
#[derive(Debug)]
pub struct Followed {
    /// The learner's publication number.
    pub version: u64,
    /// Training steps the weights include.
    pub updates: u64,
    /// The network.
    pub net: Arc<QNet>,
    /// This process's catalog index → the network's item index (0: unknown to it).
    to_q: Vec<u32>,
}

impl Followed {
    /// Weights whose items are `ids` (index i + 1 is `ids[i]`), matched to `catalog`.
    pub fn new(
        version: u64,
        updates: u64,
        net: Arc<QNet>,
        ids: &[String],
        catalog: &Catalog,
    ) -> Self {
        let mut to_q = vec![0; catalog.len()];
        for (i, id) in ids.iter().enumerate().take(net.num_items()) {
            if let Some(c) = catalog.index_of(id) {
                to_q[c as usize] = i as u32 + 1;
            }
        }
        Self {
            version,
            updates,
            net,
            to_q,
        }
    }

    /// Catalog items the map covers: items added since are unknown to it until rebuilt.
    pub fn mapped(&self) -> usize {
        self.to_q.len()
    }
}

/// Where the Q-values come from and where feedback goes.
#[derive(Debug)]
enum Source {
    /// Trained here: the learner's item index i + 1 is the catalog's index i.
    Local(Arc<Learner>),
    /// Trained by the learner process: its latest publication, once loaded, and the
    /// shared state that takes this process's feedback.
    Followed {
        current: ArcSwapOption<Followed>,
        shared: Arc<RedisShared>,
    },
}

/// The weights one request is re-scored with.
enum Current {
    Local(Arc<Published>),
    Followed(Arc<Followed>),
}

impl Current {
    fn net(&self) -> &QNet {
        match self {
            Self::Local(p) => &p.net,
            Self::Followed(f) => &f.net,
        }
    }

    fn version(&self) -> u64 {
        match self {
            Self::Local(p) => p.version,
            Self::Followed(f) => f.version,
        }
    }

    fn updates(&self) -> u64 {
        match self {
            Self::Local(p) => p.updates,
            Self::Followed(f) => f.updates,
        }
    }

    /// The network's index of a catalog item (0: unknown to these weights).
    fn q(&self, catalog: u32) -> u32 {
        match self {
            Self::Local(p) => q_index(catalog, p.net.num_items()),
            Self::Followed(f) => f.to_q.get(catalog as usize).copied().unwrap_or(0),
        }
    }
}

/// A Q-network attached to the engine, trained here or followed.
#[derive(Debug)]
pub struct LearnerLink {
    source: Source,
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

/// The network's state for `situation`, items mapped by `q`, the user vector kept when
/// it is of the width `user_dim` the network takes.
fn state(situation: &Situation, q: impl Fn(u32) -> u32, user_dim: usize) -> State {
    State {
        history: situation.history.iter().map(|&c| q(c)).collect(),
        context: situation.context,
        user: situation
            .user
            .clone()
            .filter(|u| user_dim > 0 && u.len() == user_dim),
    }
}

impl LearnerLink {
    /// Links `learner`, which trains here and whose items are the catalog's in index
    /// order.
    pub fn new(learner: Arc<Learner>, settings: QSettings) -> Self {
        Self {
            source: Source::Local(learner),
            settings,
        }
    }

    /// Follows the weights the learner process publishes to `shared` (none until the
    /// first is loaded with [`LearnerLink::follow`]) and sends feedback there.
    pub fn following(shared: Arc<RedisShared>, settings: QSettings) -> Self {
        Self {
            source: Source::Followed {
                current: ArcSwapOption::empty(),
                shared,
            },
            settings,
        }
    }

    /// The learner, when it trains here.
    pub fn learner(&self) -> Option<&Arc<Learner>> {
        match &self.source {
            Source::Local(learner) => Some(learner),
            Source::Followed { .. } => None,
        }
    }

    /// The followed weights last loaded (`None` when not following, or before the first).
    pub fn followed(&self) -> Option<Arc<Followed>> {
        match &self.source {
            Source::Local(_) => None,
            Source::Followed { current, .. } => current.load_full(),
        }
    }

    /// Re-scores with `weights` from now on; ignored when the weights are trained here.
    pub fn follow(&self, weights: Followed) {
        if let Source::Followed { current, .. } = &self.source {
            current.store(Some(Arc::new(weights)));
        }
    }

    fn current(&self) -> Option<Current> {
        match &self.source {
            Source::Local(learner) => Some(Current::Local(learner.current())),
            Source::Followed { current, .. } => current.load_full().map(Current::Followed),
        }
    }

    /// Re-scores `candidates` (catalog index, ranker score; best first) with the latest
    /// weights. In live mode with trained-enough weights, reorders them by the mixed
    /// score and returns the weights' version; in shadow mode leaves them as they are.
    /// Either way it records how far the top `n` of both orders agree.
    pub fn rescore(
        &self,
        situation: &Situation,
        candidates: &mut Vec<(u32, f64)>,
        n: usize,
    ) -> Option<u64> {
        if candidates.is_empty() {
            return None;
        }
        let current = self.current()?;
        let net = current.net();
        // Items the weights do not know (added since they were published) are left out of
        // the forward pass and get the mean Q of the rest (neutral once mixed).
        let state = state(situation, |c| current.q(c), net.config().user_dim);
        let actions: Vec<u32> = candidates.iter().map(|&(c, _)| current.q(c)).collect();
        let scored: Vec<u32> = actions.iter().copied().filter(|&a| a != 0).collect();
        let q = match net.q_values_of(&[&state], &[&scored]) {
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
            self.settings.mode == QMode::Live && current.updates() >= self.settings.min_updates;
        if !live {
            tracing::debug!(q_top = ?order[..top].iter().map(|&i| candidates[i].0).collect::<Vec<_>>(), "shadow Q ranking");
            return None;
        }
        *candidates = order
            .into_iter()
            .map(|i| (candidates[i].0, mixed[i]))
            .collect();
        Some(current.version())
    }

    /// What a served response remembers for the learner.
    pub fn decision(
        &self,
        situation: Situation,
        candidates: Vec<u32>,
        slate: Vec<u32>,
    ) -> Decision {
        Decision {
            situation,
            candidates,
            slate,
            negatives_done: false,
        }
    }

    /// Learns from feedback on `item` (catalog index) with `reward`: the rewarded
    /// transition, and on the response's first feedback reward-0 ones for its other
    /// slots. Trained here, they are queued for the learner (a full queue drops them, and
    /// the learner counts it); followed, the feedback goes to the shared state for the
    /// learner process (`catalog` names the items).
    pub fn feedback(&self, decision: &mut Decision, item: u32, reward: f64, catalog: &Catalog) {
        match &self.source {
            Source::Local(learner) => {
                let known = learner.items();
                for t in self.transitions(decision, item, reward, |c| q_index(c, known)) {
                    if let Err(e) = learner.submit(t) {
                        tracing::debug!(error = %e, "transition not taken");
                    }
                }
            }
            Source::Followed { shared, .. } => {
                let ids = |items: &[u32]| -> Vec<String> {
                    items
                        .iter()
                        .filter(|&&c| (c as usize) < catalog.len())
                        .map(|&c| catalog.get(c).item_id.clone())
                        .collect()
                };
                if (item as usize) >= catalog.len() {
                    return;
                }
                let negatives = !decision.negatives_done;
                decision.negatives_done = true;
                shared.feedback(SharedFeedback {
                    history: ids(&decision.situation.history),
                    context: decision.situation.context,
                    user: decision.situation.user.as_deref().map(<[f32]>::to_vec),
                    candidates: ids(&decision.candidates),
                    slate: ids(&decision.slate),
                    item: catalog.get(item).item_id.clone(),
                    reward,
                    negatives,
                });
            }
        }
    }

    /// Learns from feedback a serve replica sent (items by id, matched to `catalog`):
    /// `false` when its item is not in the catalog or nothing trains here.
    pub fn learn_shared(&self, feedback: &SharedFeedback, catalog: &Catalog) -> bool {
        let (Source::Local(_), Some(item)) = (&self.source, catalog.index_of(&feedback.item))
        else {
            return false;
        };
        let indices = |ids: &[String]| -> Vec<u32> {
            ids.iter().filter_map(|id| catalog.index_of(id)).collect()
        };
        let mut decision = Decision {
            situation: Situation {
                history: indices(&feedback.history),
                context: feedback.context,
                user: feedback.user.as_deref().map(Arc::from),
            },
            candidates: indices(&feedback.candidates),
            slate: indices(&feedback.slate),
            negatives_done: !feedback.negatives,
        };
        self.feedback(&mut decision, item, feedback.reward, catalog);
        true
    }

    /// The transitions of feedback on `item`, items mapped by `q` (see
    /// [`LearnerLink::feedback`]).
    ///
    /// The next state is the history with the item appended, in the same context and with
    /// the same user vector: the encoder's vector for the longer history would take an
    /// encoder pass on the event path, and the history part of the state carries the step.
    fn transitions(
        &self,
        decision: &mut Decision,
        item: u32,
        reward: f64,
        q: impl Fn(u32) -> u32,
    ) -> Vec<Transition> {
        let user_dim = self.learner().map_or(0, |l| l.q_config().user_dim);
        let now = state(&decision.situation, &q, user_dim);
        let next_candidates = |taken: u32| -> Vec<u32> {
            decision
                .candidates
                .iter()
                .filter(|&&c| c != taken)
                .map(|&c| q(c))
                .collect()
        };
        let mut next_history = now.history.clone();
        next_history.push(q(item));
        let mut out = vec![Transition {
            state: now.clone(),
            action: q(item),
            reward: reward as f32,
            next_state: Some(State {
                history: next_history,
                ..now.clone()
            }),
            next_candidates: next_candidates(item),
        }];
        if self.settings.negatives && !decision.negatives_done {
            decision.negatives_done = true;
            for &other in decision.slate.iter().filter(|&&c| c != item) {
                out.push(Transition {
                    state: now.clone(),
                    action: q(other),
                    reward: 0.0,
                    next_state: Some(now.clone()),
                    next_candidates: next_candidates(other),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Item;

    fn catalog(n: usize) -> Catalog {
        let mut catalog = Catalog::default();
        for i in 0..n {
            catalog.upsert(Item::new(format!("i{i}"), "c"));
        }
        catalog
    }

    fn settings() -> QSettings {
        QSettings {
            mode: QMode::Live,
            weight: 0.5,
            min_updates: 0,
            negatives: true,
        }
    }

    #[test]
    fn the_state_keeps_a_user_vector_of_the_networks_width() {
        let mut config = onrec_learn::LearnConfig::default();
        config.q.user_dim = 3;
        let ids = (0..5).map(|i| format!("i{i}")).collect();
        let learner = Arc::new(Learner::start(config, ids, None).unwrap());
        let link = LearnerLink::new(learner.clone(), settings());
        let ctx = ContextIds::from_parts(Some(9), None);
        let u: Arc<[f32]> = Arc::from([0.1f32, 0.2, 0.3].as_slice());
        let situation = Situation {
            history: vec![0, 4, 7],
            context: ctx,
            user: Some(u.clone()),
        };
        let s = state(&situation, |c| q_index(c, learner.items()), 3);
        assert_eq!(
            s.history,
            [1, 5, 0],
            "catalog index + 1; beyond the known items 0"
        );
        assert_eq!(s.user.as_deref(), Some(&[0.1f32, 0.2, 0.3][..]));
        let wrong = Situation {
            user: Some(Arc::from([1.0f32; 4].as_slice())),
            ..situation.clone()
        };
        assert_eq!(state(&wrong, |c| c + 1, 3).user, None);
        let mut decision = link.decision(situation, vec![0, 1, 2], vec![0, 1]);
        link.feedback(&mut decision, 1, 1.0, &catalog(8));
        assert_eq!(learner.accepted(), 2, "the click and the unclicked slot");
        link.feedback(&mut decision, 0, 1.0, &catalog(8));
        assert_eq!(
            learner.accepted(),
            3,
            "negatives only on the first feedback"
        );
        learner.shutdown().unwrap();
    }

    #[test]
    fn followed_weights_map_items_by_id_whatever_the_catalog_order() {
        let net = Arc::new(
            QNet::seeded(
                &onrec_learn::QConfig::default(),
                3,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        );
        let ids = ["i2".to_owned(), "i0".to_owned(), "gone".to_owned()];
        let followed = Followed::new(4, 10, net, &ids, &catalog(4));
        assert_eq!(followed.to_q, [2, 0, 1, 0]);
        assert_eq!(followed.mapped(), 4);
        let current = Current::Followed(Arc::new(followed));
        assert_eq!(
            (current.q(0), current.q(2), current.q(3), current.q(9)),
            (2, 1, 0, 0)
        );
    }

    #[test]
    fn shared_feedback_trains_a_learner_by_item_id() {
        let ids = (0..4).map(|i| format!("i{i}")).collect();
        let learner =
            Arc::new(Learner::start(onrec_learn::LearnConfig::default(), ids, None).unwrap());
        let link = LearnerLink::new(learner.clone(), settings());
        let feedback = SharedFeedback {
            history: vec!["i3".into(), "unknown".into()],
            context: ContextIds::default(),
            user: None,
            candidates: vec!["i0".into(), "i1".into(), "i2".into()],
            slate: vec!["i0".into(), "i1".into()],
            item: "i1".into(),
            reward: 1.0,
            negatives: true,
        };
        assert!(link.learn_shared(&feedback, &catalog(4)));
        assert_eq!(learner.accepted(), 2);
        let again = SharedFeedback {
            negatives: false,
            ..feedback.clone()
        };
        assert!(link.learn_shared(&again, &catalog(4)));
        assert_eq!(
            learner.accepted(),
            3,
            "a later feedback brings no negatives"
        );
        let unknown = SharedFeedback {
            item: "unknown".into(),
            ..feedback
        };
        assert!(!link.learn_shared(&unknown, &catalog(4)));
        learner.shutdown().unwrap();
    }
}
