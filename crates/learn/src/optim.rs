//! AdamW with decoupled weight decay over the dense variables and, lazily, over the item
//! table rows a step touched; its moments are plain state a checkpoint saves, so a
//! restarted learner continues the same optimisation instead of starting cold.
//!
//! Lazily means a row's moments and decay advance only on steps whose batch used the
//! row (as in "lazy Adam" for sparse embeddings): an item nobody interacts with keeps its
//! embedding, and a step costs the rows it touched, not the catalog.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::LearnError;
use crate::qnet::{ItemTable, Items};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the second moment's root.
    pub eps: f64,
    /// Decoupled weight decay per step.
    pub weight_decay: f64,
}

impl AdamParams {
    /// The usual betas (0.9, 0.999) and ε 1e-8 with `lr` and `weight_decay`.
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// First and second moments of one item table.
#[derive(Debug, Clone)]
struct RowMoments {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl RowMoments {
    fn zeros(len: usize) -> Self {
        Self {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }
}

/// The optimiser of one Q-network: moments for every dense variable and every item row.
#[derive(Debug)]
pub struct AdamW {
    params: AdamParams,
    steps: u64,
    dense: Vec<(String, Var, Tensor, Tensor)>,
    history: RowMoments,
    actions: RowMoments,
}

/// Names of the saved moments: `m.<variable>` and `v.<variable>`, with the item tables as
/// `items.history` and `items.actions`.
fn moment_name(which: &str, var: &str) -> String {
    format!("{which}.{var}")
}

impl AdamW {
    /// Fresh (zero) moments for `varmap`'s variables and `items`.
    pub fn new(varmap: &VarMap, items: &Items, params: AdamParams) -> Result<Self, LearnError> {
        let vars = varmap
            .data()
            .lock()
            .map_err(|e| LearnError::Train(e.to_string()))?;
        let mut dense = Vec::with_capacity(vars.len());
        for (name, var) in vars.iter() {
            let zeros = var.as_tensor().zeros_like()?;
            dense.push((name.clone(), var.clone(), zeros.clone(), zeros));
        }
        dense.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            params,
            steps: 0,
            dense,
            history: RowMoments::zeros(items.history.values().len()),
            actions: RowMoments::zeros(items.actions.values().len()),
        })
    }

    /// Steps taken (the bias correction's t).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The dense variables, in name order.
    pub fn vars(&self) -> Vec<Var> {
        self.dense.iter().map(|(_, v, _, _)| v.clone()).collect()
    }

    /// One step: the dense variables from `grads`, and the item rows `rows` (item
    /// indices; 0, the padding row, is skipped) from their gradients, `rows.len() × width`
    /// values each.
    pub fn step(
        &mut self,
        grads: &GradStore,
        items: &mut Items,
        rows: &[u32],
        history_grad: Option<&[f32]>,
        actions_grad: Option<&[f32]>,
    ) -> Result<(), LearnError> {
        self.steps += 1;
        let p = self.params;
        let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
        let scale_m = 1.0 / (1.0 - p.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(t));
        for (_, var, m, v) in &mut self.dense {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let next_m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let next_v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let adjusted = ((&next_m * scale_m)? / ((&next_v * scale_v)?.sqrt()? + p.eps)?)?;
            let theta = ((var.as_tensor() * (1.0 - p.lr * p.weight_decay))? - (adjusted * p.lr)?)?;
            var.set(&theta)?;
            *m = next_m;
            *v = next_v;
        }
        let scales = (scale_m as f32, scale_v as f32);
        if let Some(g) = history_grad {
            rows_step(&mut items.history, &mut self.history, rows, g, p, scales);
        }
        if let Some(g) = actions_grad {
            rows_step(&mut items.actions, &mut self.actions, rows, g, p, scales);
        }
        Ok(())
    }

    /// Zero moments for item rows added since (the tables grew to `items`).
    pub fn grow(&mut self, items: &Items) {
        self.history.m.resize(items.history.values().len(), 0.0);
        self.history.v.resize(items.history.values().len(), 0.0);
        self.actions.m.resize(items.actions.values().len(), 0.0);
        self.actions.v.resize(items.actions.values().len(), 0.0);
    }

    /// The moments by name, for a checkpoint (item moments as `[rows, width]`).
    pub fn tensors(&self, width: usize) -> Result<HashMap<String, Tensor>, LearnError> {
        let mut out = HashMap::new();
        for (name, _, m, v) in &self.dense {
            out.insert(moment_name("m", name), m.clone());
            out.insert(moment_name("v", name), v.clone());
        }
        for (name, moments) in [
            ("items.history", &self.history),
            ("items.actions", &self.actions),
        ] {
            let rows = moments.m.len() / width;
            let device = candle_core::Device::Cpu;
            out.insert(
                moment_name("m", name),
                Tensor::from_slice(&moments.m, (rows, width), &device)?,
            );
            out.insert(
                moment_name("v", name),
                Tensor::from_slice(&moments.v, (rows, width), &device)?,
            );
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::tensors`] after `steps` steps; `place` maps each
    /// saved item row to its row now (`None`: the item is gone), the rest stay zero.
    pub fn restore(
        &mut self,
        saved: &HashMap<String, Tensor>,
        steps: u64,
        place: &dyn Fn(usize) -> Option<usize>,
    ) -> Result<(), LearnError> {
        let get = |name: &str| {
            saved
                .get(name)
                .ok_or_else(|| LearnError::Checkpoint(format!("the optimizer state lacks {name}")))
        };
        for (name, var, m, v) in &mut self.dense {
            for (which, slot) in [("m", &mut *m), ("v", &mut *v)] {
                let t = get(&moment_name(which, name))?;
                if t.shape() != var.shape() {
                    return Err(LearnError::Checkpoint(format!(
                        "the optimizer's {which}.{name} has shape {:?}, the variable {:?}",
                        t.shape(),
                        var.shape()
                    )));
                }
                *slot = t.clone();
            }
        }
        for (name, moments) in [
            ("items.history", &mut self.history),
            ("items.actions", &mut self.actions),
        ] {
            for (which, now) in [("m", &mut moments.m), ("v", &mut moments.v)] {
                let t = get(&moment_name(which, name))?;
                let old = ItemTable::from_values(t.flatten_all()?.to_vec1::<f32>()?, t.dim(1)?)?;
                remap_rows(&old, now, place);
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Copies each row of `old` (`rows × old.width()`) that `place` maps to a row of `now`
/// (same width) into it.
pub fn remap_rows(old: &ItemTable, now: &mut [f32], place: &dyn Fn(usize) -> Option<usize>) {
    let w = old.width();
    for r in 1..=old.items() {
        if let Some(to) = place(r).filter(|&to| (to + 1) * w <= now.len()) {
            now[to * w..(to + 1) * w].copy_from_slice(old.row(r as u32));
        }
    }
}

/// The AdamW update of the item rows `rows` of `table`, whose gradients are `grad`.
fn rows_step(
    table: &mut ItemTable,
    moments: &mut RowMoments,
    rows: &[u32],
    grad: &[f32],
    p: AdamParams,
    (scale_m, scale_v): (f32, f32),
) {
    let w = table.width();
    let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
    let (lr, eps) = (p.lr as f32, p.eps as f32);
    let decay = 1.0 - (p.lr * p.weight_decay) as f32;
    let values = table.values_mut();
    for (local, &item) in rows.iter().enumerate() {
        if item == 0 {
            continue;
        }
        let g = &grad[local * w..(local + 1) * w];
        let at = item as usize * w;
        for (k, &gk) in g.iter().enumerate() {
            let m = &mut moments.m[at + k];
            let v = &mut moments.v[at + k];
            *m = b1 * *m + (1.0 - b1) * gk;
            *v = b2 * *v + (1.0 - b2) * gk * gk;
            let adjusted = (*m * scale_m) / ((*v * scale_v).sqrt() + eps);
            values[at + k] = values[at + k] * decay - lr * adjusted;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{Optimizer, ParamsAdamW};

    use super::*;
    use crate::qnet::QConfig;

    #[test]
    fn dense_steps_match_candles_adamw_and_rows_follow_the_same_rule() {
        let device = Device::Cpu;
        let ours = VarMap::new();
        let theirs = VarMap::new();
        let init = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &device).unwrap();
        for map in [&ours, &theirs] {
            map.get(
                (2, 2),
                "w",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &device,
            )
            .unwrap();
            map.data().lock().unwrap()["w"].set(&init).unwrap();
        }
        let cfg = QConfig {
            embed: 2,
            ..QConfig::default()
        };
        let mut items = Items::seeded(&cfg, 3);
        let params = AdamParams::new(0.01, 0.1);
        let mut adam = AdamW::new(&ours, &items, params).unwrap();
        let mut reference = candle_nn::AdamW::new(
            theirs.all_vars(),
            ParamsAdamW {
                lr: 0.01,
                weight_decay: 0.1,
                ..ParamsAdamW::default()
            },
        )
        .unwrap();
        let row_before = items.history.row(2).to_vec();
        for step in 0..3 {
            let loss = |map: &VarMap| {
                let w = map.data().lock().unwrap()["w"].as_tensor().clone();
                (w.sqr().unwrap().sum_all().unwrap() * (step + 1) as f64).unwrap()
            };
            let grads = loss(&ours).backward().unwrap();
            adam.step(
                &grads,
                &mut items,
                &[0, 2],
                Some(&[9.0, 9.0, 1.0, -2.0]),
                None,
            )
            .unwrap();
            reference.step(&loss(&theirs).backward().unwrap()).unwrap();
        }
        let a = ours.data().lock().unwrap()["w"]
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap();
        let b = theirs.data().lock().unwrap()["w"]
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap();
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-6, "{a:?} {b:?}");
        }
        // A constant gradient g moves a row by about lr · sign(g) per step, and decays it.
        let row = items.history.row(2);
        for (k, g) in [1.0f32, -2.0].iter().enumerate() {
            let expect = row_before[k] * (1.0 - 0.001f32).powi(3) - 0.03 * g.signum();
            assert!((row[k] - expect).abs() < 1e-4, "{row:?} {row_before:?}");
        }
        assert!(items.history.row(0).iter().all(|&x| x == 0.0));
        assert_eq!(adam.steps(), 3);
    }

    #[test]
    fn moments_survive_a_round_trip_and_follow_moved_rows() {
        let device = Device::Cpu;
        let map = VarMap::new();
        map.get((2,), "b", candle_nn::Init::Const(1.0), DType::F32, &device)
            .unwrap();
        let cfg = QConfig {
            embed: 2,
            ..QConfig::default()
        };
        let mut items = Items::seeded(&cfg, 3);
        let mut adam = AdamW::new(&map, &items, AdamParams::new(0.01, 0.0)).unwrap();
        let loss = map.data().lock().unwrap()["b"]
            .as_tensor()
            .sum_all()
            .unwrap();
        adam.step(
            &loss.backward().unwrap(),
            &mut items,
            &[3],
            None,
            Some(&[1.0, 1.0]),
        )
        .unwrap();
        let saved = adam.tensors(2).unwrap();
        let mut again =
            AdamW::new(&map, &Items::seeded(&cfg, 4), AdamParams::new(0.01, 0.0)).unwrap();
        // Item 3 is item 1 now; old items 1 and 2 are gone.
        again
            .restore(&saved, adam.steps(), &|r| (r == 3).then_some(1))
            .unwrap();
        assert_eq!(again.steps(), 1);
        assert_eq!(&again.actions.m[2..4], &adam.actions.m[6..8]);
        assert!(again.actions.m[4..].iter().all(|&x| x == 0.0));
        assert_eq!(
            again.dense[0].2.to_vec1::<f32>().unwrap(),
            adam.dense[0].2.to_vec1::<f32>().unwrap()
        );
        let mut missing = saved.clone();
        missing.remove("v.b");
        let e = again.restore(&missing, 1, &|r| Some(r)).unwrap_err();
        assert!(e.to_string().contains("v.b"), "{e}");
    }
}
