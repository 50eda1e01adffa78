//! `y = x · wᵀ` with the weight in its checkpoint layout `[out, in]`: every weight matmul of the model.
//!
//! Decode steps multiply a handful of activation rows by weights far larger than the caches, so the
//! cost is reading the weight. candle's gemm repacks the weight on every call once there are two or
//! more rows (5× slower than one row for `lm_head`); this kernel instead streams each weight row from
//! memory once per block of up to [`M_BLOCK`] activation rows and dots it with those rows while they
//! sit in cache, in register tiles of [`MR`] activation rows × [`NR`] weight rows.
//!
//! Each output element is accumulated the same way whatever the tile, the block or the number of rows
//! (8 lanes over `k`, a fixed horizontal sum, then the `k % 8` tail), so a sequence's logits do not
//! depend on which other sequences share its batch.

use rayon::prelude::*;

/// Accumulator lanes per output element.
const LANES: usize = 8;
/// Activation rows per register tile.
const MR: usize = 4;
/// Weight rows per register tile.
const NR: usize = 3;
/// Activation rows kept in cache while the weight streams past (64 rows of 2048 floats: 512 KiB).
const M_BLOCK: usize = 64;
/// Weight rows per parallel task (a multiple of [`NR`]).
const N_BLOCK: usize = 8 * NR;

/// `y[i, j] = Σ_p x[i, p] · w[j, p]` for `x: [m, k]`, `w: [n, k]`; returns `y: [m, n]`.
pub fn matmul_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    let mut y = vec![0f32; m * n];
    for i0 in (0..m).step_by(M_BLOCK) {
        let mb = M_BLOCK.min(m - i0);
        let xb = &x[i0 * k..(i0 + mb) * k];
        // Transposed result `[n, mb]`, so that each task owns a contiguous slice.
        let mut yt = vec![0f32; n * mb];
        yt.par_chunks_mut(N_BLOCK * mb).enumerate().for_each(|(task, yt)| {
            let j0 = task * N_BLOCK;
            let nb = yt.len() / mb;
            for jt in (0..nb).step_by(NR) {
                for it in (0..mb).step_by(MR) {
                    let tile = Tile { x: &xb[it * k..], w: &w[(j0 + jt) * k..], k };
                    tile.run(MR.min(mb - it), NR.min(nb - jt), &mut |r, c, v| yt[(jt + c) * mb + it + r] = v);
                }
            }
        });
        for (j, col) in yt.chunks_exact(mb).enumerate() {
            for (r, v) in col.iter().enumerate() {
                y[(i0 + r) * n + j] = *v;
            }
        }
    }
    y
}

/// One register tile: activation rows starting at `x`, weight rows starting at `w`, both of stride `k`.
struct Tile<'a> {
    x: &'a [f32],
    w: &'a [f32],
    k: usize,
}

impl Tile<'_> {
    /// Computes the `rows × cols` dot products and hands each to `store(row, col, value)`.
    fn run(&self, rows: usize, cols: usize, store: &mut dyn FnMut(usize, usize, f32)) {
        macro_rules! dispatch {
            ($(($r:literal, $c:literal)),*) => {
                match (rows, cols) {
                    $(($r, $c) => self.tile::<$r, $c>(store),)*
                    _ => unreachable!("tile {rows}x{cols} exceeds {MR}x{NR}"),
                }
            };
        }
        dispatch!((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (4, 3));
    }

    fn tile<const R: usize, const C: usize>(&self, store: &mut dyn FnMut(usize, usize, f32)) {
        assert!(self.x.len() >= (R - 1) * self.k + self.k && self.w.len() >= (C - 1) * self.k + self.k);
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // Safety: the CPU has AVX2 and FMA, and the slices hold R (resp. C) rows of k floats.
            let lanes = unsafe { self.lanes_avx2::<R, C>() };
            return self.finish(lanes, store);
        }
        self.finish(self.lanes_portable::<R, C>(), store)
    }

    /// Adds each element's lanes in a fixed order, then its `k % LANES` tail.
    fn finish<const R: usize, const C: usize>(
        &self,
        lanes: [[[f32; LANES]; C]; R],
        store: &mut dyn FnMut(usize, usize, f32),
    ) {
        let (k, body) = (self.k, self.k - self.k % LANES);
        for (r, row) in lanes.iter().enumerate() {
            for (c, l) in row.iter().enumerate() {
                let mut tail = 0f32;
                for p in body..k {
                    tail += self.x[r * k + p] * self.w[c * k + p];
                }
                store(r, c, ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])) + tail);
            }
        }
    }

    fn lanes_portable<const R: usize, const C: usize>(&self) -> [[[f32; LANES]; C]; R] {
        let mut acc = [[[0f32; LANES]; C]; R];
        for p in (0..self.k - self.k % LANES).step_by(LANES) {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xs = &self.x[r * self.k + p..][..LANES];
                for (c, a) in acc_r.iter_mut().enumerate() {
                    let ws = &self.w[c * self.k + p..][..LANES];
                    for l in 0..LANES {
                        a[l] = xs[l].mul_add(ws[l], a[l]);
                    }
                }
            }
        }
        acc
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes_avx2<const R: usize, const C: usize>(&self) -> [[[f32; LANES]; C]; R] {
        use std::arch::x86_64::*;
        let (x, w, k) = (self.x.as_ptr(), self.w.as_ptr(), self.k);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut p = 0;
        while p + LANES <= k {
            // Safety (caller): rows r < R of x and c < C of w hold k floats each.
            unsafe {
                let ws: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(w.add(c * k + p)));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let xs = _mm256_loadu_ps(x.add(r * k + p));
                    for (a, wc) in acc_r.iter_mut().zip(&ws) {
                        *a = _mm256_fmadd_ps(xs, *wc, *a);
                    }
                }
            }
            p += LANES;
        }
        acc.map(|row| {
            row.map(|a| {
                let mut out = [0f32; LANES];
                // Safety: `out` holds 8 floats.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), a) };
                out
            })
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
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
