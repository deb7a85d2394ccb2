//! Dataset sources: parquet (as `datasets` writes it) and CSV give the same examples as JSON Lines;
//! folders laid out like Hub dataset repos resolve per config and split; a Hub id without network
//! fails with a clear message.

mod common;

use common::*;
use peft_sft::data::{prepare_dataset, prepare_dataset_split, ChatTokenizer, TokenizeOptions};
use std::path::Path;

fn tok() -> ChatTokenizer {
    ChatTokenizer::from_dir(&fixture("models/qwen2")).unwrap()
}

fn examples(path: &Path) -> Vec<(Vec<u32>, Vec<u8>)> {
    prepare_dataset(path, &tok(), &TokenizeOptions::default())
        .unwrap()
        .examples
        .iter()
        .map(|e| (e.input_ids, e.loss_mask))
        .collect()
}

#[test]
fn parquet_and_csv_equal_json_lines() {
    let jsonl = examples(&fixture("data/qa_chat.jsonl"));
    assert_eq!(jsonl.len(), 20);
    assert_eq!(examples(&fixture("data/qa_chat.parquet")), jsonl);
    assert_eq!(
        examples(&fixture("data/qa_prompt_completion.csv")),
        examples(&fixture("data/qa_prompt_completion.jsonl"))
    );
}

#[test]
fn a_hub_layout_folder_resolves_config_and_split() {
    let dir = tempfile::tempdir().unwrap();
    let put = |rel: &str, from: &str| {
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture(from), to).unwrap();
    };
    put("README.md", "README.md");
    put("chat/train-00000-of-00001.parquet", "data/qa_chat.parquet");
    put("chat/test-00000-of-00001.jsonl", "data/qa_chat.jsonl");
    put(
        "completion/train-00000-of-00001.csv",
        "data/qa_prompt_completion.csv",
    );
    let opts = TokenizeOptions::default();
    let split = |config: &str, split: &str| {
        prepare_dataset_split(dir.path(), Some(config), split, &tok(), &opts)
            .map(|d| d.examples.len())
    };
    assert_eq!(split("chat", "train").unwrap(), 20);
    assert_eq!(split("chat", "test").unwrap(), 20);
    assert_eq!(split("completion", "train").unwrap(), 20);
    let err = split("chat", "validation").unwrap_err().to_string();
    assert!(
        err.contains("no data files for split `validation`"),
        "{err}"
    );

    let out = dir.path().join("out");
    let (ok, _, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        dir.path().to_str().unwrap(),
        "--dataset-config",
        "chat",
        "--dataset-split",
        "train",
        "--eval-dataset",
        dir.path().to_str().unwrap(),
        "--eval-steps",
        "1",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(log.contains("eval_loss"), "{log}");
}

#[test]
fn a_hub_dataset_offline_and_uncached_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "HuggingFaceTB/no-such-dataset-here",
        "--output-dir",
        tmp.path().join("o").to_str().unwrap(),
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(!ok);
    assert!(
        err.contains("HuggingFaceTB/no-such-dataset-here") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
