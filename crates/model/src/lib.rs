//! DeepSeek V2 / V2-Lite / V3 / R1 (MLA + DeepSeekMoE) on candle, CPU, f32 compute.
//!
//! [`Checkpoint`] opens a Hugging Face folder, [`DeepSeek`] runs one step of a [`ForwardBatch`]
//! (prefill chunks and decode tokens together) over a paged [`LatentCache`]. The model keeps no
//! hidden state: everything a sequence has seen lives in the cache blocks its table names.

pub mod batch;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod error;
mod linear;
mod mla;
pub mod model;
mod moe;
mod rope;
pub mod single;
pub mod weights;

pub use batch::{ForwardBatch, SeqChunk};
pub use cache::LatentCache;
pub use checkpoint::{Checkpoint, GenerationConfig};
pub use config::Config;
pub use error::{ModelError, Result};
pub use model::DeepSeek;
pub use single::{argmax, SingleSequence};
