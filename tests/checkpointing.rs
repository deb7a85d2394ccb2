//! Gradient checkpointing recomputes each decoder layer in the backward pass, selective
//! checkpointing runs each layer as one op (native kernels, or candle's with offloaded
//! activations): the loss and every gradient must equal the op-by-op run that keeps all
//! activations (LoRA with dropout, and full fine-tuning).

mod common;

use candle_core::Tensor;
use common::*;
use peft_sft::lora::{inject, LoraConfig};
use peft_sft::model::CausalLm;

fn ids() -> Tensor {
    Tensor::new(
        &[
            [3u32, 17, 42, 99, 7, 250, 11, 5],
            [8, 1, 300, 44, 12, 9, 77, 2],
        ],
        &device(),
    )
    .unwrap()
}

/// Packed rows: document ids and the RoPE positions that restart with each document.
fn packed() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let documents: Vec<Vec<u32>> = vec![vec![0, 0, 0, 1, 1, 1, 1, 2], vec![0, 0, 0, 0, 0, 1, 1, 1]];
    let positions = documents
        .iter()
        .map(|row| {
            let mut at = 0;
            row.iter()
                .enumerate()
                .map(|(i, d)| {
                    if i > 0 && row[i - 1] != *d {
                        at = 0;
                    }
                    at += 1;
                    at - 1
                })
                .collect()
        })
        .collect();
    (documents, positions)
}

/// How a run builds its graph.
#[derive(Clone, Copy)]
struct Mode {
    checkpointing: bool,
    selective: bool,
    offload: bool,
    packed: bool,
    /// Rows per MLP chunk under checkpointing (0: the model's automatic size).
    chunk_rows: usize,
}

impl Mode {
    /// The op-by-op graph that keeps every activation.
    fn op_by_op(packed: bool) -> Self {
        Mode {
            checkpointing: false,
            selective: false,
            offload: false,
            packed,
            chunk_rows: 0,
        }
    }
}

/// Loss and gradients of every trainable tensor.
fn run(model: &mut CausalLm, mode: Mode) -> (f32, Vec<(String, Tensor)>) {
    model.gradient_checkpointing = mode.checkpointing;
    model.selective_checkpointing = mode.selective;
    model.offload_activations = mode.offload;
    model.checkpoint_chunk_rows = mode.chunk_rows;
    let ids = ids();
    let mask = ids
        .ones_like()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let out = if mode.packed {
        let (documents, positions) = packed();
        model
            .loss_with(&ids, &mask, &mask, &positions, Some(&documents), Some(7))
            .unwrap()
    } else {
        model.loss(&ids, &mask, &mask, Some(7)).unwrap()
    };
    let loss = (&out.loss_sum / out.loss_tokens).unwrap();
    let grads = loss.backward().unwrap();
    let named = model
        .trainable()
        .into_iter()
        .map(|(n, v)| {
            let g = grads
                .get(&v)
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            // A gradient that carries a graph would chain every step into the optimizer state.
            assert!(!g.track_op(), "{n}: the gradient is part of a graph");
            (n, g.clone())
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), named)
}

/// The two runs give the same loss and gradients.
fn assert_runs_agree(model: &mut CausalLm, a: Mode, b: Mode, what: &str) {
    let (loss, plain) = run(model, a);
    let (loss_b, other) = run(model, b);
    assert!(
        (loss - loss_b).abs() <= 1e-6 * loss.abs(),
        "{what}: {loss} vs {loss_b}"
    );
    assert_eq!(plain.len(), other.len());
    for ((name, a), (_, b)) in plain.iter().zip(&other) {
        let err = rel_err(b, a);
        assert!(err < 1e-5, "{what}: {name}: gradient differs by {err}");
    }
}

fn assert_same(model: &mut CausalLm) {
    let plain = Mode {
        selective: true,
        ..Mode::op_by_op(false)
    };
    let ckpt = Mode {
        checkpointing: true,
        ..plain
    };
    assert_runs_agree(model, plain, ckpt, "checkpointing");
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

/// Selective checkpointing (each decoder layer one op, LoRA gradients parked) against the op-by-op
/// graph: every architecture of the fixtures (GQA, biases, Qwen3's q/k norms, Mistral's window,
/// SmolLM3's layers without RoPE, Gemma's GeGLU, output norms, soft caps and two RoPE bases), LoRA with dropout on some modules only, the base frozen on
/// the others, plain and packed rows.
#[test]
fn selective_checkpointing_gives_the_op_by_op_gradients() {
    for &name in FAMILIES {
        let mut model = load_model(&fixture(&format!("models/{name}")), false);
        adapt(&mut model);
        for packed in [false, true] {
            let op_by_op = Mode::op_by_op(packed);
            let selective = Mode {
                selective: true,
                ..op_by_op
            };
            assert_runs_agree(
                &mut model,
                op_by_op,
                selective,
                &format!("{name} packed={packed}"),
            );
            let both = Mode {
                checkpointing: true,
                ..selective
            };
            assert_runs_agree(&mut model, op_by_op, both, &format!("{name} checkpointed"));
            // The checkpointed stack's MLP by chunks of 3 of the 16 rows (the last chunk 1 row,
            // chunks crossing the batch rows): dropout masks and gradients as one pass's.
            let chunked = Mode {
                chunk_rows: 3,
                ..both
            };
            assert_runs_agree(
                &mut model,
                op_by_op,
                chunked,
                &format!("{name} checkpointed, chunked MLP"),
            );
        }
    }
}

/// LoRA r=4 with dropout on some modules and non-zero B, as the one-op tests train it.
fn adapt(model: &mut CausalLm) {
    let fused = model.linears().iter().any(|l| l.name.ends_with("qkv_proj"));
    let targets: &[&str] = match (fused, model.config.is_moe()) {
        // Phi-3: the fused modules and down; o_proj stays frozen.
        (true, _) => &["qkv_proj", "gate_up_proj", "down_proj"],
        // A mixture of experts: the attention (experts and router frozen).
        (false, true) => &["q_proj", "k_proj", "o_proj"],
        (false, false) => &["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
    };
    let config = LoraConfig {
        r: 4,
        lora_dropout: 0.1,
        target_modules: peft_sft::lora::TargetModules::List(
            targets.iter().map(|t| t.to_string()).collect(),
        ),
        ..LoraConfig::default()
    };
    inject(model, &config, 1).unwrap();
    for lin in model.linears() {
        if let Some(lora) = &lin.lora {
            let b = &lora.b;
            b.set(&(b.ones_like().unwrap() * 0.05).unwrap()).unwrap();
        }
    }
}

/// `offload_activations` (`--offload-activations`) runs the one-op layers with candle's kernels
/// as on an accelerator: attention recomputed on its own graph in the backward, the saved tensors
/// moved to host memory and back; with checkpointing, the checkpointed stack on candle's kernels.
/// Same gradients as the op-by-op graph.
#[test]
fn offloaded_one_op_layers_give_the_op_by_op_gradients() {
    for name in [
        "llama", "qwen3", "mistral", "smollm3", "gemma2", "gemma3", "phi3",
    ] {
        let mut model = load_model(&fixture(&format!("models/{name}")), false);
        adapt(&mut model);
        for packed in [false, true] {
            let op_by_op = Mode::op_by_op(packed);
            let offloaded = Mode {
                selective: true,
                offload: true,
                ..op_by_op
            };
            assert_runs_agree(
                &mut model,
                op_by_op,
                offloaded,
                &format!("{name} offloaded packed={packed}"),
            );
            // With checkpointing: the stack as one op on candle's kernels, MLP by chunks of 5.
            let checkpointed = Mode {
                checkpointing: true,
                chunk_rows: 5,
                ..offloaded
            };
            assert_runs_agree(
                &mut model,
                op_by_op,
                checkpointed,
                &format!("{name} offloaded, checkpointed packed={packed}"),
            );
        }
    }
}

#[test]
fn full_fine_tuning_gradients_equal_without_checkpointing() {
    // Gemma 2: its norms' weights train through `1 + w`; the mixtures of experts train their
    // routers and experts.
    for name in ["qwen2", "gemma2", "mixtral", "qwen3_moe"] {
        let mut model = load_model(&fixture(&format!("models/{name}")), true);
        assert_same(&mut model);
    }
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
