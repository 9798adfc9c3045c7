//! Beta draws a column at a time: the sampler a Thompson request spends most of its time
//! in (its propensity estimate takes hundreds of joint draws of every candidate's posterior).
//!
//! A Beta(a, b) draw is X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b). For shapes of at
//! least 1 (every posterior with a prior of at least 1) a column of Gamma draws is made in
//! three passes written lane by lane in `f32`, which the compiler vectorises (with AVX2 and
//! FMA where the processor has them, chosen at run time):
//! 1. standard normals by the Box–Muller transform, from 24-bit uniforms;
//! 2. Marsaglia and Tsang's proposals d·(1 + c·z)³, with their quick acceptance test and,
//!    for the one proposal in about twelve that it leaves, their exact test;
//! 3. one at a time: the exact test again, in `f64`, for the rare proposal too near its
//!    line for `f32` to decide, and a fresh draw from `rand_distr`'s sampler for each
//!    proposal the tests reject, as the rejection method prescribes.
//!
//! The draws follow the Gamma distribution to `f32` precision (unit tests compare the
//! quantiles with `rand_distr`'s sampler); the normals' tails end at 5.8 standard deviations,
//! where 24-bit uniforms end. Shapes below 1 are drawn one at a time by `rand_distr`.

use rand::Rng;
use rand_distr::{Beta, Distribution, Gamma};

/// A Beta(a, b) distribution to draw columns from.
pub(crate) struct BetaDraw {
    a: f64,
    b: f64,
    x: Gamma<f64>,
    y: Gamma<f64>,
    /// For the rare draw where both Gammas underflow to 0 (shapes far below 1).
    exact: Beta<f64>,
}

/// Buffers reused from one column to the next.
#[derive(Default)]
pub(crate) struct Scratch {
    bits: Vec<u32>,
    normals: Vec<f32>,
    x: Vec<f32>,
    y: Vec<f32>,
}

impl BetaDraw {
    /// `None` unless both shapes are positive and finite.
    pub(crate) fn new(a: f64, b: f64) -> Option<Self> {
        Some(Self {
            a,
            b,
            x: Gamma::new(a, 1.0).ok()?,
            y: Gamma::new(b, 1.0).ok()?,
            exact: Beta::new(a, b).ok()?,
        })
    }

    /// One draw, by `rand_distr`'s samplers.
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        let x = self.x.sample(rng);
        let total = x + self.y.sample(rng);
        if total > 0.0 {
            x / total
        } else {
            self.exact.sample(rng)
        }
    }

    /// Fills `out` with independent draws.
    pub(crate) fn fill<R: Rng + ?Sized>(
        &self,
        out: &mut [f64],
        scratch: &mut Scratch,
        rng: &mut R,
    ) {
        if self.a < 1.0 || self.b < 1.0 {
            out.iter_mut().for_each(|o| *o = self.sample(rng));
            return;
        }
        let mut x = std::mem::take(&mut scratch.x);
        let mut y = std::mem::take(&mut scratch.y);
        x.resize(out.len(), 0.0);
        y.resize(out.len(), 0.0);
        gamma_column(self.a, &self.x, &mut x, scratch, rng);
        gamma_column(self.b, &self.y, &mut y, scratch, rng);
        for ((o, &x), &y) in out.iter_mut().zip(&x).zip(&y) {
            let total = x + y;
            *o = if total > 0.0 {
                f64::from(x / total)
            } else {
                self.exact.sample(rng)
            };
        }
        scratch.x = x;
        scratch.y = y;
    }
}

/// Fills `out` with Gamma(`shape`, 1) draws, `shape` ≥ 1; `exact` is that distribution,
/// for the proposals both tests reject.
fn gamma_column<R: Rng + ?Sized>(
    shape: f64,
    exact: &Gamma<f64>,
    out: &mut [f32],
    scratch: &mut Scratch,
    rng: &mut R,
) {
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    // An even number of proposals: the normals come in pairs.
    let n = out.len() & !1;
    let bits = &mut scratch.bits;
    bits.clear();
    bits.resize(2 * n, 0);
    for pair in bits.chunks_exact_mut(2) {
        let word = rng.next_u64();
        pair[0] = word as u32;
        pair[1] = (word >> 32) as u32;
    }
    let (box_muller, tests) = bits.split_at(n);
    let normals = &mut scratch.normals;
    normals.clear();
    normals.resize(n, 0.0);
    pulp::Arch::new().dispatch(Proposals {
        d: d as f32,
        c: c as f32,
        box_muller,
        tests,
        normals,
        out: &mut out[..n],
    });
    for ((o, &z), &u) in out[..n].iter_mut().zip(normals.iter()).zip(tests) {
        if *o == REJECTED {
            *o = exact.sample(rng) as f32;
        } else if o.is_nan() {
            let z = f64::from(z);
            let v = 1.0 + c * z;
            let accept =
                v > 0.0 && f64::from(ln(unit(u))) < 0.5 * z * z + d * one_minus_v_plus_ln_v(c * z);
            *o = if accept {
                (d * v * v * v) as f32
            } else {
                exact.sample(rng) as f32
            };
        }
    }
    out[n..]
        .iter_mut()
        .for_each(|o| *o = exact.sample(rng) as f32);
}

/// A proposal both of Marsaglia and Tsang's tests reject (draws are positive).
const REJECTED: f32 = -1.0;

/// How near the exact test's line a proposal is left to the `f64` test.
const UNSURE: f32 = 1e-3;

/// Passes 1 and 2 of [`gamma_column`]: normals from `box_muller`'s bits, and the accepted
/// proposals ([`REJECTED`] where the tests reject one, NaN where `f32` cannot tell),
/// compiled for the processor's widest vectors.
struct Proposals<'a> {
    d: f32,
    c: f32,
    box_muller: &'a [u32],
    tests: &'a [u32],
    normals: &'a mut [f32],
    out: &'a mut [f32],
}

impl pulp::WithSimd for Proposals<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Self {
            d,
            c,
            box_muller,
            tests,
            normals,
            out,
        } = self;
        let half = normals.len() / 2;
        let (radii, angles) = box_muller.split_at(half);
        let (cos, sin) = normals.split_at_mut(half);
        for (((zc, zs), &r), &t) in cos.iter_mut().zip(sin).zip(radii).zip(angles) {
            let radius = (-2.0 * ln(unit(r))).sqrt();
            let (s, co) = sin_cos_of_turn(unit(t));
            *zc = radius * co;
            *zs = radius * s;
        }
        for ((o, &z), &u) in out.iter_mut().zip(normals.iter()).zip(tests) {
            let v = 1.0 + c * z;
            let z2 = z * z;
            let u = unit(u);
            let quick = u < 1.0 - 0.0331 * z2 * z2;
            // The exact test's margin; `f32` puts it at most about 2e-4 from its exact
            // value (the direct formula, which shapes up to 1,000 take, loses the most), so
            // a proposal closer than `UNSURE` to the line is left to the `f64` test.
            let t = c * z;
            let g = if t.abs() < 0.0625 {
                series_one_minus_v_plus_ln_v(t)
            } else {
                1.0 - v * v * v + 3.0 * ln(v.max(f32::MIN_POSITIVE))
            };
            let margin = 0.5 * z2 + d * g - ln(u);
            *o = if v <= 0.0 {
                REJECTED
            } else if quick || margin > UNSURE {
                d * v * v * v
            } else if margin < -UNSURE {
                REJECTED
            } else {
                f32::NAN
            };
        }
    }
}

/// A uniform in (0, 1) from the top 24 bits of `bits`, never 0 or 1.
#[inline(always)]
fn unit(bits: u32) -> f32 {
    ((bits >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// ln x for a positive normal `x`, to about one unit in the last place of `f32`: x = m·2ᵉ
/// with m in [√½, √2), ln m by the series of artanh((m − 1)/(m + 1)).
#[inline(always)]
fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = (exponent + i32::from(big)) as f32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 2.0 + s2 * (2.0 / 3.0 + s2 * (2.0 / 5.0 + s2 * (2.0 / 7.0 + s2 * (2.0 / 9.0))));
    s * series + e * std::f32::consts::LN_2
}

/// sin and cos of 2π·t for t in [0, 1): reduced to within an eighth of a turn of the
/// nearest quarter q, then Taylor series.
#[inline(always)]
fn sin_cos_of_turn(t: f32) -> (f32, f32) {
    // The nearest quarter, 0..=4 (4 is a whole turn, as 0), by comparisons: a floor would
    // be a library call on processors without SSE4.1, and keep the loop from vectorising.
    let q = f32::from(u8::from(t >= 0.125))
        + f32::from(u8::from(t >= 0.375))
        + f32::from(u8::from(t >= 0.625))
        + f32::from(u8::from(t >= 0.875));
    let r = (t - q * 0.25) * std::f32::consts::TAU;
    let r2 = r * r;
    let s = r
        * (1.0
            + r2 * (-1.0 / 6.0
                + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362_880.0)))));
    let c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24.0 + r2 * (-1.0 / 720.0 + r2 * (1.0 / 40_320.0))));
    // sin and cos of q quarter turns plus r.
    let (s, c) = if q == 1.0 || q == 3.0 { (c, s) } else { (s, c) };
    let sin_sign = if q == 2.0 || q == 3.0 { -1.0 } else { 1.0 };
    let cos_sign = if q == 1.0 || q == 2.0 { -1.0 } else { 1.0 };
    (s * sin_sign, c * cos_sign)
}

/// [`one_minus_v_plus_ln_v`] by its series, for |t| < 1/16, in `f32` (the vectorised pass)
/// or `f64`: 3·ln(1 + t) − 3t − 3t² − t³ by the series of ln(1 + t), to t⁹.
#[inline(always)]
fn series_one_minus_v_plus_ln_v<T>(t: T) -> T
where
    T: Copy + From<f32> + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let k = |c: f32| T::from(c);
    t * t
        * (k(-4.5)
            + t * t
                * (k(-0.75)
                    + t * (k(0.6)
                        + t * (k(-0.5) + t * (k(3.0 / 7.0) + t * (k(-0.375) + t * k(1.0 / 3.0)))))))
}

/// 1 − v + ln v for v = (1 + t)³, t > −1, without the cancellation of the direct formula
/// for small t (large shapes).
fn one_minus_v_plus_ln_v(t: f64) -> f64 {
    if t.abs() < 0.0625 {
        series_one_minus_v_plus_ln_v(t)
    } else {
        let v = (1.0 + t).powi(3);
        1.0 - v + v.ln()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    #[test]
    fn columns_of_beta_draws_have_the_beta_mean_and_variance() {
        let mut rng = SmallRng::seed_from_u64(11);
        let mut scratch = Scratch::default();
        for (a, b) in [
            (1.0, 1.0),
            (0.3, 0.5),
            (2.0, 40.0),
            (120.0, 9000.0),
            (0.01, 0.02),
            (7.5, 1.0),
        ] {
            let draw = BetaDraw::new(a, b).unwrap();
            // An odd length: the last draw comes from the exact sampler.
            let mut xs = vec![0.0; 200_001];
            draw.fill(&mut xs, &mut scratch, &mut rng);
            let n = xs.len() as f64;
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)), "({a}, {b})");
            let mean = xs.iter().sum::<f64>() / n;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            let want_mean = a / (a + b);
            let want_var = a * b / ((a + b).powi(2) * (a + b + 1.0));
            // Five standard errors of the mean; 3% of the variance.
            assert!(
                (mean - want_mean).abs() < 5.0 * (want_var / n).sqrt(),
                "({a}, {b}): mean {mean} vs {want_mean}"
            );
            assert!(
                (var - want_var).abs() < 0.03 * want_var,
                "({a}, {b}): variance {var} vs {want_var}"
            );
        }
    }

    #[test]
    fn gamma_columns_have_the_quantiles_of_rand_distrs_sampler() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut scratch = Scratch::default();
        let n = 400_000;
        for shape in [1.0, 1.5, 8.0, 50.0, 1e3, 1e5] {
            let exact = Gamma::new(shape, 1.0).unwrap();
            let mut column = vec![0f32; n];
            gamma_column(shape, &exact, &mut column, &mut scratch, &mut rng);
            let mut ours: Vec<f64> = column.into_iter().map(f64::from).collect();
            let mut theirs: Vec<f64> = (0..n).map(|_| exact.sample(&mut rng)).collect();
            ours.sort_by(f64::total_cmp);
            theirs.sort_by(f64::total_cmp);
            // Quantiles agree within five standard errors of their difference: the
            // standard error of a quantile is √(q(1 − q)/n) over the density there,
            // which the reference sample's spacing estimates.
            for q in [0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999] {
                let at = |q: f64| theirs[(q * n as f64) as usize];
                let h = 0.0005;
                let density = 2.0 * h / (at(q + h) - at(q - h));
                let se = (q * (1.0 - q) / n as f64).sqrt() / density;
                let (a, b) = (ours[(q * n as f64) as usize], at(q));
                assert!(
                    (a - b).abs() < 5.0 * std::f64::consts::SQRT_2 * se,
                    "shape {shape}, quantile {q}: {a} vs {b} (standard error {se})"
                );
            }
        }
    }

    #[test]
    fn the_vectorised_functions_match_the_standard_library() {
        for k in 1..10_000 {
            let x = k as f32 / 10_000.0;
            assert!(
                (ln(x) - x.ln()).abs() < 2e-6 * x.ln().abs().max(1.0),
                "ln {x}"
            );
            let (s, c) = sin_cos_of_turn(x);
            let angle = f64::from(x) * std::f64::consts::TAU;
            assert!((f64::from(s) - angle.sin()).abs() < 1e-6, "sin {x}");
            assert!((f64::from(c) - angle.cos()).abs() < 1e-6, "cos {x}");
        }
        for t in [-0.06f64, -1e-3, 1e-5, 0.03, 0.0624] {
            let v = (1.0 + t).powi(3);
            let direct = 1.0 - v + v.ln();
            assert!((one_minus_v_plus_ln_v(t) - direct).abs() < 1e-12, "{t}");
        }
    }
}
