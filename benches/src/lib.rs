//! What the benchmarks share: their command line, starting an engine on a model folder, timing
//! request streams, and the bytes a model step reads.
//!
//! The benchmarks are plain binaries (`harness = false`), run by hand on a model made with
//! `mlaserve make-model` (see `benches/README.md`); they are not part of CI.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use mlaserve_engine::{EngineConfig, EngineEvent, EngineHandle, GenerateRequest, RequestStream, SamplingParams, Usage};
use mlaserve_model::{Checkpoint, Config};

/// `--key value` pairs after `cargo bench ... --`. Cargo's own `--bench` flag is ignored.
pub struct Args {
    values: HashMap<String, String>,
}

impl Args {
    pub fn parse() -> anyhow::Result<Self> {
        let mut values = HashMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            if arg == "--bench" {
                continue;
            }
            let Some(key) = arg.strip_prefix("--") else { bail!("unexpected argument `{arg}` (expected --key value)") };
            let (key, value) = match key.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (key.to_string(), it.next().ok_or_else(|| anyhow!("--{key} needs a value"))?),
            };
            values.insert(key, value);
        }
        Ok(Args { values })
    }

    /// `--model DIR`, else `$MODEL_DIR`.
    pub fn model(&self) -> anyhow::Result<PathBuf> {
        self.values
            .get("model")
            .cloned()
            .or_else(|| std::env::var("MODEL_DIR").ok())
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("pass --model DIR (or set MODEL_DIR) to a folder made by `mlaserve make-model`"))
    }

    pub fn model_opt(&self) -> Option<PathBuf> {
        self.model().ok()
    }

    pub fn get<T: FromStr>(&self, key: &str, default: T) -> anyhow::Result<T> {
        match self.values.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| anyhow!("--{key}: cannot parse `{v}`")),
        }
    }

    /// A comma-separated list, e.g. `--concurrency 1,4,16`.
    pub fn list(&self, key: &str, default: &[usize]) -> anyhow::Result<Vec<usize>> {
        match self.values.get(key) {
            None => Ok(default.to_vec()),
            Some(v) => {
                v.split(',').map(|x| x.trim().parse().map_err(|_| anyhow!("--{key}: cannot parse `{x}`"))).collect()
            }
        }
    }
}

/// A running engine and what the benchmark needs to know about its model.
pub struct Bench {
    pub engine: EngineHandle,
    pub config: Config,
    /// Ids the tokenizer can produce; prompts use ids below this.
    pub vocab: usize,
    pub load_time: Duration,
}

/// Loads the model folder and starts an engine over it.
pub fn start(dir: &std::path::Path, cfg: EngineConfig) -> anyhow::Result<Bench> {
    let t0 = Instant::now();
    let checkpoint = Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let model = checkpoint.load_model().with_context(|| format!("loading {}", dir.display()))?;
    let load_time = t0.elapsed();
    let vocab = checkpoint.tokenizer_vocab_size();
    let eos = checkpoint.eos_token_ids();
    let config = checkpoint.config.clone();
    let engine = EngineHandle::spawn(model, Arc::new(checkpoint.tokenizer), eos, cfg)
        .map_err(|e| anyhow!("starting the engine: {e}"))?;
    Ok(Bench { engine, config, vocab, load_time })
}

/// `len` pseudo-random token ids in `3..vocab` (past bos/eos/pad), a different prompt per `seed`.
pub fn random_prompt(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
            3 + (r % (vocab.max(4) as u64 - 3)) as u32
        })
        .collect()
}

/// Greedy, `ignore_eos`: exactly `max_tokens` tokens.
pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        max_tokens,
        stop_token_ids: vec![],
        stop: vec![],
        ignore_eos: true,
        skip_special_tokens: true,
    }
}

/// One request's timeline.
pub struct Timed {
    pub submitted: Instant,
    /// When each token arrived.
    pub token_times: Vec<Instant>,
    pub usage: Usage,
}

impl Timed {
    pub fn ttft(&self) -> Duration {
        self.token_times[0] - self.submitted
    }
}

/// Drains a stream, stamping every token as it arrives.
pub fn collect_timed(mut stream: RequestStream, submitted: Instant) -> anyhow::Result<Timed> {
    let mut token_times = Vec::new();
    while let Some(event) = stream.blocking_next() {
        match event.map_err(|e| anyhow!("request failed: {e}"))? {
            EngineEvent::Token(_) => token_times.push(Instant::now()),
            EngineEvent::Finished(f) => {
                if token_times.is_empty() {
                    bail!("the request finished without a token");
                }
                return Ok(Timed { submitted, token_times, usage: f.usage });
            }
        }
    }
    bail!("the stream ended without Finished")
}

/// Submits all requests at once and collects each on its own thread.
pub fn run_concurrent(engine: &EngineHandle, requests: Vec<GenerateRequest>) -> anyhow::Result<Vec<Timed>> {
    let mut streams = Vec::with_capacity(requests.len());
    for r in requests {
        let submitted = Instant::now();
        streams.push((engine.submit(r).map_err(|e| anyhow!("submit: {e}"))?, submitted));
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = streams.into_iter().map(|(st, t)| s.spawn(move || collect_timed(st, t))).collect();
        handles.into_iter().map(|h| h.join().expect("collector thread panicked")).collect()
    })
}

/// Resident and peak memory of this process (`VmRSS`, `VmHWM`) in GB.
pub fn memory_gb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb * 1024.0 / 1e9)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Parameters of the attention block of one layer (design doc §10), plus the layer's two RMSNorms.
pub fn attention_params(c: &Config) -> usize {
    let (h, n_h) = (c.hidden_size, c.num_attention_heads);
    let q = match c.q_lora_rank {
        None => h * n_h * c.qk_head_dim(),
        Some(r) => h * r + r + r * n_h * c.qk_head_dim(),
    };
    q + h * c.latent_dim()
        + c.kv_lora_rank
        + c.kv_lora_rank * n_h * (c.qk_nope_head_dim + c.v_head_dim)
        + n_h * c.v_head_dim * h
        + 2 * h
}

/// Weight values one decode step of `batch` sequences reads, assuming the router spreads tokens
/// uniformly over the experts (random weights do): every layer's attention, dense MLPs, the
/// expected number of distinct routed experts `E·(1 − (1 − k/E)^batch)`, the shared experts, the
/// routers and `lm_head` (the embedding rows are negligible).
pub fn weights_read_per_step(c: &Config, batch: usize) -> f64 {
    let h = c.hidden_size;
    let mut values = 0.0;
    for layer in 0..c.num_hidden_layers {
        values += attention_params(c) as f64;
        match &c.moe {
            Some(moe) if c.is_moe_layer(layer) => {
                let (e, k) = (moe.router.num_experts as f64, moe.router.top_k as f64);
                let expert = (3 * h * moe.moe_intermediate_size) as f64;
                let distinct = e * (1.0 - (1.0 - k / e).powi(batch as i32));
                values += distinct * expert + moe.n_shared_experts as f64 * expert + e * h as f64;
            }
            _ => values += (3 * h * c.intermediate_size) as f64,
        }
    }
    values + (h * c.vocab_size + h) as f64
}

/// Bytes per weight value the engine holds: bf16 checkpoints stay bf16, anything else becomes f32.
/// Read from `config.json`'s `torch_dtype` (`dtype` in newer `transformers`).
pub fn bytes_per_weight(dir: &std::path::Path) -> anyhow::Result<f64> {
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let dtype = config.get("torch_dtype").or_else(|| config.get("dtype")).and_then(|d| d.as_str());
    Ok(if dtype == Some("bfloat16") { 2.0 } else { 4.0 })
}

/// Median of some durations.
pub fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

pub fn print_machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rayon = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!("machine: {threads} threads available, cpu `{cpu}`, RAYON_NUM_THREADS={rayon}, load average {load}");
}
