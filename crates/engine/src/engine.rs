//! The engine thread and its handle.
//!
//! The thread owns the model, the latent cache and the scheduler as plain values and loops
//! `schedule → forward → sample`. The async world reaches it through two channels: submissions go
//! in through an [`EngineHandle`], and each request's outputs come back on its own
//! [`RequestStream`]. Dropping the stream aborts the request: its blocks are freed at the next step.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use mlaserve_model::{DeepSeek, LatentCache};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::detokenizer::{Detokenizer, StopStrings};
use crate::metrics::EngineMetrics;
use crate::sampler::{Sampler, SamplingParams, TokenLogprob};
use crate::scheduler::{Schedule, Scheduler, SchedulerConfig};
use crate::sequence::Sequence;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// Longest sequence (prompt plus output) the engine accepts.
    pub max_model_len: usize,
    pub prefix_caching: bool,
}

/// A validated generation request: token ids in, tokens and text out.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    Token(TokenEvent),
    Finished(Finished),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub token_id: u32,
    /// Text that became safe to emit with this token (may be empty).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token, stop token or stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    /// Text held back for stop-string matching, released at the end.
    pub text: String,
    pub usage: Usage,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {len} tokens, but the context length is {max} (prompt plus at least one generated token)")]
    PromptTooLong { len: usize, max: usize },
    #[error("max_model_len {max_model_len} exceeds the latent cache's {capacity} tokens")]
    CacheTooSmall { max_model_len: usize, capacity: usize },
    #[error("the model failed: {0}")]
    Model(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// One request's outputs, in order, ending with `Finished` or an error.
pub struct RequestStream {
    rx: UnboundedReceiver<Result<EngineEvent, EngineError>>,
}

impl RequestStream {
    pub async fn next(&mut self) -> Option<Result<EngineEvent, EngineError>> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime (CLI, tests, benchmarks).
    pub fn blocking_next(&mut self) -> Option<Result<EngineEvent, EngineError>> {
        self.rx.blocking_recv()
    }
}

struct Submission {
    id: u64,
    request: GenerateRequest,
    tx: UnboundedSender<Result<EngineEvent, EngineError>>,
}

/// Cloneable entry point to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    next_id: Arc<AtomicU64>,
    /// Requests submitted and not yet finished or dropped.
    active: Arc<AtomicUsize>,
    metrics: Arc<EngineMetrics>,
    max_model_len: usize,
}

impl EngineHandle {
    /// Starts the engine thread over `model`.
    pub fn spawn(
        model: DeepSeek,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        let capacity = cfg.num_blocks * cfg.block_size;
        if cfg.max_model_len > capacity {
            return Err(EngineError::CacheTooSmall { max_model_len: cfg.max_model_len, capacity });
        }
        let metrics = Arc::new(EngineMetrics::default());
        metrics.kv_blocks_total.store(cfg.num_blocks as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let cache = model.new_cache(cfg.num_blocks, cfg.block_size);
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            max_num_seqs: cfg.max_num_seqs,
            num_blocks: cfg.num_blocks,
            block_size: cfg.block_size,
            prefix_caching: cfg.prefix_caching,
        });
        let active = Arc::new(AtomicUsize::new(0));
        let engine = Engine {
            active: active.clone(),
            model,
            cache,
            scheduler,
            tokenizer,
            eos,
            max_model_len: cfg.max_model_len,
            requests: HashMap::new(),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("mlaserve-engine".into())
            .spawn(move || engine.run(rx))
            .map_err(|e| EngineError::Model(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle { tx, next_id: Arc::new(AtomicU64::new(0)), active, metrics, max_model_len: cfg.max_model_len })
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Requests submitted and not yet finished or abandoned.
    pub fn num_active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn is_idle(&self) -> bool {
        self.num_active() == 0
    }

    /// Queues a request; its outputs arrive on the returned stream.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if request.prompt.len() >= self.max_model_len {
            return Err(EngineError::PromptTooLong { len: request.prompt.len(), max: self.max_model_len });
        }
        let (tx, rx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Submission { id, request, tx }).is_err() {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(RequestStream { rx })
    }
}

/// What the engine keeps per request besides the scheduler's sequence.
struct RequestState {
    request: GenerateRequest,
    tx: UnboundedSender<Result<EngineEvent, EngineError>>,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stops: StopStrings,
}

struct Engine {
    model: DeepSeek,
    cache: LatentCache,
    scheduler: Scheduler,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    max_model_len: usize,
    requests: HashMap<u64, RequestState>,
    active: Arc<AtomicUsize>,
    metrics: Arc<EngineMetrics>,
}

impl Engine {
    fn run(mut self, rx: mpsc::Receiver<Submission>) {
        loop {
            if self.scheduler.is_idle() {
                match rx.recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => return, // every handle is gone
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.admit(s);
            }
            self.drop_abandoned();
            self.step();
            self.publish_gauges();
        }
    }

    fn admit(&mut self, s: Submission) {
        let r = &s.request;
        self.metrics.prompt_tokens_total.fetch_add(r.prompt.len() as u64, Ordering::Relaxed);
        let state = RequestState {
            sampler: Sampler::new(r.sampling.clone()),
            detokenizer: Detokenizer::new(self.tokenizer.clone(), &r.prompt, r.skip_special_tokens),
            stops: StopStrings::new(r.stop.clone()),
            request: s.request.clone(),
            tx: s.tx,
        };
        self.scheduler.add(Sequence::new(s.id, s.request.prompt));
        self.requests.insert(s.id, state);
    }

    /// Frees the sequences whose stream was dropped.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self.requests.iter().filter(|(_, r)| r.tx.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.scheduler.remove(id);
            self.requests.remove(&id);
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn step(&mut self) {
        let schedule = self.scheduler.schedule();
        if schedule.seqs.is_empty() {
            return;
        }
        // A panic is contained to the requests it concerns: the whole batch for the forward pass,
        // one request for its sampling; the engine keeps serving the others.
        let forward = catch_unwind(AssertUnwindSafe(|| self.model.forward(&schedule.batch, &mut self.cache)));
        let logits = match forward {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return self.fail_batch(&schedule, e.to_string()),
            Err(panic) => return self.fail_batch(&schedule, panic_message(&panic)),
        };
        self.scheduler.update(&schedule);
        for (row, s) in schedule.seqs.iter().enumerate().filter(|(_, s)| s.samples) {
            let sampled = logits.get(row).and_then(|l| l.to_vec1::<f32>()).map_err(|e| e.to_string()).and_then(|l| {
                catch_unwind(AssertUnwindSafe(|| self.emit_next_token(s.seq_id, &l))).map_err(|p| panic_message(&p))
            });
            if let Err(message) = sampled {
                tracing::error!("request {} failed: {message}", s.seq_id);
                self.finish(s.seq_id, Err(EngineError::Model(message)));
            }
        }
    }

    fn fail_batch(&mut self, schedule: &Schedule, message: String) {
        tracing::error!("forward failed: {message}");
        for s in &schedule.seqs {
            self.finish(s.seq_id, Err(EngineError::Model(message.clone())));
        }
    }

    fn emit_next_token(&mut self, id: u64, logits: &[f32]) {
        let (Some(seq), Some(state)) = (self.scheduler.get(id), self.requests.get_mut(&id)) else { return };
        let (token, logprob) = state.sampler.sample(logits, &seq.tokens[..seq.prompt_len], seq.output());
        let output_len = seq.output().len() + 1;
        let total_len = seq.tokens.len() + 1;
        self.scheduler.append_token(id, token);
        self.metrics.generation_tokens_total.fetch_add(1, Ordering::Relaxed);

        let r = &state.request;
        let ends = (!r.ignore_eos && self.eos.contains(&token)) || r.stop_token_ids.contains(&token);
        let mut reason = ends.then_some(FinishReason::Stop);
        if !ends {
            let (text, stopped) = state.stops.push(&state.detokenizer.push(token));
            let _ = state.tx.send(Ok(EngineEvent::Token(TokenEvent { token_id: token, text, logprob })));
            if stopped {
                reason = Some(FinishReason::Stop);
            }
        }
        if reason.is_none() && (output_len >= r.max_tokens || total_len >= self.max_model_len) {
            reason = Some(FinishReason::Length);
        }
        if let Some(reason) = reason {
            let text = if reason == FinishReason::Stop { String::new() } else { state.stops.flush() };
            self.finish(id, Ok(reason))
                .map(|(usage, tx)| tx.send(Ok(EngineEvent::Finished(Finished { reason, text, usage }))));
        }
    }

    /// Removes a request; on error tells its client. Returns its usage and channel on success.
    fn finish(
        &mut self,
        id: u64,
        outcome: Result<FinishReason, EngineError>,
    ) -> Option<(Usage, UnboundedSender<Result<EngineEvent, EngineError>>)> {
        let seq = self.scheduler.remove(id);
        let state = self.requests.remove(&id)?;
        self.active.fetch_sub(1, Ordering::SeqCst);
        match outcome {
            Err(e) => {
                let _ = state.tx.send(Err(e));
                None
            }
            Ok(_) => {
                let seq = seq?;
                let usage = Usage {
                    prompt_tokens: seq.prompt_len,
                    completion_tokens: seq.output().len(),
                    cached_tokens: seq.cached_tokens.unwrap_or(0),
                };
                Some((usage, state.tx))
            }
        }
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.requests_running.store(self.scheduler.num_running() as u64, Ordering::Relaxed);
        m.requests_waiting.store(self.scheduler.num_waiting() as u64, Ordering::Relaxed);
        m.kv_blocks_used.store(self.scheduler.blocks.num_used() as u64, Ordering::Relaxed);
        m.preemptions_total.store(self.scheduler.preemptions, Ordering::Relaxed);
        m.prefix_cache_hit_tokens_total.store(self.scheduler.prefix_hit_tokens, Ordering::Relaxed);
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    let text = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
    format!("panicked: {}", text.unwrap_or_else(|| "unknown cause".into()))
}
