//! MLA attention over the paged latent cache: the absorbed form that decode runs over the latents,
//! and the expanded form of prefill chunks.
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

/// Inputs of the expanded (naive) MLA attention of a prefill chunk: one sequence's new queries over
/// its context, with per-head keys and values expanded from the latents by `kv_b_proj`.
pub struct MlaPrefillArgs<'a> {
    /// Non-rope query part, `[queries, num_heads, d_nope]`; query `i` sits at position
    /// `context - queries + i` and sees the positions up to its own.
    pub q_nope: &'a [f32],
    /// Roped query part, `[queries, num_heads, rope_dim]`.
    pub q_rope: &'a [f32],
    /// Expanded keys and values, `[context, num_heads, d_nope + d_v]`.
    pub kv: &'a [f32],
    /// The context's latent rows `[context, kv_lora_rank + rope_dim]`: their rope part is the key
    /// shared by all heads.
    pub latents: &'a [f32],
    pub num_heads: usize,
    pub d_nope: usize,
    pub d_v: usize,
    pub kv_lora_rank: usize,
    pub scale: f32,
}

/// Causal expanded MLA attention: for every query and head,
/// `softmax_s(τ (q_nope·k_nope,s + q_pe·k_pe,s)) · v_s` over `s ≤` the query's position. Writes
/// `[queries, num_heads, d_v]` into `out`.
///
/// Each query's reductions run over exactly its own causal context, in position order, so its
/// result does not depend on how the prompt was cut into chunks or which prefix came from the cache.
pub fn mla_prefill(args: &MlaPrefillArgs, out: &mut [f32]) {
    let (heads, d_nope, d_v, rank) = (args.num_heads, args.d_nope, args.d_v, args.kv_lora_rank);
    let queries = args.q_nope.len() / (heads * d_nope);
    let rope = args.q_rope.len() / (queries * heads).max(1);
    let dim = rank + rope;
    let context = args.latents.len() / dim;
    assert_eq!(args.q_nope.len(), queries * heads * d_nope);
    assert_eq!(args.kv.len(), context * heads * (d_nope + d_v));
    assert_eq!(out.len(), queries * heads * d_v);
    assert!(queries <= context, "{queries} queries in a context of {context}");

    let first = context - queries;
    out.par_chunks_mut(d_v).enumerate().for_each(|(item, out)| {
        let (query, head) = (item / heads, item % heads);
        let q_nope = &args.q_nope[item * d_nope..(item + 1) * d_nope];
        let q_pe = &args.q_rope[item * rope..(item + 1) * rope];
        let kv = |pos: usize| &args.kv[(pos * heads + head) * (d_nope + d_v)..][..d_nope + d_v];
        let mut probs: Vec<f32> = (0..=first + query)
            .map(|pos| {
                let k_pe = &args.latents[pos * dim + rank..(pos + 1) * dim];
                args.scale * (dot(q_nope, &kv(pos)[..d_nope]) + dot(q_pe, k_pe))
            })
            .collect();
        softmax_in_place(&mut probs);

        out.fill(0.0);
        for (pos, p) in probs.iter().enumerate() {
            axpy(*p, &kv(pos)[d_nope..], out);
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
    fn prefill_matches_reference_and_ignores_chunking() {
        let (heads, d_nope, d_v, rank, rope, context) = (3, 8, 5, 10, 4, 13);
        let dim = rank + rope;
        let q_nope = pseudo(context * heads * d_nope, 4.0);
        let q_rope = pseudo(context * heads * rope, 5.0);
        let kv = pseudo(context * heads * (d_nope + d_v), 6.0);
        let latents = pseudo(context * dim, 7.0);
        let run = |from: usize| {
            let args = MlaPrefillArgs {
                q_nope: &q_nope[from * heads * d_nope..],
                q_rope: &q_rope[from * heads * rope..],
                kv: &kv,
                latents: &latents,
                num_heads: heads,
                d_nope,
                d_v,
                kv_lora_rank: rank,
                scale: 0.4,
            };
            let mut out = vec![0f32; (context - from) * heads * d_v];
            mla_prefill(&args, &mut out);
            out
        };
        let whole = run(0);
        for pos in 0..context {
            for h in 0..heads {
                // Keys and values of head h as one "latent" row each: [k_nope | k_pe] and v.
                let keys: Vec<Vec<f32>> = (0..=pos)
                    .map(|s| {
                        let kv = &kv[(s * heads + h) * (d_nope + d_v)..][..d_nope];
                        [kv, &latents[s * dim + rank..(s + 1) * dim]].concat()
                    })
                    .collect();
                let q = [&q_nope[(pos * heads + h) * d_nope..][..d_nope], &q_rope[(pos * heads + h) * rope..][..rope]]
                    .concat();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| 0.4 * k.iter().zip(&q).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>())
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in 0..d_v {
                    let want: f64 = (0..=pos)
                        .map(|s| kv[(s * heads + h) * (d_nope + d_v) + d_nope + c] as f64 * exps[s] / sum)
                        .sum();
                    let got = whole[(pos * heads + h) * d_v + c];
                    assert!((got as f64 - want).abs() < 1e-5, "pos {pos} head {h}: {got} vs {want}");
                }
            }
        }
        // The last queries alone, as after a prefix-cache hit, give bit-identical rows.
        for from in [1, 7, 12] {
            assert_eq!(run(from), whole[from * heads * d_v..], "queries from {from}");
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
