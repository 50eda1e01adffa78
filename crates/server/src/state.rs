//! What the handlers share: the loaded model (once it is), settings and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use mlaserve_engine::EngineHandle;
use mlaserve_model::GenerationConfig;
use tokenizers::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::error::ApiError;
use crate::metrics::HttpMetrics;

/// Which field carries the reasoning text in responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningField {
    /// `reasoning_content`, as DeepSeek's API, SGLang and llama.cpp.
    ReasoningContent,
    /// `reasoning`, as vLLM's newer releases.
    Reasoning,
    Both,
}

impl ReasoningField {
    pub fn names(self) -> &'static [&'static str] {
        match self {
            ReasoningField::ReasoningContent => &["reasoning_content"],
            ReasoningField::Reasoning => &["reasoning"],
            ReasoningField::Both => &["reasoning_content", "reasoning"],
        }
    }
}

/// A loaded model ready to serve.
pub struct Serving {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub model_name: String,
    /// Split `<think>` blocks into the reasoning field (deepseek_r1 parser).
    pub reasoning_parser: bool,
    pub defaults: GenerationConfig,
    /// Ids the tokenizer can produce.
    pub vocab_size: usize,
    pub created: u64,
}

pub struct Settings {
    pub api_key: Option<String>,
    pub reasoning_field: ReasoningField,
    pub max_queue: usize,
    pub body_limit: usize,
    pub request_timeout: std::time::Duration,
}

#[derive(Clone)]
pub struct AppState {
    serving: Arc<OnceLock<Arc<Serving>>>,
    draining: Arc<AtomicBool>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<HttpMetrics>,
}

impl AppState {
    pub fn new(settings: Settings) -> Self {
        AppState {
            serving: Arc::default(),
            draining: Arc::default(),
            settings: Arc::new(settings),
            metrics: Arc::default(),
        }
    }

    /// Makes the model available; the server turns ready.
    pub fn set_serving(&self, serving: Serving) {
        let _ = self.serving.set(Arc::new(serving));
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.serving.get().is_some() && !self.draining.load(Ordering::SeqCst)
    }

    /// The model, or 503 while it loads or the server drains.
    pub fn serving(&self) -> Result<Arc<Serving>, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("The server is shutting down."));
        }
        let serving =
            self.serving.get().cloned().ok_or_else(|| ApiError::unavailable("The model is still loading."))?;
        self.admit(&serving, 1)?;
        Ok(serving)
    }

    /// Bounded admission: 503 when `sequences` more would push the queue past `--max-queue`.
    pub fn admit(&self, serving: &Serving, sequences: usize) -> Result<(), ApiError> {
        let running = serving.engine.metrics().requests_running.load(Ordering::Relaxed) as usize;
        let waiting = serving.engine.num_active().saturating_sub(running);
        if waiting + sequences > self.settings.max_queue {
            return Err(ApiError::unavailable(format!(
                "The server is overloaded ({waiting} requests waiting); retry later."
            )));
        }
        Ok(())
    }

    pub fn loaded(&self) -> Option<Arc<Serving>> {
        self.serving.get().cloned()
    }

    /// Checks the requested model name against the served one.
    pub fn check_model(serving: &Serving, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != serving.model_name => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }
}
