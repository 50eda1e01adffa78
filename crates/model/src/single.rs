//! One sequence run through the model on its own cache: what `mlaserve generate` and the reference
//! tests need, without the engine's scheduler.

use candle_core::Tensor;

use crate::batch::{ForwardBatch, SeqChunk};
use crate::cache::LatentCache;
use crate::error::Result;
use crate::model::DeepSeek;

pub struct SingleSequence {
    cache: LatentCache,
    block_table: Vec<u32>,
    len: usize,
    /// Tokens given to [`SingleSequence::prefill`]; the ones after are generated.
    prompt_len: usize,
}

impl SingleSequence {
    /// Room for `capacity` tokens in blocks of `block_size`. The block table is laid out in reverse
    /// so that nothing can depend on a sequence's blocks being contiguous.
    pub fn new(model: &DeepSeek, capacity: usize, block_size: usize) -> Self {
        let num_blocks = capacity.div_ceil(block_size).max(1);
        SingleSequence {
            cache: model.new_cache(num_blocks, block_size),
            block_table: (0..num_blocks as u32).rev().collect(),
            len: 0,
            prompt_len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends prompt tokens in one step (MLA's expanded form) and returns the logits after the
    /// last of them, `[vocab_size]`.
    pub fn prefill(&mut self, model: &DeepSeek, tokens: &[u32]) -> Result<Tensor> {
        assert_eq!(self.prompt_len, self.len, "prefill after decode");
        self.prompt_len += tokens.len();
        self.step(model, tokens)
    }

    /// Appends one generated token (MLA's absorbed form) and returns the logits after it.
    pub fn decode(&mut self, model: &DeepSeek, token: u32) -> Result<Tensor> {
        self.step(model, &[token])
    }

    fn step(&mut self, model: &DeepSeek, tokens: &[u32]) -> Result<Tensor> {
        let context_len = self.len + tokens.len();
        let blocks = context_len.div_ceil(self.cache.block_size());
        let batch = ForwardBatch {
            token_ids: tokens.to_vec(),
            seqs: vec![SeqChunk {
                start: 0,
                len: tokens.len(),
                context_len,
                block_table: self.block_table[..blocks.min(self.block_table.len())].to_vec(),
                num_prompt_tokens: self.prompt_len,
            }],
        };
        let logits = model.forward(&batch, &mut self.cache)?;
        self.len = context_len;
        Ok(logits.squeeze(0)?)
    }
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}
