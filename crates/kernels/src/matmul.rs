//! `y = x · wᵀ` with the weight in its checkpoint layout `[out, in]`: every weight matmul of the model.
//!
//! Decode steps multiply a handful of activation rows by weights far larger than the caches, so the
//! cost is reading the weight. candle's gemm repacks the weight on every call once there are two or
//! more rows (5× slower than one row for `lm_head`); this kernel instead streams each weight row from
//! memory once per block of up to [`M_BLOCK`] activation rows and dots it with those rows while they
//! sit in cache, in register tiles of [`MR`] activation rows × [`NR`] weight rows whose accumulators
//! stay in registers over the whole of `k`.
//!
//! Each output element is accumulated the same way whatever the tile, the block or the number of rows
//! ([`LANES`] lanes over `k`, in order, a fixed tree over the lanes, then the tail), so a sequence's
//! logits do not depend on which other sequences share its batch.
//!
//! The weight is f32 or bf16 ([`WeightElem`]): bf16 checkpoints stay bf16 in memory and the tiles
//! widen each value as they load it, which is exact, so the products are those of the f32 copy at half
//! the bytes read.

use std::cell::RefCell;

use half::bf16;
use rayon::prelude::*;

/// Accumulator lanes per output element: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;
/// Activation rows per register tile.
const MR: usize = 4;
/// Weight rows per register tile.
const NR: usize = 6;
/// Activation rows kept in cache while the weight streams past (64 rows of 2048 floats: 512 KiB).
const M_BLOCK: usize = 64;
/// Weight rows per parallel task (a multiple of [`NR`]).
const N_BLOCK: usize = 8 * NR;

type Lanes = [f32; LANES];

thread_local! {
    /// The activation block in panels ([`pack_panels`]), kept between calls: a fresh buffer of
    /// this size comes from `mmap` and costs a page fault per 4 KiB on every step.
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A weight value type the tiles widen to f32 as they load it. The loads are `#[inline]` because
/// the tiles are instantiated in the calling crate: a call per load would cost more than the load.
pub trait WeightElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// Sixteen values from `p`, widened.
    ///
    /// # Safety
    /// `p` points to 16 readable values and the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx512(p: *const Self) -> std::arch::x86_64::__m512;

    /// The order in which [`WeightElem::load8_avx2`] splits sixteen values into two 8-lane halves;
    /// the activation panels are packed in the same order, so that each lane still sums the same
    /// products as on the other instruction sets.
    const AVX2_ORDER: [usize; LANES];

    /// Half `H` (0 or 1) of the sixteen values at `p` in [`WeightElem::AVX2_ORDER`], widened.
    ///
    /// # Safety
    /// `p` points to 16 readable values and the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8_avx2<const H: usize>(p: *const Self) -> std::arch::x86_64::__m256;
}

/// Values in memory order.
const NATURAL: [usize; LANES] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

impl WeightElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16_avx512(p: *const f32) -> std::arch::x86_64::__m512 {
        // Safety (caller): 16 floats at `p`.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }

    const AVX2_ORDER: [usize; LANES] = NATURAL;

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8_avx2<const H: usize>(p: *const f32) -> std::arch::x86_64::__m256 {
        // Safety (caller): 16 floats at `p`.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p.add(8 * H)) }
    }
}

/// bf16 is the top half of an f32: widening shifts the bits up by 16.
impl WeightElem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16_avx512(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // Safety (caller): 16 bf16 (32 bytes) at `p`.
        unsafe {
            let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
        }
    }

    /// Even values first, then odd ones: each 32-bit lane holds a pair, the even value in its low
    /// half (shifted up) and the odd one in its high half (masked), one instruction per half
    /// instead of a widening and a shift.
    const AVX2_ORDER: [usize; LANES] = [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15];

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8_avx2<const H: usize>(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // Safety (caller): 16 bf16 (32 bytes) at `p`.
        let pairs = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        let half = match H {
            0 => _mm256_slli_epi32::<16>(pairs),
            _ => _mm256_and_si256(pairs, _mm256_set1_epi32(0xffff_0000u32 as i32)),
        };
        _mm256_castsi256_ps(half)
    }
}

/// `y[i, j] = Σ_p x[i, p] · w[j, p]` for `x: [m, k]`, `w: [n, k]`; returns `y: [m, n]`.
pub fn matmul_wt<W: WeightElem>(x: &[f32], w: &[W], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut ys = matmul_wt_grouped(&[Product { x, w, m, k, n }]);
    ys.pop().expect("one product")
}

/// One product of [`matmul_wt_grouped`]: `x: [m, k]` against `w: [n, k]`.
pub struct Product<'a, W> {
    pub x: &'a [f32],
    pub w: &'a [W],
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// Independent products in one parallel pass, e.g. the experts of a MoE layer over their few rows
/// each; returns each `y: [m, n]`. One pass keeps both cores streaming weights from the first
/// product to the last, where a call per product waits for its slowest task and restarts.
pub fn matmul_wt_grouped<W: WeightElem>(products: &[Product<W>]) -> Vec<Vec<f32>> {
    for p in products {
        assert_eq!(p.x.len(), p.m * p.k, "x is not [m, k]");
        assert_eq!(p.w.len(), p.n * p.k, "w is not [n, k]");
    }
    let simd = simd();
    let mut ys: Vec<Vec<f32>> = products.iter().map(|p| vec![0f32; p.m * p.n]).collect();
    let outs: Vec<Output> = ys.iter_mut().zip(products).map(|(y, p)| Output { y: y.as_mut_ptr(), n: p.n }).collect();
    // Blocks of up to M_BLOCK rows of each product: (product, first row, offset of its panels).
    let mut blocks = Vec::new();
    let mut panels_len = 0;
    for (g, p) in products.iter().enumerate() {
        for i0 in (0..p.m).step_by(M_BLOCK) {
            blocks.push((g, i0, panels_len));
            panels_len += panels_size(M_BLOCK.min(p.m - i0), p.k);
        }
    }
    let tasks: Vec<(usize, usize)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(b, &(g, _, _))| (0..products[g].n.div_ceil(N_BLOCK)).map(move |t| (b, t)))
        .collect();
    let run = |panels: &mut Vec<f32>| {
        panels.clear();
        panels.resize(panels_len, 0.0);
        for &(g, i0, at) in &blocks {
            let p = &products[g];
            let mb = M_BLOCK.min(p.m - i0);
            let x = &p.x[i0 * p.k..(i0 + mb) * p.k];
            pack_panels(x, p.k, simd.lane_order::<W>(), &mut panels[at..at + panels_size(mb, p.k)]);
        }
        let panels = &panels[..];
        tasks.par_iter().for_each(|&(b, task)| {
            let (g, i0, at) = blocks[b];
            let (p, out) = (&products[g], outs[g]);
            let (k, mb) = (p.k, M_BLOCK.min(p.m - i0));
            let (j0, j1) = (task * N_BLOCK, p.n.min((task + 1) * N_BLOCK));
            let xb = &p.x[i0 * k..(i0 + mb) * k];
            task_block(simd, xb, &panels[at..], &p.w[j0 * k..j1 * k], k, |i, j, v| {
                // Safety: i < mb and j < j1 - j0 index this product's `y: [m, n]`, and only this
                // task writes its columns j0..j1 of these rows.
                unsafe { out.write(i0 + i, j0 + j, v) }
            });
        });
    };
    // A nested call on the same thread (from inside a rayon task) gets a buffer of its own.
    PANELS.with(|panels| match panels.try_borrow_mut() {
        Ok(mut panels) => run(&mut panels),
        Err(_) => run(&mut Vec::new()),
    });
    ys
}

/// The result, written in place by the tasks (each owns a range of its columns): gathering
/// per-task results instead cost a serial copy of the whole output, 5 % of a 16-row call.
#[derive(Clone, Copy)]
struct Output {
    y: *mut f32,
    n: usize,
}

// Safety: the tasks write disjoint elements, and `y` outlives them.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// # Safety
    /// `(i, j)` is inside the result and no other thread accesses it.
    unsafe fn write(self, i: usize, j: usize, v: f32) {
        debug_assert!(j < self.n);
        // Safety (caller).
        unsafe { *self.y.add(i * self.n + j) = v }
    }
}

/// Floats [`pack_panels`] writes for `mb` rows of `k`.
fn panels_size(mb: usize, k: usize) -> usize {
    mb.div_ceil(MR) * MR * (k - k % LANES)
}

/// Copies the lanes part of the activation rows `x: [mb, k]` into panels of [`MR`] rows (the last
/// padded with zeros), each panel `[k / LANES][MR][LANES]`, each group of [`LANES`] values in the
/// `order` the tile loads the weight in: a tile then reads its rows as one sequential stream (read
/// in place, rows `k` floats apart, 8 KiB for k = 2048, all map to the same L1 cache set, as the
/// weight rows do). `panels` holds [`panels_size`] floats, zeroed.
fn pack_panels(x: &[f32], k: usize, order: [usize; LANES], panels: &mut [f32]) {
    let chunks = k / LANES;
    for (i, row) in x.chunks_exact(k).enumerate() {
        let panel = &mut panels[(i / MR) * MR * chunks * LANES..];
        for (q, lanes) in row.chunks_exact(LANES).enumerate() {
            let dst = &mut panel[(q * MR + i % MR) * LANES..][..LANES];
            for (d, &l) in dst.iter_mut().zip(&order) {
                *d = lanes[l];
            }
        }
    }
}

/// One task: the weight rows of `w` against the activation rows of `x` (also packed in `panels`);
/// hands `y[i, j]` to `out(i, j, y)` once each.
fn task_block<W: WeightElem>(
    simd: Simd,
    x: &[f32],
    panels: &[f32],
    w: &[W],
    k: usize,
    mut out: impl FnMut(usize, usize, f32),
) {
    let (mb, nb) = (x.len() / k, w.len() / k);
    let body = k - k % LANES;
    for jt in (0..nb).step_by(NR) {
        for it in (0..mb).step_by(MR) {
            let tile = Tile { x: &panels[it * body..], w: &w[jt * k..], k, body };
            let (rows, cols) = (MR.min(mb - it), NR.min(nb - jt));
            let sums = tile.run(simd, rows, cols);
            for (r, row) in sums.iter().enumerate().take(rows) {
                for (c, sum) in row.iter().enumerate().take(cols) {
                    let (i, j) = (it + r, jt + c);
                    let tail: f32 = (body..k).map(|p| x[i * k + p] * w[j * k + p].to_f32()).sum();
                    out(i, j, sum + tail);
                }
            }
        }
    }
}

/// The lanes of one output element summed by a fixed tree (lane `l` takes lane `l + width` for width
/// 8, 4, 2, 1): the order every instruction set follows.
fn reduce(mut lanes: Lanes) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

/// One register tile over the first `body` columns (a multiple of [`LANES`]): the activation panel
/// `x` ([`pack_panels`]) against weight rows starting at `w`, of stride `k`. Returns the reduced sum
/// of element (row r, weight row c) at `[r][c]`; the accumulators never leave the registers.
struct Tile<'a, W> {
    x: &'a [f32],
    w: &'a [W],
    k: usize,
    body: usize,
}

type Sums = [[f32; NR]; MR];

impl<W: WeightElem> Tile<'_, W> {
    fn run(&self, simd: Simd, rows: usize, cols: usize) -> Sums {
        macro_rules! dispatch {
            ($(($r:literal, $c:literal)),*) => {
                match (rows, cols) {
                    $(($r, $c) => self.tile::<$r, $c>(simd),)*
                    _ => unreachable!("tile {rows}x{cols} exceeds {MR}x{NR}"),
                }
            };
        }
        dispatch!(
            (1, 1),
            (1, 2),
            (1, 3),
            (1, 4),
            (1, 5),
            (1, 6),
            (2, 1),
            (2, 2),
            (2, 3),
            (2, 4),
            (2, 5),
            (2, 6),
            (3, 1),
            (3, 2),
            (3, 3),
            (3, 4),
            (3, 5),
            (3, 6),
            (4, 1),
            (4, 2),
            (4, 3),
            (4, 4),
            (4, 5),
            (4, 6)
        )
    }

    fn tile<const R: usize, const C: usize>(&self, simd: Simd) -> Sums {
        assert!(self.x.len() >= self.body * MR && self.w.len() >= (C - 1) * self.k + self.body);
        assert!(R <= MR && C <= NR && self.body.is_multiple_of(LANES));
        let mut sums = [[0f32; NR]; MR];
        match simd {
            // Safety: `simd()` found the features on this CPU, and the asserts above hold the panel
            // and C weight rows covering `body`.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { self.avx512::<R, C>(&mut sums) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { self.avx2::<R, C>(&mut sums) },
            Simd::Portable => self.portable::<R, C>(&mut sums),
        }
        sums
    }

    fn portable<const R: usize, const C: usize>(&self, sums: &mut Sums) {
        let mut tile = [[[0f32; LANES]; C]; R];
        for p in (0..self.body).step_by(LANES) {
            for (r, row) in tile.iter_mut().enumerate() {
                let xs = &self.x[p * MR + r * LANES..][..LANES];
                for (c, lanes) in row.iter_mut().enumerate() {
                    let ws = &self.w[c * self.k + p..][..LANES];
                    for l in 0..LANES {
                        lanes[l] = xs[l].mul_add(ws[l].to_f32(), lanes[l]);
                    }
                }
            }
        }
        for (r, row) in tile.iter().enumerate() {
            for (c, lanes) in row.iter().enumerate() {
                sums[r][c] = reduce(*lanes);
            }
        }
    }

    // The SIMD loops index plain arrays instead of calling closures (`array::from_fn`, `map`):
    // a closure does not inherit the function's target features and ends up as a call per load.
    // Indices also keep the registers of a row, a weight row and the tile in step.

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn avx512<const R: usize, const C: usize>(&self, sums: &mut Sums) {
        use std::arch::x86_64::*;
        let (x, w, k) = (self.x.as_ptr(), self.w.as_ptr(), self.k);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut xs = [_mm512_setzero_ps(); R];
        // Safety (caller): the panel and rows c < C of w cover `body`.
        unsafe {
            for p in (0..self.body).step_by(LANES) {
                for r in 0..R {
                    xs[r] = _mm512_loadu_ps(x.add(p * MR + r * LANES));
                }
                for c in 0..C {
                    let ws = W::load16_avx512(w.add(c * k + p));
                    // The weight comes from memory: ask for the next weight rows now, so that
                    // they arrive while the tiles over these rows (one per 4 activation rows)
                    // compute. Into L2, not L1: T0 made 16-row calls 1.3× slower. A prefetch
                    // past the weight does not fault.
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((c + NR) * k + p) as *const i8);
                    for r in 0..R {
                        acc[r][c] = _mm512_fmadd_ps(xs[r], ws, acc[r][c]);
                    }
                }
            }
            // Through memory and a call: reducing the registers with shuffles here made the
            // compiler spill the accumulators inside the loop (it used only 21 of the 32
            // registers), 2× slower.
            let mut lanes = [[[0f32; LANES]; C]; R];
            for r in 0..R {
                for c in 0..C {
                    _mm512_storeu_ps(lanes[r][c].as_mut_ptr(), acc[r][c]);
                }
            }
            reduce_avx512(&lanes, sums);
        }
    }

    /// AVX2 has 16 registers: the tile runs as sub-tiles of up to 2 activation rows × 3 weight rows,
    /// each element's lanes in two 8-lane registers (12 accumulators), so that each weight load and
    /// widening feeds two rows. Over the sub-tiles the weight rows stay in cache.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const R: usize, const C: usize>(&self, sums: &mut Sums) {
        for c0 in (0..C).step_by(3) {
            for r0 in (0..R).step_by(2) {
                // Safety (caller): as for `avx512`; the sub-tile lies inside the R×C tile.
                unsafe {
                    match ((R - r0).min(2), (C - c0).min(3)) {
                        (1, 1) => self.avx2_sub::<1, 1>(r0, c0, sums),
                        (1, 2) => self.avx2_sub::<1, 2>(r0, c0, sums),
                        (1, 3) => self.avx2_sub::<1, 3>(r0, c0, sums),
                        (2, 1) => self.avx2_sub::<2, 1>(r0, c0, sums),
                        (2, 2) => self.avx2_sub::<2, 2>(r0, c0, sums),
                        (2, 3) => self.avx2_sub::<2, 3>(r0, c0, sums),
                        _ => unreachable!(),
                    }
                }
            }
        }
    }

    /// Rows `r0..r0 + R` against weight rows `c0..c0 + C`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn avx2_sub<const R: usize, const C: usize>(&self, r0: usize, c0: usize, sums: &mut Sums) {
        use std::arch::x86_64::*;
        let (x, k) = (self.x.as_ptr(), self.k);
        let w = self.w.as_ptr().wrapping_add(c0 * k);
        let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
        let mut xs = [_mm256_setzero_ps(); R];
        // Safety (caller): the panel and weight rows c0 + c < C of the tile cover `body`.
        unsafe {
            for p in (0..self.body).step_by(LANES) {
                for r in 0..R {
                    xs[r] = _mm256_loadu_ps(x.add(p * MR + (r0 + r) * LANES));
                }
                for c in 0..C {
                    let ws = W::load8_avx2::<0>(w.add(c * k + p));
                    for r in 0..R {
                        acc[r][c][0] = _mm256_fmadd_ps(xs[r], ws, acc[r][c][0]);
                    }
                }
                for r in 0..R {
                    xs[r] = _mm256_loadu_ps(x.add(p * MR + (r0 + r) * LANES + 8));
                }
                for c in 0..C {
                    let ws = W::load8_avx2::<1>(w.add(c * k + p));
                    for r in 0..R {
                        acc[r][c][1] = _mm256_fmadd_ps(xs[r], ws, acc[r][c][1]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    let mut ordered = [0f32; LANES];
                    _mm256_storeu_ps(ordered.as_mut_ptr(), acc[r][c][0]);
                    _mm256_storeu_ps(ordered.as_mut_ptr().add(8), acc[r][c][1]);
                    let mut lanes = [0f32; LANES];
                    for (&l, v) in W::AVX2_ORDER.iter().zip(ordered) {
                        lanes[l] = v;
                    }
                    sums[r0 + r][c0 + c] = reduce(lanes);
                }
            }
        }
    }
}

/// [`reduce`] of each element's lanes with shuffles: the same additions in the same order. Not
/// inlined, so that it cannot change how the tile loop keeps its accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
fn reduce_avx512<const R: usize, const C: usize>(lanes: &[[Lanes; C]; R], sums: &mut Sums) {
    use std::arch::x86_64::*;
    for r in 0..R {
        for c in 0..C {
            // Safety: each lane array holds 16 floats.
            let v = unsafe { _mm512_loadu_ps(lanes[r][c].as_ptr()) };
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let v8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
            let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
            let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
            sums[r][c] = _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps::<1>(v2, v2)));
        }
    }
}

/// The instruction set the tiles run on, chosen once per process so that every call rounds alike.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Simd {
    /// The order the tiles of this instruction set load weights of type `W` in ([`pack_panels`]).
    fn lane_order<W: WeightElem>(self) -> [usize; LANES] {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => W::AVX2_ORDER,
            _ => NATURAL,
        }
    }
}

fn simd() -> Simd {
    static BEST: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 * 0.618 + seed) * 12.9898).sin()).collect()
    }

    #[test]
    fn matches_naive_for_tails_and_blocks() {
        for &(m, k, n) in &[(1, 8, 1), (1, 36, 5), (3, 7, 4), (5, 56, 25), (70, 40, 26), (130, 17, 49), (2, 2048, 3)] {
            let (x, w) = (data(m * k, 0.3), data(n * k, 1.7));
            let y = matmul_wt(&x, &w, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let naive: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
                    assert!((y[i * n + j] as f64 - naive).abs() < 1e-4 * (k as f64).sqrt(), "({m},{k},{n}) [{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_this_cpu_has_matches_naive() {
        let mut paths = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                paths.push(Simd::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                paths.push(Simd::Avx512);
            }
        }
        // A tail after the lanes; 7 activation rows and 5 weight rows give partial tiles. The weight
        // is bf16-representable, so its bf16 copy must give the same bits.
        let (m, k, n) = (7, 40 * LANES + 5, 5);
        let x = data(m * k, 0.4);
        let w_bf16: Vec<bf16> = data(n * k, 1.1).into_iter().map(bf16::from_f32).collect();
        let w: Vec<f32> = w_bf16.iter().map(|v| v.to_f32()).collect();
        let panels = |order| {
            let mut panels = vec![0f32; panels_size(m, k)];
            pack_panels(&x, k, order, &mut panels);
            panels
        };
        let mut results = Vec::new();
        for simd in paths {
            let mut yt = vec![0f32; n * m];
            task_block(simd, &x, &panels(simd.lane_order::<f32>()), &w, k, |i, j, v| yt[j * m + i] = v);
            for (e, v) in yt.iter().enumerate() {
                let (j, i) = (e / m, e % m);
                let naive: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
                assert!((*v as f64 - naive).abs() < 1e-4, "{simd:?} [{i},{j}]: {v} vs {naive}");
            }
            let mut yt_bf16 = vec![0f32; n * m];
            task_block(simd, &x, &panels(simd.lane_order::<bf16>()), &w_bf16, k, |i, j, v| yt_bf16[j * m + i] = v);
            assert_eq!(yt, yt_bf16, "{simd:?}: bf16 weights differ from their f32 copy");
            results.push(yt);
        }
        // The lanes and their order are the same on every instruction set: so are the bits.
        assert!(results.windows(2).all(|r| r[0] == r[1]), "instruction sets round differently");
    }

    #[test]
    fn a_grouped_call_gives_each_product_alone() {
        let shapes = [(3, 40, 50), (1, 2048, 7), (70, 17, 9), (2, 40, 100)];
        let data: Vec<(Vec<f32>, Vec<f32>)> =
            shapes.iter().map(|&(m, k, n)| (data(m * k, m as f32), data(n * k, k as f32))).collect();
        let products: Vec<Product<f32>> =
            shapes.iter().zip(&data).map(|(&(m, k, n), (x, w))| Product { x, w, m, k, n }).collect();
        let grouped = matmul_wt_grouped(&products);
        for (p, y) in products.iter().zip(&grouped) {
            assert_eq!(*y, matmul_wt(p.x, p.w, p.m, p.k, p.n), "({}, {}, {})", p.m, p.k, p.n);
        }
    }

    #[test]
    fn each_row_is_independent_of_the_others() {
        let (m, k, n) = (67, 100, 31);
        let (x, w) = (data(m * k, 0.9), data(n * k, 2.2));
        let all = matmul_wt(&x, &w, m, k, n);
        for i in 0..m {
            let alone = matmul_wt(&x[i * k..(i + 1) * k], &w, 1, k, n);
            assert_eq!(alone, all[i * n..(i + 1) * n], "row {i}");
        }
    }
}
