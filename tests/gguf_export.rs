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

/// A copy of fixture model `name` with `edits` applied to its config.json.
fn edited_fixture(name: &str, into: &Path, edits: serde_json::Value) -> std::path::PathBuf {
    let dir = into.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(&format!("models/{name}"))).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in edits.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

/// A GGUF tensor, dequantized.
fn stored(c: &Content, path: &Path, name: &str) -> Tensor {
    let mut f = std::fs::File::open(path).unwrap();
    c.tensor(&mut f, name, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .dequantize(&Device::Cpu)
        .unwrap()
}

/// Gemma, Gemma 2/3 (and Gemma 3's multimodal text model), Phi-3, Mixtral and Qwen3-MoE convert
/// to llama.cpp's own architectures as its converter writes them (checked against llama.cpp
/// itself by scripts/check_llama_cpp_families.py): Gemma's `1 + w` norms, the attention scale
/// llama.cpp hard-codes carried by the queries (Gemma 2) or the query norm (Gemma 3), each
/// layer's window, soft caps, Gemma 3's local RoPE base; Phi-3's fused tensors and LongRoPE
/// factors; the experts stacked per projection with the router as `ffn_gate_inp`. Each file,
/// loaded alone (tokenizer from its metadata), computes the model.
#[test]
fn new_families_export_to_their_llama_cpp_architectures() {
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("gemma", json!({}), "gemma"),
        ("gemma2", json!({}), "gemma2"),
        ("gemma3", json!({}), "gemma3"),
        ("gemma3_multimodal", json!({}), "gemma3"),
        // llama.cpp's phi3 and llama attend without a window: the fixtures' windows (shorter
        // than the probe) are lifted.
        ("phi3", json!({"sliding_window": null}), "phi3"),
        ("mixtral", json!({"sliding_window": null}), "llama"),
        // llama.cpp's qwen3moe routes every layer: the fixture's first layer alone.
        (
            "qwen3_moe",
            json!({"mlp_only_layers": [], "num_hidden_layers": 1}),
            "qwen3moe",
        ),
    ];
    let ids = Tensor::new(
        &[[5u32, 50, 120, 7, 300, 42, 9, 77, 3, 11, 200, 64]],
        &Device::Cpu,
    )
    .unwrap();
    for (name, edits, arch) in cases {
        let base = edited_fixture(name, tmp.path(), edits);
        let out = tmp.path().join(format!("{name}.gguf"));
        let (ok, _, err) = run_cli(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--quantize",
            "f32",
        ]);
        assert!(ok, "{name}: {err}");
        let c = read(&out);
        assert_eq!(string(&c, "general.architecture"), arch, "{name}");
        let key = |k: &str| c.metadata[&format!("{arch}.{k}")].clone();
        let sliding = || -> Vec<bool> {
            key("attention.sliding_window_pattern")
                .to_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_bool().unwrap())
                .collect()
        };
        let hf = tensors(&base.join("model.safetensors"));
        let t = |n: &str| stored(&c, &out, n);
        let w = |n: &str| hf[n].clone();
        let same = |a: &Tensor, b: &Tensor, what: &str| {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-6, "{name}: {what} differs by {d}");
        };
        match name {
            "gemma2" => {
                assert!(!c.tensor_infos.contains_key("output.weight"));
                let l = "model.layers.0";
                let one = |n: &str| (w(n) + 1.0).unwrap();
                for (norm, hf) in [
                    ("attn_norm", "input_layernorm"),
                    ("post_attention_norm", "post_attention_layernorm"),
                    ("ffn_norm", "pre_feedforward_layernorm"),
                    ("post_ffw_norm", "post_feedforward_layernorm"),
                ] {
                    let stored = t(&format!("blk.0.{norm}.weight"));
                    same(&stored, &one(&format!("{l}.{hf}.weight")), norm);
                }
                same(
                    &t("output_norm.weight"),
                    &one("model.norm.weight"),
                    "output_norm",
                );
                // Scores scaled by query_pre_attn_scalar^-1/2 (24) where llama.cpp uses head_dim^-1/2 (16).
                let q =
                    (w(&format!("{l}.self_attn.q_proj.weight")) * (16f64 / 24.0).sqrt()).unwrap();
                same(&t("blk.0.attn_q.weight"), &q, "attn_q");
                assert_eq!(key("attn_logit_softcapping").to_f32().unwrap(), 3.0);
                assert_eq!(key("final_logit_softcapping").to_f32().unwrap(), 2.0);
                assert_eq!(key("attention.sliding_window").to_u32().unwrap(), 6);
                let pattern = sliding();
                assert_eq!(pattern, [true, false, true]);
            }
            "gemma3" => {
                let l = "model.layers.0.self_attn";
                let q_norm = ((w(&format!("{l}.q_norm.weight")) + 1.0).unwrap()
                    * (16f64 / 24.0).sqrt())
                .unwrap();
                same(&t("blk.0.attn_q_norm.weight"), &q_norm, "attn_q_norm");
                same(
                    &t("blk.0.attn_k_norm.weight"),
                    &(w(&format!("{l}.k_norm.weight")) + 1.0).unwrap(),
                    "attn_k_norm",
                );
                same(
                    &t("blk.0.attn_q.weight"),
                    &w(&format!("{l}.q_proj.weight")),
                    "attn_q",
                );
                assert_eq!(key("rope.freq_base").to_f32().unwrap(), 1e6);
                assert_eq!(key("rope.freq_base_swa").to_f32().unwrap(), 1e4);
                assert_eq!(key("rope.scaling.factor").to_f32().unwrap(), 2.0);
                let pattern = sliding();
                assert_eq!(pattern, [true, true, false, true]);
            }
            "phi3" => {
                let l = "model.layers.1";
                same(
                    &t("blk.1.attn_qkv.weight"),
                    &w(&format!("{l}.self_attn.qkv_proj.weight")),
                    "attn_qkv",
                );
                same(
                    &t("blk.1.ffn_up.weight"),
                    &w(&format!("{l}.mlp.gate_up_proj.weight")),
                    "ffn_up",
                );
                assert!(!c.tensor_infos.contains_key("blk.1.ffn_gate.weight"));
                let factors = |n: &str| t(n).to_vec1::<f32>().unwrap();
                assert_eq!(factors("rope_factors_short.weight"), [1.0, 1.3, 2.1, 3.4]);
                assert_eq!(factors("rope_factors_long.weight"), [1.2, 2.5, 6.0, 11.0]);
                assert_eq!(key("rope.dimension_count").to_u32().unwrap(), 8);
                assert_eq!(
                    key("rope.scaling.original_context_length")
                        .to_u32()
                        .unwrap(),
                    8
                );
                let attn = key("rope.scaling.attn_factor").to_f32().unwrap() as f64;
                let expected = (1.0 + (32f64 / 8.0).ln() / 8f64.ln()).sqrt();
                assert!((attn - expected).abs() < 1e-6, "attn_factor {attn}");
            }
            "mixtral" | "qwen3_moe" => {
                let (moe, projections) = match name {
                    "mixtral" => ("block_sparse_moe", ["w1", "w3", "w2"]),
                    _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
                };
                for (stack, p) in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
                    .iter()
                    .zip(projections)
                {
                    let stacked = t(&format!("blk.0.{stack}.weight"));
                    assert_eq!(stacked.dim(0).unwrap(), 4, "{stack}: experts outermost");
                    for e in 0..4 {
                        let expert = w(&format!("model.layers.0.{moe}.experts.{e}.{p}.weight"));
                        same(&stacked.get(e).unwrap(), &expert, &format!("{stack}[{e}]"));
                    }
                }
                same(
                    &t("blk.0.ffn_gate_inp.weight"),
                    &w(&format!("model.layers.0.{moe}.gate.weight")),
                    "ffn_gate_inp",
                );
                assert_eq!(key("expert_count").to_u32().unwrap(), 4);
                assert_eq!(key("expert_used_count").to_u32().unwrap(), 2);
                if name == "qwen3_moe" {
                    assert_eq!(key("expert_feed_forward_length").to_u32().unwrap(), 32);
                }
            }
            _ => {}
        }
        // The file alone computes the model (attention scale, windows and caps as llama.cpp
        // reads them back).
        let expected = load_model(&base, false).forward(&ids).unwrap();
        let alone = peft_sft::model::load_pretrained(out.to_str().unwrap(), false, &Device::Cpu)
            .unwrap()
            .model;
        let err = rel_err(&alone.forward(&ids).unwrap(), &expected);
        assert!(err < 1e-5, "{name}: the GGUF's logits differ by {err}");
        if arch == "llama" || arch == "qwen3moe" {
            // Quantized stacks: each expert loads as its own rows' blocks. (`--force`: on these
            // random routers Q8_0's rounding tips near-tied routes on the probe.)
            let q8 = tmp.path().join(format!("{name}-q8_0.gguf"));
            let (ok, _, err) = run_cli(&[
                "merge",
                "--model",
                base.to_str().unwrap(),
                "--output",
                q8.to_str().unwrap(),
                "--quantize",
                "q8_0",
                "--force",
            ]);
            assert!(ok, "{name} q8_0: {err}");
            let gguf = peft_sft::quant::gguf::GgufFile::open(&q8).unwrap();
            let (moe, gate) = match name {
                "mixtral" => ("block_sparse_moe", "w1"),
                _ => ("mlp", "gate_proj"),
            };
            for e in 0..4 {
                let hf_name = format!("model.layers.0.{moe}.experts.{e}.{gate}.weight");
                let q = gguf.tensor(&hf_name, &Device::Cpu).unwrap();
                assert_eq!(q.dtype(), GgmlDType::Q8_0);
                let d = max_abs_diff(&q.dequantize(&Device::Cpu).unwrap(), &w(&hf_name));
                assert!(d < 0.01, "{name}: expert {e} differs by {d} after Q8_0");
            }
        }
    }
    // What llama.cpp's architectures cannot hold is refused by name, nothing written.
    let dense = tmp.path().join("dense.gguf");
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        fixture("models/qwen3_moe").to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("layer 1 has a dense MLP"), "{err}");
    assert!(!dense.exists());
    let unnormalized = edited_fixture(
        "qwen3_moe",
        &tmp.path().join("unnormalized"),
        json!({"mlp_only_layers": [], "num_hidden_layers": 1, "norm_topk_prob": false}),
    );
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        unnormalized.to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("norm_topk_prob is false"), "{err}");
}

/// A SentencePiece-style vocabulary (here: the one the tiny SentencePiece GGUF fixture holds)
/// exports as llama.cpp's `llama` model: pieces, scores that make llama.cpp merge pairs in the BPE
/// merges' order (llama.cpp itself tokenizes the export as it does the SentencePiece-scored
/// original: checked on the fixture's 27 texts and more), byte and control token types, the
/// space prefix. Read back, the file tokenizes every reference text as the original does.
#[test]
fn sentencepiece_vocabularies_export_as_llama_cpp_llama_vocabularies() {
    use peft_sft::export::gguf::{export_model, ExportType};
    let tmp = tempfile::tempdir().unwrap();
    let original = fixture("gguf_spm/model.gguf");
    let loaded =
        peft_sft::model::load_pretrained(original.to_str().unwrap(), false, &Device::Cpu).unwrap();
    let out = tmp.path().join("spm.gguf");
    export_model(
        &loaded.model,
        &loaded.tokenizer,
        "spm",
        ExportType::F32,
        &out,
    )
    .unwrap();
    let c = read(&out);
    assert_eq!(string(&c, "tokenizer.ggml.model"), "llama");
    assert!(c.metadata["tokenizer.ggml.add_space_prefix"]
        .to_bool()
        .unwrap());
    let types = c.metadata["tokenizer.ggml.token_type"].to_vec().unwrap();
    let kind = |id: usize| types[id].to_i32().unwrap();
    // <unk>, <s>, the user-defined <tool>, a byte.
    assert_eq!((kind(0), kind(1), kind(3)), (2, 3, 4));
    let tokens = c.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    let byte = tokens
        .iter()
        .position(|t| t.to_string().unwrap() == "<0x41>")
        .unwrap();
    assert_eq!(kind(byte), 6);
    let scores = c.metadata["tokenizer.ggml.scores"].to_vec().unwrap();
    assert_eq!(scores.len(), tokens.len());
    let back =
        peft_sft::model::load_pretrained(out.to_str().unwrap(), false, &Device::Cpu).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf_spm/reference.json")).unwrap())
            .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() > 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        for special in [true, false] {
            assert_eq!(
                back.tokenizer.encode(text, special).unwrap(),
                loaded.tokenizer.encode(text, special).unwrap(),
                "{text:?}"
            );
        }
    }
    let ids = Tensor::new(&[[1u32, 285, 321, 382, 338, 328]], &Device::Cpu).unwrap();
    let err = rel_err(
        &back.model.forward(&ids).unwrap(),
        &loaded.model.forward(&ids).unwrap(),
    );
    assert!(err < 1e-5, "logits differ by {err}");
}

/// A mixture of experts' all-linear adapter (attention, router, and through PEFT's
/// target_parameters the stacked experts) exports to llama.cpp's adapter tensors for its
/// `mul_mat_id` LoRA: per expert `[r, in]` A and `[out, r]` B stacked outermost, the gate-up pair
/// (rank 2r) split into the gate and up stacks over the shared A, its PEFT scale folded into B so
/// that llama.cpp's alpha / rank reproduces every expert's update (llama.cpp itself computes the
/// adapter's logits: scripts/check_llama_cpp_families.py).
#[test]
fn mixture_of_experts_adapters_export_per_expert_for_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe-adapter.gguf");
    let adapter = fixture("peft/mixtral/adapter");
    let model_dir = fixture("models/mixtral");
    let (ok, _, err) = run_cli(&[
        "export-adapter",
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        model_dir.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let c = read(&out);
    let alpha = c.metadata["adapter.lora.alpha"].to_f32().unwrap() as f64;
    let t = |n: &str| stored(&c, &out, n);
    let mut model = load_model(&model_dir, false);
    load_adapter(&mut model, &adapter).unwrap();
    let moe = model.layers[1].moe.as_ref().unwrap();
    let (experts, inter) = (4, 48);
    // llama.cpp's update of expert e: alpha / r · B_e A_e, r = B's rank dimension.
    let update = |stack: &str, e: usize| {
        let a = t(&format!("blk.1.{stack}.weight.lora_a")).get(e).unwrap();
        let b = t(&format!("blk.1.{stack}.weight.lora_b")).get(e).unwrap();
        let r = b.dim(1).unwrap() as f64;
        (b.matmul(&a).unwrap() * (alpha / r)).unwrap()
    };
    for e in 0..experts {
        let gate_up = moe
            .lora
            .gate_up
            .as_ref()
            .unwrap()
            .weight_delta(e, experts)
            .unwrap();
        let down = moe
            .lora
            .down
            .as_ref()
            .unwrap()
            .weight_delta(e, experts)
            .unwrap();
        for (stack, expected) in [
            ("ffn_gate_exps", gate_up.narrow(0, 0, inter).unwrap()),
            ("ffn_up_exps", gate_up.narrow(0, inter, inter).unwrap()),
            ("ffn_down_exps", down),
        ] {
            let d = max_abs_diff(&update(stack, e), &expected);
            assert!(d < 1e-6, "expert {e} {stack}: update differs by {d}");
        }
    }
    // The router's pair, 2-D.
    let router = moe
        .lora
        .router
        .as_ref()
        .unwrap()
        .weight_delta(0, 1)
        .unwrap();
    let a = t("blk.1.ffn_gate_inp.weight.lora_a");
    let b = t("blk.1.ffn_gate_inp.weight.lora_b");
    let r = b.dim(1).unwrap() as f64;
    let d = max_abs_diff(&(b.matmul(&a).unwrap() * (alpha / r)).unwrap(), &router);
    assert!(d < 1e-6, "router update differs by {d}");
    assert_eq!(
        c.tensor_infos["blk.1.ffn_up_exps.weight.lora_a"]
            .shape
            .dims(),
        [experts, 8, 64]
    );
}
