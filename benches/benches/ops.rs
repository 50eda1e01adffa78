//! The matmuls of one V2-Lite decode step, timed alone at several batch sizes, with the layouts
//! the model uses: experts and dense MLPs multiply by a contiguous transposed weight
//! (`x.matmul(&w_t)`, `w_t: [in, out]`), attention projections and `lm_head` go through
//! `candle_nn::Linear` (`x.matmul(&w.t())`, `w: [out, in]`). Each op cycles through enough
//! distinct weights that they come from memory, not the cache, as in a real step.
//!
//! The `streamed` rows are not candle: a plain batched-GEMV written here (weights `[out, in]`, each
//! weight row read once from memory and dotted with every activation row while those sit in L1/L2,
//! output rows split over the cores) — the bound a decode-shaped matmul could reach, for comparison.
//!
//! `cargo bench -p mlaserve-benches --bench ops [-- --batches 1,2,4,16,64 --iters 20 --only SUBSTRING]`

use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use mlaserve_benches::{median, print_machine, Args};

/// Enough distinct copies that together they exceed the last-level cache (32 MB here).
fn copies(bytes_each: usize) -> usize {
    (128usize << 20).div_ceil(bytes_each).clamp(1, 16)
}

enum Layout {
    /// `x.matmul(&w_t)` with `w_t` contiguous `[in, out]` (experts, dense MLP).
    Transposed,
    /// `Linear::forward`: `x.matmul(&w.t())` with `w` contiguous `[out, in]`.
    Linear,
    /// [`streamed_matmul`] over `w: [out, in]`.
    Streamed,
    /// candle's quantized `QMatMul` with the weight in Q8_0 (8-bit blocks of 32, one f16 scale).
    Q8,
}

const LANES: usize = 16;
/// Weight rows per work item.
const ROWS: usize = 4;

/// `y[j, o] = Σ_i x[j, i] · w[o, i]`: `x` `[m, inp]`, `w` `[out, inp]`, `y` `[m, out]`.
fn streamed_matmul(w: &[f32], x: &[f32], m: usize, inp: usize, out: usize) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(inp.is_multiple_of(LANES) && out.is_multiple_of(ROWS));
    let mut yt = vec![0f32; out * m]; // [out, m], transposed at the end
    yt.par_chunks_mut(64 * ROWS * m).enumerate().for_each(|(c, yc)| {
        for (b, yb) in yc.chunks_mut(ROWS * m).enumerate() {
            let row0 = (c * 64 + b) * ROWS;
            let rows: [&[f32]; ROWS] = std::array::from_fn(|r| &w[(row0 + r) * inp..(row0 + r + 1) * inp]);
            for j in 0..m {
                let dots = dot_rows(&rows, &x[j * inp..(j + 1) * inp]);
                for r in 0..ROWS {
                    yb[r * m + j] = dots[r];
                }
            }
        }
    });
    let mut y = vec![0f32; m * out];
    for o in 0..out {
        for j in 0..m {
            y[j * out + o] = yt[o * m + j];
        }
    }
    y
}

/// `ROWS` dot products sharing one read of `x`, with AVX2+FMA when the CPU has it.
fn dot_rows(rows: &[&[f32]; ROWS], x: &[f32]) -> [f32; ROWS] {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // Safety: the features were just detected.
        return unsafe { dot_rows_avx2(rows, x) };
    }
    rows.map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
}

/// Two 8-wide accumulators per weight row; `x.len()` is a multiple of 16 (checked by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(rows: &[&[f32]; ROWS], x: &[f32]) -> [f32; ROWS] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
    for r in rows {
        assert_eq!(r.len(), x.len());
    }
    let mut k = 0;
    while k + LANES <= x.len() {
        // Safety: k + 16 <= len of x and of every row.
        unsafe {
            let x0 = _mm256_loadu_ps(x.as_ptr().add(k));
            let x1 = _mm256_loadu_ps(x.as_ptr().add(k + 8));
            for (a, row) in acc.iter_mut().zip(rows) {
                let p = row.as_ptr().add(k);
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p), x0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(8)), x1, a[1]);
            }
        }
        k += LANES;
    }
    acc.map(|[a, b]| {
        let mut lanes = [0f32; 8];
        // Safety: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a, b)) };
        lanes.iter().sum()
    })
}

fn time_op(inp: usize, out: usize, layout: &Layout, batch: usize, iters: usize) -> anyhow::Result<Duration> {
    let n = copies(match layout {
        Layout::Q8 => inp * out / 32 * 34,
        _ => inp * out * 4,
    });
    let dev = Device::Cpu;
    let weights: Vec<Tensor> = (0..n)
        .map(|_| match layout {
            Layout::Transposed => Tensor::randn(0f32, 0.02, (inp, out), &dev),
            Layout::Linear | Layout::Streamed | Layout::Q8 => Tensor::randn(0f32, 0.02, (out, inp), &dev),
        })
        .collect::<candle_core::Result<_>>()?;
    let linears: Vec<Linear> = weights.iter().map(|w| Linear::new(w.clone(), None)).collect();
    let x = Tensor::randn(0f32, 1.0, (batch, inp), &dev)?;
    let raw: Vec<Vec<f32>> = match layout {
        Layout::Streamed => weights.iter().map(|w| w.flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?,
        _ => vec![],
    };
    let q8: Vec<QMatMul> = match layout {
        Layout::Q8 => weights
            .iter()
            .map(|w| QMatMul::from_qtensor(QTensor::quantize(w, GgmlDType::Q8_0)?))
            .collect::<candle_core::Result<_>>()?,
        _ => vec![],
    };
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let run = |i: usize| -> anyhow::Result<Tensor> {
        Ok(match layout {
            Layout::Transposed => x.matmul(&weights[i % n])?,
            Layout::Linear => linears[i % n].forward(&x)?,
            Layout::Q8 => q8[i % n].forward(&x)?,
            Layout::Streamed => {
                Tensor::from_vec(streamed_matmul(&raw[i % n], &xs, batch, inp, out), (batch, out), &dev)?
            }
        })
    };
    // Every copy once: first-touch, and QMatMul repacks its weight on the first call.
    for i in 0..n {
        run(i)?;
    }
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        let t = Instant::now();
        let y = run(i)?;
        times.push(t.elapsed());
        std::hint::black_box(y);
    }
    Ok(median(times))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let batches = args.list("batches", &[1, 2, 4, 16, 64])?;
    let iters: usize = args.get("iters", 20)?;
    let only: String = args.get("only", String::new())?;
    print_machine();
    check_streamed()?;
    // (name, in, out, layout, calls per step of a V2-Lite MoE layer or the head)
    let ops = [
        ("expert gate+up (fused)", 2048, 2 * 1408, Layout::Transposed),
        ("expert down", 1408, 2048, Layout::Transposed),
        ("shared experts gate+up", 2048, 2 * 2816, Layout::Transposed),
        ("dense MLP gate+up", 2048, 2 * 10944, Layout::Transposed),
        ("dense MLP down", 10944, 2048, Layout::Transposed),
        ("q_proj (Linear)", 2048, 3072, Layout::Linear),
        ("o_proj (Linear)", 2048, 2048, Layout::Linear),
        ("lm_head (Linear)", 2048, 102400, Layout::Linear),
        ("expert gate+up as Linear", 2048, 2 * 1408, Layout::Linear),
        ("lm_head as transposed", 2048, 102400, Layout::Transposed),
        ("expert gate+up, streamed", 2048, 2 * 1408, Layout::Streamed),
        ("dense MLP down, streamed", 10944, 2048, Layout::Streamed),
        ("lm_head, streamed", 2048, 102400, Layout::Streamed),
        ("expert gate+up, Q8_0 QMatMul", 2048, 2 * 1408, Layout::Q8),
        ("dense MLP down, Q8_0 QMatMul", 10944, 2048, Layout::Q8),
        ("lm_head, Q8_0 QMatMul", 2048, 102400, Layout::Q8),
    ];
    print!("| op | weight MB |");
    for b in &batches {
        print!(" batch {b} ms (GB/s) |");
    }
    println!();
    println!("|---|---:|{}", "---:|".repeat(batches.len()));
    for (name, inp, out, layout) in ops.iter().filter(|op| op.0.contains(&only)) {
        // Bytes the op streams: f32, or Q8_0's 34 bytes per 32 weights.
        let mb = match layout {
            Layout::Q8 => (inp * out / 32 * 34) as f64 / 1e6,
            _ => (inp * out * 4) as f64 / 1e6,
        };
        print!("| {name} [{inp}→{out}] | {mb:.1} |");
        for &b in &batches {
            let t = time_op(*inp, *out, layout, b, iters)?;
            print!(" {:.3} ({:.0}) |", t.as_secs_f64() * 1e3, mb / 1e3 / t.as_secs_f64());
        }
        println!();
    }
    Ok(())
}

/// The streamed kernel agrees with candle's matmul.
fn check_streamed() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (m, inp, out) = (5, 64, 24);
    let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
    let want: Vec<f32> = x.matmul(&w.t()?)?.flatten_all()?.to_vec1()?;
    let got = streamed_matmul(&w.flatten_all()?.to_vec1()?, &x.flatten_all()?.to_vec1()?, m, inp, out);
    for (a, b) in got.iter().zip(&want) {
        anyhow::ensure!((a - b).abs() < 1e-3, "streamed matmul disagrees: {a} vs {b}");
    }
    Ok(())
}
