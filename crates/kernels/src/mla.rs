//! MLA attention over the paged latent cache.
//!
//! The cache of one layer is a single store shaped `[num_blocks, block_size, dim]` where each row is
//! one token's `[c_kv (kv_lora_rank) | k_pe (rope_dim)]`: the normalised latent and the roped key
//! shared by all heads. A sequence reaches its rows through a block table. These arguments (flat
//! arrays, one padded block-table row per query) are the interface the CUDA kernel will share.

use rayon::prelude::*;

use crate::vector::{axpy, dot, softmax_in_place};

/// One layer's latent store, `[num_blocks, block_size, dim]` row-major.
#[derive(Clone, Copy)]
pub struct PagedLatents<'a> {
    pub data: &'a [f32],
    pub block_size: usize,
    pub dim: usize,
}

impl<'a> PagedLatents<'a> {
    /// The row of the token at `pos` of a sequence with this block table.
    #[inline]
    pub fn row(&self, block_table: &[u32], pos: usize) -> &'a [f32] {
        let block = block_table[pos / self.block_size] as usize;
        let start = (block * self.block_size + pos % self.block_size) * self.dim;
        &self.data[start..start + self.dim]
    }
}

/// Block tables and context lengths of a batch of queries: query `i` attends to the first
/// `context_lens[i]` tokens of the sequence whose table is `tables[i * max_blocks..][..max_blocks]`.
#[derive(Clone, Copy)]
pub struct BlockTables<'a> {
    pub tables: &'a [u32],
    pub max_blocks: usize,
    pub context_lens: &'a [u32],
}

impl<'a> BlockTables<'a> {
    pub fn num_queries(&self) -> usize {
        self.context_lens.len()
    }

    pub fn table(&self, query: usize) -> &'a [u32] {
        &self.tables[query * self.max_blocks..(query + 1) * self.max_blocks]
    }
}

/// Inputs of the weight-absorbed MLA attention.
pub struct MlaDecodeArgs<'a> {
    /// `W_UKᵀ q_nope` per query and head, `[queries, num_heads, kv_lora_rank]`.
    pub q_latent: &'a [f32],
    /// Roped query part, `[queries, num_heads, rope_dim]`.
    pub q_rope: &'a [f32],
    pub num_heads: usize,
    pub kv_lora_rank: usize,
    /// Softmax scale τ (based on the 192-d q·k head, not the 576-d latent).
    pub scale: f32,
    pub cache: PagedLatents<'a>,
    pub tables: BlockTables<'a>,
}

/// Absorbed MLA attention: for every query and head, `softmax_s(τ (q_lat·c_s + q_pe·k_pe,s)) · c_s`.
/// Writes `[queries, num_heads, kv_lora_rank]` into `out`: the attended latent, still to be
/// multiplied by `W_UV` and `o_proj`.
pub fn mla_decode(args: &MlaDecodeArgs, out: &mut [f32]) {
    let (heads, rank) = (args.num_heads, args.kv_lora_rank);
    let rope = args.cache.dim - rank;
    assert_eq!(out.len(), args.tables.num_queries() * heads * rank);
    assert_eq!(args.q_latent.len(), out.len());
    assert_eq!(args.q_rope.len(), args.tables.num_queries() * heads * rope);

    // One work item per (query, head): each reads the query's latents once, so the order of every
    // reduction is fixed by the sequence alone.
    out.par_chunks_mut(rank).enumerate().for_each(|(item, out)| {
        let query = item / heads;
        let table = args.tables.table(query);
        let len = args.tables.context_lens[query] as usize;
        let q_lat = &args.q_latent[item * rank..(item + 1) * rank];
        let q_pe = &args.q_rope[item * rope..(item + 1) * rope];

        let mut probs: Vec<f32> = (0..len)
            .map(|pos| {
                let row = args.cache.row(table, pos);
                args.scale * (dot(q_lat, &row[..rank]) + dot(q_pe, &row[rank..]))
            })
            .collect();
        softmax_in_place(&mut probs);

        out.fill(0.0);
        for (pos, p) in probs.iter().enumerate() {
            axpy(*p, &args.cache.row(table, pos)[..rank], out);
        }
    });
}

/// Copies the first `len` latent rows of one sequence into `out` (`[len, dim]`), for the expanded
/// (prefill) form of attention.
pub fn gather_latents(cache: PagedLatents, block_table: &[u32], len: usize, out: &mut [f32]) {
    assert_eq!(out.len(), len * cache.dim);
    for (pos, dst) in out.chunks_exact_mut(cache.dim).enumerate() {
        dst.copy_from_slice(cache.row(block_table, pos));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.7331).sin()).collect()
    }

    /// Naive attention over contiguous latents, in f64.
    fn reference(q_lat: &[f32], q_pe: &[f32], rows: &[Vec<f32>], rank: usize, scale: f32) -> Vec<f32> {
        let scores: Vec<f64> = rows
            .iter()
            .map(|r| {
                let s: f64 = q_lat.iter().zip(&r[..rank]).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>()
                    + q_pe.iter().zip(&r[rank..]).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>();
                s * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        (0..rank).map(|c| rows.iter().zip(&exps).map(|(r, e)| r[c] as f64 * e / sum).sum::<f64>() as f32).collect()
    }

    #[test]
    fn paged_decode_matches_contiguous_reference() {
        let (rank, rope, heads, block_size, num_blocks) = (20, 6, 3, 4, 12);
        let dim = rank + rope;
        let data = pseudo(num_blocks * block_size * dim, 1.0);
        let cache = PagedLatents { data: &data, block_size, dim };
        // Two queries over scattered blocks, of different lengths (one ends mid-block).
        let max_blocks = 4;
        let tables = [7u32, 2, 9, 0, 3, 11, 5, 1];
        let context_lens = [13u32, 9];
        let q_latent = pseudo(2 * heads * rank, 2.0);
        let q_rope = pseudo(2 * heads * rope, 3.0);
        let args = MlaDecodeArgs {
            q_latent: &q_latent,
            q_rope: &q_rope,
            num_heads: heads,
            kv_lora_rank: rank,
            scale: 0.3,
            cache,
            tables: BlockTables { tables: &tables, max_blocks, context_lens: &context_lens },
        };
        let mut out = vec![0f32; 2 * heads * rank];
        mla_decode(&args, &mut out);

        for q in 0..2 {
            let table = &tables[q * max_blocks..(q + 1) * max_blocks];
            let rows: Vec<Vec<f32>> = (0..context_lens[q] as usize).map(|p| cache.row(table, p).to_vec()).collect();
            for h in 0..heads {
                let i = q * heads + h;
                let want =
                    reference(&q_latent[i * rank..(i + 1) * rank], &q_rope[i * rope..(i + 1) * rope], &rows, rank, 0.3);
                for (a, b) in out[i * rank..(i + 1) * rank].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "query {q} head {h}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn gather_follows_the_block_table() {
        let (block_size, dim) = (2, 3);
        let data: Vec<f32> = (0..4 * block_size * dim).map(|i| i as f32).collect();
        let cache = PagedLatents { data: &data, block_size, dim };
        let mut out = vec![0f32; 3 * dim];
        gather_latents(cache, &[3, 1], 3, &mut out);
        assert_eq!(out, [18., 19., 20., 21., 22., 23., 6., 7., 8.]);
    }
}
