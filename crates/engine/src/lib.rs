//! The continuous-batching engine: requests in, tokens out, over a paged latent cache.
//!
//! [`EngineHandle::submit`] queues a [`GenerateRequest`]; the engine thread's loop schedules a step
//! ([`scheduler`]), runs the model over it and samples ([`sampler`]); the [`block_manager`] owns the
//! cache blocks and the prefix cache.

pub mod block_manager;
pub mod detokenizer;
pub mod engine;
pub mod metrics;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

pub use engine::{
    EngineConfig, EngineError, EngineEvent, EngineHandle, FinishReason, Finished, GenerateRequest, RequestStream,
    TokenEvent, Usage,
};
pub use metrics::EngineMetrics;
pub use sampler::{SamplingParams, TokenLogprob};
