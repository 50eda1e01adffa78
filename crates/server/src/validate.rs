//! Request validation, kept apart from scheduling: the shared generation fields of a chat or text
//! completion become an engine [`GenerateRequest`], or a 400 naming the parameter. Ranges follow
//! OpenAI's API (temperature 0–2, top_p 0–1, penalties −2–2, top_logprobs 0–20).

use mlaserve_engine::{GenerateRequest, SamplingParams};
use mlaserve_model::GenerationConfig;

use crate::error::ApiError;
use crate::protocol::{GenerationFields, StringOrList};

/// Most choices one request may ask for, over all its prompts.
pub const MAX_N: i64 = 128;
pub const MAX_TOP_LOGPROBS: i64 = 20;
const MAX_STOPS: usize = 16;

/// What the engine needs besides the prompt, checked once per request.
pub struct Generation {
    pub n: usize,
    /// Names the prompt in errors: `messages` or `prompt`.
    pub prompt_param: &'static str,
    pub stream: bool,
    pub include_usage: bool,
    pub template: GenerateRequest,
}

pub struct Limits<'a> {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub defaults: &'a GenerationConfig,
}

fn in_range(param: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => {
            Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {v}.")))
        }
        _ => Ok(()),
    }
}

/// Validates the shared fields. `prompt_param` names the prompt in errors (`messages` or
/// `prompt`); `max_tokens` is the request's limit with the field it came from (chat may say
/// `max_completion_tokens`); `logprobs` the number of alternatives wanted, if any.
pub fn generation(
    f: &GenerationFields,
    prompt_param: &'static str,
    max_tokens: (&'static str, Option<i64>),
    logprobs: Option<usize>,
    limits: &Limits,
) -> Result<Generation, ApiError> {
    let (max_tokens_param, max_tokens) = max_tokens;
    in_range("temperature", f.temperature, 0.0, 2.0)?;
    in_range("top_p", f.top_p, 0.0, 1.0)?;
    in_range("min_p", f.min_p, 0.0, 1.0)?;
    in_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
    in_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
    in_range("repetition_penalty", f.repetition_penalty, 0.01, 2.0)?;
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (off) or positive, got {k}."))),
    };
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid("n", format!("`n` must be between 1 and {MAX_N}, got {n}.")));
    }
    if let Some(m) = max_tokens.filter(|m| *m < 1) {
        return Err(ApiError::invalid(max_tokens_param, format!("`{max_tokens_param}` must be at least 1, got {m}.")));
    }
    let stop = f.stop.as_ref().map(StringOrList::to_vec).unwrap_or_default();
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop", format!("`stop` takes up to {MAX_STOPS} non-empty strings.")));
    }
    let mut logit_bias = Vec::new();
    for (key, bias) in f.logit_bias.iter().flatten() {
        let id = key.parse::<u32>().ok().filter(|id| (*id as usize) < limits.vocab_size).ok_or_else(|| {
            ApiError::invalid("logit_bias", format!("`logit_bias` key `{key}` is not a token id of this model."))
        })?;
        if !(-100.0..=100.0).contains(bias) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` values must be between -100 and 100, got {bias}."),
            ));
        }
        logit_bias.push((id, *bias));
    }
    let stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
    if let Some(bad) = stop_token_ids.iter().find(|id| **id as usize >= limits.vocab_size) {
        return Err(ApiError::invalid("stop_token_ids", format!("Token id {bad} is out of the vocabulary.")));
    }
    let d = limits.defaults;
    let sampling = SamplingParams {
        temperature: f.temperature.or(d.temperature).unwrap_or(1.0),
        top_p: f.top_p.or(d.top_p).unwrap_or(1.0).max(f32::MIN_POSITIVE),
        top_k: if f.top_k.is_some() { top_k } else { d.top_k.unwrap_or(0) },
        min_p: f.min_p.unwrap_or(0.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        logit_bias,
        seed: f.seed.map(|s| s as u64),
        logprobs,
    };
    Ok(Generation {
        n: n as usize,
        prompt_param,
        stream: f.stream.unwrap_or(false),
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        template: GenerateRequest {
            prompt: Vec::new(),
            sampling,
            max_tokens: max_tokens.map_or(usize::MAX, |m| m as usize),
            stop_token_ids,
            stop,
            ignore_eos: f.ignore_eos.unwrap_or(false),
            skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        },
    })
}

impl Generation {
    /// The engine request for one prompt and choice: the context length bounds `max_tokens`, and
    /// choice `i` of a seeded request gets its own seed.
    pub fn request(&self, prompt: &[u32], choice: usize, max_model_len: usize) -> Result<GenerateRequest, ApiError> {
        let room = max_model_len.saturating_sub(prompt.len());
        if room == 0 {
            return Err(ApiError::context_length(
                self.prompt_param,
                format!(
                "This model's maximum context length is {max_model_len} tokens. However, your prompt has {} tokens.",
                prompt.len()
            ),
            ));
        }
        let requested = self.template.max_tokens;
        if requested != usize::MAX && requested > room {
            return Err(ApiError::context_length(self.prompt_param, format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({} in the prompt, {requested} for the completion). Please reduce the prompt or max_tokens.",
                prompt.len() + requested,
                prompt.len()
            )));
        }
        let mut r = self.template.clone();
        r.prompt = prompt.to_vec();
        r.max_tokens = requested.min(room);
        r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(choice as u64));
        Ok(r)
    }
}
