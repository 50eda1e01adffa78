//! Latent-cache bytes per token: MLA's `kv_lora_rank + qk_rope_head_dim` values per layer against
//! the per-head K and V an MHA cache of the same model would hold, for the released configs (design
//! doc §1/§3) and for `--model DIR` (or `$MODEL_DIR`) if given. The engine's cache stores f32 on
//! the CPU; the size comes from `LatentCache::bytes_per_token`.
//!
//! `cargo bench -p mlaserve-benches --bench kv_bytes [-- --model DIR]`

use mlaserve_benches::Args;
use mlaserve_model::config::HfConfig;
use mlaserve_model::{Config, LatentCache};
use serde_json::json;

fn released(name: &str) -> serde_json::Value {
    // Only the fields that size the cache differ; the rest is V2-Lite's.
    let (layers, hidden, heads, q_lora) = match name {
        "DeepSeek-V2-Lite" => (27, 2048, 16, None),
        "DeepSeek-V2 / V2.5" => (60, 5120, 128, Some(1536)),
        _ => (61, 7168, 128, Some(1536)),
    };
    json!({
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": hidden, "intermediate_size": 10944,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": 163840, "q_lora_rank": q_lora, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128
    })
}

fn row(name: &str, c: &Config) {
    let layers = c.num_hidden_layers;
    let engine_f32 = LatentCache::bytes_per_token(layers, c.latent_dim());
    let mla = |bytes: usize| layers * c.latent_dim() * bytes;
    let mha = |bytes: usize| layers * c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim) * bytes;
    assert_eq!(engine_f32, mla(4));
    println!(
        "| {name} | {layers} | {} | {} | {} | {} | {:.1}× | {:.2} GiB |",
        mla(2),
        engine_f32,
        mha(2),
        mha(4),
        mha(2) as f64 / mla(2) as f64,
        (engine_f32 * 128 * 1024) as f64 / (1u64 << 30) as f64,
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    println!("Bytes per token, all layers. MLA caches c_kv (kv_lora_rank) + k_pe (qk_rope_head_dim) per layer;");
    println!("MHA-equivalent caches K (qk_nope + qk_rope) and V (v_head_dim) for every head.");
    println!();
    println!("| model | layers | MLA bf16 | MLA f32 (engine cache) | MHA bf16 | MHA f32 | MHA / MLA | engine cache, one 128K-token sequence |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for name in ["DeepSeek-V2-Lite", "DeepSeek-V2 / V2.5", "DeepSeek-V3 / R1"] {
        let raw: HfConfig = serde_json::from_value(released(name))?;
        row(name, &Config::resolve(raw)?);
    }
    if let Some(dir) = args.model_opt() {
        let c = Config::from_file(&dir.join("config.json"))?;
        row(&dir.display().to_string(), &c);
    }
    Ok(())
}
