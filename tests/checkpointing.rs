//! Gradient checkpointing recomputes each decoder layer in the backward pass: the loss and every
//! gradient must equal the run that keeps all activations (LoRA with dropout, and full fine-tuning).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use peft_sft::lora::{inject, LoraConfig};
use peft_sft::model::CausalLm;
use peft_sft::ops::checkpoint::backward;

fn ids() -> Tensor {
    Tensor::new(
        &[
            [3u32, 17, 42, 99, 7, 250, 11, 5],
            [8, 1, 300, 44, 12, 9, 77, 2],
        ],
        &Device::Cpu,
    )
    .unwrap()
}

/// Loss and gradients of every trainable tensor, with checkpointing on or off.
fn run(model: &mut CausalLm, checkpointing: bool) -> (f32, Vec<(String, Tensor)>) {
    model.gradient_checkpointing = checkpointing;
    let ids = ids();
    let mask = ids
        .ones_like()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let out = model.loss(&ids, &mask, &mask, Some(7)).unwrap();
    let loss = (&out.loss_sum / out.loss_tokens).unwrap();
    let grads = backward(&loss).unwrap();
    let named = model
        .trainable()
        .into_iter()
        .map(|(n, v)| {
            let g = grads
                .get(&v)
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            (n, g.clone())
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), named)
}

fn assert_same(model: &mut CausalLm) {
    let (loss, plain) = run(model, false);
    let (loss_ckpt, ckpt) = run(model, true);
    assert!(
        (loss - loss_ckpt).abs() <= 1e-6 * loss.abs(),
        "{loss} vs {loss_ckpt}"
    );
    assert_eq!(plain.len(), ckpt.len());
    for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
        let err = rel_err(b, a);
        assert!(err < 1e-5, "{name}: checkpointed gradient differs by {err}");
    }
}

#[test]
fn lora_gradients_with_dropout_equal_without_checkpointing() {
    for name in ["llama", "qwen3", "mistral"] {
        let mut model = load_model(&fixture(&format!("models/{name}")), false);
        let config = LoraConfig {
            r: 4,
            lora_dropout: 0.1,
            ..LoraConfig::default()
        };
        inject(&mut model, &config, 1).unwrap();
        for lin in model.linears() {
            let b = &lin.lora.as_ref().unwrap().b;
            b.set(&(b.ones_like().unwrap() * 0.05).unwrap()).unwrap();
        }
        assert_same(&mut model);
    }
}

#[test]
fn full_fine_tuning_gradients_equal_without_checkpointing() {
    let mut model = load_model(&fixture("models/qwen2"), true);
    assert_same(&mut model);
}
