//! Thompson's joint draws, stored a column per candidate: mixing them with the personal
//! ranking and finding each draw's best remaining candidate run down the columns, every
//! draw in its own lane, in passes the compiler vectorises (with AVX2 where the processor
//! has it, chosen at run time). Row-wise, each step would walk 50 scattered values.
//!
//! The arithmetic per draw is the row-wise one, in the same order, so the results are the
//! same to the bit: a draw's values are summed candidate by candidate for its mean and
//! variance, and its best is the first of its largest values.

use std::ops::Range;

/// `rows` joint draws of `m` candidates' values: value (r, i) at `cols[i * rows + r]`.
pub(crate) struct Draws {
    rows: usize,
    cols: Vec<f64>,
}

impl Draws {
    /// `rows` draws of `m` candidates, all 0.
    pub(crate) fn zeros(rows: usize, m: usize) -> Self {
        Self {
            rows,
            cols: vec![0.0; rows * m],
        }
    }

    /// How many draws.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// The draws of every candidate, each a column of `rows` values, in candidate order.
    pub(crate) fn columns_mut(&mut self) -> std::slice::ChunksExactMut<'_, f64> {
        self.cols.chunks_exact_mut(self.rows.max(1))
    }

    /// Replaces every draw's values v by w·`personal` + (1 − w)·z(v), with z the standard
    /// score over the draw's candidates (0 when they do not vary) and `personal` already
    /// weighted by w: as [`crate::policy`]'s row-wise mix does.
    pub(crate) fn mix(&mut self, personal: &[f64], weight: f64) {
        if self.rows == 0 {
            return;
        }
        pulp::Arch::new().dispatch(MixPass {
            rows: self.rows,
            cols: &mut self.cols,
            personal,
            weight,
        });
    }

    /// For each draw in `rows`, the index of its best candidate among those not `taken`
    /// (at least one is not): the first of the largest values.
    pub(crate) fn best(&self, rows: Range<usize>, taken: &[bool]) -> Vec<usize> {
        let mut best = vec![0; rows.len()];
        if best.is_empty() {
            return best;
        }
        pulp::Arch::new().dispatch(BestPass {
            rows: self.rows,
            cols: &self.cols,
            range: rows,
            taken,
            best: &mut best,
        });
        best
    }

    /// [`Draws::best`] of one draw.
    pub(crate) fn best_of(&self, row: usize, taken: &[bool]) -> usize {
        let column = self.cols.iter().skip(row).step_by(self.rows.max(1));
        let mut best: Option<(usize, f64)> = None;
        for (i, (&v, &t)) in column.zip(taken).enumerate() {
            if !t && best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
        best.map_or(0, |(i, _)| i)
    }
}

/// [`Draws::mix`]'s passes: each draw's sum, then its squared deviations, then the mix.
struct MixPass<'a> {
    rows: usize,
    cols: &'a mut [f64],
    personal: &'a [f64],
    weight: f64,
}

impl pulp::WithSimd for MixPass<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Self {
            rows,
            cols,
            personal,
            weight,
        } = self;
        let n = (cols.len() / rows).max(1) as f64;
        let mut mean = vec![0.0; rows];
        for column in cols.chunks_exact(rows) {
            for (s, &v) in mean.iter_mut().zip(column) {
                *s += v;
            }
        }
        mean.iter_mut().for_each(|s| *s /= n);
        let mut sd = vec![0.0; rows];
        for column in cols.chunks_exact(rows) {
            for ((s, &v), &m) in sd.iter_mut().zip(column).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        sd.iter_mut().for_each(|s| *s = (*s / n).sqrt());
        for (column, &p) in cols.chunks_exact_mut(rows).zip(personal) {
            for ((v, &m), &s) in column.iter_mut().zip(&mean).zip(&sd) {
                let z = if s > 1e-12 { (*v - m) / s } else { 0.0 };
                *v = p + (1.0 - weight) * z;
            }
        }
    }
}

/// [`Draws::best`]'s pass, [`BLOCK`] draws at a time: their best so far stays in
/// registers while the candidates' columns go by.
struct BestPass<'a> {
    rows: usize,
    cols: &'a [f64],
    range: Range<usize>,
    taken: &'a [bool],
    best: &'a mut [usize],
}

/// Draws whose best values one pass of [`BestPass`] keeps in registers.
const BLOCK: usize = 16;

impl pulp::WithSimd for BestPass<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Self {
            rows,
            cols,
            range,
            taken,
            best,
        } = self;
        let open: Vec<usize> = (0..taken.len()).filter(|&i| !taken[i]).collect();
        let Some((&first, rest)) = open.split_first() else {
            return;
        };
        let mut blocks = best.chunks_exact_mut(BLOCK);
        let mut at = range.start;
        for out in blocks.by_ref() {
            best_of_block::<BLOCK>(cols, rows, at, (first, rest), out);
            at += BLOCK;
        }
        for out in blocks.into_remainder().chunks_exact_mut(1) {
            best_of_block::<1>(cols, rows, at, (first, rest), out);
            at += 1;
        }
    }
}

/// The best candidate of draws `at..at + N` into `out`: the first of `open`'s columns with
/// the largest value.
#[inline(always)]
fn best_of_block<const N: usize>(
    cols: &[f64],
    rows: usize,
    at: usize,
    (first, rest): (usize, &[usize]),
    out: &mut [usize],
) {
    let column = |i: usize| &cols[i * rows + at..i * rows + at + N];
    let mut value = [0.0; N];
    value.copy_from_slice(column(first));
    let mut index = [first; N];
    for &i in rest {
        let c = column(i);
        for l in 0..N {
            let better = c[l] > value[l];
            value[l] = if better { c[l] } else { value[l] };
            index[l] = if better { i } else { index[l] };
        }
    }
    out.copy_from_slice(&index);
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(rows: usize, m: usize, rng: &mut SmallRng) -> (Draws, Vec<Vec<f64>>) {
        let mut draws = Draws::zeros(rows, m);
        for column in draws.columns_mut() {
            column.iter_mut().for_each(|v| *v = rng.random());
        }
        let by_row = (0..rows)
            .map(|r| (0..m).map(|i| draws.cols[i * rows + r]).collect())
            .collect();
        (draws, by_row)
    }

    #[test]
    fn mixes_each_draw_as_the_row_wise_mix_does_to_the_bit() {
        let mut rng = SmallRng::seed_from_u64(3);
        let (rows, m, weight) = (37, 11, 0.7);
        let (mut draws, by_row) = random(rows, m, &mut rng);
        // One draw with no spread: its standard scores are 0.
        for column in draws.columns_mut() {
            column[5] = 0.25;
        }
        let scores: Vec<f64> = (0..m).map(|_| rng.random()).collect();
        let personal: Vec<f64> = crate::policy::z(&scores)
            .into_iter()
            .map(|v| weight * v)
            .collect();
        draws.mix(&personal, weight);
        for (r, row) in by_row.iter().enumerate() {
            let row = if r == 5 { vec![0.25; m] } else { row.clone() };
            let z = crate::policy::z(&row);
            for i in 0..m {
                let expected = personal[i] + (1.0 - weight) * z[i];
                assert_eq!(draws.cols[i * rows + r].to_bits(), expected.to_bits());
            }
        }
    }

    #[test]
    fn finds_the_first_largest_value_among_the_candidates_not_taken() {
        let mut rng = SmallRng::seed_from_u64(4);
        let (rows, m) = (53, 9);
        let (mut draws, mut by_row) = random(rows, m, &mut rng);
        // Ties go to the earlier candidate.
        for (i, column) in draws.columns_mut().enumerate() {
            column[7] = if i % 3 == 1 { 2.0 } else { 1.0 };
            by_row[7][i] = column[7];
        }
        for taken in [vec![false; m], (0..m).map(|i| i % 4 == 1).collect()] {
            let best = draws.best(3..rows, &taken);
            for (r, row) in by_row.iter().enumerate() {
                let expected = (0..m)
                    .filter(|&i| !taken[i])
                    .fold(None, |b: Option<usize>, i| match b {
                        Some(b) if row[b] >= row[i] => Some(b),
                        _ => Some(i),
                    })
                    .unwrap();
                assert_eq!(draws.best_of(r, &taken), expected, "draw {r}");
                if r >= 3 {
                    assert_eq!(best[r - 3], expected, "draw {r}");
                }
            }
        }
        assert_eq!(draws.best_of(7, &vec![false; m]), 1);
    }
}
