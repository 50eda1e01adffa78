//! `POST /v1/chat/completions`: messages → chat template → engine → (reasoning, content) as SSE
//! chunks or one `chat.completion`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use mlaserve_engine::{EngineEvent, RequestStream};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::output::{
    chat_logprob, finish_reason, merge, request_id, sse_error, sse_json, unix_now, Timer, UsageTotals,
};
use crate::protocol::{ChatCompletionRequest, ChatMessage, GenerationFields, MessageContent};
use crate::reasoning::{ReasoningParser, Split};
use crate::state::{AppState, Serving};
use crate::validate::{self, Limits, MAX_TOP_LOGPROBS};

/// A rendered, tokenized conversation.
struct ChatPrompt {
    ids: Vec<u32>,
    /// The prompt ends inside an open `<think>` block.
    opens_reasoning: bool,
}

pub async fn chat_completions(State(state): State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    let timer = Timer::start();
    let serving = state.serving()?;
    let req: ChatCompletionRequest = body.read()?;
    let fields: GenerationFields = body.read()?;
    AppState::check_model(&serving, req.model.as_deref())?;

    let top_logprobs = req.top_logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top_logprobs) {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}."),
        ));
    }
    if top_logprobs > 0 && req.logprobs != Some(true) {
        return Err(ApiError::invalid("top_logprobs", "`top_logprobs` requires `logprobs` to be true."));
    }
    let logprobs = (req.logprobs == Some(true)).then_some(top_logprobs as usize);
    let max_model_len = serving.engine.max_model_len();
    let limits = Limits { max_model_len, vocab_size: serving.vocab_size, defaults: &serving.defaults };
    let max_tokens = match req.max_completion_tokens {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", fields.max_tokens),
    };
    let generation = validate::generation(&fields, "messages", max_tokens, logprobs, &limits)?;

    let prompt = render_prompt(&serving, &req)?;
    state.admit(&serving, generation.n)?;
    let streams = (0..generation.n)
        .map(|i| Ok(serving.engine.submit(generation.request(&prompt.ids, i, max_model_len)?)?))
        .collect::<Result<Vec<RequestStream>, ApiError>>()?;

    let response = ChatResponse {
        id: request_id("chatcmpl"),
        created: unix_now(),
        state: state.clone(),
        serving,
        opens_reasoning: prompt.opens_reasoning,
        timer,
    };
    if generation.stream {
        let events = response.stream(streams, generation.include_usage);
        Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
    } else {
        Ok(Json(response.collect(streams).await?).into_response())
    }
}

fn render_prompt(serving: &Serving, req: &ChatCompletionRequest) -> Result<ChatPrompt, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message."));
    }
    let template = serving.template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "This model has no chat template; start the server with --chat-template or use /v1/completions.",
        )
    })?;
    let messages = req.messages.iter().enumerate().map(|(i, m)| message_json(i, m)).collect::<Result<Vec<_>, _>>()?;
    let mut extra = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(tools) = &req.tools {
        extra.insert("tools".into(), tools.clone());
    }
    let text = template
        .render(&messages, req.add_generation_prompt.unwrap_or(true), &extra)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let encoding = serving.tokenizer.encode(text.as_str(), false).map_err(ApiError::internal)?;
    Ok(ChatPrompt { ids: encoding.get_ids().to_vec(), opens_reasoning: text.trim_end().ends_with("<think>") })
}

/// A message as the template sees it: content flattened to a string.
fn message_json(i: usize, m: &ChatMessage) -> Result<Value, ApiError> {
    let role = match m.role.as_str() {
        "developer" => "system",
        r @ ("system" | "user" | "assistant" | "tool") => r,
        other => {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!("Unknown role `{other}`: expected system, developer, user, assistant or tool."),
            ))
        }
    };
    let content = match &m.content {
        None if role == "assistant" => Value::Null,
        None => return Err(ApiError::invalid(format!("messages[{i}].content"), "A message needs `content`.")),
        Some(MessageContent::Text(t)) => Value::String(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => texts.push(t.as_str()),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content[{j}]"),
                            format!("Content parts of type `{kind}` are not supported; only text parts with `text`."),
                        ))
                    }
                }
            }
            Value::String(texts.join("\n"))
        }
    };
    let mut obj = Map::new();
    obj.insert("role".into(), role.into());
    obj.insert("content".into(), content);
    if let Some(name) = &m.name {
        obj.insert("name".into(), name.clone().into());
    }
    if let Some(calls) = &m.tool_calls {
        obj.insert("tool_calls".into(), calls.clone());
    }
    if let Some(id) = &m.tool_call_id {
        obj.insert("tool_call_id".into(), id.clone().into());
    }
    Ok(Value::Object(obj))
}

struct ChatResponse {
    id: String,
    created: u64,
    state: AppState,
    serving: Arc<Serving>,
    opens_reasoning: bool,
    timer: Timer,
}

impl ChatResponse {
    fn parser(&self) -> Option<ReasoningParser> {
        self.serving.reasoning_parser.then(|| ReasoningParser::new(self.opens_reasoning))
    }

    /// Splits a piece of text into (reasoning, content).
    fn split(parser: &mut Option<ReasoningParser>, text: &str, last: bool) -> Split {
        match parser {
            Some(p) => {
                let mut s = p.push(text);
                if last {
                    let rest = p.finish();
                    s.reasoning += &rest.reasoning;
                    s.content += &rest.content;
                }
                s
            }
            None => Split { reasoning: String::new(), content: text.to_string() },
        }
    }

    /// A `delta` (or `message`) object with the reasoning under the configured field names.
    fn message(&self, split: Split, role: bool, streaming: bool) -> Value {
        let mut m = Map::new();
        if role {
            m.insert("role".into(), "assistant".into());
        }
        if !streaming || !split.content.is_empty() {
            m.insert("content".into(), split.content.into());
        }
        if !split.reasoning.is_empty() || (!streaming && self.serving.reasoning_parser) {
            let value: Value = if split.reasoning.is_empty() { Value::Null } else { split.reasoning.into() };
            for name in self.state.settings.reasoning_field.names() {
                m.insert((*name).into(), value.clone());
            }
        }
        Value::Object(m)
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.serving.model_name, "choices": choices})
    }

    fn stream(
        mut self,
        streams: Vec<RequestStream>,
        include_usage: bool,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        let n = streams.len();
        async_stream::stream! {
            let metrics = self.state.metrics.clone();
            for i in 0..n {
                let delta = json!({"role": "assistant", "content": ""});
                yield Ok(sse_json(&self.chunk(json!([{"index": i, "delta": delta, "logprobs": null, "finish_reason": null}]))));
            }
            let mut parsers: Vec<_> = (0..n).map(|_| self.parser()).collect();
            let mut usage = UsageTotals::default();
            let mut events = std::pin::pin!(merge(streams, self.timer.start + self.state.settings.request_timeout));
            let mut status = 200;
            while let Some((i, event)) = events.next().await {
                match event {
                    Ok(EngineEvent::Token(t)) => {
                        self.timer.token(&metrics);
                        let split = Self::split(&mut parsers[i], &t.text, false);
                        let logprobs = chat_logprob(&self.serving.tokenizer, &t).map(|e| json!({"content": [e]}));
                        if split == Split::default() && logprobs.is_none() {
                            continue;
                        }
                        let delta = self.message(split, false, true);
                        yield Ok(sse_json(&self.chunk(json!([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": null}]))));
                    }
                    Ok(EngineEvent::Finished(f)) => {
                        let split = Self::split(&mut parsers[i], &f.text, true);
                        if split != Split::default() {
                            let delta = self.message(split, false, true);
                            yield Ok(sse_json(&self.chunk(json!([{"index": i, "delta": delta, "logprobs": null, "finish_reason": null}]))));
                        }
                        usage.add(&f.usage, true);
                        yield Ok(sse_json(&self.chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(f.reason)}]))));
                    }
                    Err(e) => {
                        status = e.status.as_u16();
                        yield Ok(sse_error(e));
                        break;
                    }
                }
            }
            if include_usage {
                let mut chunk = self.chunk(json!([]));
                chunk["usage"] = usage.json();
                yield Ok(sse_json(&chunk));
            }
            yield Ok(Event::default().data("[DONE]"));
            let latency = self.timer.finish(&metrics);
            tracing::info!(status, latency, usage = %usage.json(), "chat stream finished");
        }
    }

    async fn collect(mut self, streams: Vec<RequestStream>) -> Result<Value, ApiError> {
        let n = streams.len();
        let mut parsers: Vec<_> = (0..n).map(|_| self.parser()).collect();
        let mut texts = vec![Split::default(); n];
        let mut logprobs: Vec<Vec<Value>> = vec![Vec::new(); n];
        let mut reasons = vec![None; n];
        let mut usage = UsageTotals::default();
        let mut events = std::pin::pin!(merge(streams, self.timer.start + self.state.settings.request_timeout));
        while let Some((i, event)) = events.next().await {
            let (text, last) = match event? {
                EngineEvent::Token(t) => {
                    self.timer.token(&self.state.metrics);
                    logprobs[i].extend(chat_logprob(&self.serving.tokenizer, &t));
                    (t.text, false)
                }
                EngineEvent::Finished(f) => {
                    usage.add(&f.usage, true);
                    reasons[i] = Some(finish_reason(f.reason));
                    (f.text, true)
                }
            };
            let s = Self::split(&mut parsers[i], &text, last);
            texts[i].reasoning += &s.reasoning;
            texts[i].content += &s.content;
        }
        let latency = self.timer.finish(&self.state.metrics);
        tracing::info!(latency, usage = %usage.json(), "chat completion finished");
        let want_logprobs = logprobs.iter().any(|l| !l.is_empty());
        let choices: Vec<Value> = texts
            .into_iter()
            .zip(logprobs)
            .zip(reasons)
            .enumerate()
            .map(|(i, ((split, lp), reason))| {
                let logprobs = if want_logprobs { json!({"content": lp}) } else { Value::Null };
                json!({"index": i, "message": self.message(split, true, false), "logprobs": logprobs, "finish_reason": reason})
            })
            .collect();
        Ok(
            json!({"id": self.id, "object": "chat.completion", "created": self.created, "model": self.serving.model_name,
                  "choices": choices, "usage": usage.json()}),
        )
    }
}
