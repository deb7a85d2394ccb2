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
            let mut config =
                SftConfig::from_toml(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            config.lora_config().validate().unwrap();
            // Every setting in range, once the per-run paths are given.
            config.model_name_or_path = "m".into();
            config.dataset_name = "d.jsonl".into();
            config.output_dir = "out".into();
            config
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 6);
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

/// Random weights (the GPU benchmarks' 8B models without files) load every tensor a config
/// implies, dense or quantized as it loads, and give finite logits; they really are random.
#[test]
fn random_weights_load_any_config_dense_or_quantized() {
    use peft_sft::model::weights::Weights;
    use peft_sft::model::{CausalLm, ModelConfig};
    use peft_sft::quant::QuantScheme;
    for name in ["llama", "qwen2", "qwen3"] {
        let config =
            ModelConfig::from_file(&fixture(&format!("models/{name}/config.json"))).unwrap();
        let vocab = config.vocab_size;
        let weights = Weights::random(0.02, &Device::Cpu);
        for quantize in [None, Some(QuantScheme::qlora())] {
            let model = CausalLm::load_quantized(
                config.clone(),
                &weights,
                false,
                quantize,
                candle_core::DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            let ids = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu).unwrap();
            let logits = model.forward(&ids).unwrap();
            assert_eq!(logits.dims(), [1, 4, vocab]);
            let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{name}");
            assert!(
                values.iter().any(|&v| v != values[0]),
                "{name}: constant logits"
            );
        }
    }
}
