//! The GPU correctness checks (built only with `--features cuda`; run by scripts/gpu-check.sh on
//! the GPU machine with `PEFT_SFT_TEST_DEVICE=cuda`).
//!
//! The numerical test files below are compiled in as they are: on the GPU machine their models,
//! fixtures and batches live on the CUDA device (`common::device`) and they assert the same
//! tolerances against the same transformers/PEFT/bitsandbytes fixtures as on the CPU. The tests
//! in this file compare the two devices directly: merge, greedy generation, evaluation and a
//! 20-step training run on CUDA against the same on the CPU, and `--bf16` against f32 on CUDA.
//! The included files carry every family's fixtures (Gemma's soft caps and GeGLU, Phi-3's fused
//! modules and LongRoPE run candle's kernels on CUDA where no CUDA kernel exists).
// Each included test file declares its own `mod common` (the helpers they share on the CPU).
#![allow(clippy::duplicate_mod)]

#[path = "autograd_frozen.rs"]
mod autograd_frozen;
#[path = "chat_format.rs"]
mod chat_format;
#[path = "checkpointing.rs"]
mod checkpointing;
#[path = "packing.rs"]
mod packing;
#[path = "parity_models.rs"]
mod parity_models;
#[path = "parity_peft.rs"]
mod parity_peft;
#[path = "parity_train_step.rs"]
mod parity_train_step;
#[path = "qlora.rs"]
mod qlora;

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_sft::generate::{generate, GenerateOptions};
use peft_sft::lora::{load_adapter, merge_and_unload};
use peft_sft::model::CausalLm;
use peft_sft::model::{load_pretrained, weights::Weights, ModelConfig};

fn load_on(dir: &std::path::Path, device: &Device) -> CausalLm {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::from_dir(dir).unwrap();
    CausalLm::load(config, &weights, false, DType::F32, device).unwrap()
}

fn on_cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

#[test]
fn the_tests_run_on_cuda() {
    assert!(
        device().is_cuda(),
        "PEFT_SFT_TEST_DEVICE=cuda is not set: these checks would run on the CPU"
    );
}

#[test]
fn merge_on_cuda_equals_merge_on_the_cpu() {
    for name in ["llama", "qwen2", "gemma2", "phi3", "gemma3_multimodal"] {
        let base = fixture(&format!("models/{name}"));
        let adapter = fixture(&format!("peft/{name}/adapter"));
        let mut merged = Vec::new();
        for device in [Device::Cpu, device()] {
            let mut model = load_on(&base, &device);
            load_adapter(&mut model, &adapter).unwrap();
            merge_and_unload(&mut model).unwrap();
            let weights: Vec<(String, Tensor)> = model
                .named_weights()
                .into_iter()
                .map(|(n, p)| (n, on_cpu(p.tensor())))
                .collect();
            merged.push(weights);
        }
        let (cpu, cuda) = (&merged[0], &merged[1]);
        assert_eq!(cpu.len(), cuda.len());
        for ((n, a), (m, b)) in cpu.iter().zip(cuda) {
            assert_eq!(n, m);
            let diff = max_abs_diff(b, a);
            assert!(diff < 1e-6, "{name}: merged {n} differs by {diff}");
        }
    }
}

#[test]
fn greedy_generation_and_logits_equal_the_cpus() {
    let spec = fixture("models/qwen2");
    let adapter = fixture("peft/qwen2/adapter");
    let mut runs = Vec::new();
    for device in [Device::Cpu, device()] {
        let mut loaded = load_pretrained(spec.to_str().unwrap(), false, &device).unwrap();
        load_adapter(&mut loaded.model, &adapter).unwrap();
        let prompt = loaded
            .tokenizer
            .encode("What is the capital of France?", true)
            .unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 24,
            ..GenerateOptions::default()
        };
        let tokens = generate(&loaded.model, &prompt, &opts).unwrap();
        let ids = Tensor::new(prompt.as_slice(), &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = on_cpu(&loaded.model.forward(&ids).unwrap());
        runs.push((tokens, logits));
    }
    let err = rel_err(&runs[1].1, &runs[0].1);
    assert!(err < 1e-5, "CUDA logits differ from the CPU's by {err}");
    assert_eq!(runs[1].0, runs[0].0, "greedy tokens differ");
}

/// `train --lora` (dropout 0.05) for 20 steps on `device` with `extra` flags; the logged losses.
fn train_losses(device: &str, extra: &[&str]) -> Vec<f64> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut flags = vec!["--lora", "--lora-dropout", "0.05"];
    flags.extend_from_slice(extra);
    let (ok, _, err) = run_cli(&train_args(device, out.to_str().unwrap(), "20", &flags));
    assert!(ok, "train on {device} {extra:?} failed: {err}");
    let losses = logged(&out, "loss");
    assert_eq!(losses.len(), 20, "{device}: expected 20 logged losses");
    losses
}

#[test]
fn twenty_lora_steps_on_cuda_log_the_cpus_losses() {
    for extra in [&[][..], &["--gradient-checkpointing"][..]] {
        let cpu = train_losses("cpu", extra);
        let cuda = train_losses("cuda", extra);
        for (step, (c, g)) in cpu.iter().zip(&cuda).enumerate() {
            let rel = (g - c).abs() / c.abs();
            assert!(
                rel < 1e-4,
                "{extra:?} step {}: CUDA loss {g} vs CPU {c} ({rel:.2e} relative)",
                step + 1
            );
        }
        assert!(
            cuda[19] < 0.95 * cuda[0],
            "the loss did not fall on CUDA: {cuda:?}"
        );
    }
}

#[test]
fn bf16_mixed_precision_on_cuda_follows_the_f32_run() {
    let f32_run = train_losses("cuda", &["--bf16", "false"]);
    let bf16_run = train_losses("cuda", &["--bf16", "true"]);
    for (step, (a, b)) in f32_run.iter().zip(&bf16_run).enumerate() {
        let rel = (b - a).abs() / a.abs();
        assert!(rel < 0.02, "step {}: bf16 loss {b} vs f32 {a}", step + 1);
    }
}

#[test]
fn eval_on_cuda_equals_eval_on_the_cpu() {
    let model = fixture("models/qwen2");
    let adapter = fixture("peft/qwen2/adapter");
    let data = fixture("data/qa_chat.jsonl");
    let mut losses = Vec::new();
    for device in ["cpu", "cuda"] {
        let (ok, out, err) = run_cli(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--json",
            "--device",
            device,
        ]);
        assert!(ok, "eval on {device} failed: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        losses.push(v["eval_loss"].as_f64().expect("eval_loss"));
    }
    let rel = (losses[1] - losses[0]).abs() / losses[0];
    assert!(
        rel < 1e-5,
        "eval_loss CUDA {} vs CPU {}",
        losses[1],
        losses[0]
    );
}

/// The output and the gradients of `x` and `w` of `op(x, w)` on `device` in `dtype`, read back
/// as f32 on the CPU; the loss is `sum(op(x, w) * r)` for a fixed random `r`.
fn forward_and_grads(
    op: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    (x, w, r): (&Tensor, &Tensor, &Tensor),
    device: &Device,
    dtype: DType,
) -> [Tensor; 3] {
    let var = |t: &Tensor| {
        candle_core::Var::from_tensor(&t.to_device(device).unwrap().to_dtype(dtype).unwrap())
            .unwrap()
    };
    let (xv, wv) = (var(x), var(w));
    let out = op(xv.as_tensor(), wv.as_tensor()).unwrap();
    let r = r.to_device(device).unwrap().to_dtype(dtype).unwrap();
    let grads = (&out * &r)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let back = |t: &Tensor| on_cpu(&t.to_dtype(DType::F32).unwrap());
    [
        back(&out),
        back(grads.get(xv.as_tensor()).expect("x gradient")),
        back(
            grads
                .get(wv.as_tensor())
                .expect("second operand's gradient"),
        ),
    ]
}

/// Largest `|a - b|` relative to the largest `|b|`.
fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let size = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / size.to_scalar::<f32>().unwrap().max(1e-12)
}

/// The CUDA kernels (RMSNorm, SwiGLU: forward and backward, f32 and bf16) against the CPU's
/// native f32 kernels, through the ops' dispatch points. The bf16 run's reference sees the same
/// bf16-rounded inputs, so what is left is the kernels' one rounding of each result (the RMSNorm
/// weight's gradient is candle's bf16 reduction over the rows, hence its wider bound). On the CPU
/// (a dry run) only f32 is compared: there bf16 runs candle's ops, which this test is not about.
#[test]
fn cuda_rms_norm_and_swiglu_kernels_equal_the_cpu_kernels() {
    let cpu = Device::Cpu;
    // Rows of a width that is not a multiple of the block (576: SmolLM2's hidden size).
    let x = Tensor::randn(0f32, 1.0, (3, 37, 576), &cpu).unwrap();
    let w = Tensor::randn(1f32, 0.1, 576, &cpu).unwrap();
    let r = Tensor::randn(0f32, 1.0, (3, 37, 576), &cpu).unwrap();
    let up = Tensor::randn(0f32, 1.0, (3, 37, 576), &cpu).unwrap();
    let norm = |x: &Tensor, w: &Tensor| peft_sft::ops::norm::rms_norm(x, w, 1e-5);
    let swiglu = |g: &Tensor, u: &Tensor| {
        peft_sft::ops::glu::glu(g, u, peft_sft::ops::glu::Activation::Silu)
    };
    let rounded =
        |t: &Tensor, dtype: DType| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
    let mut runs = vec![("f32", DType::F32, [1e-5, 1e-5, 1e-5])];
    if device().is_cuda() {
        runs.push(("bf16", DType::BF16, [1e-2, 1e-2, 3e-2]));
    }
    for (what, dtype, tolerances) in runs {
        let (x, up, w, r) = (
            rounded(&x, dtype),
            rounded(&up, dtype),
            rounded(&w, dtype),
            rounded(&r, dtype),
        );
        for (op, name, second) in [
            (
                &norm as &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
                "rms-norm",
                &w,
            ),
            (&swiglu, "swiglu", &up),
        ] {
            let want = forward_and_grads(op, (&x, second, &r), &cpu, DType::F32);
            let got = forward_and_grads(op, (&x, second, &r), &device(), dtype);
            let parts = ["output", "d x", "d second"];
            for ((part, tolerance), (g, w)) in
                parts.iter().zip(tolerances).zip(got.iter().zip(&want))
            {
                let err = relative_error(g, w);
                assert!(
                    err <= tolerance,
                    "{name} {what} {part}: relative error {err}"
                );
            }
        }
    }
}

/// The CUDA RoPE kernel (token-major, forward and its inverse in the backward) against the CPU's
/// native kernel, with tables shared by the batch and per batch row (packed documents restart
/// their positions), f32 and (on a GPU) bf16 on the same rounded inputs.
#[test]
fn cuda_rope_kernel_equals_the_cpu_kernel() {
    use peft_sft::ops::rope::{apply_rope_tokens, RopeScaling, RotaryEmbedding};
    let cpu = Device::Cpu;
    let (b, t, heads, d) = (2, 45, 3, 64);
    let rope = RotaryEmbedding::new(d, 10000.0, &RopeScaling::Default);
    let shared: Vec<Vec<u32>> = vec![(0..t as u32 + 7).collect()];
    let per_row: Vec<Vec<u32>> = (0..b as u32)
        .map(|r| (0..t as u32).map(|i| (i * (r + 1)) % 13).collect())
        .collect();
    let rounded =
        |t: &Tensor, dtype: DType| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
    let mut runs = vec![(DType::F32, 1e-5)];
    if device().is_cuda() {
        runs.push((DType::BF16, 1e-2));
    }
    for (dtype, tolerance) in runs {
        let x = rounded(
            &Tensor::randn(0f32, 1.0, (b, t, heads, d), &cpu).unwrap(),
            dtype,
        );
        let r = rounded(
            &Tensor::randn(0f32, 1.0, (b, t, heads, d), &cpu).unwrap(),
            dtype,
        );
        for positions in [&shared, &per_row] {
            let run = |device: &Device, dtype: DType| {
                let (cos, sin) = rope.tables(positions, dtype, device).unwrap();
                let xv = candle_core::Var::from_tensor(
                    &x.to_device(device).unwrap().to_dtype(dtype).unwrap(),
                )
                .unwrap();
                let out = apply_rope_tokens(xv.as_tensor(), &cos, &sin).unwrap();
                let r = r.to_device(device).unwrap().to_dtype(dtype).unwrap();
                let grads = (&out * &r)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let back = |t: &Tensor| on_cpu(&t.to_dtype(DType::F32).unwrap());
                [
                    back(&out),
                    back(grads.get(xv.as_tensor()).expect("x gradient")),
                ]
            };
            let want = run(&cpu, DType::F32);
            let got = run(&device(), dtype);
            for (part, (g, w)) in ["output", "d x"].iter().zip(got.iter().zip(&want)) {
                let err = relative_error(g, w);
                assert!(
                    err <= tolerance,
                    "rope {dtype:?} {part}: relative error {err}"
                );
            }
        }
    }
}

/// The loss on a GPU (logits by cuBLAS, the fused CUDA row pass) against the CPU's native chunk
/// loop: loss, accuracy and entropy sums and the gradients of the hidden states and (full
/// fine-tuning) the head, f32 and (on a GPU) bf16 on the same rounded inputs.
#[test]
fn cuda_loss_rows_equal_the_cpu_loss() {
    use peft_sft::ops::cross_entropy::{lm_head_loss, LossTargets};
    let cpu = Device::Cpu;
    let (n, h, vocab) = (67, 48, 1000);
    let targets = LossTargets {
        target_ids: (0..n as u32).map(|i| (i * 37) % vocab as u32).collect(),
        loss_weight: (0..n).map(|i| [0.0, 1.0, 0.5][i % 3]).collect(),
        entropy_weight: (0..n).map(|i| (i % 2) as f32).collect(),
        kind: Default::default(),
        softcap: None,
    };
    let rounded =
        |t: &Tensor, dtype: DType| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
    let mut runs = vec![(DType::F32, 1e-4)];
    if device().is_cuda() {
        runs.push((DType::BF16, 3e-2));
    }
    for (dtype, tolerance) in runs {
        let hidden = rounded(&Tensor::randn(0f32, 1.0, (n, h), &cpu).unwrap(), dtype);
        let head = rounded(&Tensor::randn(0f32, 0.2, (vocab, h), &cpu).unwrap(), dtype);
        let run = |device: &Device, dtype: DType| {
            let var = |t: &Tensor| {
                candle_core::Var::from_tensor(
                    &t.to_device(device).unwrap().to_dtype(dtype).unwrap(),
                )
                .unwrap()
            };
            let (hv, wv) = (var(&hidden), var(&head));
            let out = lm_head_loss(hv.as_tensor(), wv.as_tensor(), &targets).unwrap();
            let loss = out.loss_sum.to_dtype(DType::F32).unwrap();
            let grads = loss.backward().unwrap();
            let back = |t: &Tensor| on_cpu(&t.to_dtype(DType::F32).unwrap());
            let sums = [
                loss.to_device(&Device::Cpu)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64,
                out.correct_tokens,
                out.entropy_sum,
            ];
            (
                sums,
                [
                    back(grads.get(hv.as_tensor()).expect("d hidden")),
                    back(grads.get(wv.as_tensor()).expect("d head")),
                ],
            )
        };
        let (want_sums, want_grads) = run(&cpu, DType::F32);
        let (got_sums, got_grads) = run(&device(), dtype);
        let (loss, entropy) = ((got_sums[0], want_sums[0]), (got_sums[2], want_sums[2]));
        for (what, (g, w)) in [("loss", loss), ("entropy", entropy)] {
            assert!(
                (g - w).abs() <= tolerance * w.abs().max(1.0),
                "{dtype:?} {what}: {g} vs {w}"
            );
        }
        // bf16 logits can swap two near-equal top logits of a row: allow two such rows.
        let hits = if dtype == DType::F32 { 0.0 } else { 2.0 };
        let (g, w) = (got_sums[1], want_sums[1]);
        assert!(
            (g - w).abs() <= hits,
            "{dtype:?} correct tokens: {g} vs {w}"
        );
        for (what, (g, w)) in ["d hidden", "d head"]
            .iter()
            .zip(got_grads.iter().zip(&want_grads))
        {
            let err = relative_error(g, w);
            assert!(
                err as f64 <= tolerance,
                "{dtype:?} {what}: relative error {err}"
            );
        }
    }
}

/// The CUDA 4-bit dequantization (the frozen QLoRA base) against the CPU's, value for value:
/// NF4 with double-quantized absmax and FP4 with plain absmax, from f32 and bf16 weights, with
/// a final block that is not full.
#[test]
fn cuda_4bit_dequantization_is_bit_exact_with_the_cpus() {
    use peft_sft::ops::linear::FrozenWeight;
    use peft_sft::quant::{FourBitType, QuantScheme, QuantizedWeight};
    use std::sync::Arc;
    let cpu = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (96, 77), &cpu).unwrap();
    for (quant_type, double_quant) in [(FourBitType::Nf4, true), (FourBitType::Fp4, false)] {
        for source in [DType::F32, DType::BF16] {
            let scheme = QuantScheme::FourBit {
                quant_type,
                blocksize: 64,
                double_quant,
            };
            let dense = |device: &Device| {
                let w = w.to_dtype(source).unwrap();
                let q = QuantizedWeight::quantize(&w, scheme, DType::F32, device).unwrap();
                on_cpu(&FrozenWeight::Quantized(Arc::new(q)).dense().unwrap())
            };
            let (want, got) = (dense(&cpu), dense(&device()));
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(
                diff, 0.0,
                "{quant_type:?} double_quant={double_quant} from {source:?}"
            );
        }
    }
}
