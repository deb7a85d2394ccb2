//! Model folders round-trip: a model saved sharded (index + shards, as transformers shards above
//! its limit) loads back with identical logits; recipes in adapters/ parse.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use peft_sft::config::SftConfig;
use peft_sft::model::save::save_pretrained;

#[test]
fn sharded_save_loads_back_identically() {
    let base = fixture("models/llama");
    let model = load_model(&base, false);
    let tmp = tempfile::tempdir().unwrap();
    save_pretrained(&model, &base, tmp.path(), 40_000).unwrap();
    assert!(tmp.path().join("model.safetensors.index.json").exists());
    let shards = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-0")
        })
        .count();
    assert!(shards > 1, "expected several shards, found {shards}");
    assert!(!tmp.path().join("model.safetensors").exists());
    assert!(tmp.path().join("tokenizer.json").exists());
    let reloaded = load_model(tmp.path(), false);
    let ids = Tensor::new(&[[1u32, 2, 3, 50, 60, 70]], &Device::Cpu).unwrap();
    assert_eq!(
        rel_err(
            &reloaded.forward(&ids).unwrap(),
            &model.forward(&ids).unwrap()
        ),
        0.0
    );
}

#[test]
fn every_recipe_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("adapters");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config =
                SftConfig::from_toml(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            config.lora_config().validate().unwrap();
            n += 1;
        }
    }
    assert!(n >= 3);
}

#[test]
fn a_bad_recipe_key_names_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.toml");
    std::fs::write(&path, "lora_r = 8\nlearning_rat = 1e-4\n").unwrap();
    let err = SftConfig::from_toml(&path).unwrap_err().to_string();
    assert!(
        err.contains("r.toml:2") && err.contains("learning_rat"),
        "{err}"
    );
}
