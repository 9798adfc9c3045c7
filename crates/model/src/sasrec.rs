//! The sequence encoder: SASRec-style causal self-attention over a user's last L items,
//! plus the request context, giving one user vector per sequence. The item tower is the
//! item embedding table itself (shared with the input side), so a user's score for item
//! i is the inner product `u · vᵢ`. Optionally the tower adds a category embedding,
//! vᵢ = eᵢ + c[cat(i)], so what is learned of one item carries over to its category; a
//! served copy folds the two into one table ([`SasRec::folded_item_table`]).
//!
//! Causal attention (not BERT4Rec's masked bidirectional model) because every position of
//! every training sequence is then a next-item example in one forward pass, which trains
//! well on 2 CPU cores, and serving is the same computation read at the last position.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::context::{ContextIds, DEVICE_BUCKETS, HOUR_BUCKETS};
use crate::rng::SplitMix64;

/// The encoder's shape. Saved beside the weights, so a checkpoint describes itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Items in the vocabulary, without the padding index 0.
    pub num_items: usize,
    /// Longest history read (the last `max_len` items).
    pub max_len: usize,
    /// Width of item, position and user vectors.
    pub hidden: usize,
    /// Attention heads (divides `hidden`).
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the feed-forward layer.
    pub ff: usize,
    /// Dropout probability during training.
    pub dropout: f32,
    /// A learned weight added to the score of every item already in the user's history:
    /// whether, and how strongly, people come back to what they had (repeat purchases) or
    /// move on from it (films seen, durable goods), learned from the sequences themselves.
    #[serde(default)]
    pub repeat: bool,
    /// Width of the item text vectors the item tower projects (0: no item text).
    #[serde(default)]
    pub text_dim: usize,
    /// With item text: a second projection of the text, learned for items scored by their
    /// text alone (an item never trained on, or one whose own embedding a training step
    /// leaves out), instead of the projection that complements an item's own embedding.
    #[serde(default)]
    pub text_alone: bool,
}

impl Config {
    /// The defaults for `num_items` items: 2 blocks of width 64 over the last 50 items.
    pub fn for_items(num_items: usize) -> Self {
        Self {
            num_items,
            max_len: 50,
            hidden: 64,
            heads: 2,
            layers: 2,
            ff: 256,
            dropout: 0.5,
            repeat: true,
            text_dim: 0,
            text_alone: false,
        }
    }
}

/// Dropout with a seeded generator, so training is reproducible (candle's CPU generator
/// cannot be seeded).
#[derive(Debug)]
pub struct Noise {
    rng: SplitMix64,
    p: f32,
}

impl Noise {
    /// Dropout with probability `p`, drawn from `seed`.
    pub fn new(p: f32, seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            p,
        }
    }

    fn apply(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if (self.rng.unit() as f32) < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
    }
}

fn drop(x: Tensor, noise: &mut Option<&mut Noise>) -> candle_core::Result<Tensor> {
    match noise {
        Some(n) => n.apply(&x),
        None => Ok(x),
    }
}

#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) ln1: LayerNorm,
    pub(crate) qkv: Linear,
    pub(crate) out: Linear,
    pub(crate) ln2: LayerNorm,
    pub(crate) ff1: Linear,
    pub(crate) ff2: Linear,
    pub(crate) heads: usize,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let h = cfg.hidden;
        Ok(Self {
            ln1: candle_nn::layer_norm(h, 1e-6, vb.pp("ln1"))?,
            qkv: candle_nn::linear(h, 3 * h, vb.pp("qkv"))?,
            out: candle_nn::linear(h, h, vb.pp("out"))?,
            ln2: candle_nn::layer_norm(h, 1e-6, vb.pp("ln2"))?,
            ff1: candle_nn::linear(h, cfg.ff, vb.pp("ff1"))?,
            ff2: candle_nn::linear(cfg.ff, h, vb.pp("ff2"))?,
            heads: cfg.heads,
        })
    }

    /// Pre-norm attention and feed-forward with residuals; `mask` is added to the
    /// attention logits (0 or a large negative number), shaped `[b, 1, l, l]`. Only the
    /// last `rows` positions are computed as queries (keys and values are all `l`), so a
    /// caller that needs only the last position pays for one row: `[b, rows, d]`.
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rows: usize,
        noise: &mut Option<&mut Noise>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let dh = d / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
        let split = |i: usize, n: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .narrow(1, l - n, n)?
                .reshape((b, n, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0, rows)?, split(1, l)?, split(2, l)?);
        let mask = mask.narrow(2, l - rows, rows)?;
        let logits = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?.broadcast_add(&mask)?;
        let attn = drop(candle_nn::ops::softmax_last_dim(&logits)?, noise)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, rows, d))?;
        let x = (x.narrow(1, l - rows, rows)? + drop(self.out.forward(&y)?, noise)?)?;
        let f = self.ff1.forward(&self.ln2.forward(&x)?)?.gelu()?;
        let f = self.ff2.forward(&drop(f, noise)?)?;
        x + drop(f, noise)?
    }
}

/// How much of an item's vector is its own with categories: its own embedding is scaled
/// by this, so that (with Adam's steps of a fixed size) it moves this much slower than
/// its category's and a few clicks do not overfit single items.
pub const ITEM_SHARE: f64 = 0.3;

/// The repeat weight is its variable times this: a single number pushed the same way by
/// every example moves by about the learning rate per Adam step, and this lets it reach
/// the size of a score within a few hundred steps.
const REPEAT_SCALE: f64 = 20.0;

/// A category embedding added to every item's vector in the item tower.
#[derive(Debug)]
struct ItemCategories {
    table: Embedding,
    /// Category index of every item index, `[num_items + 1]`.
    of_item: Tensor,
}

/// Item text in the item tower: every item's text vector, fixed, and a learned
/// projection of it added to the item's vector.
#[derive(Debug)]
struct ItemText {
    /// `[num_items + 1, text_dim]`; row 0 (padding) and items without text are zero.
    vectors: Tensor,
    proj: Linear,
    /// The projection for items scored by their text alone ([`Config::text_alone`]).
    alone: Option<Linear>,
    /// `[num_items + 1, 1]`: 1 for items never trained on, which have no own embedding
    /// and are scored by their text alone; `None` when every item was trained on.
    untrained: Option<Tensor>,
}

/// The encoder.
#[derive(Debug)]
pub struct SasRec {
    items: Embedding,
    categories: Option<ItemCategories>,
    text: Option<ItemText>,
    pub(crate) positions: Embedding,
    pub(crate) hours: Embedding,
    pub(crate) devices: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_out: LayerNorm,
    /// The repeat weight `[1]` (see [`Config::repeat`]).
    repeat: Option<Tensor>,
    cfg: Config,
}

/// Large negative logit for masked attention: not -inf, so a row with nothing to attend
/// to (padding) becomes uniform instead of NaN.
pub(crate) const MASKED: f32 = -1e9;

impl SasRec {
    /// Builds the encoder from weights named as in a checkpoint (`items.embeddings`,
    /// `blocks.0.qkv.weight`, …).
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let h = cfg.hidden;
        if cfg.heads == 0 || !h.is_multiple_of(cfg.heads) {
            candle_core::bail!("hidden ({h}) must be a multiple of heads ({})", cfg.heads);
        }
        Ok(Self {
            items: candle_nn::embedding(cfg.num_items + 1, h, vb.pp("items"))?,
            categories: None,
            text: None,
            positions: candle_nn::embedding(cfg.max_len, h, vb.pp("positions"))?,
            hours: candle_nn::embedding(HOUR_BUCKETS, h, vb.pp("context.hours"))?,
            devices: candle_nn::embedding(DEVICE_BUCKETS, h, vb.pp("context.devices"))?,
            blocks: (0..cfg.layers)
                .map(|i| Block::load(vb.pp(format!("blocks.{i}")), cfg))
                .collect::<candle_core::Result<_>>()?,
            ln_out: candle_nn::layer_norm(h, 1e-6, vb.pp("ln_out"))?,
            repeat: if cfg.repeat {
                Some(vb.get(1, "repeat")?)
            } else {
                None
            },
            cfg: cfg.clone(),
        })
    }

    /// The encoder's shape.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Adds `count` category embeddings (named `categories.weight` under `vb`) to the
    /// item tower; `of_item[i]` is item index i's category (`num_items + 1` entries, each
    /// below `count`).
    pub fn with_categories(
        mut self,
        vb: VarBuilder,
        count: usize,
        of_item: &[u32],
    ) -> candle_core::Result<Self> {
        if of_item.len() != self.cfg.num_items + 1 {
            candle_core::bail!(
                "{} item categories for {} item indices",
                of_item.len(),
                self.cfg.num_items + 1
            );
        }
        if let Some(&c) = of_item.iter().find(|&&c| c as usize >= count) {
            candle_core::bail!("category index {c} is beyond the {count} categories");
        }
        let device = self.items.embeddings().device().clone();
        self.categories = Some(ItemCategories {
            table: candle_nn::embedding(count, self.cfg.hidden, vb.pp("categories"))?,
            of_item: Tensor::from_slice(of_item, of_item.len(), &device)?,
        });
        Ok(self)
    }

    /// Adds item text to the item tower: `vectors` (`[num_items + 1, text_dim]`, fixed)
    /// through a learned projection (named `text.proj.weight` under `vb`).
    pub fn with_text(mut self, vb: VarBuilder, vectors: Tensor) -> candle_core::Result<Self> {
        let (rows, dim) = vectors.dims2()?;
        if rows != self.cfg.num_items + 1 || dim != self.cfg.text_dim {
            candle_core::bail!(
                "item text vectors are {rows} × {dim}, the encoder expects {} × {}",
                self.cfg.num_items + 1,
                self.cfg.text_dim
            );
        }
        self.text = Some(ItemText {
            vectors,
            proj: candle_nn::linear_no_bias(dim, self.cfg.hidden, vb.pp("text.proj"))?,
            alone: if self.cfg.text_alone {
                Some(candle_nn::linear_no_bias(
                    dim,
                    self.cfg.hidden,
                    vb.pp("text.alone"),
                )?)
            } else {
                None
            },
            untrained: None,
        });
        Ok(self)
    }

    /// Marks `items` (indices) as never trained on: their rows leave out their own
    /// embeddings, and with [`Config::text_alone`] their text goes through the text-alone
    /// projection. Without item text it changes nothing.
    pub fn with_untrained(mut self, items: &[u32]) -> candle_core::Result<Self> {
        let n = self.cfg.num_items + 1;
        if let Some(t) = self.text.as_mut() {
            let mut mask = vec![0f32; n];
            for &i in items {
                if let Some(m) = mask.get_mut(i as usize) {
                    *m = 1.0;
                }
            }
            t.untrained = (!items.is_empty())
                .then(|| Tensor::from_vec(mask, (n, 1), t.vectors.device()))
                .transpose()?;
        }
        Ok(self)
    }

    /// The item text vectors, when the item tower reads text.
    pub fn text_vectors(&self) -> Option<&Tensor> {
        self.text.as_ref().map(|t| &t.vectors)
    }

    /// The item tower: one row per item index (row 0 is padding), `[num_items + 1, hidden]`,
    /// the category embeddings and the projected text added when there are any.
    pub fn folded_item_table(&self) -> candle_core::Result<Tensor> {
        self.item_table_keeping(None)
    }

    /// The item-tower rows of `ids` (`[ids.len(), hidden]`): what
    /// `folded_item_table()?.index_select(ids)` gives, in values and in the gradients it
    /// passes back, without folding the whole table. The distinct ids, ascending, are
    /// folded, and each id's row is taken from them; so the gradient of an item met
    /// several times is summed in the order of `ids` before it is scaled, and the
    /// gradients of a category's items are added in item order, as with the whole table.
    pub fn item_rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let device = self.items.embeddings().device();
        let mut distinct = ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let at: Vec<u32> = ids
            .iter()
            .map(|i| distinct.partition_point(|d| d < i) as u32)
            .collect();
        let picked = Tensor::from_slice(&distinct, distinct.len(), device)?;
        let rows = self.fold(Some(&picked), None)?;
        rows.index_select(&Tensor::from_vec(at, ids.len(), device)?, 0)
    }

    /// [`SasRec::folded_item_table`] with the items' own embeddings multiplied by `keep`
    /// (`[num_items + 1, 1]`, 1 or 0 per item): a dropped item is known by its category
    /// and text alone, as an item never trained on is.
    pub fn item_table_keeping(&self, keep: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.fold(None, keep)
    }

    /// The item-tower rows of the item indices `picked` (every row when `None`), with the
    /// own embeddings of the items whose `keep` (`[rows, 1]`) is 0, and of items never
    /// trained on, left out: with [`Config::text_alone`], such an item's text goes through
    /// the text-alone projection instead of the other one.
    fn fold(&self, picked: Option<&Tensor>, keep: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let pick = |t: &Tensor| match picked {
            None => Ok(t.clone()),
            Some(p) => t.index_select(p, 0),
        };
        let untrained = match self.text.as_ref().and_then(|t| t.untrained.as_ref()) {
            Some(u) => Some(pick(u)?.affine(-1.0, 1.0)?),
            None => None,
        };
        let keep = match (keep, untrained) {
            (None, trained) => trained,
            (Some(k), None) => Some(k.clone()),
            (Some(k), Some(trained)) => Some(k.broadcast_mul(&trained)?),
        };
        let own = pick(self.items.embeddings())?;
        let own = match &keep {
            None => own,
            Some(keep) => own.broadcast_mul(keep)?,
        };
        let table = match &self.categories {
            None => own,
            Some(c) => (own.affine(ITEM_SHARE, 0.0)? + c.table.forward(&pick(&c.of_item)?)?)?,
        };
        let Some(t) = &self.text else {
            return Ok(table);
        };
        let vectors = pick(&t.vectors)?;
        let projected = t.proj.forward(&vectors)?;
        match (&t.alone, &keep) {
            (Some(alone), Some(keep)) => {
                let kept = projected.broadcast_mul(keep)?;
                let dropped = alone
                    .forward(&vectors)?
                    .broadcast_mul(&keep.affine(-1.0, 1.0)?)?;
                (table + kept)? + dropped
            }
            _ => table + projected,
        }
    }

    /// Runs the blocks over left-padded item ids `[b, l]` (0 = padding), whose item-tower
    /// rows are `rows` (`[b·l, d]`, in the order of `ids`). With `last_only`, the final
    /// block computes only the last position: `[b, 1, d]`, else `[b, l, d]`.
    fn encode(
        &self,
        rows: &Tensor,
        ids: &Tensor,
        last_only: bool,
        noise: &mut Option<&mut Noise>,
    ) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let device = ids.device();
        let pos = Tensor::arange(0u32, l as u32, device)?;
        let scale = (self.cfg.hidden as f64).sqrt();
        let x = rows
            .reshape((b, l, self.cfg.hidden))?
            .affine(scale, 0.0)?
            .broadcast_add(&self.positions.forward(&pos)?)?;
        let real = ids.ne(0u32)?.to_dtype(DType::F32)?;
        let mut x = drop(x, noise)?.broadcast_mul(&real.unsqueeze(2)?)?;

        let ids_host: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let mut mask = vec![MASKED; b * l * l];
        for r in 0..b {
            for i in 0..l {
                for j in 0..=i {
                    if ids_host[r * l + j] != 0 {
                        mask[(r * l + i) * l + j] = 0.0;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, l, l), device)?;
        let real = real.unsqueeze(2)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let rows = if last_only && i + 1 == self.blocks.len() {
                1
            } else {
                l
            };
            x = block
                .forward(&x, &mask, rows, noise)?
                .broadcast_mul(&real.narrow(1, l - rows, rows)?)?;
        }
        Ok(x)
    }

    /// Mixes the context into encoded positions and normalises: `[…, hidden]`.
    fn head(&self, x: &Tensor, hours: &Tensor, devices: &Tensor) -> candle_core::Result<Tensor> {
        let ctx = (self.hours.forward(hours)? + self.devices.forward(devices)?)?;
        self.ln_out.forward(&(x + ctx)?)
    }

    /// Per-position outputs for training: position t, mixed with the context of the
    /// interaction at t + 1, predicts the item at t + 1. Shapes: ids, hours, devices
    /// `[b, l]` → `[b, l, hidden]`. `table` is the item tower
    /// ([`SasRec::folded_item_table`]), computed once per step.
    pub fn forward_train(
        &self,
        table: &Tensor,
        ids: &Tensor,
        hours: &Tensor,
        devices: &Tensor,
        noise: Option<&mut Noise>,
    ) -> candle_core::Result<Tensor> {
        let mut noise = noise;
        let rows = table.index_select(&ids.flatten_all()?, 0)?;
        let x = self.encode(&rows, ids, false, &mut noise)?;
        self.head(&x, hours, devices)
    }

    /// User vectors `[b, hidden]` from left-padded histories `[b, l]` and the context of
    /// the moment of the request (`hours`, `devices`: `[b]`).
    pub fn user_vectors(
        &self,
        ids: &Tensor,
        hours: &Tensor,
        devices: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let rows = self
            .folded_item_table()?
            .index_select(&ids.flatten_all()?, 0)?;
        let last = self.encode(&rows, ids, true, &mut None)?.squeeze(1)?;
        self.head(&last, hours, devices)
    }

    /// [`SasRec::user_vectors`] with dropout, for training; it folds only the rows of the
    /// items in `ids` ([`SasRec::item_rows`]), not the whole catalog's.
    pub fn user_vectors_train(
        &self,
        ids: &Tensor,
        hours: &Tensor,
        devices: &Tensor,
        noise: &mut Noise,
    ) -> candle_core::Result<Tensor> {
        let rows = self.item_rows(&ids.flatten_all()?.to_vec1()?)?;
        let last = self
            .encode(&rows, ids, true, &mut Some(noise))?
            .squeeze(1)?;
        self.head(&last, hours, devices)
    }

    /// Scores of every item index for each user vector: `[b, num_items + 1]`, before the
    /// repeat term ([`SasRec::add_repeat`]).
    pub fn scores(&self, users: &Tensor) -> candle_core::Result<Tensor> {
        users.matmul(&self.folded_item_table()?.t()?)
    }

    /// The repeat weight, `[1]`, when the encoder has one (differentiable: training
    /// learns it through this).
    pub fn repeat_tensor(&self) -> candle_core::Result<Option<Tensor>> {
        self.repeat
            .as_ref()
            .map(|w| w.affine(REPEAT_SCALE, 0.0))
            .transpose()
    }

    /// The learned weight of an item already in the history, when the encoder has one.
    pub fn repeat_weight(&self) -> candle_core::Result<Option<f32>> {
        self.repeat_tensor()?
            .map(|w| Ok(w.to_vec1::<f32>()?[0]))
            .transpose()
    }

    /// Adds the repeat weight to the scores of every item in `history`, once per item
    /// (`scores` by item index).
    pub fn add_repeat(weight: f32, scores: &mut [f32], history: &[u32]) {
        let mut seen: Vec<u32> = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for i in seen {
            if let Some(s) = scores.get_mut(i as usize) {
                *s += weight;
            }
        }
    }

    /// Left-pads (or truncates to the last `max_len`) histories into `[b, max_len]` ids,
    /// with the context of each request, on `device`.
    pub fn batch(
        &self,
        histories: &[&[u32]],
        contexts: &[ContextIds],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let l = self.cfg.max_len;
        let mut ids = vec![0u32; histories.len() * l];
        for (r, h) in histories.iter().enumerate() {
            let tail = &h[h.len().saturating_sub(l)..];
            ids[r * l + (l - tail.len())..(r + 1) * l].copy_from_slice(tail);
        }
        let b = histories.len();
        let hours: Vec<u32> = contexts.iter().map(|c| u32::from(c.hour)).collect();
        let devices: Vec<u32> = contexts.iter().map(|c| u32::from(c.device)).collect();
        Ok((
            Tensor::from_vec(ids, (b, l), device)?,
            Tensor::from_vec(hours, b, device)?,
            Tensor::from_vec(devices, b, device)?,
        ))
    }
}

/// Re-initialises every variable from `seed`: normal(0, 0.02) for embeddings and weights,
/// ones and zeros for layer norms, zeros for biases. Variables are visited in name order,
/// so the result depends only on the seed and the shapes.
pub fn init_seeded(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let mut rng = SplitMix64::new(seed);
    let vars = varmap
        .data()
        .lock()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let (shape, device) = (var.shape().clone(), var.device().clone());
        let is_norm = name.split('.').any(|p| p.starts_with("ln"));
        let value = if name.ends_with(".bias") {
            Tensor::zeros(shape, DType::F32, &device)?
        } else if is_norm {
            Tensor::ones(shape, DType::F32, &device)?
        } else {
            let data: Vec<f32> = (0..shape.elem_count())
                .map(|_| (rng.normal() * 0.02) as f32)
                .collect();
            Tensor::from_vec(data, shape, &device)?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// Sets the own embeddings of `items` to zero, so that items never trained on are known by
/// their category and text alone, as a dropped item is in training
/// ([`SasRec::item_table_keeping`]) and not by a random vector.
pub fn forget_items(varmap: &VarMap, items: &[u32]) -> candle_core::Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let Some(var) = vars.get("items.weight") else {
        candle_core::bail!("the encoder has no item embeddings");
    };
    let (rows, width) = var.dims2()?;
    let mut table: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
    for &i in items {
        if let Some(row) = table.chunks_exact_mut(width).nth(i as usize) {
            row.fill(0.0);
        }
    }
    var.set(&Tensor::from_vec(table, (rows, width), var.device())?)
}

/// Cross-entropy of next-item prediction over the positions whose target is not padding,
/// against the item tower `table` of the step.
/// `seen_from` (`[b, num_items + 1]`, with a repeat weight) is the first position at which
/// each item is in the row's history (0 for items before the window, `l` or more for items
/// not seen); an item's score at position t gets the repeat weight from there on.
/// `item_mask` (`[num_items + 1]`: 0, or a large negative number for items that are not
/// classes) is added to every row of logits.
pub fn loss(
    model: &SasRec,
    table: &Tensor,
    hidden: &Tensor,
    targets: &Tensor,
    seen_from: Option<&Tensor>,
    item_mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, l, d) = hidden.dims3()?;
    let hidden = hidden.reshape(((), d))?;
    let targets = targets.flatten_all()?;
    let keep: Vec<u32> = targets
        .to_vec1::<u32>()?
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t != 0)
        .map(|(i, _)| i as u32)
        .collect();
    let keep = Tensor::from_vec(keep.clone(), keep.len(), hidden.device())?;
    let mut logits = hidden.index_select(&keep, 0)?.matmul(&table.t()?)?;
    if let (Some(w), Some(from)) = (model.repeat_tensor()?, seen_from) {
        let n = from.dim(1)?;
        let pos = Tensor::arange(0u32, l as u32, hidden.device())?.reshape((1, l, 1))?;
        let seen = pos
            .broadcast_ge(&from.reshape((b, 1, n))?)?
            .to_dtype(DType::F32)?
            .reshape((b * l, n))?
            .index_select(&keep, 0)?;
        logits = (logits + seen.broadcast_mul(&w)?)?;
    }
    if let Some(mask) = item_mask {
        logits = logits.broadcast_add(mask)?;
    }
    candle_nn::loss::cross_entropy(&logits, &targets.index_select(&keep, 0)?)
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`;
/// returns the norm before clipping.
pub fn clip_grads(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
    max_norm: f64,
) -> candle_core::Result<f64> {
    let mut total = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_vectors_equal_the_last_position_of_the_full_pass() {
        let cfg = Config {
            num_items: 40,
            max_len: 6,
            hidden: 16,
            heads: 2,
            layers: 2,
            ff: 32,
            dropout: 0.0,
            repeat: false,
            text_dim: 0,
            text_alone: false,
        };
        let varmap = VarMap::new();
        let model = SasRec::load(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap();
        init_seeded(&varmap, 3).unwrap();
        let histories: [&[u32]; 3] = [&[1, 2, 3], &[5, 6, 7, 8, 9, 10, 11], &[4]];
        let contexts = [
            ContextIds::from_parts(Some(3), None),
            ContextIds::default(),
            ContextIds::from_parts(None, Some("app")),
        ];
        let (ids, hours, devices) = model.batch(&histories, &contexts, &Device::Cpu).unwrap();
        let fast = model.user_vectors(&ids, &hours, &devices).unwrap();
        let full = model
            .encode(
                &model
                    .folded_item_table()
                    .unwrap()
                    .index_select(&ids.flatten_all().unwrap(), 0)
                    .unwrap(),
                &ids,
                false,
                &mut None,
            )
            .unwrap();
        let full = model
            .head(
                &full
                    .narrow(1, cfg.max_len - 1, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap(),
                &hours,
                &devices,
            )
            .unwrap();
        let diff = (fast - full)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    /// An encoder over 30 items in 4 categories whose item tower reads 6-wide text, with
    /// a text-alone projection when `text_alone`, and `untrained` items never trained on.
    fn text_model(text_alone: bool, untrained: &[u32]) -> (Config, VarMap, SasRec) {
        let cfg = Config {
            num_items: 30,
            text_dim: 6,
            text_alone,
            ..Config::for_items(30)
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let of_item: Vec<u32> = (0..31).map(|i| i % 4).collect();
        let mut rng = SplitMix64::new(11);
        let vectors: Vec<f32> = (0..31 * 6).map(|_| rng.normal() as f32).collect();
        let model = SasRec::load(vb.clone(), &cfg)
            .unwrap()
            .with_categories(vb.clone(), 4, &of_item)
            .unwrap()
            .with_text(
                vb,
                Tensor::from_vec(vectors, (31, 6), &Device::Cpu).unwrap(),
            )
            .unwrap()
            .with_untrained(untrained)
            .unwrap();
        init_seeded(&varmap, 5).unwrap();
        (cfg, varmap, model)
    }

    #[test]
    fn item_rows_are_the_folded_tables_rows_with_the_same_gradients() {
        for (alone, untrained) in [(false, &[][..]), (true, &[]), (true, &[3, 15, 30])] {
            item_rows_match_the_folded_table(alone, untrained);
        }
    }

    fn item_rows_match_the_folded_table(text_alone: bool, untrained: &[u32]) {
        let (cfg, varmap, model) = text_model(text_alone, untrained);
        let mut rng = SplitMix64::new(12);
        // Repeats, padding and items of one category, in no order.
        let ids = [7u32, 3, 7, 0, 11, 30, 3, 7, 15, 0, 19];
        let index = Tensor::from_slice(&ids, ids.len(), &Device::Cpu).unwrap();
        let weights: Vec<f32> = (0..ids.len() * cfg.hidden)
            .map(|_| rng.normal() as f32)
            .collect();
        let weights = Tensor::from_vec(weights, (ids.len(), cfg.hidden), &Device::Cpu).unwrap();
        let full = model
            .folded_item_table()
            .unwrap()
            .index_select(&index, 0)
            .unwrap();
        let rows = model.item_rows(&ids).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in values(&full).iter().zip(values(&rows)) {
            assert!((a - b).abs() < 1e-6, "{a} against {b}");
        }
        let grads = |t: &Tensor| {
            (t * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (gf, gr) = (grads(&full), grads(&rows));
        for (name, var) in varmap.data().lock().unwrap().iter() {
            match (name.as_str(), gf.get(var), gr.get(var)) {
                ("items.weight" | "categories.weight", Some(a), Some(b)) => {
                    assert_eq!(values(a), values(b), "the gradient of {name}");
                }
                // The projection's gradient is a product summed in another order.
                ("text.alone.weight", Some(a), Some(b)) => {
                    for (x, y) in values(a).iter().zip(values(b)) {
                        assert!((x - y).abs() < 1e-4, "the gradient of {name}: {x}, {y}");
                    }
                }
                ("text.alone.weight", None, None) => assert!(untrained.is_empty()),
                ("items.weight" | "categories.weight" | "text.alone.weight", a, b) => {
                    panic!("the gradient of {name}: {a:?} against {b:?}")
                }
                _ => {}
            }
        }
    }

    #[test]
    fn items_without_their_own_embedding_are_scored_by_the_text_alone_projection() {
        let (_, varmap, model) = text_model(true, &[15]);
        let vars = varmap.data().lock().unwrap().clone();
        let weight = |name: &str| vars[name].as_tensor().to_vec2::<f32>().unwrap();
        let (own, cats, proj, alone) = (
            weight("items.weight"),
            weight("categories.weight"),
            weight("text.proj.weight"),
            weight("text.alone.weight"),
        );
        let vectors = model.text_vectors().unwrap().to_vec2::<f32>().unwrap();
        let times = |w: &[Vec<f32>], i: usize| -> Vec<f32> {
            w.iter()
                .map(|row| row.iter().zip(&vectors[i]).map(|(a, b)| a * b).sum())
                .collect()
        };
        // Item 7's own embedding is left out in this step; 15 was never trained on.
        let mut keep = vec![1f32; 31];
        keep[7] = 0.0;
        let keep = Tensor::from_vec(keep, (31, 1), &Device::Cpu).unwrap();
        let table = model
            .item_table_keeping(Some(&keep))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for i in [1usize, 7, 15, 30] {
            let text_alone = i == 7 || i == 15;
            let text = times(if text_alone { &alone } else { &proj }, i);
            for (k, got) in table[i].iter().enumerate() {
                let mine = if text_alone {
                    0.0
                } else {
                    own[i][k] * ITEM_SHARE as f32
                };
                let want = mine + cats[i % 4][k] + text[k];
                assert!((got - want).abs() < 1e-5, "item {i}: {got} against {want}");
            }
        }
        // Served, only the untrained item is scored by its text alone.
        let served = model.folded_item_table().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(served[15], table[15]);
        assert_ne!(served[7], table[7]);
        assert_eq!(served[1], table[1]);
    }
}
