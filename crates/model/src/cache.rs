//! The paged latent cache: per layer one preallocated store of fixed-size blocks, each token's row
//! holding `c_kv` (after `kv_a_layernorm`) and `k_pe` (after rope): `kv_lora_rank + qk_rope_head_dim`
//! values per token per layer, and nothing per head.

use mlaserve_kernels::mla::PagedLatents;

pub struct LatentCache {
    layers: Vec<Vec<f32>>,
    num_blocks: usize,
    block_size: usize,
    dim: usize,
}

impl LatentCache {
    /// Allocates `num_blocks` blocks of `block_size` tokens for each of `num_layers` layers.
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, dim: usize) -> Self {
        assert!(block_size > 0 && num_blocks > 0, "the latent cache needs at least one block");
        // Zeroed allocations are mapped lazily by the OS, so an unused cache costs no resident memory.
        let layers = (0..num_layers).map(|_| vec![0f32; num_blocks * block_size * dim]).collect();
        LatentCache { layers, num_blocks, block_size, dim }
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(num_layers: usize, dim: usize) -> usize {
        num_layers * dim * std::mem::size_of::<f32>()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn layer(&self, layer: usize) -> PagedLatents<'_> {
        PagedLatents { data: &self.layers[layer], block_size: self.block_size, dim: self.dim }
    }

    /// Writes `rows` (`[slots.len(), dim]`) to the given slots (`block * block_size + offset`).
    pub fn write(&mut self, layer: usize, slots: &[u32], rows: &[f32]) {
        assert_eq!(rows.len(), slots.len() * self.dim);
        let store = &mut self.layers[layer];
        for (slot, row) in slots.iter().zip(rows.chunks_exact(self.dim)) {
            let start = *slot as usize * self.dim;
            store[start..start + self.dim].copy_from_slice(row);
        }
    }
}
