//! The DeepSeek V2/V3 decoder: embeddings, `num_hidden_layers` blocks of MLA + (dense MLP | MoE),
//! final norm and `lm_head`. Tensors of layers past `num_hidden_layers` (the MTP module) are never
//! read. Logits of ids the tokenizer cannot produce are masked.

use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::batch::ForwardBatch;
use crate::cache::LatentCache;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::mla::Mla;
use crate::moe::{Mlp, Moe};
use crate::rope::Rope;
use crate::weights::Weights;

enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Mla,
    post_attention_layernorm: RmsNorm,
    mlp: Ffn,
}

pub struct DeepSeek {
    config: Config,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Ids at or past this (the tokenizer's size) get −∞ logits.
    vocab_limit: usize,
}

impl DeepSeek {
    pub fn new(config: &Config, w: &Weights, vocab_limit: usize) -> Result<Self> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        let rope = Arc::new(Rope::new(config));
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let mlp = match &config.moe {
                    Some(moe) if config.is_moe_layer(i) => Ffn::Moe(Moe::new(moe, w, &format!("{p}.mlp"), h)?),
                    _ => Ffn::Dense(Mlp::new(w, &format!("{p}.mlp"), h, config.intermediate_size)?),
                };
                Ok(DecoderLayer {
                    input_layernorm: w.rms_norm(&format!("{p}.input_layernorm"), h, config.rms_norm_eps)?,
                    self_attn: Mla::new(config, w, &format!("{p}.self_attn"), rope.clone())?,
                    post_attention_layernorm: w.rms_norm(
                        &format!("{p}.post_attention_layernorm"),
                        h,
                        config.rms_norm_eps,
                    )?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if config.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::new(embed_tokens.flatten_all()?.to_vec1()?, v, h)
        } else {
            w.linear("lm_head", v, h)?
        };
        let norm = w.rms_norm("model.norm", h, config.rms_norm_eps)?;
        w.finish_progress();
        if vocab_limit == 0 || vocab_limit > v {
            return Err(ModelError::Config(format!("the tokenizer has {vocab_limit} ids but vocab_size is {v}")));
        }
        Ok(DeepSeek { config: config.clone(), embed_tokens, layers, norm, lm_head, vocab_limit })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A cache sized for this model.
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> LatentCache {
        LatentCache::new(self.config.num_hidden_layers, num_blocks, block_size, self.config.latent_dim())
    }

    /// Runs one step and returns the logits of each sequence's last new token, `[seqs, vocab_size]`.
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut LatentCache) -> Result<Tensor> {
        batch.validate(cache.block_size()).map_err(|m| ModelError::Config(format!("invalid batch: {m}")))?;
        let ids = Tensor::from_slice(&batch.token_ids, batch.num_tokens(), &Device::Cpu)?;
        let mut h = self.embed_tokens.index_select(&ids, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = layer.self_attn.forward(&layer.input_layernorm.forward(&h)?, batch, cache, i)?;
            h = (h + attn)?;
            let x = layer.post_attention_layernorm.forward(&h)?;
            let ffn = match &layer.mlp {
                Ffn::Dense(mlp) => {
                    Tensor::from_vec(mlp.forward_rows(&x.flatten_all()?.to_vec1::<f32>()?), x.dims2()?, &Device::Cpu)?
                }
                Ffn::Moe(moe) => moe.forward(&x)?,
            };
            h = (h + ffn)?;
        }
        let last: Vec<u32> = batch.seqs.iter().map(|s| (s.start + s.len - 1) as u32).collect();
        let last = Tensor::from_vec(last, batch.seqs.len(), &Device::Cpu)?;
        let h = self.norm.forward(&h.index_select(&last, 0)?)?;
        let v = self.config.vocab_size;
        let mut logits = self.lm_head.forward_rows(&h.flatten_all()?.to_vec1::<f32>()?);
        // Rows past the tokenizer's ids are padding the model never learnt to avoid.
        for row in logits.chunks_exact_mut(v) {
            row[self.vocab_limit..].fill(f32::NEG_INFINITY);
        }
        Ok(Tensor::from_vec(logits, (batch.seqs.len(), v), &Device::Cpu)?)
    }
}
