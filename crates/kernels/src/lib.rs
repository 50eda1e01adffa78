//! The hot loops of mlaserve, kept apart from any model or request logic so that each has one CPU
//! implementation here and, later, a CUDA one behind the `cuda` feature with the same arguments.
//!
//! - [`matmul`]: `x · wᵀ` over `[out, in]` weights, streaming the weight once per step.
//! - [`mla`]: paged MLA attention over the latent cache (absorbed decode, latent gather for prefill).
//! - [`routing`]: DeepSeekMoE router (softmax/sigmoid scoring, greedy / group-limited / noaux_tc top-k).
//! - [`vector`]: the small dot/axpy building blocks both use.

pub mod matmul;
pub mod mla;
pub mod routing;
pub mod vector;
