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
        Mlp::forward_grouped(&[(self, x)]).pop().expect("one MLP")
    }

    /// Several MLPs, each over its own rows, with one parallel pass per projection (gate+up, down):
    /// [`Mlp::forward_rows`] of each.
    pub fn forward_grouped(calls: &[(&Mlp, &[f32])]) -> Vec<Vec<f32>> {
        let gate_up: Vec<(&Linear, &[f32])> = calls.iter().map(|&(mlp, x)| (&mlp.gate_up, x)).collect();
        let acts: Vec<Vec<f32>> = Linear::forward_grouped(&gate_up)
            .iter()
            .zip(calls)
            .map(|(gate_up, (mlp, _))| swiglu(gate_up, mlp.width))
            .collect();
        let down: Vec<(&Linear, &[f32])> =
            calls.iter().zip(&acts).map(|((mlp, _), act)| (&mlp.down, &act[..])).collect();
        Linear::forward_grouped(&down)
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
        // The chosen experts and the shared ones all in one grouped pass; the shared output (or
        // zeros) is the base the experts' weighted rows are added to, in expert order.
        let chosen: Vec<(&Mlp, &[(usize, f32)])> =
            self.experts.iter().zip(&assigned).filter(|(_, rows)| !rows.is_empty()).map(|(e, r)| (e, &r[..])).collect();
        let inputs: Vec<Vec<f32>> = chosen
            .iter()
            .map(|(_, rows)| rows.iter().flat_map(|(t, _)| &xs[t * hidden..(t + 1) * hidden]).copied().collect())
            .collect();
        let mut calls: Vec<(&Mlp, &[f32])> = chosen.iter().zip(&inputs).map(|((e, _), x)| (*e, &x[..])).collect();
        if let Some(shared) = &self.shared {
            calls.push((shared, &xs));
        }
        let mut ys = Mlp::forward_grouped(&calls);
        let mut out = match &self.shared {
            Some(_) => ys.pop().expect("the shared experts' output"),
            None => vec![0f32; tokens * hidden],
        };
        for ((_, rows), y) in chosen.iter().zip(&ys) {
            for ((token, weight), y) in rows.iter().zip(y.chunks_exact(hidden)) {
                mlaserve_kernels::vector::axpy(*weight, y, &mut out[token * hidden..][..hidden]);
            }
        }
        Ok(Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?)
    }
}
