//! The matmuls of one V2-Lite decode step, timed alone at several batch sizes: the kernel the model
//! runs (`mlaserve_kernels::matmul::matmul_wt`, bf16 weights in their checkpoint layout `[out, in]`,
//! as V2-Lite ships them), beside the same kernel over f32 weights, candle's `Linear` and its
//! quantized Q8_0 `QMatMul` for comparison. Each op cycles through enough distinct weights that they
//! come from memory, not the cache, as in a real step.
//!
//! `cargo bench -p mlaserve-benches --bench ops [-- --batches 1,2,4,16,64 --iters 20 --only SUBSTRING]`

use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use half::bf16;
use mlaserve_benches::{median, print_machine, Args};
use mlaserve_kernels::matmul::matmul_wt;

/// Enough distinct copies that together they exceed the last-level cache.
fn copies(bytes_each: usize) -> usize {
    (128usize << 20).div_ceil(bytes_each).clamp(1, 16)
}

enum Layout {
    /// `matmul_wt` over a bf16 `w: [out, in]`: what the model runs on a bf16 checkpoint.
    Kernel,
    /// `matmul_wt` over an f32 `w: [out, in]` (f32, f16 and FP8 checkpoints).
    KernelF32,
    /// candle's `Linear::forward`: `x.matmul(&w.t())` with `w` contiguous `[out, in]`.
    Candle,
    /// candle's quantized `QMatMul` with the weight in Q8_0 (8-bit blocks of 32, one f16 scale).
    Q8,
}

/// Bytes of weight the op streams: bf16, f32, or Q8_0's 34 bytes per 32 weights.
fn weight_bytes(inp: usize, out: usize, layout: &Layout) -> usize {
    match layout {
        Layout::Kernel => inp * out * 2,
        Layout::Q8 => inp * out / 32 * 34,
        Layout::KernelF32 | Layout::Candle => inp * out * 4,
    }
}

fn time_op(inp: usize, out: usize, layout: &Layout, batch: usize, iters: usize) -> anyhow::Result<Duration> {
    let n = copies(weight_bytes(inp, out, layout));
    let dev = Device::Cpu;
    let weights: Vec<Tensor> =
        (0..n).map(|_| Tensor::randn(0f32, 0.02, (out, inp), &dev)).collect::<candle_core::Result<_>>()?;
    let x = Tensor::randn(0f32, 1.0, (batch, inp), &dev)?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let linears: Vec<Linear> = match layout {
        Layout::Candle => weights.iter().map(|w| Linear::new(w.clone(), None)).collect(),
        _ => vec![],
    };
    let raw: Vec<Vec<f32>> = match layout {
        Layout::Kernel | Layout::KernelF32 => {
            weights.iter().map(|w| w.flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?
        }
        _ => vec![],
    };
    let raw_bf16: Vec<Vec<bf16>> = match layout {
        Layout::Kernel => raw.iter().map(|w| w.iter().map(|v| bf16::from_f32(*v)).collect()).collect(),
        _ => vec![],
    };
    let q8: Vec<QMatMul> = match layout {
        Layout::Q8 => weights
            .iter()
            .map(|w| QMatMul::from_qtensor(QTensor::quantize(w, GgmlDType::Q8_0)?))
            .collect::<candle_core::Result<_>>()?,
        _ => vec![],
    };
    drop(weights);
    let run = |i: usize| -> anyhow::Result<Vec<f32>> {
        Ok(match layout {
            Layout::Kernel => matmul_wt(&xs, &raw_bf16[i % n], batch, inp, out),
            Layout::KernelF32 => matmul_wt(&xs, &raw[i % n], batch, inp, out),
            Layout::Candle => linears[i % n].forward(&x)?.flatten_all()?.to_vec1()?,
            Layout::Q8 => q8[i % n].forward(&x)?.flatten_all()?.to_vec1()?,
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
    // (name, in, out, layout)
    let ops = [
        ("expert gate+up", 2048, 2 * 1408, Layout::Kernel),
        ("expert down", 1408, 2048, Layout::Kernel),
        ("shared experts gate+up", 2048, 2 * 2816, Layout::Kernel),
        ("dense MLP gate+up", 2048, 2 * 10944, Layout::Kernel),
        ("dense MLP down", 10944, 2048, Layout::Kernel),
        ("q_proj", 2048, 3072, Layout::Kernel),
        ("o_proj", 2048, 2048, Layout::Kernel),
        ("lm_head", 2048, 102400, Layout::Kernel),
        ("expert gate+up, f32 weights", 2048, 2 * 1408, Layout::KernelF32),
        ("lm_head, f32 weights", 2048, 102400, Layout::KernelF32),
        ("expert gate+up, candle Linear", 2048, 2 * 1408, Layout::Candle),
        ("lm_head, candle Linear", 2048, 102400, Layout::Candle),
        ("expert gate+up, Q8_0 QMatMul", 2048, 2 * 1408, Layout::Q8),
        ("lm_head, Q8_0 QMatMul", 2048, 102400, Layout::Q8),
    ];
    print!("| op | weight MB |");
    for b in &batches {
        print!(" batch {b} ms (GB/s, GFLOP/s) |");
    }
    println!();
    println!("|---|---:|{}", "---:|".repeat(batches.len()));
    for (name, inp, out, layout) in ops.iter().filter(|op| op.0.contains(&only)) {
        let mb = weight_bytes(*inp, *out, layout) as f64 / 1e6;
        print!("| {name} [{inp}→{out}] | {mb:.1} |");
        for &b in &batches {
            let t = time_op(*inp, *out, layout, b, iters)?.as_secs_f64();
            let gflop = 2.0 * (b * inp * out) as f64 / 1e9;
            print!(" {:.3} ({:.0}, {:.0}) |", t * 1e3, mb / 1e3 / t, gflop / t);
        }
        println!();
    }
    Ok(())
}
