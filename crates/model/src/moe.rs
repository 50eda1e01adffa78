//! The feed-forward blocks: the SwiGLU MLP (dense layers, experts, shared experts) and the
//! DeepSeekMoE layer (design doc §5).
//!
//! The MoE layer routes every token of the step at once in f32, groups the (token, expert) pairs by
//! expert, runs each chosen expert once over its rows and adds the weighted results back; the shared
//! experts run over all rows with weight 1.

use candle_core::{Device, Tensor};
use mlaserve_kernels::routing::{route, RouterConfig};
use mlaserve_kernels::vector::swiglu;

use crate::config::MoeConfig;
use crate::error::Result;
use crate::linear::Linear;
use crate::weights::Weights;

/// `down(silu(gate(x)) ⊙ up(x))`, with gate and up fused into one matmul.
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    width: usize,
}

impl Mlp {
    pub fn new(w: &Weights, prefix: &str, hidden: usize, width: usize) -> Result<Self> {
        let gate_up =
            w.get_matrix(&[format!("{prefix}.gate_proj.weight"), format!("{prefix}.up_proj.weight")], width, hidden)?;
        Ok(Mlp {
            gate_up: Linear::new(gate_up, 2 * width, hidden),
            down: w.linear(&format!("{prefix}.down_proj"), hidden, width)?,
            width,
        })
    }

    /// Row-major `[rows, hidden]` → `[rows, hidden]`.
    pub fn forward_rows(&self, x: &[f32]) -> Vec<f32> {
        self.down.forward_rows(&swiglu(&self.gate_up.forward_rows(x), self.width))
    }
}

pub struct Moe {
    router: RouterConfig,
    /// Router weight `[experts, hidden]`, f32 like the routing itself.
    gate: Linear,
    correction_bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

impl Moe {
    pub fn new(cfg: &MoeConfig, w: &Weights, prefix: &str, hidden: usize) -> Result<Self> {
        let e = cfg.router.num_experts;
        let experts = (0..e)
            .map(|i| Mlp::new(w, &format!("{prefix}.experts.{i}"), hidden, cfg.moe_intermediate_size))
            .collect::<Result<_>>()?;
        let shared = match cfg.n_shared_experts {
            0 => None,
            n => Some(Mlp::new(w, &format!("{prefix}.shared_experts"), hidden, n * cfg.moe_intermediate_size)?),
        };
        let correction_bias = w
            .get_opt(&format!("{prefix}.gate.e_score_correction_bias"), &[e])?
            .map(|b| b.to_vec1::<f32>())
            .transpose()?;
        Ok(Moe {
            router: cfg.router.clone(),
            gate: w.linear(&format!("{prefix}.gate"), e, hidden)?,
            correction_bias,
            experts,
            shared,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let logits = self.gate.forward_rows(&xs);
        let routing = route(&self.router, &logits, self.correction_bias.as_deref());

        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (i, (e, w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            assigned[*e as usize].push((i / routing.top_k, *w));
        }
        let mut out = match &self.shared {
            Some(shared) => shared.forward_rows(&xs),
            None => vec![0f32; tokens * hidden],
        };
        for (expert, rows) in self.experts.iter().zip(&assigned).filter(|(_, r)| !r.is_empty()) {
            let picked: Vec<f32> = rows.iter().flat_map(|(t, _)| &xs[t * hidden..(t + 1) * hidden]).copied().collect();
            let ys = expert.forward_rows(&picked);
            for ((token, weight), y) in rows.iter().zip(ys.chunks_exact(hidden)) {
                mlaserve_kernels::vector::axpy(*weight, y, &mut out[token * hidden..][..hidden]);
            }
        }
        Ok(Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?)
    }
}
