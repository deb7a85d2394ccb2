//! Autograd discipline: after `backward`, the gradient store holds exactly the trainable tensors:
//! the LoRA pairs for LoRA, every weight for full fine-tuning, and never a frozen weight.

mod common;
use candle_core::Tensor;
use common::*;
use peft_sft::lora::{inject, LoraConfig, TargetModules};
use std::collections::HashSet;

fn batch() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::new(
        &[
            [1u32, 5, 9, 13, 17, 21, 25, 29],
            [2, 4, 6, 8, 10, 12, 14, 16],
        ],
        &device(),
    )
    .unwrap();
    let ones = Tensor::ones((2, 8), candle_core::DType::F32, &device()).unwrap();
    (ids, ones.clone(), ones)
}

#[test]
fn lora_gradients_reach_only_the_adapters() {
    for name in ["llama", "qwen2", "qwen3", "smollm3"] {
        let mut model = load_model(&fixture(&format!("models/{name}")), false);
        let config = LoraConfig {
            r: 4,
            lora_dropout: 0.1,
            target_modules: TargetModules::List(vec![
                "q_proj".into(),
                "v_proj".into(),
                "down_proj".into(),
            ]),
            ..LoraConfig::default()
        };
        inject(&mut model, &config, 0).unwrap();
        let (ids, mask, attn) = batch();
        let out = model.loss(&ids, &mask, &attn, Some(7)).unwrap();
        let grads = out.loss_sum.backward().unwrap();
        let trainable: HashSet<_> = model.trainable().iter().map(|(_, v)| v.id()).collect();
        let stored: HashSet<_> = grads.get_ids().copied().collect();
        assert_eq!(
            trainable.len(),
            6 * model.layers.len(),
            "{name}: three A/B pairs per layer"
        );
        assert_eq!(
            stored, trainable,
            "{name}: the gradient store must hold exactly the adapters"
        );
    }
}

#[test]
fn full_fine_tuning_gradients_reach_every_weight() {
    let model = load_model(&fixture("models/qwen2"), true);
    let (ids, mask, attn) = batch();
    let out = model.loss(&ids, &mask, &attn, None).unwrap();
    let grads = out.loss_sum.backward().unwrap();
    let trainable: HashSet<_> = model.trainable().iter().map(|(_, v)| v.id()).collect();
    let stored: HashSet<_> = grads.get_ids().copied().collect();
    assert_eq!(stored, trainable);
    assert_eq!(trainable.len(), model.named_weights().len());
}

/// What a candle user writes — `loss.backward()`, then an optimizer step — trains every LoRA
/// tensor in every mode: the one-op layers (the CPU default), the checkpointed stack, the
/// op-by-op graph and per-layer checkpointing over it. (B starts at zero, so A moves from the
/// second step on.)
#[test]
fn plain_backward_trains_every_lora_tensor_in_every_mode() {
    use peft_sft::train::optimizer::{AdamW, AdamWParams};
    for (selective, checkpointing) in [(true, false), (true, true), (false, false), (false, true)] {
        let mut model = load_model(&fixture("models/llama"), false);
        model.selective_checkpointing = selective;
        model.gradient_checkpointing = checkpointing;
        let config = LoraConfig {
            r: 4,
            lora_dropout: 0.1,
            ..LoraConfig::default()
        };
        inject(&mut model, &config, 0).unwrap();
        let before: Vec<Tensor> = model
            .trainable()
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let mut opt = AdamW::new(model.trainable(), AdamWParams::default()).unwrap();
        let (ids, mask, attn) = batch();
        for step in 0..2 {
            let out = model.loss(&ids, &mask, &attn, Some(step)).unwrap();
            let store = out.loss_sum.backward().unwrap();
            let grads: Vec<Tensor> = opt
                .params()
                .iter()
                .map(|(name, v)| {
                    store
                        .get(v)
                        .unwrap_or_else(|| {
                            panic!("{selective}/{checkpointing}: no gradient for {name}")
                        })
                        .clone()
                })
                .collect();
            opt.step(&grads, 1e-2).unwrap();
        }
        for ((name, v), old) in model.trainable().iter().zip(&before) {
            assert!(
                max_abs_diff(v.as_tensor(), old) > 0.0,
                "selective {selective}, checkpointing {checkpointing}: {name} did not change"
            );
        }
    }
}
