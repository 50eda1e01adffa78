//! Owner of the latent cache's blocks: reference counts, the free list and the prefix cache.
//!
//! A full block can be registered under the chained hash of its tokens and every token before it.
//! When its last user frees it, it stays in the prefix cache while sitting on the free list, and a
//! later sequence with the same prefix takes it back instead of recomputing. Allocation evicts the
//! least recently freed block first; a sequence's blocks are freed tail first, so a prefix outlives
//! its suffixes. Ask, then act: `can_allocate` before `allocate`, so nothing is half-allocated.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

#[derive(Clone, Default)]
struct Block {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache.
    hash: Option<u64>,
    /// The block's tokens, checked on every hit so a hash collision cannot serve wrong latents.
    tokens: Vec<u32>,
    /// Position in the free list while `ref_count == 0`.
    freed_at: u64,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks ordered by when they were freed: the first is evicted first.
    free: BTreeSet<(u64, u32)>,
    cached: HashMap<u64, u32>,
    clock: u64,
    prefix_caching: bool,
}

/// Chained hash of one full block: its tokens and the hash of everything before it.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockManager {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free: (0..num_blocks as u32).map(|b| (b as u64, b)).collect(),
            cached: HashMap::new(),
            clock: num_blocks as u64,
            prefix_caching,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free, including evictable cached ones).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by live sequences.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    pub fn can_allocate(&self, n: usize) -> bool {
        n <= self.free.len()
    }

    /// Takes `n` free blocks, evicting their prefix-cache entries.
    pub fn allocate(&mut self, n: usize) -> Vec<u32> {
        assert!(self.can_allocate(n), "allocate({n}) with {} free blocks", self.free.len());
        (0..n)
            .map(|_| {
                let (_, id) = self.free.pop_first().expect("checked by can_allocate");
                let block = &mut self.blocks[id as usize];
                if let Some(hash) = block.hash.take() {
                    self.cached.remove(&hash);
                }
                block.tokens.clear();
                block.ref_count = 1;
                id
            })
            .collect()
    }

    /// Releases one reference to each block of a table, tail first.
    pub fn free(&mut self, table: &[u32]) {
        for &id in table.iter().rev() {
            let block = &mut self.blocks[id as usize];
            assert!(block.ref_count > 0, "block {id} freed twice");
            block.ref_count -= 1;
            if block.ref_count == 0 {
                block.freed_at = self.clock;
                self.free.insert((self.clock, id));
                self.clock += 1;
            }
        }
    }

    /// The cached blocks matching the longest prefix of `hashes` (with their `tokens`), without
    /// taking them. Also returns how many of them are on the free list (taking them uses up free
    /// blocks).
    pub fn cached_prefix(&self, hashes: &[u64], tokens: &[u32]) -> (Vec<u32>, usize) {
        if !self.prefix_caching {
            return (Vec::new(), 0);
        }
        let mut found = Vec::new();
        let mut idle = 0;
        for (hash, chunk) in hashes.iter().zip(tokens.chunks_exact(self.block_size)) {
            match self.cached.get(hash) {
                Some(&id) if self.blocks[id as usize].tokens == chunk => {
                    idle += usize::from(self.blocks[id as usize].ref_count == 0);
                    found.push(id);
                }
                _ => break,
            }
        }
        (found, idle)
    }

    /// Takes a reference to blocks found by [`Self::cached_prefix`].
    pub fn acquire(&mut self, blocks: &[u32]) {
        for &id in blocks {
            let block = &mut self.blocks[id as usize];
            if block.ref_count == 0 {
                self.free.remove(&(block.freed_at, id));
            }
            block.ref_count += 1;
        }
    }

    /// Registers a full, computed block in the prefix cache (unless another block already holds
    /// the same prefix).
    pub fn register(&mut self, id: u32, hash: u64, tokens: &[u32]) {
        if !self.prefix_caching || self.cached.contains_key(&hash) {
            return;
        }
        let block = &mut self.blocks[id as usize];
        if block.hash.is_none() {
            block.hash = Some(hash);
            block.tokens = tokens.to_vec();
            self.cached.insert(hash, id);
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let free_by_count = self.blocks.iter().filter(|b| b.ref_count == 0).count();
        assert_eq!(free_by_count, self.free.len());
        for (hash, id) in &self.cached {
            assert_eq!(self.blocks[*id as usize].hash, Some(*hash));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(tokens: &[u32], bs: usize) -> Vec<u64> {
        let mut parent = None;
        tokens
            .chunks_exact(bs)
            .map(|c| {
                let h = block_hash(parent, c);
                parent = Some(h);
                h
            })
            .collect()
    }

    #[test]
    fn allocate_and_free_return_every_block() {
        let mut m = BlockManager::new(4, 2, true);
        assert!(!m.can_allocate(5));
        let a = m.allocate(3);
        assert_eq!((m.num_used(), m.num_free()), (3, 1));
        m.free(&a);
        assert_eq!(m.num_free(), 4);
        m.check_invariants();
    }

    #[test]
    fn freed_prefix_is_found_again_and_evicted_last() {
        let mut m = BlockManager::new(4, 2, true);
        let tokens = [1, 2, 3, 4];
        let hs = hashes(&tokens, 2);
        let table = m.allocate(2);
        m.register(table[0], hs[0], &tokens[..2]);
        m.register(table[1], hs[1], &tokens[2..]);
        m.free(&table);

        let (found, idle) = m.cached_prefix(&hs, &tokens);
        assert_eq!((found.clone(), idle), (table.clone(), 2));
        // Another prefix with the same first block only matches one block.
        let other = [1, 2, 9, 9];
        assert_eq!(m.cached_prefix(&hashes(&other, 2), &other).0, vec![table[0]]);

        m.acquire(&found);
        assert_eq!(m.num_used(), 2);
        m.free(&found);
        // Tail freed first: evicting two blocks takes the never-used ones, then the tail block.
        let taken = m.allocate(3);
        assert!(!taken.contains(&table[0]) && taken.contains(&table[1]));
        assert_eq!(m.cached_prefix(&hs, &tokens).0, vec![table[0]]);
        m.check_invariants();
    }

    #[test]
    fn hash_collisions_are_caught_by_comparing_tokens() {
        let mut m = BlockManager::new(2, 2, true);
        let t = m.allocate(1);
        let h = block_hash(None, &[1, 2]);
        m.register(t[0], h, &[1, 2]);
        assert!(m.cached_prefix(&[h], &[7, 7]).0.is_empty());
    }

    #[test]
    fn prefix_caching_can_be_turned_off() {
        let mut m = BlockManager::new(2, 2, false);
        let t = m.allocate(1);
        let h = block_hash(None, &[1, 2]);
        m.register(t[0], h, &[1, 2]);
        m.free(&t);
        assert!(m.cached_prefix(&[h], &[1, 2]).0.is_empty());
    }
}
