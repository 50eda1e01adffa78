//! A malformed or truncated model folder fails at load with a message naming what is wrong.

use std::path::{Path, PathBuf};

use mlaserve_model::Checkpoint;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// A scratch copy of a fixture folder.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("mlaserve-loader-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    dst
}

fn load_error(dir: &Path) -> String {
    match Checkpoint::open(dir).and_then(|c| c.load_model()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("v3", "missing");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gone = "model.layers.1.self_attn.kv_b_proj.weight";
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != gone).collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains(gone), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_weights_file_is_reported() {
    let dir = copy_fixture("v2-lite", "truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_shard_and_tokenizer_and_bad_config_are_reported() {
    let dir = copy_fixture("v2", "shard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(load_error(&dir).contains("model-00002-of-00002.safetensors"));
    std::fs::remove_dir_all(dir).unwrap();

    let dir = copy_fixture("v3", "tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(load_error(&dir).contains("tokenizer.json"));

    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("deepseek_v3", "mixtral");
    std::fs::write(&config, text).unwrap();
    assert!(load_error(&dir).contains("model_type `mixtral`"));

    std::fs::write(&config, "{\"model_type\": \"deepseek_v3\"").unwrap();
    assert!(load_error(&dir).contains("config.json"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wrong_shape_is_named() {
    let dir = copy_fixture("v2-lite", "shape");
    let config = dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["kv_lora_rank"] = 40.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.layers.0.self_attn.kv_b_proj.weight") && err.contains("expected [128, 40]"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
