//! The Q-network's forward pass on the CPU for the request path, written out instead of
//! run op by op through candle: one state and its candidates are a few small products,
//! and candle's per-op overhead cost more than they do. The state's part of the first
//! layer is computed once and shared by every candidate. It computes what
//! [`crate::qnet::Dense::q_lists`] computes, to 1e-5 (a test checks it); training keeps
//! candle.

use candle_core::{Storage, Tensor};
use onrec_model::context::{DEVICE_BUCKETS, HOUR_BUCKETS};
use onrec_model::infer::{HostLinear, dot};

use crate::LearnError;
use crate::qnet::{Dense, QConfig, State};

/// The dense part's weights as plain arrays.
#[derive(Debug, Clone)]
pub(crate) struct HostQ {
    hours: Vec<f32>,
    devices: Vec<f32>,
    user: Option<HostLinear>,
    l1: HostLinear,
    l2: HostLinear,
    out: HostLinear,
    cfg: QConfig,
}

fn flat(t: &Tensor) -> Result<Vec<f32>, LearnError> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Reads `table`'s rows in place (a CPU tensor) with `f`.
fn with_rows<T>(table: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T, LearnError> {
    let (storage, layout) = table.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(LearnError::Invalid(
            "the item table is not on the CPU".into(),
        ));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| LearnError::Invalid("the item table is not contiguous".into()))?;
    let all = cpu.as_slice::<f32>()?;
    Ok(f(&all[start..end]))
}

impl HostQ {
    /// Copies `dense`'s weights.
    pub(crate) fn of(dense: &Dense) -> Result<Self, LearnError> {
        Ok(Self {
            hours: flat(dense.hours.embeddings())?,
            devices: flat(dense.devices.embeddings())?,
            user: dense.user.as_ref().map(HostLinear::of).transpose()?,
            l1: HostLinear::of(&dense.l1)?,
            l2: HostLinear::of(&dense.l2)?,
            out: HostLinear::of(&dense.out)?,
            cfg: dense.cfg.clone(),
        })
    }

    /// Q of each state's candidates, in their order; `history` and `actions` are the
    /// item tables (CPU tensors, `embed` wide, indexed by item).
    pub(crate) fn q_lists(
        &self,
        history: &Tensor,
        actions: &Tensor,
        states: &[&State],
        candidates: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, LearnError> {
        let features: Vec<Vec<f32>> = with_rows(history, |rows| {
            states
                .iter()
                .map(|s| self.state_features(rows, s))
                .collect()
        })?;
        with_rows(actions, |rows| {
            features
                .iter()
                .zip(candidates)
                .map(|(s, list)| {
                    pulp::Arch::new().dispatch(QOf {
                        host: self,
                        rows,
                        s,
                        candidates: list,
                    })
                })
                .collect()
        })
    }

    /// Mean history embedding (zero without a history), hour and device embeddings and,
    /// with a user vector in the shape, its projection (of zeros when there is none).
    fn state_features(&self, rows: &[f32], state: &State) -> Vec<f32> {
        let e = self.cfg.embed;
        let row = |i: u32| rows.get(i as usize * e..(i as usize + 1) * e);
        let tail = state.recent(self.cfg.max_history);
        let real = tail.iter().filter(|&&i| i != 0).count();
        let mut x = vec![0f32; e];
        for &i in tail.iter().filter(|&&i| i != 0) {
            if let Some(r) = row(i) {
                for (a, v) in x.iter_mut().zip(r) {
                    *a += v / real as f32;
                }
            }
        }
        let hour = usize::from(state.context.hour).min(HOUR_BUCKETS - 1);
        let device = usize::from(state.context.device).min(DEVICE_BUCKETS - 1);
        x.extend_from_slice(&self.hours[hour * e..(hour + 1) * e]);
        x.extend_from_slice(&self.devices[device * e..(device + 1) * e]);
        if let Some(proj) = &self.user {
            let zeros = vec![0f32; proj.inputs()];
            let u = state.user.as_deref().unwrap_or(&zeros);
            let mut projected = vec![0f32; proj.outputs()];
            proj.apply(u, &mut projected);
            x.extend(projected);
        }
        x
    }
}

/// Q of each of `candidates` in state features `s`: the first layer's state part once,
/// its action part per candidate; compiled for the processor's widest vectors, so every
/// loop is written out here or inlined.
struct QOf<'a> {
    host: &'a HostQ,
    rows: &'a [f32],
    s: &'a [f32],
    candidates: &'a [u32],
}

impl pulp::WithSimd for QOf<'_> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Vec<f32> {
        let Self {
            host,
            rows,
            s,
            candidates,
        } = self;
        let (e, h) = (host.cfg.embed, host.l1.outputs());
        let mut shared = vec![0f32; h];
        for (o, z) in shared.iter_mut().enumerate() {
            *z = dot(&host.l1.row(o)[..s.len()], s) + host.l1.bias()[o];
        }
        let zeros = vec![0f32; e];
        let (mut z1, mut z2) = (vec![0f32; h], vec![0f32; host.l2.outputs()]);
        let mut q = Vec::with_capacity(candidates.len());
        let mut out = [0f32];
        for &a in candidates {
            let action = rows
                .get(a as usize * e..(a as usize + 1) * e)
                .unwrap_or(&zeros);
            for (o, z) in z1.iter_mut().enumerate() {
                *z = (shared[o] + dot(&host.l1.row(o)[s.len()..], action)).max(0.0);
            }
            host.l2.apply(&z1, &mut z2);
            for z in &mut z2 {
                *z = z.max(0.0);
            }
            host.out.apply(&z2, &mut out);
            q.push(out[0]);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::Device;
    use onrec_model::context::ContextIds;

    use crate::qnet::QNet;

    use super::*;

    #[test]
    fn the_host_path_computes_the_q_values_candle_does() {
        for user_dim in [0, 6] {
            let cfg = QConfig {
                max_history: 5,
                embed: 8,
                hidden: 12,
                user_dim,
                seed: 3,
            };
            let net = QNet::seeded(&cfg, 30, &Device::Cpu).unwrap();
            let user: Arc<[f32]> = Arc::from(vec![0.5, -1.0, 0.25, 2.0, 0.0, -0.75]);
            let states = [
                State {
                    history: vec![1, 2, 3, 4, 5, 6, 7],
                    context: ContextIds::from_parts(Some(20), Some("mobile")),
                    user: (user_dim > 0).then(|| user.clone()),
                },
                State {
                    history: vec![],
                    context: ContextIds::default(),
                    user: None,
                },
                State {
                    history: vec![0, 9, 0],
                    context: ContextIds::from_parts(None, Some("tablet")),
                    user: None,
                },
            ];
            let lists: [&[u32]; 3] = [&[1, 5, 30], &[2], &[7, 8, 9, 10, 11]];
            let refs: Vec<&State> = states.iter().collect();
            let want = net.candle_q_values(&refs, &lists).unwrap();
            let got = net.q_values_of(&refs, &lists).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.len(), w.len());
                for (a, b) in g.iter().zip(w) {
                    assert!((a - b).abs() < 1e-5, "{g:?} vs {w:?}");
                }
            }
        }
    }
}
