//! Bias-free linear layers: every weight matmul of the model (projections, experts, router, `lm_head`).
//!
//! The weight stays in its checkpoint layout `[out, in]` and the product runs on the kernels crate's
//! [`matmul_wt`], which streams the weight once per step and computes each row of the result the same
//! way whatever the batch (see that module for why not candle's gemm).

use candle_core::{Device, Tensor};
use mlaserve_kernels::matmul::matmul_wt;

use crate::error::{ModelError, Result};

pub struct Linear {
    /// `[out, in]`, row-major.
    weight: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Linear {
    pub fn new(weight: Vec<f32>, out: usize, inp: usize) -> Self {
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
        matmul_wt(x, &self.weight, x.len() / self.inp, self.inp, self.out)
    }
}
