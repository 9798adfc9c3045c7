//! The Q-network: Q(s, a) for a state s = [u, c, h] (the encoder's user vector, the
//! request context, the user's recent items) and a candidate item a.
//!
//! The history is the mean of learned embeddings of the user's last items; hour and device
//! buckets have learned embeddings; the encoder's user vector, when the encoder ranked the
//! request, goes through a learned projection (zeros when it did not); the action is a
//! learned embedding of the candidate. Their concatenation goes through a two-layer ReLU
//! MLP to one scalar. The history is a mean, not a sequence model, because serving
//! re-ranks only the top-M candidates and the network must stay cheap enough to train
//! online on a CPU; the sequence model's view of the user arrives through u.
//!
//! The item embeddings live in two [`ItemTable`]s, one row per item, outside candle's
//! variables: a training step gathers the rows its batch touches, differentiates those
//! and updates only them, so a step costs the same for a catalog of a thousand items as
//! for one of a million. The small dense part (context embeddings, projection, MLP) is an
//! ordinary candle `VarMap`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap};
use onrec_model::context::{ContextIds, DEVICE_BUCKETS, HOUR_BUCKETS};
use onrec_model::rng::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::LearnError;
use crate::qhost::HostQ;
use crate::replay::Transition;

/// The Q-network's shape and initial weights. A checkpoint loads only into an equal
/// configuration; the number of items is not part of it (items are matched by id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QConfig {
    /// Longest history read (the last `max_history` items).
    pub max_history: usize,
    /// Width of item, hour, device and user-projection embeddings.
    pub embed: usize,
    /// Width of both hidden layers.
    pub hidden: usize,
    /// Width of the encoder's user vector u; 0 leaves u out of the state.
    pub user_dim: usize,
    /// Seed of the initial weights and of replay sampling.
    pub seed: u64,
}

impl Default for QConfig {
    /// Embeddings of width 32, hidden layers of 64, the last 20 items, no user vector.
    fn default() -> Self {
        Self {
            max_history: 20,
            embed: 32,
            hidden: 64,
            user_dim: 0,
            seed: 42,
        }
    }
}

impl QConfig {
    /// Checks that every width is positive.
    pub fn validate(&self) -> Result<(), LearnError> {
        for (name, value) in [
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

    /// Checks that a state's items, context buckets and user vector fit a network of
    /// `num_items` items.
    pub fn check_state(&self, state: &State, num_items: usize) -> Result<(), LearnError> {
        if let Some(&bad) = state.history.iter().find(|&&i| i as usize > num_items) {
            return Err(LearnError::Invalid(format!(
                "history item {bad} is beyond the {num_items} items"
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
        match &state.user {
            Some(u) if u.len() != self.user_dim => Err(LearnError::Invalid(format!(
                "user vector of width {} where the network takes {}",
                u.len(),
                self.user_dim
            ))),
            Some(u) if u.iter().any(|x| !x.is_finite()) => Err(LearnError::Invalid(
                "user vector with a value that is not finite".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Checks that candidate items are real items (1..=num_items).
    pub fn check_actions(&self, actions: &[u32], num_items: usize) -> Result<(), LearnError> {
        match actions.iter().find(|&&a| a == 0 || a as usize > num_items) {
            Some(bad) => Err(LearnError::Invalid(format!(
                "action {bad} is not in 1..={num_items}"
            ))),
            None => Ok(()),
        }
    }

    /// Checks a transition's state, action, reward, next state and next candidates.
    pub fn check_transition(&self, t: &Transition, num_items: usize) -> Result<(), LearnError> {
        self.check_state(&t.state, num_items)?;
        self.check_actions(&[t.action], num_items)?;
        if !t.reward.is_finite() {
            return Err(LearnError::Invalid(format!(
                "reward {} is not finite",
                t.reward
            )));
        }
        if let Some(next) = &t.next_state {
            self.check_state(next, num_items)?;
        }
        self.check_actions(&t.next_candidates, num_items)
    }

    /// Width of the MLP's input: history, hour, device, user projection (if any), action.
    fn input_width(&self) -> usize {
        let parts = if self.user_dim > 0 { 5 } else { 4 };
        parts * self.embed
    }
}

/// What the network sees of a user at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    /// Dense item indices (1..=num_items; 0 for an item the network does not know),
    /// oldest first; only the last `max_history` count.
    pub history: Vec<u32>,
    /// The request context.
    pub context: ContextIds,
    /// The encoder's user vector at serving time, when the encoder ranked the request
    /// (`user_dim` wide). Shared, because a transition's next state keeps it.
    pub user: Option<Arc<[f32]>>,
}

impl State {
    /// The last `max_history` items of the history: the part the network reads.
    pub fn recent(&self, max_history: usize) -> &[u32] {
        &self.history[self.history.len().saturating_sub(max_history)..]
    }
}

/// Item embedding rows (row 0 is padding and stays zero), plain memory so that training
/// can read and update single rows.
#[derive(Debug, Clone)]
pub struct ItemTable {
    width: usize,
    values: Vec<f32>,
}

impl ItemTable {
    /// A table of `items` items plus padding, rows drawn from normal(0, 0.1) by a seed of
    /// their own, so a row's initial value does not depend on when the table grew to it.
    pub fn seeded(items: usize, width: usize, seed: u64) -> Self {
        let mut table = Self {
            width,
            values: vec![0.0; width],
        };
        table.grow(items, seed);
        table
    }

    /// A table holding `values` (`rows × width`, row 0 padding).
    pub fn from_values(values: Vec<f32>, width: usize) -> Result<Self, LearnError> {
        if width == 0 || values.is_empty() || !values.len().is_multiple_of(width) {
            return Err(LearnError::Invalid(format!(
                "{} values do not make rows of width {width}",
                values.len()
            )));
        }
        Ok(Self { width, values })
    }

    /// Items held (rows without the padding row).
    pub fn items(&self) -> usize {
        self.values.len() / self.width - 1
    }

    /// Row width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// All values, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// All values, row-major, for in-place updates.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// One row.
    pub fn row(&self, item: u32) -> &[f32] {
        let w = self.width;
        &self.values[item as usize * w..(item as usize + 1) * w]
    }

    /// Adds seeded rows until the table holds `items` items.
    pub fn grow(&mut self, items: usize, seed: u64) {
        let w = self.width;
        for row in self.items() + 1..=items {
            let mut rng = SplitMix64::new(seed ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            self.values
                .extend((0..w).map(|_| (rng.normal() * 0.1) as f32));
        }
    }

    /// The rows of `items`, in their order, as a `[len, width]` tensor.
    pub fn gather(&self, items: &[u32], device: &Device) -> Result<Tensor, LearnError> {
        let mut out = Vec::with_capacity(items.len() * self.width);
        for &i in items {
            out.extend_from_slice(self.row(i));
        }
        Ok(Tensor::from_vec(out, (items.len(), self.width), device)?)
    }

    /// The whole table as a `[items + 1, width]` tensor.
    pub fn tensor(&self, device: &Device) -> Result<Tensor, LearnError> {
        Ok(Tensor::from_slice(
            &self.values,
            (self.items() + 1, self.width),
            device,
        )?)
    }
}

/// The item tables of one network.
#[derive(Debug, Clone)]
pub struct Items {
    /// Embeddings of items in a history.
    pub history: ItemTable,
    /// Embeddings of candidate items (actions).
    pub actions: ItemTable,
}

impl Items {
    /// Seeded tables for `items` items.
    pub fn seeded(cfg: &QConfig, items: usize) -> Self {
        let mut tables = Self {
            history: ItemTable::seeded(0, cfg.embed, 0),
            actions: ItemTable::seeded(0, cfg.embed, 0),
        };
        tables.grow(cfg, items);
        tables
    }

    /// Grows both tables to `items` items, each row seeded from the table's own seed.
    pub fn grow(&mut self, cfg: &QConfig, items: usize) {
        self.history.grow(items, cfg.seed ^ 0x4849_5354);
        self.actions.grow(items, cfg.seed ^ 0x4143_5453);
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.history.items()
    }

    /// Whether no item is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The network apart from its item tables: context embeddings, the user projection and
/// the MLP, as candle modules over a `VarMap` (training) or fixed tensors (published).
#[derive(Debug)]
pub struct Dense {
    pub(crate) hours: Embedding,
    pub(crate) devices: Embedding,
    pub(crate) user: Option<Linear>,
    pub(crate) l1: Linear,
    pub(crate) l2: Linear,
    pub(crate) out: Linear,
    pub(crate) cfg: QConfig,
    device: Device,
}

/// Item rows for one forward pass: tensors of item embeddings and the map from an item
/// index to its row in them (the identity for whole tables, a batch's own numbering for
/// gathered rows).
pub struct Rows<'a> {
    /// History embeddings.
    pub history: &'a Tensor,
    /// Action embeddings.
    pub actions: &'a Tensor,
    /// Row of an item index in both tensors.
    pub row: &'a dyn Fn(u32) -> u32,
}

impl Dense {
    /// Builds the dense part from weights named as in a checkpoint (`context.hours.weight`,
    /// `mlp.l1.weight`, …); with a fresh `VarMap` behind `vb`, call [`init_seeded`] next.
    pub fn new(vb: VarBuilder, cfg: &QConfig) -> Result<Self, LearnError> {
        cfg.validate()?;
        let (e, h) = (cfg.embed, cfg.hidden);
        Ok(Self {
            hours: candle_nn::embedding(HOUR_BUCKETS, e, vb.pp("context.hours"))?,
            devices: candle_nn::embedding(DEVICE_BUCKETS, e, vb.pp("context.devices"))?,
            user: match cfg.user_dim {
                0 => None,
                d => Some(candle_nn::linear(d, e, vb.pp("mlp.user"))?),
            },
            l1: candle_nn::linear(cfg.input_width(), h, vb.pp("mlp.l1"))?,
            l2: candle_nn::linear(h, h, vb.pp("mlp.l2"))?,
            out: candle_nn::linear(h, 1, vb.pp("mlp.out"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// A dense part with fresh variables on `device`, initialised from `cfg.seed`.
    pub fn seeded(cfg: &QConfig, device: &Device) -> Result<(VarMap, Self), LearnError> {
        let varmap = VarMap::new();
        let dense = Self::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
        init_seeded(&varmap, cfg.seed)?;
        Ok((varmap, dense))
    }

    /// State features `[b, (3 or 4) · embed]`: mean history embedding (zero for an empty
    /// history), hour embedding, device embedding and, with a user vector in the
    /// configuration, its projection (of zeros when a state has none).
    fn state_features(&self, rows: &Rows, states: &[&State]) -> Result<Tensor, LearnError> {
        let l = self.cfg.max_history;
        let b = states.len();
        let mut ids = vec![0u32; b * l];
        let mut weights = vec![0f32; b * l];
        for (r, s) in states.iter().enumerate() {
            let tail = s.recent(l);
            let real = tail.iter().filter(|&&i| i != 0).count();
            for (c, &item) in tail.iter().enumerate() {
                ids[r * l + c] = (rows.row)(item);
                if item != 0 {
                    weights[r * l + c] = 1.0 / real as f32;
                }
            }
        }
        let ids = Tensor::from_vec(ids, b * l, &self.device)?;
        let weights = Tensor::from_vec(weights, (b, l, 1), &self.device)?;
        let history = rows
            .history
            .index_select(&ids, 0)?
            .reshape((b, l, self.cfg.embed))?
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
        let mut parts = vec![history, hours, devices];
        if let Some(proj) = &self.user {
            let d = self.cfg.user_dim;
            let mut u = vec![0f32; b * d];
            for (r, s) in states.iter().enumerate() {
                if let Some(v) = &s.user {
                    u[r * d..(r + 1) * d].copy_from_slice(v);
                }
            }
            parts.push(proj.forward(&Tensor::from_vec(u, (b, d), &self.device)?)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor, LearnError> {
        let x = self.l1.forward(x)?.relu()?;
        let x = self.l2.forward(&x)?.relu()?;
        Ok(self.out.forward(&x)?.squeeze(1)?)
    }

    /// Q(sᵢ, aᵢ) for paired states and actions: `[b]`, differentiable (for training).
    pub fn forward(
        &self,
        rows: &Rows,
        states: &[&State],
        actions: &[u32],
    ) -> Result<Tensor, LearnError> {
        if states.len() != actions.len() {
            return Err(LearnError::Invalid(format!(
                "{} states but {} actions",
                states.len(),
                actions.len()
            )));
        }
        let s = self.state_features(rows, states)?;
        let ids: Vec<u32> = actions.iter().map(|&a| (rows.row)(a)).collect();
        let a = rows
            .actions
            .index_select(&Tensor::from_vec(ids, actions.len(), &self.device)?, 0)?;
        self.mlp(&Tensor::cat(&[&s, &a], 1)?)
    }

    /// Q of each state's candidates, in their order, from one batched forward pass over
    /// the lists padded to the longest one.
    pub fn q_lists(
        &self,
        rows: &Rows,
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
        let pad = (rows.row)(0);
        let mut ids = vec![pad; b * m];
        for (r, list) in actions.iter().enumerate() {
            for (c, &a) in list.iter().enumerate() {
                ids[r * m + c] = (rows.row)(a);
            }
        }
        let s = self.state_features(rows, states)?;
        let s = s.unsqueeze(1)?.broadcast_as((b, m, s.dim(1)?))?;
        let a = rows
            .actions
            .index_select(&Tensor::from_vec(ids, b * m, &self.device)?, 0)?
            .reshape((b, m, self.cfg.embed))?;
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

/// Name of the history item table among a network's tensors (checkpoints, exports).
pub const HISTORY_TABLE: &str = "items.history";
/// Name of the action item table among a network's tensors.
pub const ACTION_TABLE: &str = "items.actions";

/// A published, immutable Q-network: the dense part and whole item tables.
#[derive(Debug)]
pub struct QNet {
    dense: Dense,
    /// The request path's forward pass on the CPU (`None` on other devices).
    host: Option<HostQ>,
    /// The dense part's tensors by name, for [`QNet::to_bytes`].
    vars: HashMap<String, Tensor>,
    history: Tensor,
    actions: Tensor,
    num_items: usize,
}

impl QNet {
    /// A network holding copies of the current values of `varmap`'s variables and of
    /// `items`, so later training steps do not show through it.
    pub fn snapshot(
        varmap: &VarMap,
        items: &Items,
        cfg: &QConfig,
        device: &Device,
    ) -> Result<Self, LearnError> {
        let vars = copy_vars(varmap)?;
        let dense = Dense::new(
            VarBuilder::from_tensors(vars.clone(), DType::F32, device),
            cfg,
        )?;
        Ok(Self {
            host: host_path(&dense, device)?,
            dense,
            vars,
            history: items.history.tensor(device)?,
            actions: items.actions.tensor(device)?,
            num_items: items.len(),
        })
    }

    /// The weights as safetensors bytes, for another process: the dense part's tensors by
    /// name and the item tables ([`HISTORY_TABLE`], [`ACTION_TABLE`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>, LearnError> {
        let mut tensors: Vec<(&str, &Tensor)> =
            self.vars.iter().map(|(k, v)| (k.as_str(), v)).collect();
        tensors.push((HISTORY_TABLE, &self.history));
        tensors.push((ACTION_TABLE, &self.actions));
        safetensors::serialize(tensors, None)
            .map_err(|e| LearnError::Checkpoint(format!("serializing the Q-network: {e}")))
    }

    /// The network [`QNet::to_bytes`] wrote for the shape `cfg`, on `device`; an error
    /// names what does not fit.
    pub fn from_bytes(cfg: &QConfig, bytes: &[u8], device: &Device) -> Result<Self, LearnError> {
        let bad = |what: String| LearnError::Checkpoint(format!("loading a Q-network: {what}"));
        let mut vars =
            candle_core::safetensors::load_buffer(bytes, device).map_err(|e| bad(e.to_string()))?;
        let mut table = |name: &str| -> Result<Tensor, LearnError> {
            let t = vars.remove(name).ok_or_else(|| bad(format!("no {name}")))?;
            match t.dims() {
                &[rows, width] if rows >= 1 && width == cfg.embed => Ok(t),
                dims => Err(bad(format!(
                    "{name} is {dims:?}, not rows of width {}",
                    cfg.embed
                ))),
            }
        };
        let (history, actions) = (table(HISTORY_TABLE)?, table(ACTION_TABLE)?);
        if history.dims() != actions.dims() {
            return Err(bad("the item tables differ in size".into()));
        }
        let dense = Dense::new(
            VarBuilder::from_tensors(vars.clone(), DType::F32, device),
            cfg,
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            host: host_path(&dense, device)?,
            dense,
            vars,
            num_items: history.dims()[0] - 1,
            history,
            actions,
        })
    }

    /// A network with fresh seeded weights for `items` items.
    pub fn seeded(cfg: &QConfig, items: usize, device: &Device) -> Result<Self, LearnError> {
        let (varmap, _) = Dense::seeded(cfg, device)?;
        Self::snapshot(&varmap, &Items::seeded(cfg, items), cfg, device)
    }

    /// The network's shape.
    pub fn config(&self) -> &QConfig {
        &self.dense.cfg
    }

    /// Items the network knows (indices 1..=num_items).
    pub fn num_items(&self) -> usize {
        self.num_items
    }

    /// Q of each state's candidates, in their order, from one batched forward pass.
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
        let cfg = self.config();
        for s in states {
            cfg.check_state(s, self.num_items)?;
        }
        for list in actions {
            cfg.check_actions(list, self.num_items)?;
        }
        match &self.host {
            Some(host) => host.q_lists(&self.history, &self.actions, states, actions),
            None => self.dense.q_lists(&self.rows(), states, actions),
        }
    }

    /// [`QNet::q_values_of`] through candle, which the CPU path is checked against.
    #[cfg(test)]
    pub(crate) fn candle_q_values(
        &self,
        states: &[&State],
        actions: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, LearnError> {
        self.dense.q_lists(&self.rows(), states, actions)
    }

    fn rows(&self) -> Rows<'_> {
        Rows {
            history: &self.history,
            actions: &self.actions,
            row: &|i| i,
        }
    }
}

/// The written-out forward pass for `dense` on the CPU.
fn host_path(dense: &Dense, device: &Device) -> Result<Option<HostQ>, LearnError> {
    if device.is_cpu() {
        Ok(Some(HostQ::of(dense)?))
    } else {
        Ok(None)
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

    fn cfg(user_dim: usize) -> QConfig {
        QConfig {
            embed: 8,
            hidden: 16,
            user_dim,
            ..QConfig::default()
        }
    }

    fn net() -> QNet {
        QNet::seeded(&cfg(0), 10, &Device::Cpu).unwrap()
    }

    fn state(history: &[u32], hour: u8) -> State {
        State {
            history: history.to_vec(),
            context: ContextIds { hour, device: 1 },
            user: None,
        }
    }

    #[test]
    fn a_network_loaded_from_its_bytes_gives_the_same_q_values() {
        let net = QNet::seeded(&cfg(3), 10, &Device::Cpu).unwrap();
        let copy = QNet::from_bytes(&cfg(3), &net.to_bytes().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(copy.num_items(), 10);
        let s = State {
            user: Some(Arc::from([0.5f32, -1.0, 2.0].as_slice())),
            ..state(&[1, 2, 3], 5)
        };
        let actions = vec![vec![7, 3, 10]];
        let states = [s];
        assert_eq!(
            copy.q_values(&states, &actions).unwrap(),
            net.q_values(&states, &actions).unwrap()
        );
        let err = QNet::from_bytes(&cfg(0), &net.to_bytes().unwrap(), &Device::Cpu)
            .map(drop)
            .unwrap_err();
        assert!(err.to_string().contains("mlp.l1"), "{err}");
        let err = QNet::from_bytes(&cfg(3), b"not safetensors", &Device::Cpu)
            .map(drop)
            .unwrap_err();
        assert!(err.to_string().contains("loading a Q-network"), "{err}");
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
            .dense
            .forward(&net.rows(), &[&states[0], &states[1]], &[3, 2])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((paired[0] - batched[0][1]).abs() < 1e-5);
        assert!((paired[1] - batched[1][0]).abs() < 1e-5);
    }

    #[test]
    fn gathered_rows_give_the_same_q_as_whole_tables() {
        let c = cfg(0);
        let (varmap, dense) = Dense::seeded(&c, &Device::Cpu).unwrap();
        let items = Items::seeded(&c, 10);
        let net = QNet::snapshot(&varmap, &items, &c, &Device::Cpu).unwrap();
        let states = [state(&[9, 2], 3), state(&[4], 7)];
        let lists: [&[u32]; 2] = [&[5, 9], &[2]];
        let whole = net.q_values_of(&[&states[0], &states[1]], &lists).unwrap();
        let used = [9u32, 2, 4, 5];
        let local: HashMap<u32, u32> = used
            .iter()
            .enumerate()
            .map(|(r, &i)| (i, r as u32))
            .collect();
        let history = items.history.gather(&used, &Device::Cpu).unwrap();
        let actions = items.actions.gather(&used, &Device::Cpu).unwrap();
        let row = |i: u32| local.get(&i).copied().unwrap_or(0);
        let rows = Rows {
            history: &history,
            actions: &actions,
            row: &row,
        };
        let gathered = dense
            .q_lists(&rows, &[&states[0], &states[1]], &lists)
            .unwrap();
        for (a, b) in whole.iter().flatten().zip(gathered.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{whole:?} {gathered:?}");
        }
    }

    #[test]
    fn the_user_vector_moves_q_and_a_missing_one_counts_as_zeros() {
        let net = QNet::seeded(&cfg(4), 10, &Device::Cpu).unwrap();
        let with = |u: Option<[f32; 4]>| State {
            user: u.map(|u| Arc::from(u.as_slice())),
            ..state(&[1, 2], 3)
        };
        let q = |s: State| net.q_values(&[s], &[vec![1, 5]]).unwrap();
        assert_ne!(q(with(Some([1.0, -1.0, 0.5, 2.0]))), q(with(None)));
        assert_eq!(q(with(Some([0.0; 4]))), q(with(None)));
        let e = net
            .q_values(
                &[State {
                    user: Some(Arc::from([1.0f32, 2.0].as_slice())),
                    ..state(&[1], 3)
                }],
                &[vec![1]],
            )
            .unwrap_err();
        assert!(e.to_string().contains("width 2"), "{e}");
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
    fn the_same_seed_gives_the_same_weights_and_growth_keeps_rows() {
        let a = net().q_values(&[state(&[1], 2)], &[vec![1, 2]]).unwrap();
        let b = net().q_values(&[state(&[1], 2)], &[vec![1, 2]]).unwrap();
        assert_eq!(a, b);
        let c = cfg(0);
        let mut grown = Items::seeded(&c, 4);
        grown.grow(&c, 10);
        let fresh = Items::seeded(&c, 10);
        assert_eq!(grown.history.values(), fresh.history.values());
        assert_eq!(grown.actions.values(), fresh.actions.values());
        assert!(grown.history.row(0).iter().all(|&x| x == 0.0));
    }
}
