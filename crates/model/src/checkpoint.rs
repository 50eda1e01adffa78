//! A Hugging Face model folder: `config.json`, the safetensors weights, `tokenizer.json`, and the
//! optional `generation_config.json` and `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::config::{Config, TokenIds};
use crate::error::{ModelError, Result};
use crate::model::DeepSeek;
use crate::weights::Weights;

/// Sampling defaults a checkpoint ships in `generation_config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub generation: GenerationConfig,
    /// `tokenizer_config.json` as JSON (chat template, special tokens), if present.
    pub tokenizer_config: Option<serde_json::Value>,
}

impl Checkpoint {
    /// Reads everything but the weights, failing early on anything missing or malformed.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::io(dir, "not a model folder"));
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?
            .map(|v| serde_json::from_value(v).map_err(|e| ModelError::io(dir.join("generation_config.json"), e)))
            .transpose()?
            .unwrap_or_default();
        let tokenizer_config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        Ok(Checkpoint { dir: dir.to_path_buf(), config, tokenizer, generation, tokenizer_config })
    }

    /// Number of ids the tokenizer can produce (the largest id plus one).
    pub fn tokenizer_vocab_size(&self) -> usize {
        self.tokenizer.get_vocab(true).values().max().map_or(0, |m| *m as usize + 1)
    }

    /// End-of-sequence ids: the generation config's, else the model config's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.generation.eos_token_id {
            Some(TokenIds::One(id)) => vec![*id],
            Some(TokenIds::Many(ids)) => ids.clone(),
            None => self.config.eos_token_ids.clone(),
        }
    }

    /// Maps and reads the weights, converting them to f32.
    pub fn load_model(&self) -> Result<DeepSeek> {
        let weights = Weights::open(&self.dir, self.config.fp8_block_size)?;
        DeepSeek::new(&self.config, &weights, self.tokenizer_vocab_size())
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| ModelError::io(path, e))
}
