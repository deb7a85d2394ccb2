//! QLoRA against the reference stack: a transformers + bitsandbytes 4-bit checkpoint loads to the
//! same logits, our load-time quantization writes its bytes, a PEFT QLoRA step gives the same loss
//! and gradients, GGUF files load to the logits transformers computes from them, and `--qlora`
//! training works end to end with a merge verified on a probe.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_sft::lora::load_adapter;
use peft_sft::model::layers::LinearWeight;
use peft_sft::model::weights::Weights;
use peft_sft::model::{load_pretrained, load_pretrained_with, CausalLm, LoadOptions, ModelConfig};
use peft_sft::quant::gguf::GgufFile;
use peft_sft::quant::{QuantScheme, QuantizedData};

fn bnb_dir() -> std::path::PathBuf {
    fixture("qlora/bnb_llama")
}

#[test]
fn a_bitsandbytes_4bit_checkpoint_loads_to_transformers_logits() {
    let loaded = load_pretrained(bnb_dir().to_str().unwrap(), false, &device()).unwrap();
    let model = loaded.model;
    assert_eq!(
        model.quantized_modules().len(),
        2 * 7,
        "every decoder linear stays 4-bit"
    );
    let reference = tensors(&bnb_dir().join("reference.safetensors"));
    let ids = input_ids(&reference);
    let err = rel_err(&model.forward(&ids).unwrap(), &reference["logits"]);
    assert!(
        err < 1e-5,
        "logits differ from transformers + bitsandbytes by {err}"
    );
    // And they are far from the full-precision model's: the test would notice a dense load.
    assert!(rel_err(&reference["logits"], &reference["logits_full"]) > 1e-2);
}

#[test]
fn quantizing_the_full_model_at_load_writes_the_checkpoint_bytes() {
    let dir = fixture("models/llama");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::from_dir(&dir).unwrap();
    let ours = CausalLm::load_quantized(
        config,
        &weights,
        false,
        Some(QuantScheme::qlora()),
        DType::F32,
        &device(),
    )
    .unwrap();
    let stored = tensors(&bnb_dir().join("model.safetensors"));
    let mut checked = 0;
    for lin in ours.linears() {
        let LinearWeight::Quantized(q) = &lin.weight else {
            panic!("{} was not quantized", lin.name)
        };
        let QuantizedData::FourBit(f) = &q.data else {
            panic!("{} is not 4-bit", lin.name)
        };
        let ours: Vec<u8> = f.packed.to_vec1().unwrap();
        let theirs: Vec<u8> = stored[&format!("{}.weight", lin.name)]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours, theirs, "{}: packed codes differ", lin.name);
        checked += 1;
    }
    assert_eq!(checked, 14);
}

/// Loss mask from labels (-100 = ignored).
fn mask_of(labels: &Tensor) -> Tensor {
    labels.ge(0i64).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn a_qlora_step_matches_peft_over_bitsandbytes() {
    let dir = fixture("qlora/qlora_step");
    let step = tensors(&dir.join("step.safetensors"));
    let mut loaded = load_pretrained(bnb_dir().to_str().unwrap(), false, &device()).unwrap();
    load_adapter(&mut loaded.model, &dir.join("adapter")).unwrap();
    let mut model = loaded.model;
    let ids = input_ids(&step);
    let err = rel_err(&model.forward(&ids).unwrap(), &step["logits"]);
    assert!(err < 1e-5, "logits differ from PEFT's by {err}");
    let mask = mask_of(&step["labels"]);
    let ones = mask.ones_like().unwrap();
    // As trained by default, and with gradient checkpointing (the checkpointed stack), its MLP
    // whole and by chunks of 3 rows (the quantized MLP weights then dequantized once per pass).
    for (checkpointing, chunk_rows) in [(false, 0), (true, 0), (true, 3)] {
        model.gradient_checkpointing = checkpointing;
        model.checkpoint_chunk_rows = chunk_rows;
        let out = model.loss(&ids, &mask, &ones, None).unwrap();
        let loss = (&out.loss_sum / out.loss_tokens).unwrap();
        let err = rel_err(&loss, &step["loss"]);
        assert!(err < 1e-5, "loss differs from PEFT's by {err}");
        let grads = loss.backward().unwrap();
        let trainable = model.trainable();
        assert_eq!(trainable.len(), 28);
        assert_peft_gradients(&step, &grads, &trainable, 1e-4);
    }
}

/// PEFT's DoRA over the bitsandbytes NF4 checkpoint's weights (scripts/make_dora_fixture.py): the
/// norm of `W + scale B A` is taken over the dequantized weight, as PEFT's
/// `dequantize_module_weight`, and no dense copy of it is kept.
#[test]
fn a_dora_adapter_matches_peft_over_nf4_weights() {
    let reference = tensors(&fixture("peft/llama_dora/qlora_reference.safetensors"));
    let mut loaded = load_pretrained(bnb_dir().to_str().unwrap(), false, &device()).unwrap();
    load_adapter(&mut loaded.model, &fixture("peft/llama_dora/adapter")).unwrap();
    let mut model = loaded.model;
    let ids = input_ids(&reference);
    let err = rel_err(&model.forward(&ids).unwrap(), &reference["logits"]);
    assert!(err < 1e-5, "logits differ from PEFT's by {err}");
    let row: Vec<f32> = (0..ids.dim(1).unwrap())
        .map(|i| (i >= 5) as u8 as f32)
        .collect();
    let mask = Tensor::new(row.as_slice(), &device())
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as(ids.shape())
        .unwrap()
        .contiguous()
        .unwrap();
    let ones = mask.ones_like().unwrap();
    // Each layer as one op (the default), op by op, and with gradient checkpointing (the
    // checkpointed stack, the MLP whole and by chunks of 3 rows).
    for (checkpointing, selective, chunk_rows) in [
        (false, true, 0),
        (false, false, 0),
        (true, true, 0),
        (true, true, 3),
    ] {
        model.gradient_checkpointing = checkpointing;
        model.selective_checkpointing = selective;
        model.checkpoint_chunk_rows = chunk_rows;
        let out = model.loss(&ids, &mask, &ones, None).unwrap();
        let loss = (&out.loss_sum / out.loss_tokens).unwrap();
        let err = rel_err(&loss, &reference["loss"]);
        assert!(
            err < 1e-5,
            "{checkpointing} {selective} {chunk_rows}: loss differs from PEFT's by {err}"
        );
        let grads = loss.backward().unwrap();
        let trainable = model.trainable();
        assert_eq!(trainable.len(), 42);
        assert_peft_gradients(&reference, &grads, &trainable, 1e-4);
    }
}

/// `tests/fixtures/qlora/gguf/model-<file>.gguf` with the tiny llama's tokenizer.
fn gguf_model(file: &str) -> CausalLm {
    let options = LoadOptions {
        tokenizer: Some(fixture("models/llama")),
        ..LoadOptions::default()
    };
    let path = fixture(&format!("qlora/gguf/model-{file}.gguf"));
    load_pretrained_with(path.to_str().unwrap(), options, &device())
        .unwrap()
        .model
}

#[test]
fn gguf_files_load_to_the_logits_transformers_reads_from_them() {
    let dir = fixture("qlora/gguf");
    let reference = tensors(&dir.join("reference.safetensors"));
    let ids = input_ids(&reference);
    for (file, quantized) in [("f16", 0), ("q8_0", 14), ("q4_0", 14)] {
        let model = gguf_model(file);
        assert_eq!(model.quantized_modules().len(), quantized, "{file}");
        let err = rel_err(
            &model.forward(&ids).unwrap(),
            &reference[&format!("logits_{file}")],
        );
        assert!(
            err < 1e-4,
            "{file}: logits differ from transformers' by {err}"
        );
    }
}

/// llama.cpp's converter wrote the tiny Llama's tokenizer into the GGUF fixtures' metadata: the
/// tokenizer built from it is the model folder's (the same ids, BOS added as its flag says, the
/// same special tokens and template). A copy of the file without that metadata and without a
/// tokenizer.json beside it says what to pass.
#[test]
fn a_gguf_base_brings_its_tokenizer_or_says_what_to_pass() {
    use candle_core::quantized::gguf_file;
    let path = fixture("qlora/gguf/model-q8_0.gguf");
    let from_gguf = load_pretrained(path.to_str().unwrap(), false, &device())
        .unwrap()
        .tokenizer;
    let folder = peft_sft::data::ChatTokenizer::from_dir(&fixture("models/llama")).unwrap();
    for text in [
        "Hello world, it's 2024!",
        "  two spaces\nand a newline\t tab",
        "The capital of France is Paris.",
        "",
    ] {
        assert_eq!(
            from_gguf.encode(text, true).unwrap(),
            folder.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(
        (&from_gguf.bos_token, &from_gguf.eos_token),
        (&folder.bos_token, &folder.eos_token)
    );
    assert_eq!(from_gguf.chat_template, folder.chat_template);

    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("bare.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("tokenizer."))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut file, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::fs::File::create(&bare).unwrap();
    gguf_file::write(&mut out, &metadata, &refs).unwrap();
    drop(out);
    let err = load_pretrained(bare.to_str().unwrap(), false, &device())
        .err()
        .expect("no tokenizer in the metadata nor beside the file")
        .to_string();
    assert!(
        err.contains("no tokenizer in its metadata") && err.contains("--tokenizer"),
        "{err}"
    );
}

fn train_qlora(out: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "train",
        "--qlora",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        out,
        "--max-steps",
        "12",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "5e-3",
        "--lr-scheduler-type",
        "constant",
        "--logging-steps",
        "1",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = run_cli(&args);
    (ok, err)
}

#[test]
fn qlora_training_lowers_the_loss_and_merges_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qlora");
    let (ok, err) = train_qlora(out.to_str().unwrap(), &[]);
    assert!(ok, "{err}");
    let losses = logged(&out, "loss");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    let adapter = out.to_str().unwrap();

    // Merging into the dequantized base answers like the adapter on its 4-bit base.
    let merged = tmp.path().join("merged");
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        "tests/fixtures/models/qwen2",
        "--qlora",
        "--adapter",
        adapter,
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("dequantized"), "{err}");
    assert!(merged.join("model.safetensors").exists());

    // Merging into the original full-precision weights differs by the quantization error: the
    // probe check refuses, writes nothing, and --force overrides.
    let refused = tmp.path().join("refused");
    let args = [
        "merge",
        "--model",
        "tests/fixtures/models/qwen2",
        "--qlora",
        "--adapter",
        adapter,
        "--base-full-precision",
        "tests/fixtures/models/qwen2",
        "--output",
        refused.to_str().unwrap(),
    ];
    let (ok, _, err) = run_cli(&args);
    assert!(!ok, "a merge that changes the answers must be refused");
    assert!(
        err.contains("--force") && err.contains("nothing written"),
        "{err}"
    );
    assert!(!refused.exists());
    let mut forced = args.to_vec();
    forced.push("--force");
    let (ok, _, err) = run_cli(&forced);
    assert!(ok, "{err}");
    assert!(refused.join("model.safetensors").exists());
}

#[test]
fn full_fine_tuning_refuses_a_quantized_base() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = train_qlora(tmp.path().to_str().unwrap(), &["--full"]);
    assert!(!ok);
    assert!(
        err.contains("--qlora") || err.contains("cannot be used"),
        "{err}"
    );
}

#[test]
fn training_on_a_gguf_base_saves_an_adapter_with_hugging_face_names() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gguf");
    let (ok, _, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/qlora/gguf/model-q8_0.gguf",
        "--tokenizer",
        "tests/fixtures/models/llama",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "8",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "5e-3",
        "--logging-steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let adapter = tensors(&out.join("adapter_model.safetensors"));
    assert!(adapter.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert_eq!(adapter.len(), 28);
    // The adapter fits the Hugging Face model the GGUF was converted from: load it there and the
    // q_proj output (un-permuted rows) must agree with the GGUF-based model's.
    let mut hf = load_model(&fixture("models/llama"), false);
    load_adapter(&mut hf, &out).unwrap();
    let mut gguf = gguf_model("f16");
    load_adapter(&mut gguf, &out).unwrap();
    let ids = Tensor::new(&[[3u32, 17, 42, 99, 7, 250]], &device()).unwrap();
    let err = rel_err(&gguf.forward(&ids).unwrap(), &hf.forward(&ids).unwrap());
    assert!(err < 2e-2, "f16 GGUF + adapter vs HF + adapter: {err}");
}

fn eval_loss(extra: &[&str]) -> f64 {
    let mut args = vec![
        "eval",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = run_cli(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["eval_loss"].as_f64().unwrap()
}

#[test]
fn eight_bit_sits_between_full_precision_and_four_bit() {
    let full = eval_loss(&[]);
    let int8 = eval_loss(&["--load-in-8bit"]);
    let nf4 = eval_loss(&["--load-in-4bit"]);
    let fp4 = eval_loss(&["--qlora", "--bnb-4bit-quant-type", "fp4"]);
    assert!(
        (int8 - full).abs() < 0.01 * full,
        "int8 {int8} vs full {full}"
    );
    assert!(
        (int8 - full).abs() < (nf4 - full).abs(),
        "int8 {int8}, nf4 {nf4}, full {full}"
    );
    assert!(nf4 != fp4, "nf4 and fp4 must use different codes");
}

#[test]
fn a_gguf_base_merges_into_a_gguf_file_of_the_same_types_or_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    for (q, should_pass) in [("q8_0", true), ("q4_0", false)] {
        let adapter = tmp.path().join(format!("adapter-{q}"));
        let model = format!("tests/fixtures/qlora/gguf/model-{q}.gguf");
        let (ok, _, err) = run_cli(&[
            "train",
            "--model",
            &model,
            "--tokenizer",
            "tests/fixtures/models/llama",
            "--dataset",
            "tests/fixtures/data/qa_chat.jsonl",
            "--output-dir",
            adapter.to_str().unwrap(),
            "--max-steps",
            "8",
            "--per-device-train-batch-size",
            "4",
            "--learning-rate",
            "5e-3",
            "--device",
            "cpu",
        ]);
        assert!(ok, "{err}");
        let out = tmp.path().join(format!("merged-{q}.gguf"));
        let (ok, _, err) = run_cli(&[
            "merge",
            "--model",
            &model,
            "--tokenizer",
            "tests/fixtures/models/llama",
            "--adapter",
            adapter.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert_eq!(ok, should_pass, "{q}: {err}");
        if !should_pass {
            // Re-quantizing to 4 bits erases most of what a short LoRA run learned: refused.
            assert!(err.contains("--force") && !out.exists(), "{err}");
            continue;
        }
        let original = GgufFile::open(&repo().join(&model)).unwrap();
        let merged = GgufFile::open(&out).unwrap();
        assert_eq!(original.names(), merged.names());
        let q_proj = "model.layers.0.self_attn.q_proj.weight";
        let (a, b) = (
            original.tensor(q_proj, &Device::Cpu).unwrap(),
            merged.tensor(q_proj, &Device::Cpu).unwrap(),
        );
        assert_eq!(a.dtype(), b.dtype(), "re-quantized to the base's type");
        assert_ne!(
            a.data().unwrap(),
            b.data().unwrap(),
            "the adapter was merged"
        );
        let norm = "model.norm.weight";
        assert_eq!(
            original.tensor(norm, &Device::Cpu).unwrap().data().unwrap(),
            merged.tensor(norm, &Device::Cpu).unwrap().data().unwrap(),
            "untouched tensors are copied byte for byte"
        );
    }
}

#[test]
fn quantized_frozen_linears_compute_with_their_dequantized_weight() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Var;
    use peft_sft::ops::linear::{frozen_linear, lora_linear, FrozenWeight, LoraBase};
    use peft_sft::quant::QuantizedWeight;
    use std::sync::Arc;

    let dev = device();
    let w = Tensor::randn(0f32, 0.5, (32, 256), &dev).unwrap();
    let gguf = |dtype| QuantizedWeight {
        shape: (32, 256),
        data: QuantizedData::Gguf(Arc::new(QTensor::quantize(&w, dtype).unwrap())),
        dtype: DType::F32,
    };
    let weights = [
        QuantizedWeight::quantize(&w, QuantScheme::qlora(), DType::F32, &dev).unwrap(),
        QuantizedWeight::quantize(&w, QuantScheme::Int8, DType::F32, &dev).unwrap(),
        gguf(GgmlDType::Q4K),
        gguf(GgmlDType::Q5K),
        gguf(GgmlDType::Q6K),
        gguf(GgmlDType::Q8_0),
    ];
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 256), &dev).unwrap()).unwrap();
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.1, (4, 256), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, (32, 4), &dev).unwrap()).unwrap();
    for q in weights {
        let name = q.format_name();
        let dense = q.dequantize().unwrap();
        let err = rel_err(&dense, &w);
        assert!(err > 0.0 && err < 0.2, "{name}: quantization error {err}");
        let quantized = FrozenWeight::Quantized(Arc::new(q));
        let reference = FrozenWeight::Dense(dense);
        for (which, run) in [("frozen", 0), ("lora", 1)] {
            let forward = |w: &FrozenWeight| {
                if run == 0 {
                    frozen_linear(&x, w, None).unwrap()
                } else {
                    let base = LoraBase {
                        weight: w,
                        bias: None,
                        dropout_mask: None,
                    };
                    lora_linear(&x, base, &a, &b, 2.0).unwrap()
                }
            };
            let (yq, yd) = (forward(&quantized), forward(&reference));
            assert!(rel_err(&yq, &yd) < 1e-6, "{name} {which}: forward");
            let gq = (yq * 1.0).unwrap().sum_all().unwrap().backward().unwrap();
            let gd = (yd * 1.0).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &a, &b].into_iter().take(if run == 0 { 1 } else { 3 }) {
                let err = rel_err(gq.get(v).unwrap(), gd.get(v).unwrap());
                assert!(err < 1e-6, "{name} {which}: gradient differs by {err}");
            }
            assert_eq!(
                gq.get_ids().count(),
                gd.get_ids().count(),
                "{name}: no weight gradient"
            );
        }
    }
}

/// Every weight type candle reads works as a frozen GGUF base: a one-layer Llama with rows of 256
/// (so K-quants fit) written with its linear weights in each type loads to the logits of the same
/// file holding those weights dequantized (f32), and LoRA on it trains: the loss and every A/B
/// gradient equal the dequantized model's.
#[test]
fn every_gguf_weight_type_is_a_frozen_base_for_lora() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let fixture_file = fixture("qlora/gguf/model-q8_0.gguf");
    let mut f = std::fs::File::open(&fixture_file).unwrap();
    let fixture_content = gguf_file::Content::read(&mut f).unwrap();
    let (hidden, ff, vocab) = (256usize, 512usize, 400usize);
    let mut metadata: Vec<(String, gguf_file::Value)> = fixture_content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") || k.starts_with("general."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in [
        ("llama.block_count", 1u32),
        ("llama.context_length", 256),
        ("llama.embedding_length", hidden as u32),
        ("llama.feed_forward_length", ff as u32),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.rope.dimension_count", 64),
        ("llama.vocab_size", vocab as u32),
    ] {
        metadata.push((k.into(), gguf_file::Value::U32(v)));
    }
    metadata.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        gguf_file::Value::F32(1e-6),
    ));
    let random = |rows: usize, cols: usize, seed: u64| {
        let mut rng = peft_sft::rng::Rng::new(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.normal() * 0.05) as f32)
            .collect();
        Tensor::from_vec(v, (rows, cols), &dev).unwrap()
    };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &dev).unwrap();
    let linears = [
        ("blk.0.attn_q.weight", hidden, hidden),
        ("blk.0.attn_k.weight", hidden / 2, hidden),
        ("blk.0.attn_v.weight", hidden / 2, hidden),
        ("blk.0.attn_output.weight", hidden, hidden),
        ("blk.0.ffn_gate.weight", ff, hidden),
        ("blk.0.ffn_up.weight", ff, hidden),
        ("blk.0.ffn_down.weight", hidden, ff),
    ];
    // `ty`'s quantization of every linear weight, and the same values dequantized (f32).
    let write = |ty: GgmlDType, dequantized: bool, path: &std::path::Path| {
        let mut tensors: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), random(vocab, hidden, 1)),
            ("output.weight".into(), random(vocab, hidden, 2)),
        ]
        .into_iter()
        .map(|(n, t)| (n, QTensor::quantize(&t, GgmlDType::F32).unwrap()))
        .collect();
        for name in [
            "blk.0.attn_norm.weight",
            "blk.0.ffn_norm.weight",
            "output_norm.weight",
        ] {
            tensors.push((
                name.into(),
                QTensor::quantize(&ones(hidden), GgmlDType::F32).unwrap(),
            ));
        }
        for (i, (name, rows, cols)) in linears.iter().enumerate() {
            let q = QTensor::quantize(&random(*rows, *cols, 10 + i as u64), ty).unwrap();
            let q = if dequantized {
                QTensor::quantize(&q.dequantize(&dev).unwrap(), GgmlDType::F32).unwrap()
            } else {
                q
            };
            tensors.push((name.to_string(), q));
        }
        let meta: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut out, &meta, &refs).unwrap();
    };
    let ids = Tensor::new(&[[3u32, 17, 42, 9, 77, 5, 12, 300]], &dev).unwrap();
    let mask = Tensor::ones((1, 8), DType::F32, &dev).unwrap();
    let config = peft_sft::lora::LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..Default::default()
    };
    // Loss and gradients with B moved off zero (so A's gradient is not zero).
    let run = |path: &std::path::Path| {
        let mut model = load_pretrained(path.to_str().unwrap(), false, &dev)
            .unwrap()
            .model;
        peft_sft::lora::inject(&mut model, &config, 7).unwrap();
        for lin in model.linears() {
            let lora = lin.lora.as_ref().unwrap();
            let b = lora.b.as_tensor();
            lora.b
                .set(&(b.ones_like().unwrap() * 0.01).unwrap())
                .unwrap();
        }
        let logits = model.forward(&ids).unwrap();
        let out = model.loss(&ids, &mask, &mask, None).unwrap();
        let loss = (&out.loss_sum / out.loss_tokens).unwrap();
        let grads = loss.backward().unwrap();
        let grads: Vec<(String, Tensor)> = model
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, grads.get(&v).unwrap().clone()))
            .collect();
        (model.quantized_modules().len(), logits, loss, grads)
    };
    for ty in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
    ] {
        let (quantized, dense) = (tmp.path().join("q.gguf"), tmp.path().join("d.gguf"));
        write(ty, false, &quantized);
        write(ty, true, &dense);
        let (n_q, logits_q, loss_q, grads_q) = run(&quantized);
        let (_, logits_d, loss_d, grads_d) = run(&dense);
        if ty != GgmlDType::F16 {
            assert_eq!(n_q, 7, "{ty:?}: the linears stay quantized");
        }
        let err = rel_err(&logits_q, &logits_d);
        assert!(
            err < 1e-4,
            "{ty:?}: logits differ from the dequantized weights' by {err}"
        );
        assert!(rel_err(&loss_q, &loss_d) < 1e-5, "{ty:?}: loss");
        assert_eq!(grads_q.len(), 14);
        for ((name, g), (_, want)) in grads_q.iter().zip(&grads_d) {
            let err = rel_err(g, want);
            assert!(err < 1e-4, "{ty:?}: gradient of {name} differs by {err}");
        }
    }
}

/// A GGUF file with a SentencePiece vocabulary (`tokenizer.ggml.model = llama`, written by
/// scripts/make_spm_gguf_fixture.py as llama.cpp's converter writes one) brings the tokenizer
/// transformers builds from it: the same ids (BOS added, `▁` prepended to the first word, byte
/// fallback for unseen characters, control and user-defined tokens whole) and the same decoding;
/// the model in it computes transformers' logits.
#[test]
fn a_sentencepiece_gguf_brings_transformers_tokenizer() {
    let dir = fixture("gguf_spm");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let path = dir.join("model.gguf");
    let loaded = load_pretrained(path.to_str().unwrap(), false, &device()).unwrap();
    let tok = loaded.tokenizer;
    let model = &reference["model"];
    let ids: Vec<u32> = serde_json::from_value(model["model_input_ids"].clone()).unwrap();
    let n = ids.len();
    let logits = loaded
        .model
        .forward(
            &Tensor::new(ids.as_slice(), &device())
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .get(n - 1)
        .unwrap();
    let want: Vec<f32> = serde_json::from_value(model["last_logits"].clone()).unwrap();
    let want = Tensor::new(want.as_slice(), &device()).unwrap();
    let err = rel_err(&logits, &want);
    assert!(err < 1e-4, "logits differ from transformers' by {err}");
    let special = &reference["special"];
    assert_eq!(tok.bos_token.as_deref(), special["bos_token"].as_str());
    assert_eq!(tok.eos_token.as_deref(), special["eos_token"].as_str());
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let ours = tok.encode(text, true).unwrap();
        assert_eq!(ours, want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&ours, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decoding {text:?}"
        );
    }
}
