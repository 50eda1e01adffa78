//! `POST /v1/completions`: raw prompts (text or token ids, one or several) → engine → text.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use mlaserve_engine::{EngineEvent, RequestStream, TokenEvent};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::output::{finish_reason, merge, request_id, sse_error, sse_json, token_text, unix_now, Timer, UsageTotals};
use crate::protocol::{CompletionRequest, GenerationFields, Prompt};
use crate::state::{AppState, Serving};
use crate::validate::{self, Limits, MAX_N};

/// OpenAI's limit on `logprobs` for text completions.
const MAX_LOGPROBS: i64 = 5;

pub async fn completions(State(state): State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    let timer = Timer::start();
    let serving = state.serving()?;
    let req: CompletionRequest = body.read()?;
    let fields: GenerationFields = body.read()?;
    AppState::check_model(&serving, req.model.as_deref())?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported."));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {k}."),
            ))
        }
    };
    let max_model_len = serving.engine.max_model_len();
    let limits = Limits { max_model_len, vocab_size: serving.vocab_size, defaults: &serving.defaults };
    let generation = validate::generation(&fields, "prompt", ("max_tokens", fields.max_tokens), logprobs, &limits)?;

    let prompts = tokenize(&serving, req.prompt)?;
    if (prompts.len() * generation.n) as i64 > MAX_N {
        return Err(ApiError::invalid(
            "prompt",
            format!("A request may ask for at most {MAX_N} completions in all (prompts × n)."),
        ));
    }
    state.admit(&serving, prompts.len() * generation.n)?;
    let mut streams = Vec::with_capacity(prompts.len() * generation.n);
    for prompt in &prompts {
        for i in 0..generation.n {
            streams.push(serving.engine.submit(generation.request(prompt, i, max_model_len)?)?);
        }
    }
    let response = CompletionResponse {
        id: request_id("cmpl"),
        created: unix_now(),
        state: state.clone(),
        serving,
        n: generation.n,
        timer,
    };
    if generation.stream {
        Ok(Sse::new(response.stream(streams, generation.include_usage))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        Ok(Json(response.collect(streams).await?).into_response())
    }
}

fn tokenize(serving: &Serving, prompt: Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| -> Result<Vec<u32>, ApiError> {
        Ok(serving.tokenizer.encode(text, false).map_err(ApiError::internal)?.get_ids().to_vec())
    };
    let prompts = match prompt {
        Prompt::Text(t) => vec![encode(&t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids],
        Prompt::TokenLists(lists) => lists,
    };
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty."));
    }
    if let Some(bad) = prompts.iter().flatten().find(|id| **id as usize >= serving.vocab_size) {
        return Err(ApiError::invalid("prompt", format!("Token id {bad} is out of the vocabulary.")));
    }
    Ok(prompts)
}

struct CompletionResponse {
    id: String,
    created: u64,
    state: AppState,
    serving: Arc<Serving>,
    n: usize,
    timer: Timer,
}

/// Text-completion logprobs of some tokens, in OpenAI's legacy layout.
#[derive(Default)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Map<String, Value>>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    fn push(&mut self, serving: &Serving, t: &TokenEvent, offset: usize) {
        let Some(lp) = &t.logprob else { return };
        self.tokens.push(token_text(&serving.tokenizer, t.token_id));
        self.token_logprobs.push(lp.logprob);
        self.top_logprobs.push(lp.top.iter().map(|(id, l)| (token_text(&serving.tokenizer, *id), json!(l))).collect());
        self.text_offset.push(offset);
    }

    fn json(self) -> Value {
        if self.tokens.is_empty() {
            return Value::Null;
        }
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset})
    }
}

impl CompletionResponse {
    fn body(&self, object: &str, choices: Value) -> Value {
        json!({"id": self.id, "object": object, "created": self.created, "model": self.serving.model_name,
               "choices": choices})
    }

    fn stream(
        mut self,
        streams: Vec<RequestStream>,
        include_usage: bool,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        async_stream::stream! {
            let metrics = self.state.metrics.clone();
            let mut usage = UsageTotals::default();
            let mut offsets = vec![0usize; streams.len()];
            let mut events = std::pin::pin!(merge(streams, self.timer.start + self.state.settings.request_timeout));
            while let Some((i, event)) = events.next().await {
                let (text, logprobs, reason) = match event {
                    Ok(EngineEvent::Token(t)) => {
                        self.timer.token(&metrics);
                        let mut lp = Logprobs::default();
                        lp.push(&self.serving, &t, offsets[i]);
                        (t.text, lp.json(), None)
                    }
                    Ok(EngineEvent::Finished(f)) => {
                        usage.add(&f.usage, i % self.n == 0);
                        (f.text, Value::Null, Some(finish_reason(f.reason)))
                    }
                    Err(e) => {
                        yield Ok(sse_error(e));
                        break;
                    }
                };
                if text.is_empty() && logprobs.is_null() && reason.is_none() {
                    continue;
                }
                offsets[i] += text.len();
                yield Ok(sse_json(&self.body("text_completion", json!([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]))));
            }
            if include_usage {
                let mut chunk = self.body("text_completion", json!([]));
                chunk["usage"] = usage.json();
                yield Ok(sse_json(&chunk));
            }
            yield Ok(Event::default().data("[DONE]"));
            let latency = self.timer.finish(&metrics);
            tracing::info!(latency, usage = %usage.json(), "completion stream finished");
        }
    }

    async fn collect(mut self, streams: Vec<RequestStream>) -> Result<Value, ApiError> {
        let count = streams.len();
        let mut texts = vec![String::new(); count];
        let mut logprobs: Vec<Logprobs> = (0..count).map(|_| Logprobs::default()).collect();
        let mut reasons = vec![None; count];
        let mut usage = UsageTotals::default();
        let mut events = std::pin::pin!(merge(streams, self.timer.start + self.state.settings.request_timeout));
        while let Some((i, event)) = events.next().await {
            match event? {
                EngineEvent::Token(t) => {
                    self.timer.token(&self.state.metrics);
                    logprobs[i].push(&self.serving, &t, texts[i].len());
                    texts[i].push_str(&t.text);
                }
                EngineEvent::Finished(f) => {
                    usage.add(&f.usage, i % self.n == 0);
                    texts[i].push_str(&f.text);
                    reasons[i] = Some(finish_reason(f.reason));
                }
            }
        }
        let latency = self.timer.finish(&self.state.metrics);
        tracing::info!(latency, usage = %usage.json(), "completion finished");
        let choices: Vec<Value> = texts
            .into_iter()
            .zip(logprobs)
            .zip(reasons)
            .enumerate()
            .map(|(i, ((text, lp), reason))| json!({"index": i, "text": text, "logprobs": lp.json(), "finish_reason": reason}))
            .collect();
        let mut body = self.body("text_completion", json!(choices));
        body["usage"] = usage.json();
        Ok(body)
    }
}
