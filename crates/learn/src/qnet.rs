//! The Q-network: Q(s, a) for a state s = (history, context) and a candidate item a.
//!
//! The state is the mean of learned embeddings of the user's last items next to learned
//! embeddings of the hour and device buckets; the action is a learned embedding of the
//! candidate. Their concatenation goes through a two-layer ReLU MLP to one scalar. The
//! history is a mean, not a sequence model, because serving re-ranks only the top-M
//! candidates and the network must stay cheap enough to train online on a CPU.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap};
use onrec_model::context::{ContextIds, DEVICE_BUCKETS, HOUR_BUCKETS};
use onrec_model::rng::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::LearnError;
use crate::replay::Transition;

/// The Q-network's shape and initial weights. Saved with a checkpoint, which only loads
/// into an equal configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QConfig {
    /// Items in the vocabulary, without the padding index 0.
    pub num_items: usize,
    /// Longest history read (the last `max_history` items).
    pub max_history: usize,
    /// Width of item, hour and device embeddings.
    pub embed: usize,
    /// Width of both hidden layers.
    pub hidden: usize,
    /// Seed of the initial weights and of replay sampling.
    pub seed: u64,
}

impl QConfig {
    /// The defaults for `num_items` items: embeddings of width 32, hidden layers of 64,
    /// the last 20 items.
    pub fn for_items(num_items: usize) -> Self {
        Self {
            num_items,
            max_history: 20,
            embed: 32,
            hidden: 64,
            seed: 42,
        }
    }

    /// Checks that every width is positive.
    pub fn validate(&self) -> Result<(), LearnError> {
        for (name, value) in [
            ("num_items", self.num_items),
            ("max_history", self.max_history),
            ("embed", self.embed),
            ("hidden", self.hidden),
        ] {
            if value == 0 {
                return Err(LearnError::Config(format!("q.{name} must be positive")));
            }
        }
        Ok(())
    }

    /// Checks that a state's items and context buckets are in range.
    pub fn check_state(&self, state: &State) -> Result<(), LearnError> {
        if let Some(&bad) = state.history.iter().find(|&&i| i as usize > self.num_items) {
            return Err(LearnError::Invalid(format!(
                "history item {bad} is beyond num_items {}",
                self.num_items
            )));
        }
        if usize::from(state.context.hour) >= HOUR_BUCKETS
            || usize::from(state.context.device) >= DEVICE_BUCKETS
        {
            return Err(LearnError::Invalid(format!(
                "context {:?} is out of its buckets",
                state.context
            )));
        }
        Ok(())
    }

    /// Checks that candidate items are real items (1..=num_items).
    pub fn check_actions(&self, actions: &[u32]) -> Result<(), LearnError> {
        match actions
            .iter()
            .find(|&&a| a == 0 || a as usize > self.num_items)
        {
            Some(bad) => Err(LearnError::Invalid(format!(
                "action {bad} is not in 1..={}",
                self.num_items
            ))),
            None => Ok(()),
        }
    }

    /// Checks a transition's state, action, next state and next candidates.
    pub fn check_transition(&self, t: &Transition) -> Result<(), LearnError> {
        self.check_state(&t.state)?;
        self.check_actions(&[t.action])?;
        if let Some(next) = &t.next_state {
            self.check_state(next)?;
        }
        self.check_actions(&t.next_candidates)
    }
}

/// What the network sees of a user at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// Dense item indices (1..=num_items), oldest first; only the last `max_history` count.
    pub history: Vec<u32>,
    /// The request context.
    pub context: ContextIds,
}

/// The Q-network. Immutable once built: training mutates the variables it was built from.
#[derive(Debug)]
pub struct QNet {
    history_items: Embedding,
    hours: Embedding,
    devices: Embedding,
    actions: Embedding,
    l1: Linear,
    l2: Linear,
    out: Linear,
    cfg: QConfig,
    device: Device,
}

impl QNet {
    /// Builds the network from weights named as in a checkpoint (`history.weight`,
    /// `mlp.l1.weight`, …); with a fresh `VarMap` behind `vb`, call [`init_seeded`] next.
    pub fn new(vb: VarBuilder, cfg: &QConfig) -> Result<Self, LearnError> {
        cfg.validate()?;
        let (e, h) = (cfg.embed, cfg.hidden);
        Ok(Self {
            history_items: candle_nn::embedding(cfg.num_items + 1, e, vb.pp("history"))?,
            hours: candle_nn::embedding(HOUR_BUCKETS, e, vb.pp("context.hours"))?,
            devices: candle_nn::embedding(DEVICE_BUCKETS, e, vb.pp("context.devices"))?,
            actions: candle_nn::embedding(cfg.num_items + 1, e, vb.pp("actions"))?,
            l1: candle_nn::linear(4 * e, h, vb.pp("mlp.l1"))?,
            l2: candle_nn::linear(h, h, vb.pp("mlp.l2"))?,
            out: candle_nn::linear(h, 1, vb.pp("mlp.out"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// A network with fresh variables on `device`, initialised from `cfg.seed`.
    pub fn seeded(cfg: &QConfig, device: &Device) -> Result<(VarMap, Self), LearnError> {
        let varmap = VarMap::new();
        let net = Self::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
        init_seeded(&varmap, cfg.seed)?;
        Ok((varmap, net))
    }

    /// An immutable network holding copies of the current values of `varmap`'s variables,
    /// so later training steps do not show through it.
    pub fn snapshot(varmap: &VarMap, cfg: &QConfig, device: &Device) -> Result<Self, LearnError> {
        let tensors = copy_vars(varmap)?;
        Self::new(VarBuilder::from_tensors(tensors, DType::F32, device), cfg)
    }

    /// The network's shape.
    pub fn config(&self) -> &QConfig {
        &self.cfg
    }

    /// State features `[b, 3 · embed]`: mean history embedding (zero for an empty
    /// history), hour embedding, device embedding.
    fn state_features(&self, states: &[&State]) -> Result<Tensor, LearnError> {
        let l = self.cfg.max_history;
        let b = states.len();
        let mut ids = vec![0u32; b * l];
        let mut weights = vec![0f32; b * l];
        for (r, s) in states.iter().enumerate() {
            self.cfg.check_state(s)?;
            let tail = &s.history[s.history.len().saturating_sub(l)..];
            let real = tail.iter().filter(|&&i| i != 0).count();
            for (c, &item) in tail.iter().enumerate() {
                ids[r * l + c] = item;
                if item != 0 {
                    weights[r * l + c] = 1.0 / real as f32;
                }
            }
        }
        let ids = Tensor::from_vec(ids, (b, l), &self.device)?;
        let weights = Tensor::from_vec(weights, (b, l, 1), &self.device)?;
        let history = self
            .history_items
            .forward(&ids)?
            .broadcast_mul(&weights)?
            .sum(1)?;
        let hours: Vec<u32> = states.iter().map(|s| u32::from(s.context.hour)).collect();
        let devices: Vec<u32> = states.iter().map(|s| u32::from(s.context.device)).collect();
        let hours = self
            .hours
            .forward(&Tensor::from_vec(hours, b, &self.device)?)?;
        let devices = self
            .devices
            .forward(&Tensor::from_vec(devices, b, &self.device)?)?;
        Ok(Tensor::cat(&[&history, &hours, &devices], 1)?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor, LearnError> {
        let x = self.l1.forward(x)?.relu()?;
        let x = self.l2.forward(&x)?.relu()?;
        Ok(self.out.forward(&x)?.squeeze(1)?)
    }

    /// Q(sᵢ, aᵢ) for paired states and actions: `[b]`, differentiable (for training).
    pub fn forward(&self, states: &[&State], actions: &[u32]) -> Result<Tensor, LearnError> {
        if states.len() != actions.len() {
            return Err(LearnError::Invalid(format!(
                "{} states but {} actions",
                states.len(),
                actions.len()
            )));
        }
        self.cfg.check_actions(actions)?;
        let s = self.state_features(states)?;
        let ids = Tensor::from_vec(actions.to_vec(), actions.len(), &self.device)?;
        let a = self.actions.forward(&ids)?;
        self.mlp(&Tensor::cat(&[&s, &a], 1)?)
    }

    /// Q of each state's candidates, in their order, from one batched forward pass over
    /// the lists padded to the longest one.
    pub fn q_values(
        &self,
        states: &[State],
        actions: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>, LearnError> {
        let refs: Vec<&State> = states.iter().collect();
        let lists: Vec<&[u32]> = actions.iter().map(Vec::as_slice).collect();
        self.q_values_of(&refs, &lists)
    }

    /// [`QNet::q_values`] over borrowed states and candidate lists.
    pub fn q_values_of(
        &self,
        states: &[&State],
        actions: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, LearnError> {
        if states.len() != actions.len() {
            return Err(LearnError::Invalid(format!(
                "{} states but {} candidate lists",
                states.len(),
                actions.len()
            )));
        }
        let m = actions.iter().map(|a| a.len()).max().unwrap_or(0);
        if m == 0 {
            return Ok(vec![Vec::new(); states.len()]);
        }
        let b = states.len();
        let mut ids = vec![0u32; b * m];
        for (r, list) in actions.iter().enumerate() {
            self.cfg.check_actions(list)?;
            ids[r * m..r * m + list.len()].copy_from_slice(list);
        }
        let s = self.state_features(states)?;
        let s = s.unsqueeze(1)?.broadcast_as((b, m, s.dim(1)?))?;
        let a = self
            .actions
            .forward(&Tensor::from_vec(ids, (b, m), &self.device)?)?;
        let x = Tensor::cat(&[&s, &a], 2)?.reshape((b * m, ()))?;
        let q = self.mlp(&x)?.reshape((b, m))?.to_vec2::<f32>()?;
        Ok(q.into_iter()
            .zip(actions)
            .map(|(mut row, list)| {
                row.truncate(list.len());
                row
            })
            .collect())
    }
}

/// Copies of the current values of `varmap`'s variables, by name.
pub fn copy_vars(varmap: &VarMap) -> Result<HashMap<String, Tensor>, LearnError> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|e| LearnError::Train(e.to_string()))?;
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Re-initialises every variable from `seed`: normal(0, 0.1) for embeddings, He-normal
/// for linear weights (keeps ReLU activations at a useful scale from the first step),
/// zeros for biases. Variables are visited in name order, so the result depends only on
/// the seed and the shapes (candle's CPU generator cannot be seeded).
pub fn init_seeded(varmap: &VarMap, seed: u64) -> Result<(), LearnError> {
    let mut rng = SplitMix64::new(seed);
    let vars = varmap
        .data()
        .lock()
        .map_err(|e| LearnError::Train(e.to_string()))?;
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let (shape, device) = (var.shape().clone(), var.device().clone());
        let value = if name.ends_with(".bias") {
            Tensor::zeros(shape, DType::F32, &device)?
        } else {
            let std = if name.starts_with("mlp.") {
                (2.0 / shape.dims().last().copied().unwrap_or(1) as f64).sqrt()
            } else {
                0.1
            };
            let data: Vec<f32> = (0..shape.elem_count())
                .map(|_| (rng.normal() * std) as f32)
                .collect();
            Tensor::from_vec(data, shape, &device)?
        };
        var.set(&value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> QNet {
        let cfg = QConfig {
            embed: 8,
            hidden: 16,
            ..QConfig::for_items(10)
        };
        QNet::seeded(&cfg, &Device::Cpu).unwrap().1
    }

    fn state(history: &[u32], hour: u8) -> State {
        State {
            history: history.to_vec(),
            context: ContextIds { hour, device: 1 },
        }
    }

    #[test]
    fn batched_q_values_match_one_by_one_and_forward() {
        let net = net();
        let states = vec![state(&[1, 2, 3], 5), state(&[], 0), state(&[4], 9)];
        let actions = vec![vec![7, 3, 1], vec![2], vec![]];
        let batched = net.q_values(&states, &actions).unwrap();
        assert_eq!(batched.iter().map(Vec::len).collect::<Vec<_>>(), [3, 1, 0]);
        for (s, (list, row)) in states.iter().zip(actions.iter().zip(&batched)) {
            let single = net
                .q_values(std::slice::from_ref(s), std::slice::from_ref(list))
                .unwrap();
            for (x, y) in single[0].iter().zip(row) {
                assert!((x - y).abs() < 1e-5, "{x} {y}");
            }
        }
        let paired = net
            .forward(&[&states[0], &states[1]], &[3, 2])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((paired[0] - batched[0][1]).abs() < 1e-5);
        assert!((paired[1] - batched[1][0]).abs() < 1e-5);
    }

    #[test]
    fn only_the_last_items_count_and_bad_input_is_rejected() {
        let net = net();
        let long: Vec<u32> = (0..30).map(|i| 1 + i % 10).collect();
        let tail = long[10..].to_vec();
        let q = net
            .q_values(&[state(&long, 3), state(&tail, 3)], &[vec![5], vec![5]])
            .unwrap();
        assert!((q[0][0] - q[1][0]).abs() < 1e-6);
        assert!(matches!(
            net.q_values(&[state(&[11], 3)], &[vec![1]]),
            Err(LearnError::Invalid(_))
        ));
        assert!(matches!(
            net.q_values(&[state(&[1], 3)], &[vec![0]]),
            Err(LearnError::Invalid(_))
        ));
        assert!(matches!(
            net.q_values(&[state(&[1], 25)], &[vec![1]]),
            Err(LearnError::Invalid(_))
        ));
    }

    #[test]
    fn the_same_seed_gives_the_same_weights() {
        let a = net().q_values(&[state(&[1], 2)], &[vec![1, 2]]).unwrap();
        let b = net().q_values(&[state(&[1], 2)], &[vec![1, 2]]).unwrap();
        assert_eq!(a, b);
    }
}
