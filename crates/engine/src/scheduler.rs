//! The scheduler decides what each step computes (vLLM v1 style: no phases, every sequence's
//! `num_computed` chases its token count under a per-step token budget).
//!
//! ```text
//! step budget = max_num_batched_tokens
//! 1. running, oldest first:  decode token (or the next prefill chunk)
//!       no block free → preempt the newest running sequence (free, recompute later)
//! 2. waiting, in order:      longest cached prefix → prefill chunk with what is left
//!       stops at max_num_seqs, an empty budget, or no blocks (and after any preemption)
//! ```

use std::collections::VecDeque;

use mlaserve_model::{ForwardBatch, SeqChunk};

use crate::block_manager::BlockManager;
use crate::sequence::Sequence;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub prefix_caching: bool,
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduled {
    pub seq_id: u64,
    pub num_tokens: usize,
    /// The chunk reaches the end of the sequence's tokens: its logits give the next token.
    pub samples: bool,
}

pub struct Schedule {
    pub batch: ForwardBatch,
    pub seqs: Vec<Scheduled>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    pub blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    pub preemptions: u64,
    pub prefix_hit_tokens: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.prefix_caching),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running.iter().chain(&self.waiting).find(|s| s.id == id)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.running.iter().chain(&self.waiting).map(|s| s.id).collect()
    }

    pub fn schedule(&mut self) -> Schedule {
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut picked: Vec<(usize, usize)> = Vec::new(); // (running index, tokens)
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = seq.num_uncomputed().min(budget);
            let need = self.blocks.blocks_for(seq.num_computed + n).saturating_sub(seq.block_table.len());
            while !self.blocks.can_allocate(need) && i < self.running.len() {
                self.preempt_newest();
                preempted = true;
            }
            if i == self.running.len() {
                break; // the sequence itself was the newest and is waiting again
            }
            let new = self.blocks.allocate(need);
            self.running[i].block_table.extend(new);
            picked.push((i, n));
            budget -= n;
            i += 1;
        }

        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else { break };
            let bs = self.blocks.block_size();
            // At least the last token is computed, so its logits exist.
            let max_hit = (seq.tokens.len() - 1) / bs;
            let hashes = seq.block_hashes(bs).to_vec();
            let (found, idle) = self.blocks.cached_prefix(&hashes[..max_hit.min(hashes.len())], &seq.tokens);
            let computed = found.len() * bs;
            let n = (seq.tokens.len() - computed).min(budget);
            let need = self.blocks.blocks_for(computed + n) - found.len();
            if !self.blocks.can_allocate(need + idle) {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            self.blocks.acquire(&found);
            seq.block_table = found;
            seq.block_table.extend(self.blocks.allocate(need));
            seq.num_computed = computed;
            seq.num_registered = computed / bs;
            seq.cached_tokens.get_or_insert(computed);
            self.prefix_hit_tokens += computed as u64;
            self.running.push(seq);
            picked.push((self.running.len() - 1, n));
            budget -= n;
        }

        let mut schedule = Schedule { batch: ForwardBatch::default(), seqs: Vec::with_capacity(picked.len()) };
        for (i, n) in picked {
            let seq = &self.running[i];
            let start = schedule.batch.token_ids.len();
            schedule.batch.token_ids.extend_from_slice(&seq.tokens[seq.num_computed..seq.num_computed + n]);
            schedule.batch.seqs.push(SeqChunk {
                start,
                len: n,
                context_len: seq.num_computed + n,
                block_table: seq.block_table.clone(),
                num_prompt_tokens: seq.prompt_len,
            });
            schedule.seqs.push(Scheduled {
                seq_id: seq.id,
                num_tokens: n,
                samples: seq.num_computed + n == seq.tokens.len(),
            });
        }
        schedule
    }

    /// Records that a step ran: the scheduled tokens are now in the cache, and newly filled blocks
    /// join the prefix cache.
    pub fn update(&mut self, schedule: &Schedule) {
        let bs = self.blocks.block_size();
        for s in &schedule.seqs {
            let Some(seq) = self.running.iter_mut().find(|q| q.id == s.seq_id) else { continue };
            seq.num_computed += s.num_tokens;
            let full = seq.num_computed / bs;
            let hashes = seq.block_hashes(bs).to_vec();
            for (b, hash) in hashes.iter().enumerate().take(full).skip(seq.num_registered) {
                self.blocks.register(seq.block_table[b], *hash, &seq.tokens[b * bs..(b + 1) * bs]);
            }
            seq.num_registered = full;
        }
    }

    pub fn append_token(&mut self, id: u64, token: u32) {
        if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
            seq.tokens.push(token);
        }
    }

    /// Removes a sequence (finished or aborted) and frees its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i).expect("index from position")
        };
        self.blocks.free(&seq.block_table);
        Some(seq)
    }

    fn preempt_newest(&mut self) {
        let mut seq = self.running.pop().expect("preempt with running sequences");
        let table = seq.reset_cache();
        self.blocks.free(&table);
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }
}
