//! Training the encoder online, from the interactions a service sees while it serves.
//!
//! Every interaction is a choice: a user with a history, in a context, picked an item
//! over the others of the slate they were shown. [`OnlineTrainer`] keeps these examples
//! (bounded) and learns to put the chosen item first among what was shown: a softmax over
//! the slate, not over the catalog. An encoder that learns from its own traffic with a
//! full softmax learns mostly what it showed (every click is on a shown item), and its
//! ranking then feeds on itself; learning the choice among the shown items learns
//! preference instead. An interaction with no slate (a click the service did not
//! recommend) is contrasted with random catalog items.
//!
//! Each step takes half its batch from the newest examples (fine-tuning on what is new)
//! and half uniformly from all kept ones (a replay, so the model does not forget). Every
//! interaction buys a fixed number of example visits (`replays`), so training keeps pace
//! with traffic and stops when there is nothing new. The first interaction of a user is an
//! example too: a choice in a context with no history.
//!
//! The item vocabulary is the catalog: item index i + 1 is the catalog's item i, and
//! [`OnlineTrainer::grow`] adds rows for items added later. The item tower adds a
//! category embedding to each item's own (see [`crate::sasrec`]), drawn wider at the
//! start, so items of one category begin alike, a new item is placed near its category
//! before anyone has clicked it, and what a user's clicks say about a category reaches
//! every item in it. [`OnlineTrainer::snapshot`] gives a plain encoder for serving,
//! categories folded into its item table.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::checkpoint::{io, read_json, write_json};
use crate::context::ContextIds;
use crate::optim::DenseAdamW;
use crate::rng::SplitMix64;
use crate::sasrec::{self, Config, Noise, SasRec};

/// The shape and pace of online training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineConfig {
    /// Longest history read (the last `max_len` items).
    pub max_len: usize,
    /// Width of item and user vectors.
    pub hidden: usize,
    /// Attention heads (divides `hidden`).
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the feed-forward layer.
    pub ff: usize,
    /// Dropout probability during training.
    pub dropout: f32,
    /// Learn a weight for items already in the user's history ([`Config::repeat`]).
    #[serde(default)]
    pub repeat: bool,
    /// Sequences per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Example visits each new interaction buys: how often, on average, training goes
    /// over an interaction.
    pub replays: f64,
    /// Users whose histories are kept; the least recently active are forgotten first.
    pub max_users: usize,
    /// Examples kept for training; the oldest are forgotten first.
    pub max_examples: usize,
    /// Seed of initial weights, dropout and sampling.
    pub seed: u64,
}

/// Example visits each interaction buys unless configured: in the simulator's fresh shop
/// 16 closed more of the gap to the oracle than 8 in each kind of goods, and 32 did worse.
pub const DEFAULT_REPLAYS: f64 = 16.0;

impl Default for OnlineConfig {
    fn default() -> Self {
        Self {
            max_len: 20,
            hidden: 32,
            heads: 2,
            layers: 1,
            ff: 64,
            dropout: 0.1,
            repeat: false,
            batch_size: 32,
            lr: 3e-3,
            replays: DEFAULT_REPLAYS,
            max_users: 200_000,
            max_examples: 200_000,
            seed: 7,
        }
    }
}

/// Gradient norm clip.
const MAX_GRAD_NORM: f64 = 5.0;
/// Items an example contrasts with the chosen one, at most: the rest of the slate, or
/// random catalog items when there was none.
const OTHERS: usize = 9;
/// Logit of a padding candidate.
const MASKED: f32 = -1e9;
/// The category embeddings' name in the variables.
const CATEGORY_TABLE: &str = "categories.weight";
/// The item embeddings' name in the variables.
const ITEM_TABLE: &str = "items.weight";
/// Spread (sd) of the initial category embeddings; item embeddings start at 0.02.
const CATEGORY_INIT_SD: f64 = 0.1;

/// Weights file of a saved online encoder.
pub const ONLINE_WEIGHTS: &str = "online.safetensors";
/// State file of a saved online encoder: items, histories, examples.
pub const ONLINE_STATE: &str = "online.json";

/// Sets `var` (named `name`) to `saved`, read from `file`, when their shapes agree; the
/// error says where the shapes came from (`whose`: "here…", "in its own config.json").
fn set_same_shape(
    var: &candle_core::Var,
    saved: &Tensor,
    name: &str,
    file: &Path,
    whose: &str,
) -> Result<(), ModelError> {
    if saved.dims() != var.dims() {
        return Err(io(
            file,
            format!(
                "{name} is {:?} there but {:?} {whose}",
                saved.dims(),
                var.dims()
            ),
        ));
    }
    var.set(saved)?;
    Ok(())
}

/// What [`OnlineTrainer::save`] writes beside the weights, items named by id.
#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    /// Item ids in row order (row 1 first).
    items: Vec<String>,
    /// Category names in row order (row 0, no category, is empty).
    categories: Vec<String>,
    users: Vec<(String, Vec<String>)>,
    examples: Vec<SavedExample>,
    steps: u64,
    first_choices: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedExample {
    history: Vec<String>,
    context: ContextIds,
    item: String,
    others: Vec<String>,
}

/// One user's recent interactions, newest last.
#[derive(Debug)]
struct UserSeq {
    items: VecDeque<u32>,
    /// The trainer's clock when it last grew.
    touched: u64,
}

/// One choice: with `history` in `context`, the user took `item` over `others`.
#[derive(Debug)]
struct Example {
    history: Vec<u32>,
    context: ContextIds,
    item: u32,
    /// Empty: contrast with random items.
    others: Vec<u32>,
}

/// The encoder in training, with the examples it trains on.
pub struct OnlineTrainer {
    cfg: OnlineConfig,
    varmap: VarMap,
    model: SasRec,
    opt: DenseAdamW,
    device: Device,
    /// Category index of every item index (index 0 is padding, category 0 "none").
    item_category: Vec<u32>,
    category_index: HashMap<String, u32>,
    users: HashMap<String, usize>,
    seqs: Vec<UserSeq>,
    examples: VecDeque<Example>,
    /// The newest examples not trained on yet.
    fresh: usize,
    first_choices: usize,
    credit: f64,
    clock: u64,
    rng: SplitMix64,
    noise: Noise,
    steps: u64,
    last_loss: f32,
    /// Items (1-based) nothing had been learned of when it was made.
    unlearned: Vec<u32>,
}

impl std::fmt::Debug for OnlineTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlineTrainer")
            .field("items", &(self.item_category.len() - 1))
            .field("users", &self.seqs.len())
            .field("examples", &self.examples.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl OnlineTrainer {
    /// A freshly initialised encoder over items whose categories are `categories` (in
    /// item order; an empty string is no category), on `device`.
    pub fn new(
        cfg: OnlineConfig,
        categories: &[String],
        device: Device,
    ) -> Result<Self, ModelError> {
        if cfg.batch_size == 0
            || cfg.max_len == 0
            || cfg.max_examples == 0
            || !(cfg.replays.is_finite() && cfg.replays > 0.0)
        {
            return Err(ModelError::Train(
                "batch_size, max_len, max_examples and replays must be above zero".into(),
            ));
        }
        let mut category_index = HashMap::new();
        let mut item_category = vec![0];
        for c in categories {
            item_category.push(Self::category_of(&mut category_index, c));
        }
        let (varmap, model) = Self::build(&cfg, &item_category, category_index.len(), &device)?;
        sasrec::init_seeded(&varmap, cfg.seed)?;
        Self::spread_categories(&varmap, cfg.seed)?;
        let opt = Self::optimizer(&varmap, &cfg)?;
        Ok(Self {
            rng: SplitMix64::new(cfg.seed ^ 0x0a11_0e5d),
            noise: Noise::new(cfg.dropout, cfg.seed.wrapping_add(1)),
            cfg,
            varmap,
            model,
            opt,
            device,
            item_category,
            category_index,
            users: HashMap::new(),
            seqs: Vec::new(),
            examples: VecDeque::new(),
            fresh: 0,
            first_choices: 0,
            credit: 0.0,
            clock: 0,
            steps: 0,
            last_loss: f32::NAN,
            unlearned: (1..=categories.len() as u32).collect(),
        })
    }

    /// Items (1-based) nothing had been learned of when this trainer was made: all of a
    /// fresh one's, those the checkpoint or the saved state it started from did not know.
    pub fn unlearned(&self) -> &[u32] {
        &self.unlearned
    }

    fn category_of(index: &mut HashMap<String, u32>, category: &str) -> u32 {
        if category.is_empty() {
            return 0;
        }
        let next = index.len() as u32 + 1;
        *index.entry(category.to_owned()).or_insert(next)
    }

    fn model_config(cfg: &OnlineConfig, num_items: usize) -> Config {
        Config {
            num_items,
            max_len: cfg.max_len,
            hidden: cfg.hidden,
            heads: cfg.heads,
            layers: cfg.layers,
            ff: cfg.ff,
            dropout: cfg.dropout,
            repeat: cfg.repeat,
            text_dim: 0,
            text_alone: false,
        }
    }

    fn build(
        cfg: &OnlineConfig,
        item_category: &[u32],
        categories: usize,
        device: &Device,
    ) -> Result<(VarMap, SasRec), ModelError> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = SasRec::load(
            vb.clone(),
            &Self::model_config(cfg, item_category.len() - 1),
        )?
        .with_categories(vb, categories + 1, item_category)?;
        Ok((varmap, model))
    }

    /// Draws the category embeddings wider than the items' own, so that before any
    /// training items of one category are alike and a click on one lifts its category.
    fn spread_categories(varmap: &VarMap, seed: u64) -> Result<(), ModelError> {
        let vars = varmap
            .data()
            .lock()
            .map_err(|e| ModelError::Train(e.to_string()))?;
        if let Some(var) = vars.get(CATEGORY_TABLE) {
            let mut rng = SplitMix64::new(seed ^ 0x0ca7_e609);
            let data: Vec<f32> = (0..var.elem_count())
                .map(|_| (rng.normal() * CATEGORY_INIT_SD) as f32)
                .collect();
            var.set(&Tensor::from_vec(data, var.shape(), var.device())?)?;
        }
        Ok(())
    }

    fn optimizer(varmap: &VarMap, cfg: &OnlineConfig) -> Result<DenseAdamW, ModelError> {
        Ok(DenseAdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?)
    }

    /// Items it knows.
    pub fn num_items(&self) -> usize {
        self.item_category.len() - 1
    }

    /// Width of its user vectors.
    pub fn width(&self) -> usize {
        self.cfg.hidden
    }

    /// Training steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Loss of the last step (NaN before the first).
    pub fn last_loss(&self) -> f32 {
        self.last_loss
    }

    /// Users whose histories it keeps.
    pub fn users(&self) -> usize {
        self.seqs.len()
    }

    /// Examples it keeps.
    pub fn examples(&self) -> usize {
        self.examples.len()
    }

    /// Choices of users with no history yet it has taken (ever).
    pub fn first_choices(&self) -> usize {
        self.first_choices
    }

    /// Adds items after the known ones, with their categories. What was learned is kept;
    /// the optimiser's moments start afresh.
    pub fn grow(&mut self, categories: &[String]) -> Result<(), ModelError> {
        if categories.is_empty() {
            return Ok(());
        }
        let mut item_category = self.item_category.clone();
        for c in categories {
            item_category.push(Self::category_of(&mut self.category_index, c));
        }
        let (varmap, model) = Self::build(
            &self.cfg,
            &item_category,
            self.category_index.len(),
            &self.device,
        )?;
        sasrec::init_seeded(&varmap, self.cfg.seed ^ item_category.len() as u64)?;
        Self::spread_categories(&varmap, self.cfg.seed ^ item_category.len() as u64)?;
        {
            let old = self
                .varmap
                .data()
                .lock()
                .map_err(|e| ModelError::Train(e.to_string()))?;
            let new = varmap
                .data()
                .lock()
                .map_err(|e| ModelError::Train(e.to_string()))?;
            for (name, var) in new.iter() {
                let Some(before) = old.get(name) else {
                    continue;
                };
                let (rows, fresh) = (before.dims()[0], var.dims()[0]);
                let value = if rows == fresh {
                    before.as_tensor().copy()?
                } else {
                    Tensor::cat(
                        &[
                            before.as_tensor(),
                            &var.as_tensor().narrow(0, rows, fresh - rows)?,
                        ],
                        0,
                    )?
                };
                var.set(&value)?;
            }
        }
        self.opt = Self::optimizer(&varmap, &self.cfg)?;
        self.varmap = varmap;
        self.model = model;
        self.item_category = item_category;
        Ok(())
    }

    /// Places items by the row each should score with (item index, 1-based; `hidden`
    /// wide): its own embedding becomes what the row adds to its category's, so an item
    /// known by something other than interactions (its text) starts where that puts it.
    /// Training goes on from there.
    pub fn place(&mut self, rows: &[(u32, Vec<f32>)]) -> Result<(), ModelError> {
        if rows.is_empty() {
            return Ok(());
        }
        let width = self.cfg.hidden;
        let vars = self
            .varmap
            .data()
            .lock()
            .map_err(|e| ModelError::Train(e.to_string()))?;
        let (Some(items), Some(cats)) = (vars.get(ITEM_TABLE), vars.get(CATEGORY_TABLE)) else {
            return Err(ModelError::Train("the item tower has no tables".into()));
        };
        let mut own = items.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let cat_rows = cats.as_tensor().to_vec2::<f32>()?;
        for (item, row) in rows {
            let i = *item as usize;
            if i == 0 || i >= self.item_category.len() || row.len() != width {
                return Err(ModelError::Train(format!(
                    "cannot place item {item} by a row {} wide: {} items of width {width}",
                    row.len(),
                    self.item_category.len() - 1
                )));
            }
            let mean = &cat_rows[self.item_category[i] as usize];
            for ((d, v), m) in own[i * width..(i + 1) * width]
                .iter_mut()
                .zip(row)
                .zip(mean)
            {
                *d = ((v - m) as f64 / sasrec::ITEM_SHARE) as f32;
            }
        }
        let n = own.len() / width;
        items.set(&Tensor::from_vec(own, (n, width), &self.device)?)?;
        Ok(())
    }

    /// Takes one interaction of `user` with item index `item` (1-based) in `context`,
    /// chosen from the slate `shown` (item indices; empty when it was not recommended).
    /// Items it does not know are ignored; a cart or purchase right after the click on
    /// the same item is the same choice.
    pub fn observe(&mut self, user: &str, item: u32, context: ContextIds, shown: &[u32]) {
        let items = self.num_items();
        let known = |i: u32| i != 0 && i as usize <= items;
        if !known(item) {
            return;
        }
        self.clock += 1;
        let slot = match self.users.get(user) {
            Some(&slot) => slot,
            None => {
                if self.seqs.len() >= self.cfg.max_users {
                    self.forget_oldest();
                }
                self.seqs.push(UserSeq {
                    items: VecDeque::new(),
                    touched: 0,
                });
                self.users.insert(user.to_owned(), self.seqs.len() - 1);
                self.seqs.len() - 1
            }
        };
        let seq = &mut self.seqs[slot];
        seq.touched = self.clock;
        if seq.items.back() == Some(&item) {
            return;
        }
        let mut others: Vec<u32> = Vec::with_capacity(OTHERS);
        for &i in shown {
            if others.len() < OTHERS && i != item && known(i) && !others.contains(&i) {
                others.push(i);
            }
        }
        if seq.items.is_empty() {
            self.first_choices += 1;
        }
        self.examples.push_back(Example {
            history: seq.items.iter().copied().collect(),
            context,
            item,
            others,
        });
        seq.items.push_back(item);
        while seq.items.len() > self.cfg.max_len {
            seq.items.pop_front();
        }
        while self.examples.len() > self.cfg.max_examples {
            self.examples.pop_front();
        }
        self.fresh = (self.fresh + 1).min(self.examples.len());
        self.credit += self.cfg.replays;
    }

    /// Forgets the least recently active tenth of the users' histories (their examples
    /// stay until they are the oldest).
    fn forget_oldest(&mut self) {
        let mut order: Vec<usize> = (0..self.seqs.len()).collect();
        order.sort_unstable_by_key(|&s| self.seqs[s].touched);
        let drop: std::collections::HashSet<usize> = order[..(self.seqs.len() / 10).max(1)]
            .iter()
            .copied()
            .collect();
        let mut remap = vec![usize::MAX; self.seqs.len()];
        let mut kept = Vec::with_capacity(self.seqs.len() - drop.len());
        for (old, seq) in std::mem::take(&mut self.seqs).into_iter().enumerate() {
            if !drop.contains(&old) {
                remap[old] = kept.len();
                kept.push(seq);
            }
        }
        self.seqs = kept;
        self.users.retain(|_, slot| {
            *slot = remap[*slot];
            *slot != usize::MAX
        });
    }

    /// Whether new interactions are waiting to be trained on.
    pub fn pending(&self) -> bool {
        self.credit > 0.0 && !self.examples.is_empty()
    }

    /// One training step, if anything is pending: returns its loss.
    pub fn step(&mut self) -> Result<Option<f32>, ModelError> {
        if !self.pending() {
            return Ok(None);
        }
        let b = self.cfg.batch_size.min(self.credit.ceil() as usize).max(1);
        self.credit = (self.credit - b as f64).max(0.0);
        let total = self.examples.len();
        let mut batch = Vec::with_capacity(b);
        while batch.len() < b.div_ceil(2) && self.fresh > 0 {
            batch.push(total - self.fresh);
            self.fresh -= 1;
        }
        while batch.len() < b {
            batch.push(self.rng.below(total as u64) as usize);
        }
        let (l, k, n) = (self.cfg.max_len, OTHERS + 1, self.num_items() as u64);
        let rows = batch.len();
        let mut ids = vec![0u32; rows * l];
        let mut hours = Vec::with_capacity(rows);
        let mut devices = Vec::with_capacity(rows);
        let mut candidates = vec![0u32; rows * k];
        let mut mask = vec![0f32; rows * k];
        let repeat = self.model.repeat_tensor()?;
        let mut seen = vec![0f32; if repeat.is_some() { rows * k } else { 0 }];
        for (r, &e) in batch.iter().enumerate() {
            let ex = &self.examples[e];
            let tail = &ex.history[ex.history.len().saturating_sub(l)..];
            ids[r * l + (l - tail.len())..(r + 1) * l].copy_from_slice(tail);
            hours.push(u32::from(ex.context.hour));
            devices.push(u32::from(ex.context.device));
            let row = &mut candidates[r * k..(r + 1) * k];
            row[0] = ex.item;
            for (c, slot) in row[1..].iter_mut().enumerate() {
                *slot = if ex.others.is_empty() {
                    // Random contrast: any item but the chosen one.
                    let draw = 1 + self.rng.below(n.max(2) - 1) as u32;
                    if draw >= ex.item { draw + 1 } else { draw }.min(n as u32)
                } else {
                    match ex.others.get(c) {
                        Some(&i) => i,
                        None => {
                            mask[r * k + 1 + c] = MASKED;
                            0
                        }
                    }
                };
            }
            if repeat.is_some() {
                for (c, &i) in row.iter().enumerate() {
                    if i != 0 && ex.history.contains(&i) {
                        seen[r * k + c] = 1.0;
                    }
                }
            }
        }
        let d = &self.device;
        let ids = Tensor::from_vec(ids, (rows, l), d)?;
        let hours = Tensor::from_vec(hours, rows, d)?;
        let devices = Tensor::from_vec(devices, rows, d)?;
        let users = self
            .model
            .user_vectors_train(&ids, &hours, &devices, &mut self.noise)?;
        let vectors = self
            .model
            .item_rows(&candidates)?
            .reshape((rows, k, self.cfg.hidden))?;
        let mut logits = vectors
            .matmul(&users.unsqueeze(2)?)?
            .squeeze(2)?
            .add(&Tensor::from_vec(mask, (rows, k), d)?)?;
        if let Some(w) = repeat {
            logits = (logits + Tensor::from_vec(seen, (rows, k), d)?.broadcast_mul(&w)?)?;
        }
        let targets = Tensor::zeros(rows, DType::U32, d)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let mut grads = loss.backward()?;
        sasrec::clip_grads(&mut grads, &self.varmap.all_vars(), MAX_GRAD_NORM)?;
        self.opt.step(&grads)?;
        self.steps += 1;
        self.last_loss = loss.to_scalar::<f32>()?;
        Ok(Some(self.last_loss))
    }

    /// Writes the weights, the users' histories and the examples to `dir` (created if
    /// missing), naming items by their ids in `vocabulary` (`vocabulary[0]` is padding),
    /// so that a later run can resume with another catalog. The files are written beside
    /// the old ones and renamed over them, the state file last.
    pub fn save(&self, dir: &Path, vocabulary: &[String]) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let id = |i: u32| vocabulary.get(i as usize).cloned().unwrap_or_default();
        let ids = |items: &[u32]| items.iter().map(|&i| id(i)).collect::<Vec<_>>();
        let mut categories = vec![String::new(); self.category_index.len() + 1];
        for (name, &c) in &self.category_index {
            categories[c as usize] = name.clone();
        }
        let state = SavedState {
            items: vocabulary[1..].to_vec(),
            categories,
            users: self
                .users
                .iter()
                .map(|(user, &slot)| {
                    let items: Vec<u32> = self.seqs[slot].items.iter().copied().collect();
                    (user.clone(), ids(&items))
                })
                .collect(),
            examples: self
                .examples
                .iter()
                .map(|e| SavedExample {
                    history: ids(&e.history),
                    context: e.context,
                    item: id(e.item),
                    others: ids(&e.others),
                })
                .collect(),
            steps: self.steps,
            first_choices: self.first_choices,
        };
        let (weights, state_file) = (dir.join(ONLINE_WEIGHTS), dir.join(ONLINE_STATE));
        let tmp = |p: &Path| {
            let mut name = p.as_os_str().to_owned();
            name.push(".tmp");
            std::path::PathBuf::from(name)
        };
        self.varmap
            .save(tmp(&weights))
            .map_err(|e| io(&tmp(&weights), e))?;
        write_json(&tmp(&state_file), &state)?;
        std::fs::rename(tmp(&weights), &weights).map_err(|e| io(&weights, e))?;
        std::fs::rename(tmp(&state_file), &state_file).map_err(|e| io(&state_file, e))
    }

    /// The encoder saved in `dir` by [`OnlineTrainer::save`], over today's items
    /// (`categories` in item order; `vocabulary[0]` is padding), or `None` when nothing
    /// is saved there. Items are matched by id: one still in the catalog keeps what was
    /// learned of it wherever it is now, a new one starts from its category, and
    /// histories and examples lose the items that are gone. A checkpoint of another
    /// shape is refused with a message that names both.
    pub fn resume(
        cfg: OnlineConfig,
        dir: &Path,
        vocabulary: &[String],
        categories: &[String],
        device: Device,
    ) -> Result<Option<Self>, ModelError> {
        let (weights, state_file) = (dir.join(ONLINE_WEIGHTS), dir.join(ONLINE_STATE));
        if !state_file.exists() {
            return Ok(None);
        }
        let state: SavedState = read_json(&state_file)?;
        let mut trainer = Self::new(cfg, categories, device.clone())?;
        let saved =
            candle_core::safetensors::load(&weights, &device).map_err(|e| io(&weights, e))?;
        let index: HashMap<&str, u32> = vocabulary
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, id)| (id.as_str(), i as u32))
            .collect();
        // Row r of a saved table is item r (1-based) of the saved vocabulary, or category
        // r of the saved categories; today's rows take theirs by id and by name.
        let old_items: Vec<Option<u32>> = std::iter::once(Some(0))
            .chain(state.items.iter().map(|id| index.get(id.as_str()).copied()))
            .collect();
        let mut learned = vec![false; vocabulary.len()];
        for &i in old_items.iter().flatten() {
            learned[i as usize] = true;
        }
        trainer.unlearned = (1..vocabulary.len() as u32)
            .filter(|&i| !learned[i as usize])
            .collect();
        {
            let vars = trainer
                .varmap
                .data()
                .lock()
                .map_err(|e| ModelError::Train(e.to_string()))?;
            for (name, var) in vars.iter() {
                let before = saved.get(name).ok_or_else(|| {
                    io(&weights, format!("has no {name}: saved with another shape"))
                })?;
                let rows: Vec<(usize, usize)> = match name.as_str() {
                    ITEM_TABLE => old_items
                        .iter()
                        .enumerate()
                        .filter_map(|(old, new)| new.map(|n| (old, n as usize)))
                        .collect(),
                    CATEGORY_TABLE => state
                        .categories
                        .iter()
                        .enumerate()
                        .filter_map(|(old, name)| {
                            let now = if name.is_empty() {
                                Some(0)
                            } else {
                                trainer.category_index.get(name.as_str()).copied()
                            };
                            now.map(|n| (old, n as usize))
                        })
                        .collect(),
                    _ => {
                        set_same_shape(
                            var,
                            before,
                            name,
                            &weights,
                            "here: saved with another shape",
                        )?;
                        continue;
                    }
                };
                if before.dim(1)? != var.dim(1)? {
                    return Err(io(
                        &weights,
                        format!(
                            "{name} is {} wide there but {} here: saved with another shape",
                            before.dim(1)?,
                            var.dim(1)?
                        ),
                    ));
                }
                let (mut table, width) = (var.as_tensor().to_vec2::<f32>()?, var.dim(1)?);
                let old = before.to_vec2::<f32>()?;
                for (o, n) in rows {
                    if let (Some(src), Some(dst)) = (old.get(o), table.get_mut(n)) {
                        dst.copy_from_slice(src);
                    }
                }
                let flat: Vec<f32> = table.into_iter().flatten().collect();
                var.set(&Tensor::from_vec(flat, (var.dim(0)?, width), &device)?)?;
            }
        }
        let known = |ids: &[String]| -> Vec<u32> {
            ids.iter()
                .filter_map(|id| index.get(id.as_str()).copied())
                .collect()
        };
        for (user, items) in &state.users {
            let items = known(items);
            if !items.is_empty() {
                trainer.users.insert(user.clone(), trainer.seqs.len());
                trainer.seqs.push(UserSeq {
                    items: items.into_iter().collect(),
                    touched: 0,
                });
            }
        }
        for e in &state.examples {
            if let Some(&item) = index.get(e.item.as_str()) {
                trainer.examples.push_back(Example {
                    history: known(&e.history),
                    context: e.context,
                    item,
                    others: known(&e.others),
                });
            }
        }
        trainer.steps = state.steps;
        trainer.first_choices = state.first_choices;
        trainer.opt = Self::optimizer(&trainer.varmap, &trainer.cfg)?;
        Ok(Some(trainer))
    }

    /// An encoder that starts from the checkpoint `onrec train` wrote in `dir` and goes on
    /// learning online, over today's items (`categories` in item order; `vocabulary[0]` is
    /// padding). Its shape is the checkpoint's (`cfg` gives the pace of training). It
    /// scores exactly as the checkpoint does: each category's embedding is the mean of its
    /// items' rows in the checkpoint, and each item keeps the rest as its own, so a catalog
    /// item the checkpoint does not know starts at its category's mean (or where
    /// [`OnlineTrainer::place`] puts it). A checkpoint trained with item text gives rows
    /// with the projected text folded in: online training goes on from those rows.
    pub fn from_checkpoint(
        cfg: OnlineConfig,
        dir: &Path,
        vocabulary: &[String],
        categories: &[String],
        device: Device,
    ) -> Result<Self, ModelError> {
        let shape = crate::checkpoint::read_config(dir)?;
        let cfg = OnlineConfig {
            max_len: shape.max_len,
            hidden: shape.hidden,
            heads: shape.heads,
            layers: shape.layers,
            ff: shape.ff,
            repeat: shape.repeat,
            ..cfg
        };
        let ids: Vec<String> = read_json(&dir.join(crate::checkpoint::ITEMS))?;
        let weights = dir.join(crate::checkpoint::WEIGHTS);
        let saved =
            candle_core::safetensors::load(&weights, &device).map_err(|e| io(&weights, e))?;
        let mut trainer = Self::new(cfg, categories, device.clone())?;
        let row_of: HashMap<&str, usize> = ids
            .iter()
            .enumerate()
            .map(|(r, id)| (id.as_str(), r + 1))
            .collect();
        {
            let vars = trainer
                .varmap
                .data()
                .lock()
                .map_err(|e| ModelError::Train(e.to_string()))?;
            for (name, var) in vars.iter() {
                if name == CATEGORY_TABLE || name == ITEM_TABLE {
                    continue;
                }
                let before = saved
                    .get(name)
                    .ok_or_else(|| io(&weights, format!("has no {name}")))?;
                set_same_shape(var, before, name, &weights, "in its own config.json")?;
            }
            // The rows the checkpoint scores with: with item text, its projected text
            // is folded into each item's row, and online training goes on from there.
            let table = crate::checkpoint::load(dir, &device)?
                .model
                .folded_item_table()?
                .to_vec2::<f32>()?;
            let width = trainer.cfg.hidden;
            if table.len() != ids.len() + 1 || table.iter().any(|r| r.len() != width) {
                return Err(io(
                    &weights,
                    format!(
                        "{ITEM_TABLE} is not {} rows of width {width}, as config.json and items.json say",
                        ids.len() + 1
                    ),
                ));
            }
            let (Some(items), Some(cats)) = (vars.get(ITEM_TABLE), vars.get(CATEGORY_TABLE)) else {
                return Err(ModelError::Train("the item tower has no tables".into()));
            };
            let known: Vec<Option<&Vec<f32>>> = vocabulary
                .iter()
                .map(|id| row_of.get(id.as_str()).and_then(|&r| table.get(r)))
                .collect();
            trainer.unlearned = (1..known.len() as u32)
                .filter(|&i| known[i as usize].is_none())
                .collect();
            let (mut item_rows, mut cat_rows) = (
                items.as_tensor().to_vec2::<f32>()?,
                cats.as_tensor().to_vec2::<f32>()?,
            );
            let mut sums = vec![(vec![0f32; width], 0usize); cat_rows.len()];
            for (i, row) in known.iter().enumerate().skip(1) {
                if let Some(row) = row {
                    let (sum, n) = &mut sums[trainer.item_category[i] as usize];
                    sum.iter_mut().zip(row.iter()).for_each(|(s, v)| *s += v);
                    *n += 1;
                }
            }
            for ((sum, n), dst) in sums.iter().zip(cat_rows.iter_mut()) {
                if *n > 0 {
                    dst.iter_mut()
                        .zip(sum)
                        .for_each(|(d, s)| *d = s / *n as f32);
                }
            }
            for (i, row) in known.iter().enumerate().skip(1) {
                if let Some(row) = row {
                    let mean = &cat_rows[trainer.item_category[i] as usize];
                    item_rows[i]
                        .iter_mut()
                        .zip(row.iter().zip(mean))
                        .for_each(|(d, (v, m))| *d = ((v - m) as f64 / sasrec::ITEM_SHARE) as f32);
                }
            }
            for (var, rows) in [(items, item_rows), (cats, cat_rows)] {
                let n = rows.len();
                let flat: Vec<f32> = rows.into_iter().flatten().collect();
                var.set(&Tensor::from_vec(flat, (n, width), &device)?)?;
            }
        }
        trainer.opt = Self::optimizer(&trainer.varmap, &trainer.cfg)?;
        Ok(trainer)
    }

    /// A copy of the encoder for serving: the same scores, categories folded into the
    /// item table, independent of further training.
    pub fn snapshot(&self) -> Result<SasRec, ModelError> {
        let tensors = self.serving_tensors()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        Ok(SasRec::load(
            vb,
            &Self::model_config(&self.cfg, self.num_items()),
        )?)
    }

    /// [`OnlineTrainer::snapshot`] for another process: its shape and its weights as
    /// safetensors bytes, which [`crate::checkpoint::from_bytes`] loads.
    pub fn export(&self) -> Result<(Config, Vec<u8>), ModelError> {
        let tensors = self.serving_tensors()?;
        let bytes = safetensors::serialize(tensors.iter(), None)
            .map_err(|e| ModelError::Checkpoint(format!("serializing the weights: {e}")))?;
        Ok((Self::model_config(&self.cfg, self.num_items()), bytes))
    }

    /// The serving encoder's tensors, by name.
    fn serving_tensors(&self) -> Result<HashMap<String, Tensor>, ModelError> {
        let mut tensors = HashMap::new();
        {
            let vars = self
                .varmap
                .data()
                .lock()
                .map_err(|e| ModelError::Train(e.to_string()))?;
            for (name, var) in vars.iter() {
                if name != CATEGORY_TABLE {
                    tensors.insert(name.clone(), var.as_tensor().copy()?);
                }
            }
        }
        tensors.insert(
            ITEM_TABLE.to_owned(),
            self.model.folded_item_table()?.copy()?,
        );
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::{Query, score_batch};

    fn categories(items: usize, cats: usize) -> Vec<String> {
        (0..items).map(|i| format!("c{}", i % cats)).collect()
    }

    fn trainer(items: usize) -> OnlineTrainer {
        let cfg = OnlineConfig {
            hidden: 16,
            ff: 32,
            batch_size: 16,
            ..OnlineConfig::default()
        };
        OnlineTrainer::new(cfg, &categories(items, 3), Device::Cpu).unwrap()
    }

    fn top(model: &SasRec, history: Vec<u32>, k: usize) -> Vec<u32> {
        let q = Query {
            history,
            context: ContextIds::default(),
            exclude: vec![],
            k,
            shift: None,
        };
        score_batch(model, &Device::Cpu, &[&q]).unwrap()[0]
            .iter()
            .map(|&(i, _)| i)
            .collect()
    }

    #[test]
    fn it_learns_the_category_users_choose_from_mixed_slates() {
        let mut t = trainer(30);
        let mut rng = SplitMix64::new(3);
        // Item index i + 1 is of category i % 3. User u likes category u % 3: from a slate
        // of one item per category they take the one of theirs.
        for u in 0..90u32 {
            for _ in 0..4 {
                let slate: Vec<u32> = (0..3).map(|c| c + 3 * rng.below(10) as u32 + 1).collect();
                let chosen = slate[(u % 3) as usize];
                t.observe(&format!("u{u}"), chosen, ContextIds::default(), &slate);
            }
        }
        assert!(t.examples() > 300, "one example a choice, repeats aside");
        assert!(t.pending());
        while t.step().unwrap().is_some() {}
        assert!(!t.pending());
        assert!(t.steps() > 0 && t.last_loss().is_finite());
        let served = t.snapshot().unwrap();
        for c in 0..3u32 {
            let same = top(&served, vec![c + 1, c + 4], 5)
                .iter()
                .filter(|&&i| (i - 1) % 3 == c)
                .count();
            assert!(same >= 4, "{same} of 5 in category {c}");
        }
        let q = |m: &SasRec| top(m, vec![2, 5], 8);
        assert_eq!(
            q(&t.model),
            q(&served),
            "the snapshot ranks as the trainer does"
        );
    }

    #[test]
    fn a_saved_encoder_resumes_by_item_id_with_a_changed_catalog() {
        let mut t = trainer(12);
        let vocabulary: Vec<String> = std::iter::once(String::new())
            .chain((0..12).map(|i| format!("i{i}")))
            .collect();
        for u in 0..20u32 {
            t.observe(
                &format!("u{u}"),
                u % 12 + 1,
                ContextIds::default(),
                &[1, 2, 3],
            );
            t.observe(
                &format!("u{u}"),
                (u + 5) % 12 + 1,
                ContextIds::default(),
                &[],
            );
        }
        while t.step().unwrap().is_some() {}
        let dir = std::env::temp_dir().join(format!("onrec-online-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = t.cfg.clone();
        assert!(
            OnlineTrainer::resume(
                cfg.clone(),
                &dir,
                &vocabulary,
                &categories(12, 3),
                Device::Cpu
            )
            .unwrap()
            .is_none(),
            "nothing saved yet"
        );
        t.save(&dir, &vocabulary).unwrap();
        // Today's catalog: i0 gone, the rest moved up one, one new item in a new category.
        let today: Vec<String> = std::iter::once(String::new())
            .chain((1..12).map(|i| format!("i{i}")))
            .chain(std::iter::once("new".to_owned()))
            .collect();
        let mut cats: Vec<String> = (1..12).map(|i| format!("c{}", i % 3)).collect();
        cats.push("fresh".to_owned());
        let r = OnlineTrainer::resume(cfg, &dir, &today, &cats, Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!((r.steps(), r.users(), r.num_items()), (t.steps(), 20, 12));
        assert!(r.examples() > 0 && r.examples() <= t.examples());
        let (before, after) = (
            t.snapshot().unwrap().folded_item_table().unwrap(),
            r.snapshot().unwrap().folded_item_table().unwrap(),
        );
        // Item i5 was row 6 and is row 5 now; its vector is what it was.
        let row = |m: &Tensor, i: usize| m.get(i).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row(&before, 6), row(&after, 5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_encoder_from_a_checkpoint_scores_as_it_and_places_new_items_by_category() {
        from_checkpoint(0);
    }

    #[test]
    fn an_encoder_from_a_checkpoint_with_item_text_scores_as_it_and_places_items_by_text() {
        from_checkpoint(4);
    }

    /// A checkpoint as `onrec train` writes it, over items a0..a9, with item rows far from
    /// a fresh encoder's (and item text `text_dim` wide), goes on online over today's
    /// catalog: it scores as the checkpoint did, a new item starts at its category's mean,
    /// and one placed by a row scores by that row.
    fn from_checkpoint(text_dim: usize) {
        let shape = Config {
            num_items: 10,
            max_len: 8,
            hidden: 16,
            heads: 2,
            layers: 1,
            ff: 32,
            dropout: 0.0,
            repeat: false,
            text_dim,
            text_alone: false,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut ckpt_model = SasRec::load(vb.clone(), &shape).unwrap();
        let mut rng = SplitMix64::new(3);
        let vectors: Vec<f32> = (0..11 * text_dim).map(|_| rng.normal() as f32).collect();
        let vectors = Tensor::from_vec(vectors, (11, text_dim), &Device::Cpu).unwrap();
        if text_dim > 0 {
            ckpt_model = ckpt_model.with_text(vb, vectors.clone()).unwrap();
        }
        sasrec::init_seeded(&varmap, 5).unwrap();
        {
            let vars = varmap.data().lock().unwrap();
            let items = &vars[ITEM_TABLE];
            let mut rng = SplitMix64::new(9);
            let rows: Vec<f32> = (0..items.elem_count())
                .map(|_| rng.normal() as f32)
                .collect();
            items
                .set(&Tensor::from_vec(rows, items.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let ckpt_items: Vec<String> = std::iter::once(String::new())
            .chain((0..10).map(|i| format!("a{i}")))
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "onrec-online-ckpt-{text_dim}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let text = (text_dim > 0).then_some(&vectors);
        crate::checkpoint::save(&dir, &varmap, &shape, &ckpt_items, text, &()).unwrap();

        // Today's catalog: the checkpoint's items in another order, one new item "n" in
        // category x, where a1 and a3 are.
        let today: Vec<String> = ["", "a3", "n", "a0", "a1", "a2"]
            .into_iter()
            .map(String::from)
            .chain((4..10).map(|i| format!("a{i}")))
            .collect();
        let cats: Vec<String> = today[1..]
            .iter()
            .map(|id| match id.as_str() {
                "a1" | "a3" | "n" => "x".to_owned(),
                _ => "y".to_owned(),
            })
            .collect();
        let mut t = OnlineTrainer::from_checkpoint(
            OnlineConfig::default(),
            &dir,
            &today,
            &cats,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            (t.width(), t.num_items()),
            (16, 11),
            "the checkpoint's shape"
        );
        let served = t.snapshot().unwrap();
        let index = |items: &[String], id: &str| items.iter().position(|i| i == id).unwrap() as u32;
        let scores = |m: &SasRec, items: &[String]| -> HashMap<String, f32> {
            let q = Query {
                history: vec![index(items, "a2"), index(items, "a7")],
                context: ContextIds::default(),
                exclude: vec![],
                k: items.len() - 1,
                shift: None,
            };
            score_batch(m, &Device::Cpu, &[&q]).unwrap()[0]
                .iter()
                .map(|&(i, s)| (items[i as usize].clone(), s))
                .collect()
        };
        let (before, after) = (scores(&ckpt_model, &ckpt_items), scores(&served, &today));
        for (id, s) in &before {
            assert!(
                (s - after[id]).abs() < 1e-4,
                "{id}: {s} before, {} after",
                after[id]
            );
        }
        // The new item's row is category x's mean (a1, a3), plus its own small start.
        let (table, folded) = (
            ckpt_model.folded_item_table().unwrap(),
            served.folded_item_table().unwrap(),
        );
        let row = |m: &Tensor, i: u32| m.get(i as usize).unwrap().to_vec1::<f32>().unwrap();
        let (a1, a3, new) = (
            row(&table, 2),
            row(&table, 4),
            row(&folded, index(&today, "n")),
        );
        let off: f32 = new
            .iter()
            .zip(a1.iter().zip(&a3))
            .map(|(n, (x, y))| (n - (x + y) / 2.0).abs())
            .fold(0.0, f32::max);
        assert!(off < 0.1, "the new item is {off} from its category's mean");
        let n = index(&today, "n");
        assert_eq!(
            t.unlearned(),
            [n],
            "only the new item is unknown to the checkpoint"
        );
        let placed: Vec<f32> = (0..16).map(|k| k as f32 / 8.0 - 1.0).collect();
        t.place(&[(n, placed.clone())]).unwrap();
        let folded = t.snapshot().unwrap().folded_item_table().unwrap();
        for (got, want) in row(&folded, n).iter().zip(&placed) {
            assert!((got - want).abs() < 1e-5, "placed at {got}, not {want}");
        }
        assert!(t.place(&[(99, placed)]).is_err(), "no such item");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn growing_keeps_what_was_learned_and_nothing_trains_without_news() {
        let mut t = trainer(12);
        assert!(t.step().unwrap().is_none(), "nothing to train on yet");
        t.observe("a", 1, ContextIds::default(), &[]);
        t.observe("a", 4, ContextIds::default(), &[2, 4, 6]);
        t.observe("a", 4, ContextIds::default(), &[]);
        t.observe("b", 99, ContextIds::default(), &[]);
        assert_eq!(
            (t.users(), t.examples()),
            (1, 2),
            "repeats and unknown items add nothing"
        );
        while t.step().unwrap().is_some() {}
        let before = t.model.folded_item_table().unwrap();
        t.grow(&["c1".to_owned(), "new".to_owned()]).unwrap();
        assert_eq!(t.num_items(), 14);
        let after = t.model.folded_item_table().unwrap();
        let diff = (before - after.narrow(0, 0, 13).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "known items keep their vectors ({diff})");
        t.observe("a", 14, ContextIds::default(), &[13, 14]);
        assert!(t.step().unwrap().is_some(), "a new item trains at once");
    }
}
