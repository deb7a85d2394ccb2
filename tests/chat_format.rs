//! `--chat-template chatml` on a base model without a chat template (TRL's `setup_chat_format`):
//! the new tokens' embedding and LM-head rows against PEFT's `trainable_token_indices` (logits,
//! loss and every gradient, from `scripts/make_chatml_setup_fixtures.py`), and the CLI round trip:
//! train, reload, generate, merge.

mod common;
use candle_core::Tensor;
use common::*;
use peft_sft::lora::{load_adapter, LoraConfig};
use peft_sft::model::tokens::rows_name;

const BASE: &str = "chatml_setup/base";

#[test]
fn a_peft_adapter_with_new_token_rows_gives_peft_logits_loss_and_gradients() {
    let reference = tensors(&fixture("chatml_setup/expected.safetensors"));
    let mut model = load_model(&fixture(BASE), false);
    assert_eq!(model.config.vocab_size, 400);
    let adapter = fixture("chatml_setup/peft_adapter");
    load_adapter(&mut model, &adapter).unwrap();
    assert_eq!(
        model.config.vocab_size, 402,
        "the base grows to the new ids"
    );
    let ids = input_ids(&reference);
    let logits = model.forward(&ids).unwrap();
    let err = rel_err(&logits, &reference["logits"]);
    assert!(err < 1e-4, "logits differ from PEFT's by {err}");

    // Training: the rows become variables (their loaded values are the start).
    model.train_token_rows(vec![400, 401]).unwrap();
    let mask = ids
        .ones_like()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let out = model.loss(&ids, &mask, &mask, None).unwrap();
    let loss = (&out.loss_sum / out.loss_tokens).unwrap();
    let err = rel_err(&loss, &reference["loss"]);
    assert!(err < 1e-5, "loss differs from PEFT's by {err}");
    let grads = loss.backward().unwrap();
    let trainable = model.trainable();
    let rows: Vec<&String> = trainable
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with("trainable_tokens_delta"))
        .collect();
    assert_eq!(
        rows,
        [rows_name("model.embed_tokens"), rows_name("lm_head")]
            .iter()
            .collect::<Vec<_>>()
    );
    assert_peft_gradients(&reference, &grads, &trainable, 1e-4);
    assert_eq!(trainable.len(), 30);
}

#[test]
fn train_with_chatml_setup_saves_rows_peft_loads_and_merge_keeps_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    let rows: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus one?")},
                {"role": "assistant", "content": format!("{}.", i + 1)}
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = tmp.path().join("out");
    let base = fixture(BASE);
    let (ok, _, err) = run_cli(&[
        "train",
        "--model",
        base.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--chat-template",
        "chatml",
        "--max-steps",
        "3",
        "--learning-rate",
        "1e-2",
        "--per-device-train-batch-size",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");

    // The adapter: PEFT's trainable_token_indices with both matrices' rows, and the tokenizer.
    let config = LoraConfig::from_dir(&out).unwrap();
    let indices = serde_json::to_value(config.trainable_token_indices.unwrap()).unwrap();
    assert_eq!(
        indices,
        serde_json::json!({"embed_tokens": [400, 401], "lm_head": [400, 401]})
    );
    let saved = tensors(&out.join("adapter_model.safetensors"));
    let embed_rows =
        &saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"];
    assert_eq!(embed_rows.dims(), [2, 64]);
    assert!(saved.contains_key("base_model.model.lm_head.token_adapter.trainable_tokens_delta"));
    // The rows trained: they moved away from the mean of the old rows they started at.
    let base_model = load_model(&base, false);
    let mean = base_model
        .embed_tokens
        .tensor()
        .mean_keepdim(0)
        .unwrap()
        .broadcast_as((2, 64))
        .unwrap();
    assert!(
        max_abs_diff(embed_rows, &mean) > 1e-4,
        "the new rows did not train"
    );
    let tok = peft_sft::data::ChatTokenizer::from_dir(&out).unwrap();
    assert_eq!(
        (tok.eos_token_id(), tok.pad_token_id()),
        (Some(401), Some(401))
    );

    // Reloaded on the base: the adapter's logits; merged: the same logits, vocab 402, eos 401.
    let mut adapted = load_model(&base, false);
    load_adapter(&mut adapted, &out).unwrap();
    let ids = Tensor::new(&[[400u32, 85, 288, 199, 270, 401, 199, 400, 65]], &device()).unwrap();
    let expected = adapted.forward(&ids).unwrap();
    let merged_dir = tmp.path().join("merged");
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--output",
        merged_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let merged = load_model(&merged_dir, false);
    assert_eq!(merged.config.vocab_size, 402);
    let merged_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(merged_config["eos_token_id"], 401);
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(merged_dir.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(generation["eos_token_id"], 401);
    let err = rel_err(&merged.forward(&ids).unwrap(), &expected);
    assert!(err < 1e-5, "merged logits differ by {err}");
    let merged_tok = peft_sft::data::ChatTokenizer::from_dir(&merged_dir).unwrap();
    assert_eq!(merged_tok.eos_token_id(), Some(401));

    // generate with --adapter uses the adapter's tokenizer and template.
    let (ok, text, err) = run_cli(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--prompt",
        "What is 2 plus one?",
        "--max-new-tokens",
        "4",
    ]);
    assert!(ok, "{err}");
    assert!(!text.is_empty());
}
