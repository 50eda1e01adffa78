//! What one forward step computes: the new tokens of several sequences, laid end to end.
//!
//! A sequence contributes a prefill chunk (prompt tokens), one decode token, or, when it recomputes
//! after preemption, both; all kinds share a step. Positions and cache slots follow from each sequence's context length and
//! block table.

/// One sequence's part of a step.
#[derive(Clone, Debug)]
pub struct SeqChunk {
    /// Offset of its first new token in [`ForwardBatch::token_ids`].
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Tokens in the cache after this step (the ones before plus the new ones).
    pub context_len: usize,
    /// Cache blocks holding the sequence, in order; covers `context_len` tokens.
    pub block_table: Vec<u32>,
    /// Length of the sequence's prompt. Tokens before it take MLA's expanded form, the generated
    /// ones after it the absorbed form, also when a preempted sequence recomputes them.
    pub num_prompt_tokens: usize,
}

impl SeqChunk {
    /// Position of the first new token.
    pub fn first_position(&self) -> usize {
        self.context_len - self.len
    }
}

#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Position of every token.
    pub fn positions(&self) -> Vec<u32> {
        self.seqs.iter().flat_map(|s| (s.first_position()..s.context_len).map(|p| p as u32)).collect()
    }

    /// Cache slot (`block * block_size + offset`) of every token.
    pub fn slots(&self, block_size: usize) -> Vec<u32> {
        self.seqs
            .iter()
            .flat_map(|s| {
                (s.first_position()..s.context_len)
                    .map(move |p| s.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32)
            })
            .collect()
    }

    /// Checks that the chunks tile the token array in order and their tables cover their contexts.
    pub fn validate(&self, block_size: usize) -> Result<(), String> {
        let mut next = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            if s.start != next || s.len == 0 || s.len > s.context_len {
                return Err(format!(
                    "sequence {i}: chunk {}+{} of context {} does not follow token {next}",
                    s.start, s.len, s.context_len
                ));
            }
            if s.block_table.len() * block_size < s.context_len {
                return Err(format!(
                    "sequence {i}: {} blocks cannot hold {} tokens",
                    s.block_table.len(),
                    s.context_len
                ));
            }
            next += s.len;
        }
        if next != self.token_ids.len() {
            return Err(format!("chunks cover {next} of {} tokens", self.token_ids.len()));
        }
        Ok(())
    }
}
