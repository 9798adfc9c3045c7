//! AdamW computed in place on the CPU: the same update as candle's `AdamW`, to the bit,
//! in three passes over each variable instead of about fifteen tensor operations that
//! each allocate a buffer the size of the variable. For an item table of 100,000 rows
//! those buffers (and the kernel's page faults for them) were most of a training step.
//! On other devices it is candle's `AdamW`.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// AdamW with decoupled weight decay (candle's `AdamW`, computed in place on the CPU).
#[derive(Debug)]
pub enum DenseAdamW {
    /// Every variable an f32 on the CPU: the update in place.
    Cpu(InPlace),
    /// A variable elsewhere (CUDA) or of another type: candle's own.
    Candle(AdamW),
}

/// The CPU form: each variable with its two moments.
#[derive(Debug)]
pub struct InPlace {
    vars: Vec<(Var, Tensor, Tensor)>,
    params: ParamsAdamW,
    step_t: usize,
}

impl DenseAdamW {
    /// An optimiser over `vars` with `params`.
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
        if vars
            .iter()
            .any(|v| !v.device().is_cpu() || v.dtype() != candle_core::DType::F32)
        {
            return Ok(Self::Candle(AdamW::new(vars, params)?));
        }
        let vars = vars
            .into_iter()
            .map(|v| {
                let m = Tensor::zeros(v.shape(), v.dtype(), v.device())?;
                let s = Tensor::zeros(v.shape(), v.dtype(), v.device())?;
                Ok((v, m, s))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self::Cpu(InPlace {
            vars,
            params,
            step_t: 0,
        }))
    }

    /// One update from `grads`; variables without a gradient keep their values and
    /// moments.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        match self {
            Self::Candle(opt) => opt.step(grads),
            Self::Cpu(f) => f.step(grads),
        }
    }

    /// Sets the learning rate of the following steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Self::Candle(opt) => opt.set_learning_rate(lr),
            Self::Cpu(f) => f.params.lr = lr,
        }
    }
}

impl InPlace {
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let t = self.step_t as i32;
        // The constants as candle's tensor-times-scalar ops round them: f64 to f32.
        let moments = Moments {
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
        };
        let update = Update {
            scale_m: (1.0 / (1.0 - p.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(t))) as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            eps: p.eps as f32,
            lr: p.lr as f32,
        };
        for (theta, m, v) in &self.vars {
            let Some(g) = grads.get(theta) else {
                continue;
            };
            let g = g.contiguous()?;
            m.inplace_op2(&g, &MomentsOp(moments))?;
            v.inplace_op2(&g, &SecondMomentOp(moments))?;
            theta.as_tensor().inplace_op3(m, v, &UpdateOp(update))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Moments {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
}

#[derive(Debug, Clone, Copy)]
struct Update {
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    eps: f32,
    lr: f32,
}

/// The contiguous f32 slice of an in-place op's tensor, or an error naming the op.
fn slice<'a>(name: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (CpuStorage::F32(data), Some((from, to))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("{name}: only contiguous f32 tensors");
    };
    Ok(&data[from..to])
}

/// [`slice`] of the destination, with the sources that must be as long.
fn slice_mut<'a>(
    name: &str,
    s: &'a mut CpuStorage,
    l: &Layout,
    sources: &[&[f32]],
) -> candle_core::Result<&'a mut [f32]> {
    let (CpuStorage::F32(data), Some((from, to))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("{name}: only contiguous f32 tensors");
    };
    if sources.iter().any(|src| src.len() != to - from) {
        candle_core::bail!("{name}: the tensors differ in size");
    }
    Ok(&mut data[from..to])
}

// Each `x * c + 0.0` is candle's tensor-times-scalar (an affine map with offset 0): the
// `+ 0.0` turns a −0 into +0 as it does, so that even the signs of zeros agree.

/// m ← m·β₁ + g·(1 − β₁), in candle's order of rounding.
struct MomentsOp(Moments);

impl InplaceOp2 for MomentsOp {
    fn name(&self) -> &'static str {
        "adamw-first-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(self.name(), g, gl)?;
        let m = slice_mut(self.name(), m, ml, &[g])?;
        let k = self.0;
        for (m, &g) in m.iter_mut().zip(g) {
            *m = (*m * k.beta1 + 0.0) + (g * k.one_minus_beta1 + 0.0);
        }
        Ok(())
    }
}

/// v ← v·β₂ + g²·(1 − β₂), in candle's order of rounding.
struct SecondMomentOp(Moments);

impl InplaceOp2 for SecondMomentOp {
    fn name(&self) -> &'static str {
        "adamw-second-moment"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        vl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(self.name(), g, gl)?;
        let v = slice_mut(self.name(), v, vl, &[g])?;
        let k = self.0;
        for (v, &g) in v.iter_mut().zip(g) {
            *v = (*v * k.beta2 + 0.0) + ((g * g) * k.one_minus_beta2 + 0.0);
        }
        Ok(())
    }
}

/// θ ← θ·(1 − lr·λ) − lr·m̂ / (√v̂ + ε), in candle's order of rounding.
struct UpdateOp(Update);

impl InplaceOp3 for UpdateOp {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        tl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let (m, v) = (slice(self.name(), m, ml)?, slice(self.name(), v, vl)?);
        let theta = slice_mut(self.name(), theta, tl, &[m, v])?;
        let k = self.0;
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            let adjusted = (m * k.scale_m + 0.0) / ((v * k.scale_v + 0.0).sqrt() + k.eps);
            *t = (*t * k.decay + 0.0) - (adjusted * k.lr + 0.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;
    use crate::rng::SplitMix64;

    fn vars(seed: u64) -> Vec<Var> {
        let mut rng = SplitMix64::new(seed);
        [(7usize, 5usize), (1, 3)]
            .iter()
            .map(|&(r, c)| {
                let data: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32).collect();
                Var::from_tensor(&Tensor::from_vec(data, (r, c), &Device::Cpu).unwrap()).unwrap()
            })
            .collect()
    }

    #[test]
    fn in_place_adamw_is_candles_adamw_to_the_bit() {
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..ParamsAdamW::default()
        };
        let (ours, theirs) = (vars(3), vars(3));
        let mut in_place = DenseAdamW::new(ours.clone(), params.clone()).unwrap();
        assert!(matches!(in_place, DenseAdamW::Cpu(_)));
        let mut candle = AdamW::new(theirs.clone(), params).unwrap();
        let mut rng = SplitMix64::new(9);
        for step in 0..30 {
            if step == 20 {
                in_place.set_learning_rate(0.003);
                candle.set_learning_rate(0.003);
            }
            // The same loss on both: a random linear function of the variables, squared.
            let weights: Vec<Vec<f32>> = ours
                .iter()
                .map(|v| (0..v.elem_count()).map(|_| rng.normal() as f32).collect())
                .collect();
            let loss = |vars: &[Var]| {
                let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
                for (v, w) in vars.iter().zip(&weights) {
                    let w = Tensor::from_vec(w.clone(), v.shape(), &Device::Cpu).unwrap();
                    total =
                        (total + (v.as_tensor() * w).unwrap().sum_all().unwrap().sqr()).unwrap();
                }
                total
            };
            in_place.step(&loss(&ours).backward().unwrap()).unwrap();
            candle.step(&loss(&theirs).backward().unwrap()).unwrap();
        }
        for (a, b) in ours.iter().zip(&theirs) {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_variable_without_a_gradient_is_left_alone() {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let used = vb
            .get_with_hints(4, "used", candle_nn::Init::Const(1.0))
            .unwrap();
        let _unused = vb
            .get_with_hints(4, "unused", candle_nn::Init::Const(2.0))
            .unwrap();
        let mut opt = DenseAdamW::new(varmap.all_vars(), ParamsAdamW::default()).unwrap();
        opt.step(&used.sum_all().unwrap().backward().unwrap())
            .unwrap();
        let data = varmap.data().lock().unwrap();
        let value = |name: &str| data[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(value("used").iter().all(|&x| x < 1.0));
        assert_eq!(value("unused"), vec![2.0; 4]);
    }
}
