//! Scoring the item table at memory speed: each user's top items by the inner product of
//! their vector with every item's row, exactly as an f32 scan would give them.
//!
//! The table is kept twice: row-major in f32 (the exact values) and as 8-bit codes with a
//! scale per row, in panels of [`LANES`] rows, so that one pass over a user vector gives
//! a panel's approximate scores in as many lanes with no sums across lanes. The codes are
//! a quarter of the f32 table's bytes, so a catalog of 100,000 items at width 32 (3.2 MB)
//! stays in the processor's cache between requests where the f32 table (12.8 MB) is read
//! from memory each time. The user vector is coded too, in 16 bits, and the products are
//! summed in exact integer arithmetic, two columns per multiply-add.
//!
//! The scan is exact, not approximate. Every approximate score comes with a bound on its
//! distance from the exact one: the codes round each value to within half a scale, so the
//! products differ by at most half the row's scale times the user vector's L1 norm, plus
//! the user's coding and the exact sum's rounding. A query keeps the k best lower bounds;
//! every item whose upper bound reaches the k-th of them may belong to the top k and is
//! scored again from the f32 row, in the f32 scan's own order of operations. The top k of
//! those exact scores is the f32 scan's top k, scores to the bit included.
//!
//! The panel loop runs with the widest vector instructions the processor has (AVX2 where
//! present), chosen at run time.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Rows scored together: one panel (a multiple of 8; 32 measured faster than 8 and 16).
const LANES: usize = 32;

/// Largest code magnitude: values are coded as `round(v / scale)` with
/// `scale = max |v| / CODE_MAX`.
const CODE_MAX: f32 = 127.0;

/// One user's request for [`ItemTable::top_ks`].
#[derive(Debug, Clone, Copy)]
pub struct TopK<'a> {
    /// The user vector.
    pub user: &'a [f32],
    /// Item indices not to return.
    pub exclude: &'a [u32],
    /// The user's history (item indices), for the encoder's repeat weight.
    pub history: &'a [u32],
    /// Score offsets by group: (group of every item index, offset of every group).
    pub offsets: Option<(&'a [u32], &'a [f32])>,
    /// How many to return.
    pub k: usize,
}

/// The item table (row 0 is padding), exact and coded.
#[derive(Debug, Clone)]
pub(crate) struct ItemTable {
    /// Row-major f32 values.
    exact: Vec<f32>,
    /// 8-bit codes in panels of [`LANES`] rows. Within a panel, by pairs of columns,
    /// then by row, the pair's two codes side by side; the last panel and, for an odd
    /// width, the last column are padded with zeros.
    codes: Vec<i8>,
    /// Every row's scale (zero for padding rows), padded like the panels.
    scales: Vec<f32>,
    /// The largest scale.
    max_scale: f32,
    width: usize,
    /// Pairs of columns: `width` / 2, rounded up.
    pairs: usize,
    rows: usize,
}

impl ItemTable {
    /// From a row-major table `width` wide, which it keeps as the exact values.
    pub(crate) fn new(mut table: Vec<f32>, width: usize) -> Self {
        let width = width.max(1);
        let rows = table.len() / width;
        let panels = rows.div_ceil(LANES);
        let pairs = width.div_ceil(2);
        let mut codes = vec![0i8; panels * LANES * 2 * pairs];
        let mut scales = vec![0f32; panels * LANES];
        for (i, row) in table.chunks_exact(width).enumerate() {
            let (p, r) = (i / LANES, i % LANES);
            let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / CODE_MAX;
            scales[i] = scale;
            if scale > 0.0 && scale.is_finite() {
                for (j, &v) in row.iter().enumerate() {
                    // In range by the choice of scale; the cast saturates NaN to 0.
                    codes[((p * pairs + j / 2) * LANES + r) * 2 + j % 2] =
                        (v / scale).round().clamp(-CODE_MAX, CODE_MAX) as i8;
                }
            }
        }
        table.truncate(rows * width);
        Self {
            exact: table,
            codes,
            max_scale: scales.iter().copied().fold(0.0, f32::max),
            scales,
            width,
            pairs,
            rows,
        }
    }

    /// Row `i`'s exact values.
    pub(crate) fn row(&self, i: usize) -> &[f32] {
        &self.exact[i * self.width..(i + 1) * self.width]
    }

    /// Each query's top (index, score) pairs, best first (ties: lower index first),
    /// reading the coded table once for all of them, a panel at a time. A score is the
    /// row's product with the user vector, plus its group's offset, plus `repeat` when the
    /// item is in the query's history. Index 0, excluded indices and non-finite scores are
    /// never returned.
    pub(crate) fn top_ks(&self, queries: &[TopK<'_>], repeat: Option<f32>) -> Vec<Vec<(u32, f32)>> {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            let scan = Scan {
                table: self,
                queries,
                repeat,
                dots: Avx2(simd),
            };
            return pulp::Simd::vectorize(simd, scan);
        }
        pulp::Arch::new().dispatch(Scan {
            table: self,
            queries,
            repeat,
            dots: Portable,
        })
    }

    /// Row `i`'s exact score for `q`, as the f32 scan computes it (`None`: not a score to
    /// return).
    fn exact_score(&self, i: usize, q: &TopK<'_>, repeat: Option<(f32, bool)>) -> Option<f32> {
        if i == 0 {
            return None;
        }
        let mut s = exact_dot(self.row(i), q.user);
        if let Some((groups, offsets)) = q.offsets
            && let Some(g) = groups.get(i)
        {
            s += offsets.get(*g as usize).copied().unwrap_or(0.0);
        }
        if let Some((w, true)) = repeat {
            s += w;
        }
        Some(s)
    }
}

/// The product of a row with a user vector in the order of operations of a panel's lanes
/// (four running sums over the columns, taken in turn; the columns past a multiple of
/// four go to the first), so that it is the exact scan's score to the bit.
fn exact_dot(row: &[f32], user: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let (r4, u4) = (row.as_chunks::<4>(), user.as_chunks::<4>());
    for (r, u) in r4.0.iter().zip(u4.0) {
        for a in 0..4 {
            acc[a] += r[a] * u[a];
        }
    }
    for (r, u) in r4.1.iter().zip(u4.1) {
        acc[0] += r * u;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// The products of one coded panel's rows with a coded user vector (`user`: one pair of
/// codes per pair of columns), exact in integers.
trait Dots {
    fn dots(&self, panel: &[i8], user: &[[i16; 2]]) -> [i32; LANES];
}

/// [`Dots`] in plain Rust, for the compiler to vectorise as it can.
struct Portable;

impl Dots for Portable {
    #[inline(always)]
    fn dots(&self, panel: &[i8], user: &[[i16; 2]]) -> [i32; LANES] {
        let mut acc = [0i32; LANES];
        for (pair, u) in panel.as_chunks::<{ 2 * LANES }>().0.iter().zip(user) {
            for (r, a) in acc.iter_mut().enumerate() {
                *a += i32::from(pair[2 * r]) * i32::from(u[0])
                    + i32::from(pair[2 * r + 1]) * i32::from(u[1]);
            }
        }
        acc
    }
}

/// [`Dots`] with AVX2: per pair of columns and eight rows, the 16 codes widened to 16
/// bits and multiplied by the user's pair with one multiply-add, which sums each row's
/// two products into its 32-bit lane; the user's pair is loaded once for the panel's
/// [`LANES`] rows.
#[cfg(target_arch = "x86_64")]
struct Avx2(pulp::x86::V3);

#[cfg(target_arch = "x86_64")]
impl Dots for Avx2 {
    #[inline(always)]
    fn dots(&self, panel: &[i8], user: &[[i16; 2]]) -> [i32; LANES] {
        use core::arch::x86_64::__m128i;
        let simd = self.0;
        // Eight rows per register.
        let mut acc = [simd.avx._mm256_setzero_si256(); LANES / 8];
        for (pair, u) in panel.as_chunks::<{ 2 * LANES }>().0.iter().zip(user) {
            // The pair in every 32-bit lane, the first column's code in the low half.
            let u = simd
                .avx
                ._mm256_set1_epi32(pulp::bytemuck::cast::<_, i32>(*u));
            let eighths: &[[i8; 16]; LANES / 8] = pulp::bytemuck::cast_ref(pair);
            for (acc, eighth) in acc.iter_mut().zip(eighths) {
                let codes = simd
                    .avx2
                    ._mm256_cvtepi8_epi16(pulp::bytemuck::cast::<_, __m128i>(*eighth));
                *acc = simd
                    .avx2
                    ._mm256_add_epi32(*acc, simd.avx2._mm256_madd_epi16(codes, u));
            }
        }
        pulp::bytemuck::cast(acc)
    }
}

/// The scan of [`ItemTable::top_ks`], run by `pulp` with the processor's vector
/// instructions.
struct Scan<'a, 'q, D> {
    table: &'a ItemTable,
    queries: &'a [TopK<'q>],
    repeat: Option<f32>,
    dots: D,
}

impl<D: Dots> pulp::WithSimd for Scan<'_, '_, D> {
    type Output = Vec<Vec<(u32, f32)>>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Self::Output {
        let Self {
            table,
            queries,
            repeat,
            dots,
        } = self;
        let mut picks: Vec<Pick> = queries
            .iter()
            .map(|q| Pick::new(q, repeat, table))
            .collect();
        let panel_codes = 2 * table.pairs * LANES;
        let panels = table.codes.chunks_exact(panel_codes);
        let scales = table.scales.as_chunks::<LANES>().0;
        for (p, (panel, scales)) in panels.zip(scales).enumerate() {
            let start = p * LANES;
            let len = LANES.min(table.rows - start);
            for (q, pick) in queries.iter().zip(&mut picks) {
                let mut scores = [0f32; LANES];
                let products = dots.dots(panel, &pick.code);
                for ((s, d), scale) in scores.iter_mut().zip(products).zip(scales) {
                    *s = d as f32 * (scale * pick.unit);
                }
                // Rows past the table's end, in the last panel.
                scores[len..].fill(f32::NEG_INFINITY);
                if start == 0 {
                    // Padding.
                    scores[0] = f32::NEG_INFINITY;
                }
                if let Some((groups, offsets)) = q.offsets {
                    for (s, g) in scores.iter_mut().zip(groups.get(start..).unwrap_or(&[])) {
                        *s += offsets.get(*g as usize).copied().unwrap_or(0.0);
                    }
                }
                pick.consider(&mut scores, scales, start, len, q.k);
            }
        }
        picks
            .into_iter()
            .zip(queries)
            .map(|(pick, q)| pick.finish(table, q))
            .collect()
    }
}

/// Sorted item indices walked in ascending order.
struct Cursor {
    indices: Vec<u32>,
    at: usize,
}

impl Cursor {
    fn new(indices: &[u32]) -> Self {
        let mut indices = indices.to_vec();
        indices.sort_unstable();
        indices.dedup();
        Self { indices, at: 0 }
    }

    /// Applies `f` to the scores of this cursor's indices in `start..start + scores.len()`.
    fn each(&mut self, scores: &mut [f32], start: usize, f: impl Fn(&mut f32)) {
        let end = start + scores.len();
        while let Some(&e) = self.indices.get(self.at).filter(|&&e| (e as usize) < end) {
            if let Some(s) = (e as usize)
                .checked_sub(start)
                .and_then(|i| scores.get_mut(i))
            {
                f(s);
            }
            self.at += 1;
        }
    }

    /// The same indices, walked again from the first.
    fn rewound(self) -> Self {
        Self { at: 0, ..self }
    }

    /// Whether an index not yet passed is below `end`.
    fn before(&self, end: usize) -> bool {
        self.indices
            .get(self.at)
            .is_some_and(|&e| (e as usize) < end)
    }

    /// Whether `i` is one of the indices (each asked once, in ascending order).
    fn has(&mut self, i: u32) -> bool {
        while self.indices.get(self.at).is_some_and(|&e| e < i) {
            self.at += 1;
        }
        self.indices.get(self.at) == Some(&i)
    }
}

/// One query's scan: its coded user vector, the k best lower bounds so far, the items
/// that may still belong to the top k, and where it is in its sorted exclusions and
/// history.
struct Pick {
    /// The user vector in 16-bit codes, by pairs of columns (the last padded with 0).
    code: Vec<[i16; 2]>,
    /// The user vector's scale: value ≈ code · `unit`.
    unit: f32,
    /// The bound on |approximate − exact| product per unit of a row's scale; `None` when
    /// the user vector is not finite or so large that products could overflow, and every
    /// item is a candidate.
    per_scale: Option<f32>,
    /// The k best lower bounds; its top is the k-th, below which no item can reach the
    /// top k.
    lower: BinaryHeap<Kept>,
    /// The k-th best lower bound (−∞ while fewer than k are known).
    floor: f32,
    /// Items (index, upper bound) whose upper bound reached the floor when scanned.
    candidates: Vec<(u32, f32)>,
    skip: Cursor,
    /// The history, with the repeat weight.
    seen: Option<(Cursor, f32)>,
}

impl Pick {
    fn new(q: &TopK<'_>, repeat: Option<f32>, table: &ItemTable) -> Self {
        let width = table.width as f64;
        let l1: f64 = q.user.iter().map(|v| f64::from(v.abs())).sum();
        let max = q.user.iter().fold(0f32, |m, v| m.max(v.abs()));
        // |product| ≤ |u|₁ · max |v| for the exact and the coded values alike.
        let bounded = l1 * f64::from(CODE_MAX) * f64::from(table.max_scale) < 1e35;
        // The integer sums must not overflow: |code sum| ≤ CODE_MAX · 2·pairs · top.
        let top = (f64::from(i32::MAX) / (f64::from(CODE_MAX) * 2.0 * table.pairs as f64))
            .min(f64::from(i16::MAX))
            .floor() as f32;
        let unit = if max > 0.0 && bounded { max / top } else { 0.0 };
        let mut code = vec![[0i16; 2]; table.pairs];
        if unit > 0.0 {
            for (j, &v) in q.user.iter().enumerate() {
                // In range by the choice of unit.
                code[j / 2][j % 2] = (v / unit).round().clamp(-top, top) as i16;
            }
        }
        // Per unit of row scale: half a code of the row per value times |u|₁, the user's
        // half a code times CODE_MAX per column, and the rounding of the exact sum and of
        // the approximate score (each at most (width + 8)·2⁻²⁴ of CODE_MAX · |u|₁), with
        // a margin for computing the bound itself.
        let u = f64::from(unit);
        let eps = f64::from(f32::EPSILON) / 2.0;
        let per_scale = 1.01
            * (0.5 * l1
                + 0.5 * f64::from(CODE_MAX) * width * u
                + f64::from(CODE_MAX) * (width + 8.0) * eps * (l1 + width * u))
            + 1e-30;
        Self {
            code,
            unit,
            per_scale: bounded.then_some(per_scale as f32),
            lower: BinaryHeap::with_capacity(q.k + 1),
            floor: f32::NEG_INFINITY,
            candidates: Vec::new(),
            skip: Cursor::new(q.exclude),
            seen: repeat.map(|w| (Cursor::new(q.history), w)),
        }
    }

    /// Takes the approximate `scores` of indices `start..start + len` (offsets added; the
    /// lanes past `len` −∞), with their rows' `scales`.
    #[inline(always)]
    fn consider(
        &mut self,
        scores: &mut [f32; LANES],
        scales: &[f32; LANES],
        start: usize,
        len: usize,
        k: usize,
    ) {
        let Some(per_scale) = self.per_scale else {
            self.candidates
                .extend((start..start + len).map(|i| (i as u32, f32::INFINITY)));
            return;
        };
        // Most panels hold no item that could reach the top k. The history's items may
        // gain the repeat weight, so a panel with one of them is looked at whole;
        // exclusions only lower scores.
        let end = start + len;
        if !self.seen.as_ref().is_some_and(|(h, _)| h.before(end)) {
            let mut reach = false;
            for (s, scale) in scores.iter().zip(scales) {
                reach |= s + bound(*s, per_scale * scale) >= self.floor;
            }
            if !reach {
                return;
            }
        }
        self.admit(scores, scales, start, k, per_scale);
    }

    /// [`Pick::consider`] for a panel with items that may reach the top k.
    fn admit(
        &mut self,
        scores: &mut [f32; LANES],
        scales: &[f32; LANES],
        start: usize,
        k: usize,
        per_scale: f32,
    ) {
        if let Some((seen, w)) = &mut self.seen {
            seen.each(scores, start, |s| *s += *w);
        }
        self.skip.each(scores, start, |s| *s = f32::NEG_INFINITY);
        let mut bounds = [0f32; LANES];
        for ((b, s), scale) in bounds.iter_mut().zip(&*scores).zip(scales) {
            *b = bound(*s, per_scale * scale);
        }
        for (i, (&s, &b)) in scores.iter().zip(&bounds).enumerate() {
            keep(&mut self.lower, s - b, (start + i) as u32, k);
        }
        if let Some(kth) = self.lower.peek()
            && self.lower.len() >= k
        {
            self.floor = kth.score;
        }
        for (i, (&s, &b)) in scores.iter().zip(&bounds).enumerate() {
            if s + b >= self.floor {
                self.candidates.push(((start + i) as u32, s + b));
            }
        }
        if self.candidates.len() > 4 * k + 64 {
            let floor = self.floor;
            self.candidates.retain(|&(_, upper)| upper >= floor);
        }
    }

    /// The top k of the candidates by exact score, best first.
    fn finish(self, table: &ItemTable, q: &TopK<'_>) -> Vec<(u32, f32)> {
        let floor = self.floor;
        // The candidates come in ascending order too: the cursors walk again from the start.
        let mut skip = self.skip.rewound();
        let mut seen = self.seen.map(|(history, w)| (history.rewound(), w));
        let mut heap = BinaryHeap::with_capacity(q.k + 1);
        for (i, upper) in self.candidates {
            // Upper bounds are never NaN: only those that reached a floor were kept.
            if upper < floor || skip.has(i) {
                continue;
            }
            let repeat = seen.as_mut().map(|(history, w)| (*w, history.has(i)));
            if let Some(s) = table.exact_score(i as usize, q, repeat) {
                keep(&mut heap, s, i, q.k);
            }
        }
        heap.into_sorted_vec()
            .into_iter()
            .map(|k| (k.idx, k.score))
            .collect()
    }
}

/// The bound on |approximate − exact| score for an approximate score `score` whose
/// product is within `products` of the exact one: the additions of the offset and the
/// repeat weight round too.
#[inline(always)]
fn bound(score: f32, products: f32) -> f32 {
    products + (score.abs() + products) * (4.0 * f32::EPSILON)
}

/// Keeps (`score`, `idx`) among the best `k` of `heap` (indices come in ascending order).
fn keep(heap: &mut BinaryHeap<Kept>, score: f32, idx: u32, k: usize) {
    if !score.is_finite() || k == 0 {
        return;
    }
    // A later index ties worse, so an equal score never displaces a kept one.
    match heap.peek() {
        Some(worst) if heap.len() >= k => {
            if score > worst.score {
                heap.pop();
                heap.push(Kept { score, idx });
            }
        }
        _ => heap.push(Kept { score, idx }),
    }
}

/// A kept (score, index), ordered best first: the heap's top is the worst kept.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Kept {
    score: f32,
    idx: u32,
}

impl Eq for Kept {}

impl Ord for Kept {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.idx.cmp(&other.idx))
    }
}

impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The top k of every row's exact score, by the definition: the f32 product (in the
    /// scan's order of operations), plus the offset, plus the repeat weight.
    fn brute_force(
        table: &[f32],
        width: usize,
        q: &TopK<'_>,
        repeat: Option<f32>,
    ) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = table
            .chunks_exact(width)
            .enumerate()
            .skip(1)
            .filter(|(i, _)| !q.exclude.contains(&(*i as u32)))
            .map(|(i, row)| {
                let mut s = exact_dot(row, q.user);
                if let Some((groups, offsets)) = q.offsets
                    && let Some(g) = groups.get(i)
                {
                    s += offsets.get(*g as usize).copied().unwrap_or(0.0);
                }
                if let Some(w) = repeat
                    && q.history.contains(&(i as u32))
                {
                    s += w;
                }
                (i as u32, s)
            })
            .filter(|(_, s)| s.is_finite())
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(q.k);
        all
    }

    /// A table of `rows` rows whose sizes differ by orders of magnitude, with blocks of
    /// exact duplicates (ties), an all-zero row and a row of tiny values.
    fn table(rng: &mut SplitMix64, rows: usize, width: usize) -> Vec<f32> {
        let mut t: Vec<f32> = (0..rows * width)
            .map(|i| (rng.normal() * 10f64.powi((i / width % 5) as i32 - 2)) as f32)
            .collect();
        if rows >= 32 {
            let first = t[10 * width..11 * width].to_vec();
            for r in 11..20 {
                t[r * width..(r + 1) * width].copy_from_slice(&first);
            }
            t[30 * width..31 * width].fill(0.0);
            t[31 * width..32 * width]
                .iter_mut()
                .for_each(|v| *v *= 1e-38);
        }
        if rows >= 300 {
            // Near-ties, closer than the codes can tell apart: the exact scores decide.
            let base = t[40 * width..41 * width].to_vec();
            for r in 41..300 {
                for (v, b) in t[r * width..(r + 1) * width].iter_mut().zip(&base) {
                    *v = b * (1.0 + (rng.normal() * 1e-3) as f32);
                }
            }
        }
        t
    }

    #[test]
    fn the_scan_returns_the_exact_top_k_to_the_bit() {
        let mut rng = SplitMix64::new(5);
        for (rows, width) in [(5003, 32), (801, 13), (9, 4), (1, 8)] {
            let t = table(&mut rng, rows, width);
            let items = ItemTable::new(t.clone(), width);
            let groups: Vec<u32> = (0..rows as u32 / 2).map(|i| i % 5).collect();
            let offsets = [0.5f32, -1.0, 0.0, 2.0, 0.25];
            let exclude: Vec<u32> = (0..rows as u32).step_by(13).collect();
            let history: Vec<u32> = (0..rows as u32).step_by(7).chain([3, 3]).collect();
            let users: Vec<Vec<f32>> = (0..24)
                .map(|u| match u {
                    // The duplicated row itself: its copies tie at the top.
                    0 if rows >= 32 => t[10 * width..11 * width].to_vec(),
                    1 | 2 if rows >= 300 => t[40 * width..41 * width].to_vec(),
                    _ => (0..width)
                        .map(|_| (rng.normal() * 10f64.powi(u % 4 - 1)) as f32)
                        .collect(),
                })
                .collect();
            for repeat in [None, Some(0.3)] {
                let queries: Vec<TopK> = users
                    .iter()
                    .enumerate()
                    .map(|(u, user)| TopK {
                        user,
                        exclude: if u % 3 == 0 { &[] } else { &exclude },
                        history: &history,
                        offsets: (u % 2 == 1).then_some((&groups[..], &offsets[..])),
                        k: [1, 10, 50, 0, rows + 5][u % 5],
                    })
                    .collect();
                // All queries in one scan, as a batch is served; and the plain Rust
                // products that processors without AVX2 get.
                let got = items.top_ks(&queries, repeat);
                let portable = pulp::Arch::new().dispatch(Scan {
                    table: &items,
                    queries: &queries,
                    repeat,
                    dots: Portable,
                });
                assert_eq!(got, portable);
                for (u, (q, got)) in queries.iter().zip(&got).enumerate() {
                    let want = brute_force(&t, width, q, repeat);
                    assert_eq!(
                        got.iter()
                            .map(|&(i, s)| (i, s.to_bits()))
                            .collect::<Vec<_>>(),
                        want.iter()
                            .map(|&(i, s)| (i, s.to_bits()))
                            .collect::<Vec<_>>(),
                        "{rows} rows of {width}, user {u}, k {}, repeat {repeat:?}",
                        q.k
                    );
                }
            }
        }
    }

    #[test]
    fn users_that_are_not_finite_get_only_finite_scores() {
        let mut rng = SplitMix64::new(9);
        let width = 8;
        let t = table(&mut rng, 300, width);
        let items = ItemTable::new(t.clone(), width);
        let mut huge = vec![3e38f32; width];
        huge[1] = -3e38;
        // Finite products of the exact rows, but past f32 in the codes' sums.
        let large: Vec<f32> = (0..width).map(|j| [-1e36, 1e36][j % 2]).collect();
        for user in [vec![f32::NAN; width], huge, large, {
            let mut v = vec![0.5f32; width];
            v[2] = f32::INFINITY;
            v
        }] {
            let q = TopK {
                user: &user,
                exclude: &[],
                history: &[],
                offsets: None,
                k: 10,
            };
            let got = items.top_ks(&[q], None);
            assert_eq!(got[0], brute_force(&t, width, &q, None), "{user:?}");
        }
    }
}
