//! LoRA against PEFT itself: logits with a PEFT-written adapter, the loss and every LoRA gradient,
//! and merge_and_unload's weights and logits.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use peft_sft::lora::{load_adapter, merge_and_unload};

/// Loss mask of the fixtures: labels are the inputs except the first 5 positions (-100).
fn loss_mask(ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let row: Vec<f32> = (0..t).map(|i| if i < 5 { 0.0 } else { 1.0 }).collect();
    Tensor::from_vec(row.repeat(b), (b, t), &device()).unwrap()
}

fn check(name: &str) {
    let dir = fixture(&format!("peft/{name}"));
    let reference = tensors(&dir.join("reference.safetensors"));
    let mut model = load_model(&fixture(&format!("models/{name}")), false);
    load_adapter(&mut model, &dir.join("adapter")).unwrap();
    let ids = input_ids(&reference);

    let logits = model.forward(&ids).unwrap();
    let err = rel_err(&logits, &reference["logits"]);
    assert!(
        err < 1e-4,
        "{name}: logits with adapter differ from PEFT's by {err}"
    );

    let mask = loss_mask(&ids);
    let ones = mask.ones_like().unwrap();
    let out = model.loss(&ids, &mask, &ones, None).unwrap();
    let loss = (&out.loss_sum / out.loss_tokens).unwrap();
    let err = rel_err(&loss, &reference["loss"]);
    assert!(err < 1e-5, "{name}: loss differs from PEFT's by {err}");
    let grads = loss.backward().unwrap();
    let trainable = model.trainable();
    assert_peft_gradients(&reference, &grads, &trainable, 1e-4);

    let merged = merge_and_unload(&mut model).unwrap();
    assert_eq!(merged, trainable.len() / 2);
    let merged_ref = tensors(&dir.join("merged/model.safetensors"));
    for (n, p) in model.named_weights() {
        let expected = merged_ref
            .get(&n)
            .unwrap_or_else(|| panic!("merged fixture lacks {n}"));
        let diff = max_abs_diff(p.tensor(), expected);
        assert!(
            diff < 1e-5,
            "{name}: merged {n} differs from PEFT's merge_and_unload by {diff}"
        );
    }
    let logits = model.forward(&ids).unwrap().to_dtype(DType::F32).unwrap();
    let err = rel_err(&logits, &reference["merged_logits"]);
    assert!(err < 1e-4, "{name}: merged logits differ by {err}");
}

#[test]
fn llama_adapter_matches_peft() {
    check("llama");
}

#[test]
fn qwen2_rslora_adapter_matches_peft() {
    check("qwen2");
}

/// TRL's DFT loss (`--loss-type dft`: each token's `-log p` weighed by its detached `p`) and every
/// LoRA gradient, against the formula TRL's SFTTrainer computes (scripts/make_dft_fixture.py).
#[test]
fn llama_dft_loss_and_gradients_match_trl() {
    let dir = fixture("peft/llama");
    let reference = tensors(&dir.join("dft_reference.safetensors"));
    let ids = input_ids(&tensors(&dir.join("reference.safetensors")));
    let mut model = load_model(&fixture("models/llama"), false);
    load_adapter(&mut model, &dir.join("adapter")).unwrap();
    model.loss_kind = peft_sft::ops::cross_entropy::LossKind::Dft;
    let mask = loss_mask(&ids);
    let ones = mask.ones_like().unwrap();
    let out = model.loss(&ids, &mask, &ones, None).unwrap();
    let loss = (&out.loss_sum / out.loss_tokens).unwrap();
    let err = rel_err(&loss, &reference["loss"]);
    assert!(err < 1e-5, "DFT loss differs from TRL's by {err}");
    let grads = loss.backward().unwrap();
    assert_peft_gradients(&reference, &grads, &model.trainable(), 1e-4);
    // The plain loss is larger: DFT down-weighs unlikely tokens.
    model.loss_kind = Default::default();
    let nll = model.loss(&ids, &mask, &ones, None).unwrap();
    assert!(nll.loss_sum.to_scalar::<f32>().unwrap() > out.loss_sum.to_scalar::<f32>().unwrap());
}
