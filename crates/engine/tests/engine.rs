//! The engine on the fixture models: batching, preemption, prefix caching and aborts never change
//! a greedy output, and every block comes back.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mlaserve_engine::{
    EngineConfig, EngineError, EngineEvent, EngineHandle, FinishReason, GenerateRequest, RequestStream, SamplingParams,
};
use mlaserve_model::Checkpoint;

const FIXTURES: [&str; 4] = ["v2-lite", "v2", "v3", "v3-fp8"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn config(num_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks,
        max_num_batched_tokens: 64,
        max_num_seqs: 32,
        max_model_len: 256.min(num_blocks * 4),
        prefix_caching: true,
    }
}

fn start(name: &str, cfg: EngineConfig) -> (EngineHandle, Vec<u32>) {
    let checkpoint = Checkpoint::open(&fixture(name)).unwrap();
    let model = checkpoint.load_model().unwrap();
    // Prompts are slices of a long text, tokenized once.
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|p| p["input_ids"].as_array().unwrap().len())
        .unwrap()["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let eos = checkpoint.eos_token_ids();
    let engine = EngineHandle::spawn(model, Arc::new(checkpoint.tokenizer), eos, cfg).unwrap();
    (engine, ids)
}

fn greedy(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        max_tokens,
        stop_token_ids: vec![],
        stop: vec![],
        ignore_eos: true,
        skip_special_tokens: true,
    }
}

/// Drains a stream: (tokens, text, finish reason).
fn collect(mut stream: RequestStream) -> (Vec<u32>, String, FinishReason) {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    while let Some(event) = stream.blocking_next() {
        match event.unwrap() {
            EngineEvent::Token(t) => {
                tokens.push(t.token_id);
                text.push_str(&t.text);
            }
            EngineEvent::Finished(f) => {
                text.push_str(&f.text);
                return (tokens, text, f.reason);
            }
        }
    }
    panic!("stream ended without Finished");
}

/// 16 requests of mixed prompt lengths (1 to ~200 tokens), with different output lengths.
fn mixed_requests(ids: &[u32]) -> Vec<GenerateRequest> {
    (0..16).map(|i| greedy(&ids[i * 3..i * 3 + 1 + (i * 37) % 200], 8 + i % 5 * 4)).collect()
}

fn wait_idle(engine: &EngineHandle) {
    for _ in 0..500 {
        let m = engine.metrics();
        if m.kv_blocks_used.load(Ordering::Relaxed) == 0 && m.requests_running.load(Ordering::Relaxed) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("blocks still used: {}", engine.metrics().kv_blocks_used.load(Ordering::Relaxed));
}

#[test]
fn batched_equals_one_at_a_time_on_every_fixture() {
    for name in FIXTURES {
        let (engine, ids) = start(name, config(512));
        let requests = mixed_requests(&ids);
        let alone: Vec<_> = requests.iter().map(|r| collect(engine.submit(r.clone()).unwrap())).collect();
        let streams: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
        let together: Vec<_> = streams.into_iter().map(collect).collect();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, b, "{name}: request {i} differs when batched");
            assert_eq!(a.0.len(), requests[i].max_tokens);
            assert_eq!(a.2, FinishReason::Length);
        }
        wait_idle(&engine);
    }
}

#[test]
fn preemption_keeps_outputs_identical() {
    let name = "v3";
    let (roomy, ids) = start(name, config(512));
    let requests = mixed_requests(&ids);
    let want: Vec<_> = requests.iter().map(|r| collect(roomy.submit(r.clone()).unwrap())).collect();

    // 64 blocks of 4 tokens cannot hold the 16 sequences (~1,900 tokens) at once.
    let (tight, _) = start(name, config(64));
    let streams: Vec<_> = requests.iter().map(|r| tight.submit(r.clone()).unwrap()).collect();
    let got: Vec<_> = streams.into_iter().map(collect).collect();
    assert_eq!(got, want);
    assert!(tight.metrics().preemptions_total.load(Ordering::Relaxed) > 0, "no preemption happened");
    wait_idle(&tight);
}

#[test]
fn shared_prefix_reuses_cached_blocks() {
    let (engine, ids) = start("v2", config(512));
    let first = greedy(&ids[..120], 8);
    collect(engine.submit(first).unwrap());
    let hits_before = engine.metrics().prefix_cache_hit_tokens_total.load(Ordering::Relaxed);

    let second = greedy(&ids[..150], 12);
    let cached = collect(engine.submit(second.clone()).unwrap());
    let hits = engine.metrics().prefix_cache_hit_tokens_total.load(Ordering::Relaxed) - hits_before;
    assert_eq!(hits, 120, "the 30 full blocks of the shared prefix are reused");

    let (cold_engine, _) = start("v2", EngineConfig { prefix_caching: false, ..config(512) });
    assert_eq!(cached, collect(cold_engine.submit(second).unwrap()));
    assert_eq!(cold_engine.metrics().prefix_cache_hit_tokens_total.load(Ordering::Relaxed), 0);
}

#[test]
fn aborted_requests_free_their_blocks() {
    let (engine, ids) = start("v2-lite", config(512));
    let mut kept = Vec::new();
    for (i, r) in mixed_requests(&ids).into_iter().enumerate() {
        let mut stream = engine.submit(GenerateRequest { max_tokens: 200, ..r }).unwrap();
        if i % 2 == 0 {
            // Read a token or two, then hang up mid-generation.
            stream.blocking_next().unwrap().unwrap();
            drop(stream);
        } else {
            kept.push(stream);
        }
    }
    for s in kept {
        collect(s);
    }
    wait_idle(&engine);
}

#[test]
fn prompts_over_the_context_length_are_refused() {
    let (engine, ids) = start("v2-lite", config(64));
    let max = engine.max_model_len();
    let err = engine.submit(greedy(&ids[..max], 4)).err().unwrap();
    assert_eq!(err, EngineError::PromptTooLong { len: max, max });
    assert_eq!(engine.submit(greedy(&[], 4)).err().unwrap(), EngineError::EmptyPrompt);
    // A prompt that fits still generates up to the context length, then stops with `length`.
    let (tokens, _, reason) = collect(engine.submit(greedy(&ids[..max - 3], 100)).unwrap());
    assert_eq!((tokens.len(), reason), (3, FinishReason::Length));
}

#[test]
fn stop_strings_and_seeded_sampling() {
    let (engine, ids) = start("v3", config(512));
    let (_, text, _) = collect(engine.submit(greedy(&ids[..40], 24)).unwrap());
    // Stop at a piece of the greedy text: the output ends right before it.
    let stop: String = text.chars().skip(10).take(3).collect();
    let at = text.find(&stop).unwrap();
    let (_, stopped, reason) =
        collect(engine.submit(GenerateRequest { stop: vec![stop], ..greedy(&ids[..40], 24) }).unwrap());
    assert_eq!((stopped.as_str(), reason), (&text[..at], FinishReason::Stop));

    let sampled = |seed| GenerateRequest {
        sampling: SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() },
        ..greedy(&ids[..40], 24)
    };
    let a = collect(engine.submit(sampled(1)).unwrap());
    let b = collect(engine.submit(sampled(1)).unwrap());
    let c = collect(engine.submit(sampled(2)).unwrap());
    assert_eq!(a, b);
    assert_ne!(a.0, c.0);
}
