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

/// Losses and gradient norms logged by `peft-sft train` with the given extra flags.
fn run_logged(extra: &[&str]) -> Vec<(f64, f64)> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args = vec![
        "train",
        "--model",
        "tests/fixtures/models/llama",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "3",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "5e-3",
        "--lora-dropout",
        "0.1",
        "--logging-steps",
        "1",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "{err}");
    let losses = logged(&out, "loss");
    let norms = logged(&out, "grad_norm");
    losses.into_iter().zip(norms).collect()
}

#[test]
fn training_with_gradient_checkpointing_logs_the_same_run() {
    let plain = run_logged(&[]);
    let ckpt = run_logged(&["--gradient-checkpointing"]);
    assert_eq!(plain.len(), 3);
    for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
        assert!(
            (a.0 - b.0).abs() < 1e-5 * a.0,
            "step {i} loss: {a:?} vs {b:?}"
        );
        assert!(
            (a.1 - b.1).abs() < 1e-4 * a.1,
            "step {i} grad_norm: {a:?} vs {b:?}"
        );
    }
}
