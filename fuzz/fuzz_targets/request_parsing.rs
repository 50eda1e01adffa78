//! Arbitrary bytes as a request body, read the way the server reads one: JSON, an object, then the
//! typed views of /v1/chat/completions and /v1/completions (`JsonBody::read`), then validation of the
//! shared generation fields and the per-choice engine request. Errors are expected; a panic, an
//! overflow (debug assertions are on) or a hang is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mlaserve::extract::JsonBody;
use mlaserve::protocol::{ChatCompletionRequest, CompletionRequest, GenerationFields};
use mlaserve::validate::{self, Limits, MAX_TOP_LOGPROBS};
use mlaserve_model::GenerationConfig;

/// The fixture models' sizes.
const VOCAB: usize = 512;
const MAX_MODEL_LEN: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if !value.is_object() {
        return;
    }
    let body = JsonBody(value);
    let defaults = GenerationConfig { temperature: Some(0.6), top_p: Some(0.95), ..Default::default() };
    let limits = Limits { max_model_len: MAX_MODEL_LEN, vocab_size: VOCAB, defaults: &defaults };
    let Ok(fields) = body.read::<GenerationFields>() else { return };

    if let Ok(chat) = body.read::<ChatCompletionRequest>() {
        // As chat.rs: top_logprobs in 0..=20 and only with logprobs.
        let top = chat.top_logprobs.unwrap_or(0);
        let logprobs = ((0..=MAX_TOP_LOGPROBS).contains(&top) && chat.logprobs == Some(true)).then_some(top as usize);
        check(&fields, chat.max_completion_tokens.or(fields.max_tokens), logprobs, &limits);
    }
    if let Ok(completion) = body.read::<CompletionRequest>() {
        let logprobs = completion.logprobs.filter(|k| (0..=5).contains(k)).map(|k| k as usize);
        check(&fields, fields.max_tokens, logprobs, &limits);
    }
});

fn check(fields: &GenerationFields, max_tokens: Option<i64>, logprobs: Option<usize>, limits: &Limits) {
    let Ok(generation) = validate::generation(fields, "prompt", ("max_tokens", max_tokens), logprobs, limits) else {
        return;
    };
    assert!((1..=validate::MAX_N as usize).contains(&generation.n));
    for len in [1, 7, MAX_MODEL_LEN - 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1] {
        let prompt = vec![1u32; len];
        for choice in [0, generation.n - 1] {
            if let Ok(request) = generation.request(&prompt, choice, MAX_MODEL_LEN) {
                // Prompt and output fit the context.
                assert!(request.max_tokens >= 1 && len + request.max_tokens <= MAX_MODEL_LEN);
                let t = request.sampling.temperature;
                assert!((0.0..=2.0).contains(&t), "temperature {t}");
                assert!(request.sampling.logit_bias.iter().all(|(id, _)| (*id as usize) < VOCAB));
            }
        }
    }
}
