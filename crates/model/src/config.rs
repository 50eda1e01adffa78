//! `config.json` of a DeepSeek V2 / V2-Lite / V3 / R1 checkpoint: the raw Hugging Face fields
//! ([`HfConfig`]) and the resolved, validated [`Config`] the model is built from.

use std::path::Path;

use mlaserve_kernels::routing::{RouterConfig, Scoring, TopkMethod};
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// `config.json` as written by deepseek-ai (and by transformers, which renames a few fields).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default)]
    pub routed_scaling_factor: Option<f32>,
    #[serde(default)]
    pub topk_method: Option<String>,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub moe_layer_freq: Option<usize>,
    #[serde(default)]
    pub first_k_dense_replace: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub scoring_func: Option<String>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers ≥ 5 writes `rope_theta` and `rope_scaling` here instead.
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
    #[serde(default)]
    pub num_nextn_predict_layers: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// `rope_scaling` (or transformers' `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(default, alias = "rope_type")]
    pub r#type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub beta_fast: Option<f64>,
    #[serde(default)]
    pub beta_slow: Option<f64>,
    #[serde(default)]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    #[serde(default)]
    pub weight_block_size: Option<Vec<usize>>,
    #[serde(default)]
    pub fmt: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    DeepseekV2,
    DeepseekV3,
}

/// YaRN parameters as DeepSeek applies them (design doc §4).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// `0.1 · μ · ln s + 1` for `s > 1`, else 1.
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

#[derive(Debug, Clone)]
pub struct MoeConfig {
    pub router: RouterConfig,
    pub moe_intermediate_size: usize,
    pub n_shared_experts: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// The resolved configuration the model is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub max_position_embeddings: usize,
    pub moe: Option<MoeConfig>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `[rows, cols]` of an FP8 checkpoint's scale blocks.
    pub fp8_block_size: Option<[usize; 2]>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config(e.to_string()))?;
        Self::resolve(raw)
    }

    pub fn resolve(raw: HfConfig) -> Result<Self> {
        let arch = arch_of(&raw)?;
        let cfg_err = |m: String| Err(ModelError::Config(m));
        if raw.attention_bias {
            return cfg_err("attention_bias = true is not a DeepSeek layout".into());
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return cfg_err(format!("hidden_act `{act}` is not supported (DeepSeek uses silu)"));
        }
        if raw.num_key_value_heads.is_some_and(|kv| kv != raw.num_attention_heads) {
            return cfg_err("num_key_value_heads must equal num_attention_heads for MLA".into());
        }
        if !raw.qk_rope_head_dim.is_multiple_of(2) || raw.qk_rope_head_dim == 0 {
            return cfg_err(format!("qk_rope_head_dim {} must be even and non-zero", raw.qk_rope_head_dim));
        }
        if [raw.hidden_size, raw.num_attention_heads, raw.kv_lora_rank, raw.v_head_dim, raw.num_hidden_layers]
            .contains(&0)
        {
            return cfg_err(
                "hidden_size, num_attention_heads, kv_lora_rank, v_head_dim and num_hidden_layers must be non-zero"
                    .into(),
            );
        }

        let rope = raw.rope_scaling.clone().or(raw.rope_parameters.clone());
        let rope_theta = raw.rope_theta.or(rope.as_ref().and_then(|r| r.rope_theta)).unwrap_or(10000.0);
        let yarn = match &rope {
            None => None,
            Some(r) => match r.r#type.as_deref() {
                None | Some("default") => None,
                Some("yarn") => Some(Yarn {
                    factor: r.factor.ok_or_else(|| ModelError::Config("rope_scaling.factor is missing".into()))?,
                    original_max_position_embeddings: r.original_max_position_embeddings.ok_or_else(|| {
                        ModelError::Config("rope_scaling.original_max_position_embeddings is missing".into())
                    })?,
                    beta_fast: r.beta_fast.unwrap_or(32.0),
                    beta_slow: r.beta_slow.unwrap_or(1.0),
                    mscale: r.mscale.unwrap_or(1.0),
                    mscale_all_dim: r.mscale_all_dim.unwrap_or(0.0),
                }),
                Some(other) => return cfg_err(format!("rope_scaling.type `{other}` is not supported (yarn only)")),
            },
        };

        let moe = match raw.n_routed_experts {
            None | Some(0) => None,
            Some(num_experts) => Some(moe_config(&raw, arch, num_experts)?),
        };

        let fp8_block_size = match &raw.quantization_config {
            None => None,
            Some(q) if q.quant_method == "fp8" => {
                if q.fmt.as_deref().is_some_and(|f| f != "e4m3") {
                    return cfg_err(format!(
                        "quantization_config.fmt `{}` is not supported (e4m3 only)",
                        q.fmt.as_deref().unwrap_or_default()
                    ));
                }
                match q.weight_block_size.as_deref() {
                    Some([r, c]) if *r > 0 && *c > 0 => Some([*r, *c]),
                    _ => return cfg_err("quantization_config.weight_block_size must be [rows, cols]".into()),
                }
            }
            Some(q) => {
                return Err(ModelError::Unsupported(format!(
                    "quantization_config.quant_method `{}` (fp8 block-quantized checkpoints are supported)",
                    q.quant_method
                )))
            }
        };

        Ok(Config {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            q_lora_rank: raw.q_lora_rank.filter(|r| *r > 0),
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            yarn,
            max_position_embeddings: raw.max_position_embeddings,
            moe,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => vec![],
                Some(TokenIds::One(id)) => vec![id],
                Some(TokenIds::Many(ids)) => ids,
            },
            fp8_block_size,
        })
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: the normalised latent and the roped key.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// `τ = d_qk^(−1/2) · mscale(s, mscale_all_dim)²`.
    pub fn softmax_scale(&self) -> f64 {
        let m = self.yarn.as_ref().map_or(1.0, |y| yarn_mscale(y.factor, y.mscale_all_dim));
        (self.qk_head_dim() as f64).powf(-0.5) * m * m
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| layer >= m.first_k_dense_replace && layer.is_multiple_of(m.moe_layer_freq))
    }
}

fn arch_of(raw: &HfConfig) -> Result<Arch> {
    let from_name = |s: &str| match s {
        "deepseek_v2" | "DeepseekV2ForCausalLM" => Some(Arch::DeepseekV2),
        "deepseek_v3" | "DeepseekV3ForCausalLM" => Some(Arch::DeepseekV3),
        _ => None,
    };
    if let Some(t) = &raw.model_type {
        return from_name(t).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "model_type `{t}`: mlaserve serves deepseek_v2 and deepseek_v3 (V2, V2-Lite, V3, R1 and models built on them)"
            ))
        });
    }
    raw.architectures.iter().find_map(|a| from_name(a)).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "architectures {:?}: expected DeepseekV2ForCausalLM or DeepseekV3ForCausalLM",
            raw.architectures
        ))
    })
}

fn moe_config(raw: &HfConfig, arch: Arch, num_experts: usize) -> Result<MoeConfig> {
    let missing = |f: &str| ModelError::Config(format!("{f} is required when n_routed_experts is set"));
    let v3 = arch == Arch::DeepseekV3;
    let method = match raw.topk_method.as_deref().unwrap_or(if v3 { "noaux_tc" } else { "greedy" }) {
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
        "noaux_tc" => TopkMethod::NoauxTc,
        other => return Err(ModelError::Config(format!("topk_method `{other}` is not supported"))),
    };
    let scoring = match raw.scoring_func.as_deref().unwrap_or(if v3 { "sigmoid" } else { "softmax" }) {
        "softmax" => Scoring::Softmax,
        "sigmoid" => Scoring::Sigmoid,
        other => return Err(ModelError::Config(format!("scoring_func `{other}` is not supported"))),
    };
    let top_k = raw.num_experts_per_tok.ok_or_else(|| missing("num_experts_per_tok"))?;
    let (n_group, topk_group) = match method {
        TopkMethod::Greedy => (1, 1),
        _ => (raw.n_group.unwrap_or(1), raw.topk_group.unwrap_or(1)),
    };
    if top_k == 0 || top_k > num_experts {
        return Err(ModelError::Config(format!("num_experts_per_tok {top_k} must be in 1..={num_experts}")));
    }
    if n_group == 0 || !num_experts.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
        return Err(ModelError::Config(format!(
            "n_group {n_group} / topk_group {topk_group} do not divide n_routed_experts {num_experts}"
        )));
    }
    if topk_group * (num_experts / n_group) < top_k {
        return Err(ModelError::Config("topk_group groups hold fewer experts than num_experts_per_tok".into()));
    }
    Ok(MoeConfig {
        router: RouterConfig {
            num_experts,
            top_k,
            scoring,
            method,
            n_group,
            topk_group,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(v3),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(if v3 { 2.5 } else { 1.0 }),
        },
        moe_intermediate_size: raw.moe_intermediate_size.ok_or_else(|| missing("moe_intermediate_size"))?,
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
        moe_layer_freq: raw.moe_layer_freq.unwrap_or(1).max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_json() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
            "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
            "routed_scaling_factor": 2.5, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
            "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
            "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
            "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "bos_token_id": 0, "eos_token_id": 1,
            "num_nextn_predict_layers": 1, "tie_word_embeddings": false,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                "quant_method": "fp8", "weight_block_size": [128, 128]}
        })
    }

    fn resolve(v: serde_json::Value) -> Result<Config> {
        Config::resolve(serde_json::from_value(v).map_err(|e| ModelError::Config(e.to_string()))?)
    }

    #[test]
    fn v3_resolves_with_the_documented_scale_and_cache_width() {
        let c = resolve(v3_json()).unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        assert_eq!(c.latent_dim(), 576);
        assert!((c.softmax_scale() - 0.135234).abs() < 1e-6, "{}", c.softmax_scale());
        assert_eq!(c.fp8_block_size, Some([128, 128]));
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        let r = &c.moe.unwrap().router;
        assert_eq!((r.method, r.scoring, r.n_group, r.topk_group), (TopkMethod::NoauxTc, Scoring::Sigmoid, 8, 4));
    }

    #[test]
    fn v2_lite_scale_uses_mscale_all_dim() {
        let mut v = v3_json();
        v["model_type"] = "deepseek_v2".into();
        v["rope_scaling"]["mscale"] = 0.707.into();
        v["rope_scaling"]["mscale_all_dim"] = 0.707.into();
        let c = resolve(v).unwrap();
        assert!((c.softmax_scale() - 0.114721).abs() < 1e-6, "{}", c.softmax_scale());
    }

    #[test]
    fn transformers5_rope_parameters_are_read() {
        let mut v = v3_json();
        let rope = v["rope_scaling"].take();
        v.as_object_mut().unwrap().remove("rope_scaling");
        v.as_object_mut().unwrap().remove("rope_theta");
        let mut rp = rope.clone();
        rp["rope_type"] = "yarn".into();
        rp.as_object_mut().unwrap().remove("type");
        rp["rope_theta"] = 50000.0.into();
        v["rope_parameters"] = rp;
        let c = resolve(v).unwrap();
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.yarn.unwrap().factor, 40.0);
    }

    #[test]
    fn unknown_architecture_and_bad_fields_are_named() {
        let mut v = v3_json();
        v["model_type"] = "llama".into();
        assert!(resolve(v).unwrap_err().to_string().contains("model_type `llama`"));
        let mut v = v3_json();
        v["topk_method"] = "random".into();
        assert!(resolve(v).unwrap_err().to_string().contains("topk_method `random`"));
        let mut v = v3_json();
        v["quantization_config"]["quant_method"] = "awq".into();
        assert!(resolve(v).unwrap_err().to_string().contains("quant_method `awq`"));
        let mut v = v3_json();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        assert!(resolve(v).unwrap_err().to_string().contains("kv_lora_rank"));
    }
}
