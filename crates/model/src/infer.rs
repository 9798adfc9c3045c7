//! The encoder's serving path on the CPU, written out for its shape instead of run op by op
//! through candle: at batch 1 a forward pass is a few dozen tiny matrix products, and
//! candle's per-op overhead (allocation, dispatch, thread-count lookups) costs more than
//! the arithmetic. It computes what [`SasRec::user_vectors`] computes, to 1e-5 (a test
//! checks it), with three differences in how:
//!
//! - only the history's real positions are encoded (padding contributes nothing: its rows
//!   are zeroed and masked out as keys);
//! - the encoded last position depends on the history alone, the context joins only in
//!   the head, so [`HostEncoder::encode`] and [`HostEncoder::head`] are separate and a
//!   caller can keep the first per history;
//! - items are scored by [`crate::scan`]: 8-bit codes of the table, read once for the
//!   whole batch, then the items that may be in a user's top k scored again exactly.
//!
//! Training and CUDA keep candle.

use candle_core::Tensor;

use crate::context::{ContextIds, DEVICE_BUCKETS, HOUR_BUCKETS};
use crate::sasrec::{Block, Config, SasRec};
use crate::scan::ItemTable;
pub use crate::scan::TopK;

/// A layer norm's scale and shift.
#[derive(Debug, Clone)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn of(ln: &candle_nn::LayerNorm) -> candle_core::Result<Self> {
        let weight = ln.weight().to_vec1::<f32>()?;
        let bias = match ln.bias() {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; weight.len()],
        };
        Ok(Self {
            weight,
            bias,
            eps: ln.eps() as f32,
        })
    }

    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        for (((o, &v), w), b) in out.iter_mut().zip(x).zip(&self.weight).zip(&self.bias) {
            *o = (v - mean) * inv * w + b;
        }
    }
}

/// A linear layer's weights as plain arrays: `weight` is `[out, in]`, row-major, as
/// candle stores it.
#[derive(Debug, Clone)]
pub struct HostLinear {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

impl HostLinear {
    /// Copies `linear`'s weights.
    pub fn of(linear: &candle_nn::Linear) -> candle_core::Result<Self> {
        let (outputs, inputs) = linear.weight().dims2()?;
        let weight = linear.weight().flatten_all()?.to_vec1::<f32>()?;
        let bias = match linear.bias() {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; outputs],
        };
        Ok(Self {
            weight,
            bias,
            inputs,
        })
    }

    /// Outputs.
    pub fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// Inputs.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Row `o` of the weights: what output `o` multiplies the inputs by.
    #[inline]
    pub fn row(&self, o: usize) -> &[f32] {
        &self.weight[o * self.inputs..(o + 1) * self.inputs]
    }

    /// The bias.
    #[inline]
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// `out` = weight · `x` + bias.
    #[inline(always)]
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        for ((o, row), b) in out
            .iter_mut()
            .zip(self.weight.chunks_exact(self.inputs))
            .zip(&self.bias)
        {
            *o = dot(row, x) + b;
        }
    }
}

/// One Transformer block's weights.
#[derive(Debug, Clone)]
struct HostBlock {
    ln1: Norm,
    qkv: HostLinear,
    out: HostLinear,
    ln2: Norm,
    ff1: HostLinear,
    ff2: HostLinear,
    heads: usize,
}

impl HostBlock {
    fn of(block: &Block) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: Norm::of(&block.ln1)?,
            qkv: HostLinear::of(&block.qkv)?,
            out: HostLinear::of(&block.out)?,
            ln2: Norm::of(&block.ln2)?,
            ff1: HostLinear::of(&block.ff1)?,
            ff2: HostLinear::of(&block.ff2)?,
            heads: block.heads,
        })
    }

    /// Pre-norm causal attention and feed-forward over `x` (`[n, d]`, real positions
    /// only), computing the last `rows` positions as queries: returns `[rows, d]`.
    fn forward(&self, x: &[f32], d: usize, rows: usize) -> Vec<f32> {
        let n = x.len() / d;
        let dh = d / self.heads;
        let mut normed = vec![0.0; d];
        let mut qkv = vec![0.0; n * 3 * d];
        for (row, out) in x.chunks_exact(d).zip(qkv.chunks_exact_mut(3 * d)) {
            self.ln1.apply(row, &mut normed);
            self.qkv.apply(&normed, out);
        }
        let scale = 1.0 / (dh as f32).sqrt();
        let first = n - rows;
        let mut result = x[first * d..].to_vec();
        let (mut attended, mut projected) = (vec![0.0; d], vec![0.0; d]);
        let mut weights = vec![0.0; n];
        let mut hidden = vec![0.0; self.ff1.bias.len()];
        for (r, xr) in result.chunks_exact_mut(d).enumerate() {
            let i = first + r;
            let q = &qkv[i * 3 * d..i * 3 * d + d];
            for h in 0..self.heads {
                let qh = &q[h * dh..(h + 1) * dh];
                // Causal: position i attends to positions 0..=i.
                let logits = &mut weights[..=i];
                for (j, w) in logits.iter_mut().enumerate() {
                    let k = &qkv[j * 3 * d + d + h * dh..j * 3 * d + d + (h + 1) * dh];
                    *w = dot(qh, k) * scale;
                }
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for w in logits.iter_mut() {
                    *w = (*w - max).exp();
                    sum += *w;
                }
                let out = &mut attended[h * dh..(h + 1) * dh];
                out.fill(0.0);
                for (j, w) in logits.iter().enumerate() {
                    let v = &qkv[j * 3 * d + 2 * d + h * dh..j * 3 * d + 2 * d + (h + 1) * dh];
                    for (o, vv) in out.iter_mut().zip(v) {
                        *o += w / sum * vv;
                    }
                }
            }
            self.out.apply(&attended, &mut projected);
            xr.iter_mut().zip(&projected).for_each(|(a, b)| *a += b);
            self.ln2.apply(xr, &mut normed);
            self.ff1.apply(&normed, &mut hidden);
            hidden.iter_mut().for_each(|v| *v = gelu(*v));
            self.ff2.apply(&hidden, &mut projected);
            xr.iter_mut().zip(&projected).for_each(|(a, b)| *a += b);
        }
        result
    }
}

/// candle's `gelu` (the tanh approximation).
fn gelu(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + 0.044_715 * v * v)).tanh())
}

/// The inner product, in eight lanes so that it vectorises (inlined, so that a caller
/// compiled for wider vectors gets them).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, a_tail) = a.as_chunks::<8>();
    let (b8, b_tail) = b.as_chunks::<8>();
    let mut lanes = [0f32; 8];
    for (x, y) in a8.iter().zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// The encoder's weights as plain arrays, for the CPU serving path.
#[derive(Debug, Clone)]
pub struct HostEncoder {
    cfg: Config,
    /// The folded item table (row 0 is padding), exact and coded for the scan.
    items: ItemTable,
    positions: Vec<f32>,
    hours: Vec<f32>,
    devices: Vec<f32>,
    blocks: Vec<HostBlock>,
    ln_out: Norm,
    /// The weight added to items already in the history, when the encoder has one.
    repeat: Option<f32>,
}

fn rows(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl HostEncoder {
    /// Copies `model`'s weights (the item table with its categories folded in).
    pub fn of(model: &SasRec) -> candle_core::Result<Self> {
        Ok(Self {
            cfg: model.config().clone(),
            items: ItemTable::new(rows(&model.folded_item_table()?)?, model.config().hidden),
            positions: rows(model.positions.embeddings())?,
            hours: rows(model.hours.embeddings())?,
            devices: rows(model.devices.embeddings())?,
            blocks: model
                .blocks
                .iter()
                .map(HostBlock::of)
                .collect::<candle_core::Result<_>>()?,
            ln_out: Norm::of(&model.ln_out)?,
            repeat: model.repeat_weight()?,
        })
    }

    /// The encoder's shape.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The last position of the encoded history (item indices, oldest first; only the
    /// last `max_len` count; unknown indices are read as padding), before the context
    /// joins: `hidden` wide, zero for an empty history.
    pub fn encode(&self, history: &[u32]) -> Vec<f32> {
        let (d, l) = (self.cfg.hidden, self.cfg.max_len);
        let tail = &history[history.len().saturating_sub(l)..];
        // Left padding: the real items sit at the last positions; padding (index 0, or
        // an index beyond the table) is zero and masked.
        let first = l - tail.len();
        let real: Vec<(usize, u32)> = tail
            .iter()
            .enumerate()
            .filter(|&(_, &id)| id != 0 && (id as usize) <= self.cfg.num_items)
            .map(|(t, &id)| (first + t, id))
            .collect();
        // The last position is padding: its output is zeroed.
        if real.last().is_none_or(|&(p, _)| p != l - 1) {
            return vec![0.0; d];
        }
        let scale = (d as f32).sqrt();
        let mut x = Vec::with_capacity(real.len() * d);
        for &(p, id) in &real {
            let pos = &self.positions[p * d..(p + 1) * d];
            x.extend(
                self.items
                    .row(id as usize)
                    .iter()
                    .zip(pos)
                    .map(|(e, q)| e * scale + q),
            );
        }
        let last = self.blocks.len();
        for (i, block) in self.blocks.iter().enumerate() {
            let rows = if i + 1 == last { 1 } else { real.len() };
            x = block.forward(&x, d, rows);
        }
        x
    }

    /// The user vector from an encoded history and the moment of the request.
    pub fn head(&self, encoded: &[f32], context: ContextIds) -> Vec<f32> {
        let d = self.cfg.hidden;
        let hour = usize::from(context.hour).min(HOUR_BUCKETS - 1);
        let device = usize::from(context.device).min(DEVICE_BUCKETS - 1);
        let mixed: Vec<f32> = encoded
            .iter()
            .zip(&self.hours[hour * d..(hour + 1) * d])
            .zip(&self.devices[device * d..(device + 1) * d])
            .map(|((x, h), v)| x + h + v)
            .collect();
        let mut out = vec![0.0; d];
        self.ln_out.apply(&mixed, &mut out);
        out
    }

    /// Each query's top (index, score) pairs, best first (ties: lower index first),
    /// reading the item table once for all of them ([`crate::scan`]). Index 0, excluded
    /// indices and non-finite scores are never returned. Items of the query's history get
    /// the encoder's repeat weight.
    pub fn top_ks(&self, queries: &[TopK<'_>]) -> Vec<Vec<(u32, f32)>> {
        self.items.top_ks(queries, self.repeat)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::sasrec::init_seeded;
    use crate::serve::top_k;

    fn model(cfg: &Config, categories: bool) -> SasRec {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut m = SasRec::load(vb.clone(), cfg).unwrap();
        if categories {
            let of_item: Vec<u32> = (0..=cfg.num_items as u32).map(|i| i % 3).collect();
            m = m.with_categories(vb, 3, &of_item).unwrap();
        }
        init_seeded(&varmap, 7).unwrap();
        // Layer norms start at ones and zeros: move them, so the test sees them used.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.contains("ln") {
                let t = var.as_tensor();
                let noise = (t.randn_like(0.0, 0.3).unwrap() + t).unwrap();
                var.set(&noise).unwrap();
            }
            // A repeat weight large enough to move history items into the top.
            if name == "repeat" {
                var.set(&Tensor::new(&[0.9f32], &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        m
    }

    #[test]
    fn the_host_path_computes_candles_user_vectors_and_top_items() {
        for (cfg, categories) in [
            (
                Config {
                    num_items: 60,
                    max_len: 8,
                    hidden: 16,
                    heads: 2,
                    layers: 2,
                    ff: 32,
                    dropout: 0.0,
                    repeat: false,
                    text_dim: 0,
                    text_alone: false,
                },
                false,
            ),
            (
                Config {
                    num_items: 50,
                    max_len: 5,
                    hidden: 12,
                    heads: 3,
                    layers: 1,
                    ff: 20,
                    dropout: 0.0,
                    repeat: true,
                    text_dim: 0,
                    text_alone: false,
                },
                true,
            ),
        ] {
            let m = model(&cfg, categories);
            let host = HostEncoder::of(&m).unwrap();
            let histories: [&[u32]; 5] = [
                &[1, 2, 3],
                &[5, 6, 7, 8, 9, 10, 11, 12, 13],
                &[4],
                &[],
                &[9, 0, 7],
            ];
            let contexts = [
                ContextIds::from_parts(Some(3), None),
                ContextIds::default(),
                ContextIds::from_parts(None, Some("app")),
                ContextIds::from_parts(Some(23), Some("mobile")),
                ContextIds::default(),
            ];
            let (ids, hours, devices) = m.batch(&histories, &contexts, &Device::Cpu).unwrap();
            let want = m.user_vectors(&ids, &hours, &devices).unwrap();
            let scores = m.scores(&want).unwrap().to_vec2::<f32>().unwrap();
            let want = want.to_vec2::<f32>().unwrap();
            let users: Vec<Vec<f32>> = histories
                .iter()
                .zip(contexts)
                .map(|(h, c)| host.head(&host.encode(h), c))
                .collect();
            for (got, want) in users.iter().zip(&want) {
                let diff = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-5,
                    "user vectors differ by {diff}: {got:?} vs {want:?}"
                );
            }
            let exclude = [2u32, 5, 9];
            let shift = crate::serve::GroupShift {
                groups: (0..=cfg.num_items as u32).map(|i| i % 4).collect(),
                offsets: vec![0.3, -0.2, 0.0, 0.1],
            };
            let queries: Vec<TopK> = users
                .iter()
                .zip(histories)
                .map(|(u, h)| TopK {
                    user: u,
                    exclude: &exclude,
                    history: h,
                    offsets: Some((&shift.groups, &shift.offsets)),
                    k: 7,
                })
                .collect();
            let repeat = m.repeat_weight().unwrap();
            assert_eq!(repeat.is_some(), cfg.repeat);
            for ((got, mut want), h) in host.top_ks(&queries).iter().zip(scores).zip(histories) {
                if let Some(w) = repeat {
                    SasRec::add_repeat(w, &mut want, h);
                }
                shift.apply(&mut want);
                let want = top_k(want, &exclude, 7);
                assert_eq!(
                    got.iter().map(|p| p.0).collect::<Vec<_>>(),
                    want.iter().map(|p| p.0).collect::<Vec<_>>()
                );
                assert!(got.iter().zip(&want).all(|(a, b)| (a.1 - b.1).abs() < 1e-5));
            }
        }
    }
}
