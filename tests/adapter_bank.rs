//! One base, several adapters: each adapter's output through the bank equals a model loaded with
//! only that adapter, and deactivating gives the base back.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use peft_sft::lora::{inject, load_adapter, save_adapter, AdapterBank, LoraConfig, TargetModules};

fn random_adapter(dir: &std::path::Path, seed: u64, targets: &[&str]) {
    let mut m = load_model(&fixture("models/qwen2"), false);
    let config = LoraConfig {
        r: 4,
        target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    inject(&mut m, &config, seed).unwrap();
    // Non-zero B so each adapter changes the output.
    for lin in m.linears() {
        if let Some(l) = &lin.lora {
            l.b.set(&(l.b.ones_like().unwrap() * (0.05 * seed as f64)).unwrap())
                .unwrap();
        }
    }
    save_adapter(&m, &config, dir).unwrap();
}

#[test]
fn switching_adapters_equals_loading_each_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    random_adapter(&a, 1, &["q_proj", "v_proj"]);
    random_adapter(&b, 2, &["gate_proj", "down_proj"]);
    let ids = Tensor::new(&[[5u32, 9, 33, 120, 7]], &Device::Cpu).unwrap();
    let expected = |dir: Option<&std::path::Path>| {
        let mut m = load_model(&fixture("models/qwen2"), false);
        if let Some(d) = dir {
            load_adapter(&mut m, d).unwrap();
        }
        m.forward(&ids).unwrap()
    };
    let mut model = load_model(&fixture("models/qwen2"), false);
    let mut bank = AdapterBank::new();
    bank.load("a", &a, &model).unwrap();
    bank.load("b", &b, &model).unwrap();
    for (name, dir) in [
        (Some("b"), Some(b.as_path())),
        (Some("a"), Some(a.as_path())),
        (None, None),
    ] {
        bank.activate(&mut model, name).unwrap();
        assert_eq!(bank.active(), name);
        assert_eq!(
            rel_err(&model.forward(&ids).unwrap(), &expected(dir)),
            0.0,
            "{name:?}"
        );
    }
    assert!(
        rel_err(&expected(Some(&a)), &expected(Some(&b))) > 1e-4,
        "the adapters must differ"
    );
    assert!(bank
        .activate(&mut model, Some("c"))
        .unwrap_err()
        .to_string()
        .contains("`c`"));
    assert!(bank.unload("a"));
    assert_eq!(bank.names().collect::<Vec<_>>(), vec!["b"]);
}
