//! Three AdamW steps with gradient clipping on a LoRA model equal torch's (losses, pre-clip grad
//! norms and final adapter weights), starting from the same PEFT-written adapter: plain AdamW, and
//! PEFT's LoRA+ optimizer (`create_loraplus_optimizer`).

mod common;
use candle_core::{DType, Tensor};
use common::*;
use peft_sft::lora::adapter::peft_key;
use peft_sft::lora::load_adapter;
use peft_sft::train::optimizer::{clip_grad_norm, AdamW, AdamWParams};

#[test]
fn adamw_steps_match_torch() {
    replay("train/llama_adamw", AdamWParams::default(), None);
}

/// LoRA+ at ratio 16 with PEFT's `loraplus_weight_decay` 0.01 (scripts/make_loraplus_fixture.py).
#[test]
fn loraplus_steps_match_peft() {
    let hyper = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    replay("train/llama_loraplus", hyper, Some(16.0));
}

/// Replays a fixture's three steps with `hyper` (and LoRA+ at `loraplus`) and compares.
fn replay(fixture_dir: &str, hyper: AdamWParams, loraplus: Option<f64>) {
    let dir = fixture(fixture_dir);
    let mut model = load_model(&fixture("models/llama"), false);
    load_adapter(&mut model, &dir.join("initial_adapter")).unwrap();
    let batch = tensors(&dir.join("batch.safetensors"));
    let ids = batch["input_ids"].to_dtype(DType::U32).unwrap();
    let labels = batch["labels"].to_dtype(DType::F32).unwrap();
    // labels are -100 where not trained
    let mask = labels.ge(0f64).unwrap().to_dtype(DType::F32).unwrap();
    let attention = mask.ones_like().unwrap();
    let steps: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json")).unwrap()).unwrap();
    let steps = steps.as_array().expect("steps.json is a list");
    let mut opt = AdamW::new(model.trainable(), hyper).unwrap();
    if let Some(ratio) = loraplus {
        opt.set_loraplus_ratio(ratio);
    }
    for (i, expected) in steps.iter().enumerate() {
        let out = model.loss(&ids, &mask, &attention, None).unwrap();
        let loss = (&out.loss_sum / out.loss_tokens).unwrap();
        let grads = loss.backward().unwrap();
        let grads: Vec<Tensor> = opt
            .params()
            .iter()
            .map(|(_, v)| grads.get(v).unwrap().clone())
            .collect();
        let (norm, grads) = clip_grad_norm(grads, 1.0).unwrap();
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        let want_loss = expected["loss"].as_f64().unwrap();
        let want_norm = expected["grad_norm"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
            "step {i}: loss {loss} vs {want_loss}"
        );
        assert!(
            (norm - want_norm).abs() < 1e-4 * want_norm.max(1e-3),
            "step {i}: grad_norm {norm} vs {want_norm}"
        );
        opt.step(&grads, 1e-3).unwrap();
    }
    let final_ref = tensors(&dir.join("final_adapter/adapter_model.safetensors"));
    for lin in model.linears() {
        let lora = lin.lora.as_ref().unwrap();
        for (half, v) in [("lora_A", &lora.a), ("lora_B", &lora.b)] {
            let expected = &final_ref[&peft_key(&lin.name, half)];
            let diff = max_abs_diff(v.as_tensor(), expected);
            assert!(
                diff < 2e-5,
                "{} {half}: differs from torch's AdamW by {diff}",
                lin.name
            );
        }
    }
}
