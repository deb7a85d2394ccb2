//! Forward logits equal HF transformers' (fixtures from scripts/make_reference_fixtures.py) within
//! 1e-4 relative, in f32, for each supported family.

mod common;
use common::*;

fn check(name: &str) {
    let dir = fixture(&format!("models/{name}"));
    let reference = tensors(&dir.join("reference.safetensors"));
    let model = load_model(&dir, false);
    let logits = model.forward(&input_ids(&reference)).unwrap();
    let err = rel_err(&logits, &reference["logits"]);
    assert!(
        err < 1e-4,
        "{name}: logits differ from transformers by {err} (relative)"
    );
}

#[test]
fn llama_with_llama3_rope_scaling() {
    check("llama");
}

#[test]
fn qwen2_tied_with_qkv_bias() {
    check("qwen2");
}

#[test]
fn qwen3_with_qk_norm_and_explicit_head_dim() {
    check("qwen3");
}

#[test]
fn smollm3_with_no_rope_layers() {
    check("smollm3");
}

#[test]
fn mistral_with_sliding_window() {
    check("mistral");
}

#[test]
fn gemma_with_offset_norms_scaled_embeddings_and_geglu() {
    check("gemma");
}

#[test]
fn gemma2_with_soft_caps_output_norms_and_alternating_windows() {
    check("gemma2");
}

#[test]
fn gemma3_with_qk_norms_and_local_and_global_rope() {
    check("gemma3");
}

#[test]
fn phi3_with_fused_projections_partial_rotary_and_longrope() {
    check("phi3");
    // Within the original context LongRoPE takes its short factors.
    let dir = fixture("models/phi3");
    let reference = tensors(&dir.join("reference.safetensors"));
    let model = load_model(&dir, false);
    let ids = reference["input_ids_short"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let logits = model.forward(&ids).unwrap();
    let err = rel_err(&logits, &reference["logits_short"]);
    assert!(err < 1e-4, "phi3 short: logits differ by {err}");
}

/// Greedy generation with the key/value cache picks the tokens that recomputing the whole
/// sequence at each step picks, for every family: sliding windows crossed by the growing
/// sequence, Gemma's soft caps and two RoPE bases, Phi-3's LongRoPE switching to its long
/// frequencies when the sequence passes the original context of 8 (the cache is rebuilt there,
/// as transformers' Phi-3 does).
#[test]
fn cached_generation_equals_recomputing_every_step() {
    use peft_sft::generate::{generate, GenerateOptions};
    for &name in FAMILIES {
        let dir = fixture(&format!("models/{name}"));
        let reference = tensors(&dir.join("reference.safetensors"));
        let model = load_model(&dir, false);
        let prompt: Vec<u32> =
            input_ids(&reference).get(0).unwrap().to_vec1().unwrap()[..6].to_vec();
        let opts = GenerateOptions {
            max_new_tokens: 10,
            ..GenerateOptions::default()
        };
        let cached = generate(&model, &prompt, &opts).unwrap();
        let mut seq = prompt.clone();
        for _ in 0..cached.len() {
            let ids = candle_core::Tensor::new(seq.as_slice(), &device())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&ids).unwrap();
            let last = logits.get(0).unwrap().get(seq.len() - 1).unwrap();
            seq.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        }
        assert_eq!(
            cached,
            seq[prompt.len()..],
            "{name}: cached generation differs"
        );
    }
}

/// Gemma 3's multimodal wrapper (`Gemma3ForConditionalGeneration`, the 4B/12B/27B checkpoints):
/// its text model, read from the original layout (`language_model.model.*`), on text alone.
#[test]
fn gemma3_multimodal_checkpoint_as_its_text_model() {
    check("gemma3_multimodal");
}

/// Mixtral: a mixture of 4 experts, top 2 renormalised, in every layer, with a sliding window.
#[test]
fn mixtral_with_routed_experts() {
    check("mixtral");
}

/// Qwen3-MoE: top-2 of 4 experts with `norm_topk_prob`, q/k norms, a dense layer
/// (`mlp_only_layers`).
#[test]
fn qwen3_moe_with_routed_experts_and_a_dense_layer() {
    check("qwen3_moe");
}
