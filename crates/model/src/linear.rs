//! Bias-free linear layers: every weight matmul of the model (projections, experts, router, `lm_head`).
//!
//! The weight stays in its checkpoint layout `[out, in]` and the product runs on the kernels crate's
//! [`matmul_wt`], which streams the weight once per step and computes each row of the result the same
//! way whatever the batch (see that module for why not candle's gemm).

use candle_core::{Device, Tensor};
use half::bf16;
use mlaserve_kernels::matmul::{matmul_wt, matmul_wt_grouped, Product};

use crate::error::{ModelError, Result};

/// A weight matrix `[out, in]`, row-major. Decode reads every weight once per step, so a bf16
/// checkpoint's matrices stay bf16 (the kernel widens them exactly as it loads them); f16, f32 and
/// dequantized FP8 weights are held in f32.
pub enum WeightMatrix {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl WeightMatrix {
    fn len(&self) -> usize {
        match self {
            WeightMatrix::F32(w) => w.len(),
            WeightMatrix::Bf16(w) => w.len(),
        }
    }
}

impl From<Vec<f32>> for WeightMatrix {
    fn from(w: Vec<f32>) -> Self {
        WeightMatrix::F32(w)
    }
}

pub struct Linear {
    weight: WeightMatrix,
    out: usize,
    inp: usize,
}

impl Linear {
    pub fn new(weight: impl Into<WeightMatrix>, out: usize, inp: usize) -> Self {
        let weight = weight.into();
        assert_eq!(weight.len(), out * inp, "linear weight is not [{out}, {inp}]");
        Linear { weight, out, inp }
    }

    /// `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.inp {
            return Err(ModelError::Config(format!("linear layer expects {} inputs, got {k}", self.inp)));
        }
        let y = self.forward_rows(&x.flatten_all()?.to_vec1::<f32>()?);
        Ok(Tensor::from_vec(y, (m, self.out), &Device::Cpu)?)
    }

    /// Row-major `[rows, in]` → `[rows, out]`.
    pub fn forward_rows(&self, x: &[f32]) -> Vec<f32> {
        match &self.weight {
            WeightMatrix::F32(w) => matmul_wt(x, w, x.len() / self.inp, self.inp, self.out),
            WeightMatrix::Bf16(w) => matmul_wt(x, w, x.len() / self.inp, self.inp, self.out),
        }
    }

    /// Several layers, each over its own rows, in one parallel pass (the experts of a MoE layer):
    /// [`Linear::forward_rows`] of each.
    pub fn forward_grouped(calls: &[(&Linear, &[f32])]) -> Vec<Vec<f32>> {
        let f32s = Linear::products(calls, |w| match w {
            WeightMatrix::F32(w) => Some(&w[..]),
            WeightMatrix::Bf16(_) => None,
        });
        if let Some(products) = f32s {
            return matmul_wt_grouped(&products);
        }
        let bf16s = Linear::products(calls, |w| match w {
            WeightMatrix::Bf16(w) => Some(&w[..]),
            WeightMatrix::F32(_) => None,
        });
        match bf16s {
            Some(products) => matmul_wt_grouped(&products),
            // Mixed weight types: one pass per layer.
            None => calls.iter().map(|(l, x)| l.forward_rows(x)).collect(),
        }
    }

    /// The calls as the kernel's products, if `weight` finds every layer's weight of its type.
    fn products<'a, W>(
        calls: &[(&'a Linear, &'a [f32])],
        weight: impl Fn(&'a WeightMatrix) -> Option<&'a [W]>,
    ) -> Option<Vec<Product<'a, W>>> {
        calls
            .iter()
            .map(|&(l, x)| Some(Product { x, w: weight(&l.weight)?, m: x.len() / l.inp, k: l.inp, n: l.out }))
            .collect()
    }
}
