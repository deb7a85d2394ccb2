//! GGUF export: `merge --output x.gguf` from a safetensors base writes llama.cpp's metadata,
//! tokenizer and tensor layout (read back with candle's GGUF reader, and loaded by peft-sft's GGUF
//! loader to the merged model's logits), and `export-adapter` writes llama.cpp's LoRA format.

mod common;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use common::*;
use peft_sft::lora::{load_adapter, merge_and_unload};
use peft_sft::model::{load_pretrained_with, LoadOptions};
use std::path::Path;

fn read(path: &Path) -> Content {
    let mut f = std::fs::File::open(path).unwrap();
    Content::read(&mut f).unwrap()
}

fn string(c: &Content, key: &str) -> String {
    c.metadata[key].to_string().unwrap().clone()
}

fn merge(model: &str, adapter: &str, out: &Path, quantize: &str, extra: &[&str]) {
    let mut args = vec![
        "merge",
        "--model",
        model,
        "--adapter",
        adapter,
        "--output",
        out.to_str().unwrap(),
        "--quantize",
        quantize,
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "{err}");
}

/// Logits of `ids` from the GGUF file (peft-sft's GGUF loader, tokenizer from `tok_dir`).
fn gguf_logits(path: &Path, tok_dir: &Path, ids: &Tensor) -> Tensor {
    let options = LoadOptions {
        tokenizer: Some(tok_dir.to_path_buf()),
        ..LoadOptions::default()
    };
    let loaded = load_pretrained_with(path.to_str().unwrap(), options, &Device::Cpu).unwrap();
    loaded.model.forward(ids).unwrap()
}

#[test]
fn merged_llama_exports_to_gguf_with_llama_cpp_metadata_and_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("llama-sft.gguf");
    let base = fixture("models/llama");
    let adapter = fixture("peft/llama/adapter");
    merge(
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        &out,
        "f16",
        &[],
    );
    let c = read(&out);
    assert_eq!(string(&c, "general.architecture"), "llama");
    assert_eq!(string(&c, "general.type"), "model");
    assert_eq!(c.metadata["llama.block_count"].to_u32().unwrap(), 2);
    assert_eq!(
        c.metadata["llama.attention.head_count_kv"]
            .to_u32()
            .unwrap(),
        2
    );
    assert_eq!(c.metadata["general.file_type"].to_u32().unwrap(), 1);
    assert_eq!(string(&c, "tokenizer.ggml.model"), "gpt2");
    assert_eq!(string(&c, "tokenizer.ggml.pre"), "gpt-2");
    let tokens = c.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    assert_eq!(tokens.len(), 400);
    let types = c.metadata["tokenizer.ggml.token_type"].to_vec().unwrap();
    assert_eq!(
        types[0].to_i32().unwrap(),
        3,
        "<|begin_of_text|> is a control token"
    );
    assert_eq!(types[300].to_i32().unwrap(), 1);
    assert!(!c.metadata["tokenizer.ggml.merges"]
        .to_vec()
        .unwrap()
        .is_empty());
    assert!(c.metadata["tokenizer.ggml.add_bos_token"]
        .to_bool()
        .unwrap());
    assert!(string(&c, "tokenizer.chat_template").contains("start_header_id"));
    // Llama 3 RoPE scaling travels as rope_freqs; norms stay f32, matrices f16.
    assert!(c.tensor_infos.contains_key("rope_freqs.weight"));
    assert_eq!(
        c.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype,
        GgmlDType::F32
    );
    assert_eq!(
        c.tensor_infos["blk.1.attn_q.weight"].ggml_dtype,
        GgmlDType::F16
    );
    assert!(c.tensor_infos.contains_key("output.weight"));

    // The file answers like the merged model (f16 rounding aside).
    let mut merged = load_model(&base, false);
    load_adapter(&mut merged, &adapter).unwrap();
    merge_and_unload(&mut merged).unwrap();
    let ids = Tensor::new(&[[1u32, 50, 120, 7, 300, 42, 9]], &Device::Cpu).unwrap();
    let expected = merged.forward(&ids).unwrap();
    let err = rel_err(&gguf_logits(&out, &base, &ids), &expected);
    assert!(
        err < 5e-3,
        "GGUF logits differ from the merged model by {err}"
    );
}

#[test]
fn tied_qwen2_exports_q8_0_and_q4_k_m_falls_back_like_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("models/qwen2");
    let adapter = fixture("peft/qwen2/adapter");
    let out = tmp.path().join("qwen.gguf");
    merge(
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        &out,
        "q8_0",
        &[],
    );
    let c = read(&out);
    assert_eq!(string(&c, "general.architecture"), "qwen2");
    assert!(
        !c.tensor_infos.contains_key("output.weight"),
        "tied: no output"
    );
    assert_eq!(
        c.tensor_infos["blk.0.attn_q.bias"].ggml_dtype,
        GgmlDType::F32
    );
    assert_eq!(
        c.tensor_infos["blk.0.attn_q.weight"].ggml_dtype,
        GgmlDType::Q8_0
    );
    assert!(!c.metadata.contains_key("qwen2.vocab_size"));
    let mut merged = load_model(&base, false);
    load_adapter(&mut merged, &adapter).unwrap();
    merge_and_unload(&mut merged).unwrap();
    let ids = Tensor::new(&[[5u32, 50, 120, 7, 300, 42]], &Device::Cpu).unwrap();
    let err = rel_err(
        &gguf_logits(&out, &base, &ids),
        &merged.forward(&ids).unwrap(),
    );
    // 8-bit blocks of 32 on weights of N(0, 0.2²) (the merge itself refused nothing: its probe kept
    // the adapter's effect within 10%).
    assert!(err < 5e-2, "Q8_0 GGUF logits differ by {err}");

    // Rows of 64 are too short for Q4_K/Q6_K blocks (256): llama.cpp's fallbacks apply.
    let out = tmp.path().join("qwen-q4km.gguf");
    merge(
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        &out,
        "q4_k_m",
        &["--force"],
    );
    let c = read(&out);
    assert_eq!(c.metadata["general.file_type"].to_u32().unwrap(), 15);
    assert_eq!(
        c.tensor_infos["blk.1.attn_q.weight"].ggml_dtype,
        GgmlDType::Q5_0
    );
    assert_eq!(
        c.tensor_infos["token_embd.weight"].ggml_dtype,
        GgmlDType::Q8_0
    );
}

#[test]
fn merge_without_an_adapter_converts_a_model_and_refuses_other_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("base.gguf");
    let base = fixture("models/qwen2");
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok && err.contains("converted to GGUF (f16)"), "{err}");
    let ids = Tensor::new(&[[5u32, 50, 120, 7]], &Device::Cpu).unwrap();
    let expected = load_model(&base, false).forward(&ids).unwrap();
    let err = rel_err(&gguf_logits(&out, &base, &ids), &expected);
    assert!(err < 5e-3, "converted logits differ by {err}");
    let folder = tmp.path().join("folder");
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--output",
        folder.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--adapter is required"), "{err}");
    assert!(!folder.exists());
}

/// SmolLM3 converts to llama.cpp's `smollm3` architecture: its keys, llama's query/key row
/// layout, and the file (loaded alone, tokenizer from its metadata) computes the model — its NoPE
/// layers included, which llama.cpp hard-codes as every 4th. A model whose NoPE layers differ is
/// refused, naming the layer.
#[test]
fn smollm3_exports_to_llama_cpp_smollm3_and_nope_layers_must_be_every_fourth() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm3.gguf");
    let base = fixture("models/smollm3");
    let convert = |model: &Path, out: &Path| {
        run_cli(&[
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--quantize",
            "f32",
        ])
    };
    let (ok, _, err) = convert(&base, &out);
    assert!(ok, "{err}");
    let c = read(&out);
    assert_eq!(string(&c, "general.architecture"), "smollm3");
    assert_eq!(c.metadata["smollm3.block_count"].to_u32().unwrap(), 4);
    assert_eq!(
        c.metadata["smollm3.rope.dimension_count"].to_u32().unwrap(),
        16
    );
    assert!(!string(&c, "tokenizer.chat_template").contains("[:]"));
    // Rows of attn_q are llama.cpp's permutation of q_proj's.
    let q = load_model(&base, false).layers[0].linears[0]
        .weight
        .dense()
        .unwrap();
    let mut f = std::fs::File::open(&out).unwrap();
    let stored = c
        .tensor(&mut f, "blk.0.attn_q.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let (heads, d) = (4, 16);
    let row = |t: &Tensor, r: usize| t.get(r).unwrap().to_vec1::<f32>().unwrap();
    for h in 0..heads {
        for j in 0..d / 2 {
            for t in 0..2 {
                assert_eq!(
                    row(&stored, h * d + 2 * j + t),
                    row(&q, h * d + t * d / 2 + j)
                );
            }
        }
    }
    let ids = Tensor::new(&[[5u32, 50, 120, 7, 300, 42, 9, 77, 3]], &Device::Cpu).unwrap();
    let expected = load_model(&base, false).forward(&ids).unwrap();
    let alone = peft_sft::model::load_pretrained(out.to_str().unwrap(), false, &Device::Cpu)
        .unwrap()
        .model;
    assert_eq!(
        (0..4)
            .map(|i| alone.config.layer_uses_rope(i))
            .collect::<Vec<_>>(),
        [true, true, true, false]
    );
    let err = rel_err(&alone.forward(&ids).unwrap(), &expected);
    assert!(err < 1e-5, "the smollm3 GGUF's logits differ by {err}");

    // NoPE on layer 1 instead of 3: not what llama.cpp would compute.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(&base).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, other.join(path.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(other.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["no_rope_layers"] = serde_json::json!([1, 0, 1, 1]);
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    let refused = tmp.path().join("refused.gguf");
    let (ok, _, err) = convert(&other, &refused);
    assert!(
        !ok && err.contains("layer 1 skips RoPE") && err.contains("every 4th layer"),
        "{err}"
    );
    assert!(!refused.exists());
}

#[test]
fn export_adapter_writes_llama_cpp_lora_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter.gguf");
    let adapter = fixture("peft/llama/adapter");
    let (ok, _, err) = run_cli(&[
        "export-adapter",
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        fixture("models/llama").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let c = read(&out);
    assert_eq!(string(&c, "general.type"), "adapter");
    assert_eq!(string(&c, "adapter.type"), "lora");
    assert_eq!(string(&c, "general.architecture"), "llama");
    let config = peft_sft::lora::LoraConfig::from_dir(&adapter).unwrap();
    let alpha = c.metadata["adapter.lora.alpha"].to_f32().unwrap() as f64;
    assert!((alpha - config.lora_alpha).abs() < 1e-6);
    let peft = tensors(&adapter.join("adapter_model.safetensors"));
    assert_eq!(c.tensor_infos.len(), peft.len());
    let mut f = std::fs::File::open(&out).unwrap();
    let mut get = |name: &str| {
        c.tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    let key = |m: &str, h: &str| format!("base_model.model.model.layers.0.{m}.{h}.weight");
    // A unchanged; B of v unchanged; B of q with llama.cpp's row permutation (same rows, reordered).
    let a = get("blk.0.attn_q.weight.lora_a");
    assert_eq!(
        max_abs_diff(&a, &peft[&key("self_attn.q_proj", "lora_A")]),
        0.0
    );
    let bv = get("blk.0.attn_v.weight.lora_b");
    assert_eq!(
        max_abs_diff(&bv, &peft[&key("self_attn.v_proj", "lora_B")]),
        0.0
    );
    let bq = get("blk.0.attn_q.weight.lora_b");
    let theirs = &peft[&key("self_attn.q_proj", "lora_B")];
    assert_eq!(bq.dims(), theirs.dims());
    assert!(max_abs_diff(&bq, theirs) > 0.0, "q rows must be permuted");
    let rows = |t: &Tensor| {
        let mut r: Vec<Vec<u32>> = t
            .to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| row.into_iter().map(f32::to_bits).collect())
            .collect();
        r.sort();
        r
    };
    assert_eq!(rows(&bq), rows(theirs));
}
