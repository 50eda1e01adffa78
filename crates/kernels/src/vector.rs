//! f32 vector primitives with a fixed reduction order.
//!
//! Sums use 16 independent lanes so the compiler can vectorise them, and the order depends only on
//! the vector length: a sequence's result never depends on what else is in the batch.

use rayon::prelude::*;

const LANES: usize = 16;

/// Dot product of two equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// SwiGLU over rows `[gate | up]` of `2 * width` values: `silu(gate) * up`, `[rows, width]`.
/// `silu(v) = v / (1 + e^-v)`.
/// Rows run in parallel: a 512-token prefill step gives the dense layer 5.6 M values.
pub fn swiglu(gate_up: &[f32], width: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * width);
    let mut act = vec![0f32; rows * width];
    act.par_chunks_mut(width).zip(gate_up.par_chunks(2 * width)).with_min_len(8).for_each(|(act, gu)| {
        let (gate, up) = gu.split_at(width);
        for ((a, g), u) in act.iter_mut().zip(gate).zip(up) {
            *a = *g / (1.0 + (-*g).exp()) * *u;
        }
    });
    act
}

/// In-place numerically stable softmax.
pub fn softmax_in_place(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in xs.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_all_tail_lengths() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-5, "n={n}");
        }
    }

    #[test]
    fn swiglu_is_silu_gate_times_up_per_row() {
        let gate_up = [0.5, -2.0, 3.0, 4.0, 0.0, 1.0, 5.0, 2.0];
        let act = swiglu(&gate_up, 2);
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert_eq!(act, vec![silu(0.5) * 3.0, silu(-2.0) * 4.0, silu(0.0) * 5.0, silu(1.0) * 2.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut xs = vec![1.0, 3.0, 2.0, -50.0];
        softmax_in_place(&mut xs);
        assert!((xs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(xs[1] > xs[2] && xs[2] > xs[0] && xs[0] > xs[3]);
    }
}
