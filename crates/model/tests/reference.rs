//! Every fixture model under `tests/fixtures/` against the logits and greedy continuations that
//! Hugging Face `transformers` computed for it (`tools/make_fixtures.py`): prefilled at once, fed in
//! chunks, and decoded token by token through the absorbed MLA form.

use std::path::{Path, PathBuf};

use mlaserve_model::{argmax, Checkpoint, DeepSeek, SingleSequence};
use serde::Deserialize;

const LOGIT_TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct Reference {
    tokenizer_vocab_size: usize,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    text: String,
    input_ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(name: &str) -> (Checkpoint, DeepSeek, Reference) {
    let dir = fixtures_dir().join(name);
    let checkpoint = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = checkpoint.load_model().unwrap_or_else(|e| panic!("{name}: {e}"));
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (checkpoint, model, serde_json::from_str(&text).unwrap())
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// Feeds the prompt in chunks of `chunk` tokens, then decodes greedily one token at a time.
/// Returns the logits after the prompt and the continuation.
fn run(model: &DeepSeek, prompt: &[u32], chunk: usize, steps: usize, block_size: usize) -> (Vec<f32>, Vec<u32>) {
    let mut seq = SingleSequence::new(model, prompt.len() + steps, block_size);
    let mut logits = None;
    for part in prompt.chunks(chunk) {
        logits = Some(seq.prefill(model, part).unwrap());
    }
    let first: Vec<f32> = logits.unwrap().to_vec1().unwrap();
    let mut tokens = vec![argmax(&first)];
    while tokens.len() < steps {
        let l: Vec<f32> = seq.decode(model, tokens[tokens.len() - 1]).unwrap().to_vec1().unwrap();
        tokens.push(argmax(&l));
    }
    (first, tokens)
}

fn check_fixture(name: &str) {
    let (checkpoint, model, reference) = load(name);
    assert_eq!(checkpoint.tokenizer_vocab_size(), reference.tokenizer_vocab_size, "{name}: tokenizer size");
    let real = reference.tokenizer_vocab_size;
    for p in &reference.prompts {
        let ids: Vec<u32> = checkpoint.tokenizer.encode(p.text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ids, p.input_ids, "{name}/{}: tokenization", p.name);
        let steps = p.greedy.len();
        // (chunk size, block size): whole prompt at once; odd chunks over small blocks; token by token.
        let mut at_once = None;
        for (chunk, block_size) in [(usize::MAX, 16), (7, 4), (1, 5)] {
            let how = if chunk == usize::MAX { "at once".to_string() } else { format!("in chunks of {chunk}") };
            let (logits, greedy) = run(&model, &p.input_ids, chunk, steps, block_size);
            let err = max_abs_diff(&logits[..real], &p.last_logits[..real]);
            eprintln!("{name}/{} {how}: max-abs logit error {err:.2e}", p.name);
            assert!(err < LOGIT_TOLERANCE, "{name}/{} {how}: logits off by {err}", p.name);
            assert!(logits[real..].iter().all(|l| *l == f32::NEG_INFINITY), "{name}: padding ids not masked");
            assert_eq!(greedy, p.greedy, "{name}/{} {how}: greedy continuation", p.name);
            // Every kernel reduces in an order fixed by the token alone: chunking changes no bit.
            let at_once = at_once.get_or_insert(logits.clone());
            assert!(logits == *at_once, "{name}/{} {how}: logits differ from the prompt at once", p.name);
        }
    }
}

#[test]
fn v2_lite_matches_transformers() {
    check_fixture("v2-lite");
}

#[test]
fn v2_matches_transformers() {
    check_fixture("v2");
}

#[test]
fn v3_matches_transformers() {
    check_fixture("v3");
}

#[test]
fn v3_fp8_matches_transformers() {
    check_fixture("v3-fp8");
}

/// The absorbed (decode) and expanded (prefill) forms of MLA agree on the same token.
#[test]
fn absorbed_and_expanded_attention_agree() {
    for name in ["v2-lite", "v3"] {
        let (_, model, reference) = load(name);
        let prompt = &reference.prompts.iter().max_by_key(|p| p.input_ids.len()).unwrap().input_ids;
        let mut expanded = SingleSequence::new(&model, prompt.len(), 16);
        let want: Vec<f32> = expanded.prefill(&model, prompt).unwrap().to_vec1().unwrap();
        let mut absorbed = SingleSequence::new(&model, prompt.len(), 16);
        absorbed.prefill(&model, &prompt[..prompt.len() - 1]).unwrap();
        let got: Vec<f32> = absorbed.decode(&model, prompt[prompt.len() - 1]).unwrap().to_vec1().unwrap();
        let real = reference.tokenizer_vocab_size;
        let err = max_abs_diff(&got[..real], &want[..real]);
        assert!(err < 1e-4, "{name}: absorbed vs expanded differ by {err}");
    }
}
