//! A request's tokens as the scheduler sees them: how many are in the cache, and in which blocks.

use crate::block_manager::block_hash;

pub struct Sequence {
    pub id: u64,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose latents are in the cache; the rest are still to be computed.
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// Chained hashes of the full blocks of `tokens`, extended as tokens arrive.
    block_hashes: Vec<u64>,
    /// Blocks of `block_table` already registered in the prefix cache.
    pub num_registered: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: Option<usize>,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>) -> Self {
        Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered: 0,
            cached_tokens: None,
        }
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Hashes of every full block of tokens so far.
    pub fn block_hashes(&mut self, block_size: usize) -> &[u64] {
        let full = self.tokens.len() / block_size;
        while self.block_hashes.len() < full {
            let i = self.block_hashes.len();
            let parent = i.checked_sub(1).map(|p| self.block_hashes[p]);
            self.block_hashes.push(block_hash(parent, &self.tokens[i * block_size..(i + 1) * block_size]));
        }
        &self.block_hashes
    }

    /// Forgets the cache (after preemption): everything will be recomputed.
    pub fn reset_cache(&mut self) -> Vec<u32> {
        self.num_computed = 0;
        self.num_registered = 0;
        std::mem::take(&mut self.block_table)
    }
}
