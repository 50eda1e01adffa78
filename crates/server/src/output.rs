//! From engine events to API responses: merging a request's choices, logprob entries, usage and
//! the latency metrics every response records.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::response::sse::Event;
use futures_util::stream::{self, select_all, Stream, StreamExt};
use mlaserve_engine::{EngineEvent, FinishReason, RequestStream, TokenEvent, Usage};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::ApiError;
use crate::metrics::HttpMetrics;

/// The events of several choices as one stream of `(choice index, event)`, cut off with a
/// timeout error at `deadline` (dropping the streams aborts the requests in the engine).
pub fn merge(
    streams: Vec<RequestStream>,
    deadline: Instant,
) -> impl Stream<Item = (usize, Result<EngineEvent, ApiError>)> + Send {
    let mut all =
        select_all(streams.into_iter().enumerate().map(|(i, s)| {
            Box::pin(stream::unfold(s, move |mut s| async move { s.next().await.map(|e| ((i, e), s)) }))
        }));
    async_stream::stream! {
        loop {
            match tokio::time::timeout_at(deadline.into(), all.next()).await {
                Ok(Some((i, event))) => yield (i, event.map_err(ApiError::from)),
                Ok(None) => break,
                Err(_) => {
                    yield (0, Err(ApiError::timeout()));
                    break;
                }
            }
        }
    }
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn request_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{:x}{:06x}", unix_now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One token's text as the client sees it in logprobs.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// A chat logprobs entry (`{"token", "logprob", "bytes", "top_logprobs"}`) for a token.
pub fn chat_logprob(tokenizer: &Tokenizer, t: &TokenEvent) -> Option<Value> {
    let lp = t.logprob.as_ref()?;
    let entry = |id: u32, logprob: f32| {
        let text = token_text(tokenizer, id);
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
    };
    let mut e = entry(t.token_id, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|(id, l)| entry(*id, *l)).collect();
    Some(e)
}

/// Usage summed over choices (the prompt counted once per prompt).
#[derive(Default)]
pub struct UsageTotals {
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

impl UsageTotals {
    /// Adds a finished choice; `first_of_prompt` counts its prompt.
    pub fn add(&mut self, u: &Usage, first_of_prompt: bool) {
        if first_of_prompt {
            self.prompt_tokens += u.prompt_tokens;
            self.cached_tokens += u.cached_tokens;
        }
        self.completion_tokens += u.completion_tokens;
    }

    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// Times one request for the latency histograms.
pub struct Timer {
    pub start: Instant,
    first: Option<Instant>,
    tokens: usize,
}

impl Timer {
    pub fn start() -> Self {
        Timer { start: Instant::now(), first: None, tokens: 0 }
    }

    pub fn token(&mut self, metrics: &HttpMetrics) {
        if self.first.is_none() {
            let now = Instant::now();
            metrics.time_to_first_token.observe(now - self.start);
            self.first = Some(now);
        }
        self.tokens += 1;
    }

    /// Records the end of the request; returns its latency in seconds.
    pub fn finish(&self, metrics: &HttpMetrics) -> f64 {
        let total = self.start.elapsed();
        metrics.e2e_latency.observe(total);
        if let (Some(first), true) = (self.first, self.tokens > 1) {
            metrics.time_per_output_token.observe(first.elapsed() / (self.tokens - 1) as u32);
        }
        total.as_secs_f64()
    }
}

/// An SSE `data:` event holding JSON.
pub fn sse_json(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// The SSE event that reports an error in the middle of a stream.
pub fn sse_error(e: ApiError) -> Event {
    sse_json(&e.body())
}
