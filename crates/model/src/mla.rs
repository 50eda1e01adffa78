//! Multi-head Latent Attention (design doc §3).
//!
//! Every new token's latent row `[c_kv | k_pe]` is written to the paged cache first; then each
//! token attends over its sequence's cached rows in one of two forms:
//! - prompt tokens (prefill chunks): the naive form, expanding the cached latents through
//!   `kv_b_proj` into per-head keys and values (kernel `mla_prefill`);
//! - generated tokens (decode): the weight-absorbed form, which folds `W_UK` into the query and
//!   `W_UV` into the output so the attention reads the latents directly (kernel `mla_decode`).

use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::RmsNorm;
use mlaserve_kernels::mla::{gather_latents, mla_decode, mla_prefill, BlockTables, MlaDecodeArgs, MlaPrefillArgs};

use crate::batch::ForwardBatch;
use crate::cache::LatentCache;
use crate::config::Config;
use crate::error::Result;
use crate::linear::Linear;
use crate::rope::Rope;
use crate::weights::Weights;

enum QProj {
    Plain(Linear),
    Lora { a: Linear, norm: RmsNorm, b: Linear },
}

pub struct Mla {
    q: QProj,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    kv_b_proj: Linear,
    /// `kv_b_proj` split per head for absorption: `W_UKᵀ` `[rank, d_nope]` and `W_UV` `[d_v, rank]`
    /// per head, as linear layers so that decode rounds the same whatever the batch.
    w_uk_t: Vec<Linear>,
    w_uv: Vec<Linear>,
    o_proj: Linear,
    rope: Arc<Rope>,
    heads: usize,
    d_nope: usize,
    d_rope: usize,
    d_v: usize,
    rank: usize,
    scale: f32,
}

impl Mla {
    pub fn new(cfg: &Config, w: &Weights, prefix: &str, rope: Arc<Rope>) -> Result<Self> {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let (d_nope, d_rope, d_v, rank) =
            (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let q_out = heads * cfg.qk_head_dim();
        let q = match cfg.q_lora_rank {
            None => QProj::Plain(w.linear(&format!("{prefix}.q_proj"), q_out, h)?),
            Some(r) => QProj::Lora {
                a: w.linear(&format!("{prefix}.q_a_proj"), r, h)?,
                norm: w.rms_norm(&format!("{prefix}.q_a_layernorm"), r, cfg.rms_norm_eps)?,
                b: w.linear(&format!("{prefix}.q_b_proj"), q_out, r)?,
            },
        };
        let kv_b_weight = w.get(&format!("{prefix}.kv_b_proj.weight"), &[heads * (d_nope + d_v), rank])?;
        let kv_b_heads = kv_b_weight.reshape((heads, d_nope + d_v, rank))?;
        let (mut w_uk_t, mut w_uv) = (Vec::with_capacity(heads), Vec::with_capacity(heads));
        for head in 0..heads {
            let w = kv_b_heads.get(head)?;
            w_uk_t.push(Linear::new(w.narrow(0, 0, d_nope)?.t()?.flatten_all()?.to_vec1()?, rank, d_nope));
            w_uv.push(Linear::new(w.narrow(0, d_nope, d_v)?.flatten_all()?.to_vec1()?, d_v, rank));
        }
        Ok(Mla {
            q,
            kv_a_proj_with_mqa: w.linear(&format!("{prefix}.kv_a_proj_with_mqa"), rank + d_rope, h)?,
            kv_a_layernorm: w.rms_norm(&format!("{prefix}.kv_a_layernorm"), rank, cfg.rms_norm_eps)?,
            kv_b_proj: Linear::new(kv_b_weight.flatten_all()?.to_vec1()?, heads * (d_nope + d_v), rank),
            w_uk_t,
            w_uv,
            o_proj: w.linear(&format!("{prefix}.o_proj"), h, heads * d_v)?,
            rope,
            heads,
            d_nope,
            d_rope,
            d_v,
            rank,
            scale: cfg.softmax_scale() as f32,
        })
    }

    /// `x`: `[tokens, hidden]` (already normalised). Writes the new latents of `layer` to `cache`.
    pub fn forward(&self, x: &Tensor, batch: &ForwardBatch, cache: &mut LatentCache, layer: usize) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        let positions = batch.positions();
        let q = match &self.q {
            QProj::Plain(p) => p.forward(x)?,
            QProj::Lora { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        };
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let d_qk = self.d_nope + self.d_rope;
        let q_nope: Vec<f32> = q.chunks_exact(d_qk).flat_map(|h| &h[..self.d_nope]).copied().collect();
        let mut q_pe: Vec<f32> = q.chunks_exact(d_qk).flat_map(|h| &h[self.d_nope..]).copied().collect();
        self.rope.apply(&mut q_pe, self.heads, &positions);

        let kv = self.kv_a_proj_with_mqa.forward(x)?;
        let c_kv = self.kv_a_layernorm.forward(&kv.narrow(1, 0, self.rank)?.contiguous()?)?;
        let mut k_pe = kv.narrow(1, self.rank, self.d_rope)?.flatten_all()?.to_vec1::<f32>()?;
        self.rope.apply(&mut k_pe, 1, &positions);
        let k_pe = Tensor::from_vec(k_pe, (tokens, self.d_rope), &Device::Cpu)?;
        let rows = Tensor::cat(&[&c_kv, &k_pe], 1)?.flatten_all()?.to_vec1::<f32>()?;
        cache.write(layer, &batch.slots(cache.block_size()), &rows);

        // Prompt tokens take the expanded form, generated tokens the absorbed one, whatever chunk
        // they arrive in: each token is computed the same way however the scheduler cuts the steps.
        let width = self.heads * self.d_v;
        let mut out = vec![0f32; tokens * width];
        let mut decode = Vec::new();
        for seq in &batch.seqs {
            let first = seq.first_position();
            let prompt_end = seq.num_prompt_tokens.clamp(first, seq.context_len);
            let rows = seq.start..seq.start + prompt_end - first;
            if !rows.is_empty() {
                let attended = self.expanded(
                    &q_nope[rows.start * self.heads * self.d_nope..rows.end * self.heads * self.d_nope],
                    &q_pe[rows.start * self.heads * self.d_rope..rows.end * self.heads * self.d_rope],
                    &seq.block_table,
                    prompt_end,
                    cache,
                    layer,
                )?;
                out[rows.start * width..rows.end * width].copy_from_slice(&attended);
            }
            decode.extend((prompt_end..seq.context_len).map(|pos| Query {
                row: seq.start + pos - first,
                block_table: &seq.block_table,
                context_len: pos + 1,
            }));
        }
        if !decode.is_empty() {
            let attended = self.absorbed(&q_nope, &q_pe, &decode, cache, layer);
            for (query, o) in decode.iter().zip(attended.chunks_exact(width)) {
                out[query.row * width..(query.row + 1) * width].copy_from_slice(o);
            }
        }
        self.o_proj.forward(&Tensor::from_vec(out, (tokens, width), &Device::Cpu)?)
    }

    /// Naive form for queries at the end of a context of `context` tokens: expands the context's
    /// latents through `kv_b_proj` into per-head keys and values. Returns `[queries, heads·d_v]`.
    fn expanded(
        &self,
        q_nope: &[f32],
        q_pe: &[f32],
        block_table: &[u32],
        context: usize,
        cache: &LatentCache,
        layer: usize,
    ) -> Result<Vec<f32>> {
        let dim = self.rank + self.d_rope;
        let mut latents = vec![0f32; context * dim];
        gather_latents(cache.layer(layer), block_table, context, &mut latents);
        let c_kv: Vec<f32> = latents.chunks_exact(dim).flat_map(|row| &row[..self.rank]).copied().collect();
        let kv = self.kv_b_proj.forward_rows(&c_kv);
        let mut out = vec![0f32; q_nope.len() / self.d_nope * self.d_v];
        mla_prefill(
            &MlaPrefillArgs {
                q_nope,
                q_rope: q_pe,
                kv: &kv,
                latents: &latents,
                num_heads: self.heads,
                d_nope: self.d_nope,
                d_v: self.d_v,
                kv_lora_rank: self.rank,
                scale: self.scale,
            },
            &mut out,
        );
        Ok(out)
    }

    /// Absorbed form, one query per token, reading the latents straight from the paged cache:
    /// `[queries, heads·d_v]`. `q_nope` and `q_pe` hold every token of the step.
    fn absorbed(&self, q_nope: &[f32], q_pe: &[f32], queries: &[Query], cache: &LatentCache, layer: usize) -> Vec<f32> {
        let n = queries.len();
        let rows = |x: &[f32], width: usize| -> Vec<f32> {
            queries.iter().flat_map(|q| &x[q.row * width..(q.row + 1) * width]).copied().collect()
        };
        // q_lat_h = W_UK_hᵀ q_nope_h: [n, heads, d_nope] → [n, heads, rank].
        let q_lat = per_head(&rows(q_nope, self.heads * self.d_nope), n, &self.w_uk_t, self.d_nope, self.rank);
        let q_pe = rows(q_pe, self.heads * self.d_rope);
        let max_blocks = queries.iter().map(|q| q.block_table.len()).max().unwrap_or(0);
        let mut tables = vec![0u32; n * max_blocks];
        for (row, q) in tables.chunks_exact_mut(max_blocks).zip(queries) {
            row[..q.block_table.len()].copy_from_slice(q.block_table);
        }
        let context_lens: Vec<u32> = queries.iter().map(|q| q.context_len as u32).collect();
        let mut attended = vec![0f32; n * self.heads * self.rank];
        mla_decode(
            &MlaDecodeArgs {
                q_latent: &q_lat,
                q_rope: &q_pe,
                num_heads: self.heads,
                kv_lora_rank: self.rank,
                scale: self.scale,
                cache: cache.layer(layer),
                tables: BlockTables { tables: &tables, max_blocks, context_lens: &context_lens },
            },
            &mut attended,
        );
        // o_h = W_UV_h u_h: [n, heads, rank] → [n, heads, d_v].
        per_head(&attended, n, &self.w_uv, self.rank, self.d_v)
    }
}

/// One token's query for the absorbed form: its row in the step, and the context it sees.
struct Query<'a> {
    row: usize,
    block_table: &'a [u32],
    context_len: usize,
}

/// Applies head `h`'s layer to every row's head `h`: `x` `[rows, heads, inp]` → `[rows, heads, out]`.
fn per_head(x: &[f32], rows: usize, layers: &[Linear], inp: usize, out: usize) -> Vec<f32> {
    let heads = layers.len();
    let mut y = vec![0f32; rows * heads * out];
    let mut xh = vec![0f32; rows * inp];
    for (h, layer) in layers.iter().enumerate() {
        for (r, dst) in xh.chunks_exact_mut(inp).enumerate() {
            dst.copy_from_slice(&x[(r * heads + h) * inp..][..inp]);
        }
        for (r, src) in layer.forward_rows(&xh).chunks_exact(out).enumerate() {
            y[(r * heads + h) * out..][..out].copy_from_slice(src);
        }
    }
    y
}
