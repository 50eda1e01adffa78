//! Multi-head Latent Attention (design doc §3).
//!
//! Every new token's latent row `[c_kv | k_pe]` is written to the paged cache first; then each
//! sequence attends over its cached rows in one of two forms:
//! - prefill chunks (several new tokens): the naive form, expanding the cached latents through
//!   `kv_b_proj` into per-head keys and values;
//! - decode (one new token): the weight-absorbed form, which folds `W_UK` into the query and `W_UV`
//!   into the output so the attention reads the latents directly (kernel `mla_decode`).

use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::{Linear, RmsNorm};
use mlaserve_kernels::mla::{gather_latents, mla_decode, BlockTables, MlaDecodeArgs};

use crate::batch::{ForwardBatch, SeqChunk};
use crate::cache::LatentCache;
use crate::config::Config;
use crate::error::Result;
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
    /// `kv_b_proj` split per head for absorption: `W_UK` `[heads, d_nope, rank]`, `W_UVᵀ` `[heads, rank, d_v]`.
    w_uk: Tensor,
    w_uv_t: Tensor,
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
        let kv_b_proj = w.linear(&format!("{prefix}.kv_b_proj"), heads * (d_nope + d_v), rank)?;
        let per_head = kv_b_proj.weight().reshape((heads, d_nope + d_v, rank))?;
        let w_uk = per_head.narrow(1, 0, d_nope)?.contiguous()?;
        let w_uv_t = per_head.narrow(1, d_nope, d_v)?.transpose(1, 2)?.contiguous()?;
        Ok(Mla {
            q,
            kv_a_proj_with_mqa: w.linear(&format!("{prefix}.kv_a_proj_with_mqa"), rank + d_rope, h)?,
            kv_a_layernorm: w.rms_norm(&format!("{prefix}.kv_a_layernorm"), rank, cfg.rms_norm_eps)?,
            kv_b_proj,
            w_uk,
            w_uv_t,
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
        let q = q.reshape((tokens, self.heads, self.d_nope + self.d_rope))?;
        let q_nope = q.narrow(2, 0, self.d_nope)?.contiguous()?;
        let mut q_pe = q.narrow(2, self.d_nope, self.d_rope)?.flatten_all()?.to_vec1::<f32>()?;
        self.rope.apply(&mut q_pe, self.heads, &positions);
        let q_pe = Tensor::from_vec(q_pe, (tokens, self.heads, self.d_rope), &Device::Cpu)?;

        let kv = self.kv_a_proj_with_mqa.forward(x)?;
        let c_kv = self.kv_a_layernorm.forward(&kv.narrow(1, 0, self.rank)?.contiguous()?)?;
        let mut k_pe = kv.narrow(1, self.rank, self.d_rope)?.flatten_all()?.to_vec1::<f32>()?;
        self.rope.apply(&mut k_pe, 1, &positions);
        let k_pe = Tensor::from_vec(k_pe, (tokens, self.d_rope), &Device::Cpu)?;
        let rows = Tensor::cat(&[&c_kv, &k_pe], 1)?.flatten_all()?.to_vec1::<f32>()?;
        cache.write(layer, &batch.slots(cache.block_size()), &rows);

        // Decode tokens are attended all at once; prefill chunks one sequence at a time.
        let decode: Vec<usize> = (0..batch.seqs.len()).filter(|&i| batch.seqs[i].len == 1).collect();
        let mut outputs: Vec<Option<Tensor>> = vec![None; batch.seqs.len()];
        if !decode.is_empty() {
            let rows: Vec<u32> = decode.iter().map(|&i| batch.seqs[i].start as u32).collect();
            let rows = Tensor::from_vec(rows, decode.len(), &Device::Cpu)?;
            let attended = self.absorbed(
                &q_nope.index_select(&rows, 0)?,
                &q_pe.index_select(&rows, 0)?,
                &decode.iter().map(|&i| &batch.seqs[i]).collect::<Vec<_>>(),
                cache,
                layer,
            )?;
            for (n, &i) in decode.iter().enumerate() {
                outputs[i] = Some(attended.narrow(0, n, 1)?);
            }
        }
        for (i, seq) in batch.seqs.iter().enumerate().filter(|(_, s)| s.len > 1) {
            outputs[i] = Some(self.expanded(
                &q_nope.narrow(0, seq.start, seq.len)?,
                &q_pe.narrow(0, seq.start, seq.len)?,
                seq,
                cache,
                layer,
            )?);
        }
        let outputs: Vec<Tensor> = outputs.into_iter().map(|o| o.expect("every sequence attended")).collect();
        Ok(self.o_proj.forward(&Tensor::cat(&outputs, 0)?)?)
    }

    /// Naive form over the sequence's whole context: `[len, heads·d_v]`.
    fn expanded(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        seq: &SeqChunk,
        cache: &LatentCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (len, ctx) = (seq.len, seq.context_len);
        let dim = self.rank + self.d_rope;
        let mut latents = vec![0f32; ctx * dim];
        gather_latents(cache.layer(layer), &seq.block_table, ctx, &mut latents);
        let latents = Tensor::from_vec(latents, (ctx, dim), &Device::Cpu)?;
        let c_kv = latents.narrow(1, 0, self.rank)?;
        let k_pe = latents.narrow(1, self.rank, self.d_rope)?;

        let kv = self.kv_b_proj.forward(&c_kv)?.reshape((ctx, self.heads, self.d_nope + self.d_v))?;
        let k_nope = kv.narrow(2, 0, self.d_nope)?.transpose(0, 1)?.contiguous()?; // [heads, ctx, d_nope]
        let v = kv.narrow(2, self.d_nope, self.d_v)?.transpose(0, 1)?.contiguous()?; // [heads, ctx, d_v]
        let q_nope = q_nope.transpose(0, 1)?.contiguous()?; // [heads, len, d_nope]
        let q_pe = q_pe.transpose(0, 1)?.contiguous()?.reshape((self.heads * len, self.d_rope))?;

        let nope_scores = q_nope.matmul(&k_nope.transpose(1, 2)?)?;
        let rope_scores = q_pe.matmul(&k_pe.t()?)?.reshape((self.heads, len, ctx))?;
        let scores = ((nope_scores + rope_scores)? * self.scale as f64)?;
        // Query i sits at position ctx - len + i and sees keys up to there.
        let first = ctx - len;
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..ctx).map(move |j| if j <= first + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, len, ctx), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let out = probs.matmul(&v)?; // [heads, len, d_v]
        Ok(out.transpose(0, 1)?.reshape((len, self.heads * self.d_v))?)
    }

    /// Absorbed form for one new token per sequence: `[seqs, heads·d_v]`.
    fn absorbed(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        seqs: &[&SeqChunk],
        cache: &LatentCache,
        layer: usize,
    ) -> Result<Tensor> {
        let n = seqs.len();
        // q_lat_h = W_UK_hᵀ q_nope_h, batched over heads: [heads, n, d_nope] x [heads, d_nope, rank].
        let q_lat = q_nope.transpose(0, 1)?.contiguous()?.matmul(&self.w_uk)?;
        let q_lat = q_lat.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        let q_pe = q_pe.flatten_all()?.to_vec1::<f32>()?;
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
        let mut tables = vec![0u32; n * max_blocks];
        for (row, s) in tables.chunks_exact_mut(max_blocks).zip(seqs) {
            row[..s.block_table.len()].copy_from_slice(&s.block_table);
        }
        let context_lens: Vec<u32> = seqs.iter().map(|s| s.context_len as u32).collect();
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
        // o_h = W_UV_h u_h: [heads, n, rank] x [heads, rank, d_v].
        let u = Tensor::from_vec(attended, (n, self.heads, self.rank), &Device::Cpu)?.transpose(0, 1)?.contiguous()?;
        let out = u.matmul(&self.w_uv_t)?; // [heads, n, d_v]
        Ok(out.transpose(0, 1)?.reshape((n, self.heads * self.d_v))?)
    }
}
