//! AdamW computed in place on the CPU: the same update as candle's `AdamW`, to the bit,
//! in one pass over each variable (its value, gradient and two moments) instead of about
//! fifteen tensor operations that each allocate a buffer the size of the variable. For an
//! item table of 100,000 rows those buffers (and the kernel's page faults for them) were
//! most of a training step. On other devices it is candle's `AdamW`.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Var};
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
    vars: Vec<(Var, Vec<f32>, Vec<f32>)>,
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
                let n = v.elem_count();
                (v, vec![0.0; n], vec![0.0; n])
            })
            .collect();
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
        let k = Constants {
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(t))) as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            eps: p.eps as f32,
            lr: p.lr as f32,
        };
        for (theta, m, v) in &mut self.vars {
            let Some(g) = grads.get(theta) else {
                continue;
            };
            let op = StepOp {
                moments: RefCell::new((m, v)),
                k,
            };
            theta.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Constants {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    eps: f32,
    lr: f32,
}

/// One AdamW step of a variable θ with gradient g and moments m and v, in candle's order
/// of rounding:
/// m ← m·β₁ + g·(1 − β₁); v ← v·β₂ + g²·(1 − β₂);
/// θ ← θ·(1 − lr·λ) − lr·(m·s_m) / (√(v·s_v) + ε), with s the bias corrections.
/// Each `x * c + 0.0` is candle's tensor-times-scalar (an affine map with offset 0): the
/// `+ 0.0` turns a −0 into +0 as it does, so that even the signs of zeros agree.
struct StepOp<'a> {
    moments: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    k: Constants,
}

impl InplaceOp2 for StepOp<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        tl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(g), Some((t0, t1)), Some((g0, g1))) =
            (theta, g, tl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("{}: only contiguous f32 tensors", self.name());
        };
        let (theta, g) = (&mut theta[t0..t1], &g[g0..g1]);
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if g.len() != theta.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!("{}: the tensors differ in size", self.name());
        }
        let k = self.k;
        for (((t, &g), m), v) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = (*m * k.beta1 + 0.0) + (g * k.one_minus_beta1 + 0.0);
            *v = (*v * k.beta2 + 0.0) + ((g * g) * k.one_minus_beta2 + 0.0);
            let adjusted = (*m * k.scale_m + 0.0) / ((*v * k.scale_v + 0.0).sqrt() + k.eps);
            *t = (*t * k.decay + 0.0) - (adjusted * k.lr + 0.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
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
