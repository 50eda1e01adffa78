//! `mlaserve serve`: load a model folder, start the engine and serve the OpenAI API.
//!
//! The listener opens first so `/health` answers while the weights load; `/ready` and the API turn
//! on once the engine runs. SIGTERM or Ctrl-C drains: readiness turns false, new requests get 503,
//! streams in flight finish within the grace period, then the process exits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::future::IntoFuture;

use anyhow::{bail, Context};
use mlaserve_engine::{EngineConfig, EngineHandle};
use mlaserve_model::{Checkpoint, LatentCache};

use crate::chat_template::ChatTemplate;
use crate::output::unix_now;
use crate::state::{AppState, ReasoningField, Serving, Settings};

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model name in the API (default: the folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1 routes.
    #[arg(long, env = "MLASERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Longest sequence (prompt plus output); default: what the model and the cache allow.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// Jinja chat template file, instead of the one in tokenizer_config.json.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Reasoning parser; default: deepseek_r1 when the chat template opens `<think>`.
    #[arg(long, value_enum)]
    pub reasoning_parser: Option<ReasoningParserKind>,
    /// Response field that carries reasoning text.
    #[arg(long, value_enum, default_value_t = ReasoningField::ReasoningContent)]
    pub reasoning_field: ReasoningField,
    /// Tokens per latent-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Latent-cache size, e.g. `512MiB` or `4GiB`; default: 40% of available memory.
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// Token budget of one engine step (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Most requests waiting for admission; beyond it requests get 503.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a request may take before it is cut off with a timeout error.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// TOML file of these options (names as the flags, with `-` or `_`); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Auto,
    Float32,
    Bfloat16,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningParserKind {
    #[value(name = "deepseek_r1")]
    DeepseekR1,
    None,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.dtype == Dtype::Bfloat16 {
        bail!("--dtype bfloat16: the CPU backend computes in float32 only (use auto or float32)");
    }
    let (model_dir, demo) = match args.model.clone() {
        Some(dir) => (dir, false),
        None => (
            demo_model_dir().context(
                "no --model given and the demo model was not found: pass a Hugging Face model folder, \
             or set MLASERVE_DEMO_MODEL to the repository's models/mlaserve-demo",
            )?,
            true,
        ),
    };
    let mut args = args;
    if demo && args.served_model_name.is_none() {
        args.served_model_name = Some(DEMO_MODEL_NAME.into());
    }
    let state = AppState::new(Settings {
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        reasoning_field: args.reasoning_field,
        max_queue: args.max_queue,
        body_limit: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout),
    });
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);

    let loading = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || load(&model_dir, &args))
    };
    let grace = Duration::from_secs(args.shutdown_grace);
    let server = axum::serve(listener, crate::app::router(state.clone()))
        .with_graceful_shutdown(drain_on_signal(state.clone(), grace))
        .into_future();
    let server = tokio::spawn(server);
    // A model that cannot load ends the process: a server without one would only answer 503.
    state.set_serving(loading.await.context("model loading panicked")??);
    tracing::info!("ready");
    server.await?.context("server error")
}

async fn drain_on_signal(state: AppState, grace: Duration) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: draining requests for up to {grace:?}");
    state.start_draining();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        tracing::warn!("grace period over; exiting with requests still open");
        std::process::exit(0);
    });
    // Requests in flight keep their connections; new ones get 503 until the engine is idle.
    while state.loaded().is_some_and(|s| !s.engine.is_idle()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Name the built-in demo model is served under.
pub const DEMO_MODEL_NAME: &str = "mlaserve-demo";

/// The demo model shipped beside the binary: `$MLASERVE_DEMO_MODEL`, the installed layout
/// `<bin>/../share/mlaserve/models/mlaserve-demo` (the container image), or the source tree's
/// `models/mlaserve-demo` (`cargo run`).
pub fn demo_model_dir() -> Option<PathBuf> {
    let installed = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|bin| bin.join("../share/mlaserve/models").join(DEMO_MODEL_NAME)));
    let source_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(DEMO_MODEL_NAME);
    std::env::var_os("MLASERVE_DEMO_MODEL")
        .map(PathBuf::from)
        .into_iter()
        .chain(installed)
        .chain([source_tree])
        .find(|dir| dir.join("config.json").is_file())
}

/// Opens the checkpoint, sizes the latent cache and starts the engine.
fn load(dir: &Path, args: &ServeArgs) -> anyhow::Result<Serving> {
    let checkpoint = Checkpoint::open(dir)?;
    let cfg = checkpoint.config.clone();
    let model = checkpoint.load_model()?;

    let per_token = LatentCache::bytes_per_token(cfg.num_hidden_layers, cfg.latent_dim());
    anyhow::ensure!(args.block_size > 0, "--block-size must be positive");
    let wanted_len = args.max_model_len.unwrap_or(cfg.max_position_embeddings);
    if wanted_len > cfg.max_position_embeddings {
        bail!(
            "--max-model-len {wanted_len} exceeds the model's max_position_embeddings {}",
            cfg.max_position_embeddings
        );
    }
    let cache_bytes = match &args.kv_cache_memory {
        Some(text) => parse_bytes(text)?,
        // 40% of what is free, but no more than a full batch of full-length sequences needs.
        None => (available_memory() as f64 * 0.4) as u64,
    }
    .min((args.max_num_seqs * wanted_len * per_token) as u64);
    let num_blocks = (cache_bytes / (per_token * args.block_size) as u64) as usize;
    let capacity = num_blocks * args.block_size;
    let max_model_len = args.max_model_len.unwrap_or(wanted_len.min(capacity));
    if num_blocks == 0 || max_model_len > capacity {
        bail!(
            "the latent cache ({cache_bytes} bytes, {capacity} tokens at {per_token} bytes/token) cannot hold \
             one sequence of {max_model_len} tokens: raise --kv-cache-memory or lower --max-model-len"
        );
    }
    tracing::info!(
        "latent cache: {num_blocks} blocks of {} tokens = {capacity} tokens, {:.1} MiB ({per_token} bytes/token); max_model_len {max_model_len}",
        args.block_size,
        (num_blocks * args.block_size * per_token) as f64 / (1 << 20) as f64,
    );

    let template_source = match &args.chat_template {
        Some(path) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("--chat-template {}", path.display()))?)
        }
        None => checkpoint.tokenizer_config.as_ref().and_then(template_from_config),
    };
    let special = |name: &str| {
        let v = checkpoint.tokenizer_config.as_ref().and_then(|c| c.get(name).cloned());
        match v {
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Object(o)) => {
                o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string()
            }
            _ => String::new(),
        }
    };
    let template = template_source
        .map(|src| ChatTemplate::new(&src, &special("bos_token"), &special("eos_token")))
        .transpose()
        .context("chat template")?;
    let reasoning_parser = match args.reasoning_parser {
        Some(kind) => kind == ReasoningParserKind::DeepseekR1,
        None => template.as_ref().is_some_and(ChatTemplate::opens_reasoning),
    };
    tracing::info!("reasoning parser: {}", if reasoning_parser { "deepseek_r1" } else { "none" });

    let vocab_size = checkpoint.tokenizer_vocab_size();
    let eos = checkpoint.eos_token_ids();
    let tokenizer = Arc::new(checkpoint.tokenizer);
    let engine = EngineHandle::spawn(
        model,
        tokenizer.clone(),
        eos,
        EngineConfig {
            block_size: args.block_size,
            num_blocks,
            max_num_batched_tokens: args.max_num_batched_tokens.max(1),
            max_num_seqs: args.max_num_seqs.max(1),
            max_model_len,
            prefix_caching: !args.no_prefix_caching,
        },
    )?;
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or("model".into())
    });
    Ok(Serving {
        engine,
        tokenizer,
        template,
        model_name,
        reasoning_parser,
        defaults: checkpoint.generation,
        vocab_size,
        created: unix_now(),
    })
}

/// `chat_template` of tokenizer_config.json: a string, or a list of named templates.
fn template_from_config(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or(list.first())
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    }
}

/// Bytes from `4GiB`, `512MiB`, `1.5GB`, `1000000`.
pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.trim().parse().with_context(|| format!("invalid size `{text}`"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "kib" => 1024.0,
        "mb" | "m" => 1e6,
        "mib" => 1024f64.powi(2),
        "gb" | "g" => 1e9,
        "gib" => 1024f64.powi(3),
        "tb" | "t" => 1e12,
        "tib" => 1024f64.powi(4),
        other => bail!("unknown size unit `{other}` in `{text}`"),
    };
    if number.is_nan() || number < 0.0 {
        bail!("invalid size `{text}`");
    }
    Ok((number * scale) as u64)
}

/// `MemAvailable` from /proc/meminfo, or 1 GiB where it cannot be read.
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("-1GiB").is_err());
    }
}
