//! Parity of the data path with TRL (fixtures written by a real `trl.SFTTrainer`, see
//! `tests/fixtures/README.md`): for every `trl/expected_<format>_<tokenizer>[_<variant>].json`, our
//! `prepare_dataset` keeps and drops the same rows, with the same `input_ids` and
//! `loss_mask == (labels != -100)`; and our chat template renderings equal transformers'
//! `apply_chat_template(tokenize=False)`.

use std::path::{Path, PathBuf};

use peft_sft::data::{
    load_rows, parse_sample, prepare_dataset, tokenize_sample, ChatTokenizer, Sample,
    TokenizeOptions,
};
use serde::Deserialize;

const TOKENIZERS: [&str; 3] = ["chatml", "llama3", "toolchat"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One `expected_*.json` file.
#[derive(Debug, Deserialize)]
struct ExpectedFile {
    sft_config: SftConfig,
    examples: Vec<ExpectedExample>,
}

/// The `SFTConfig` fields the fixture set (TRL's defaults otherwise).
#[derive(Debug, Deserialize)]
struct SftConfig {
    max_length: Option<usize>,
    completion_only_loss: Option<bool>,
    assistant_only_loss: Option<bool>,
}

/// What TRL trains on for one dataset row.
#[derive(Debug, Deserialize)]
struct ExpectedExample {
    row: usize,
    dropped: bool,
    input_ids: Option<Vec<u32>>,
    labels: Option<Vec<i64>>,
}

fn tokenizer(name: &str) -> ChatTokenizer {
    ChatTokenizer::from_dir(&fixtures().join("tokenizers").join(name))
        .unwrap_or_else(|e| panic!("tokenizer {name}: {e}"))
}

/// `(format, tokenizer)` from `expected_<format>_<tokenizer>[_<variant>]`.
fn parse_name(stem: &str) -> Option<(String, String)> {
    let rest = stem.strip_prefix("expected_")?;
    TOKENIZERS.iter().find_map(|tokenizer| {
        rest.match_indices(&format!("_{tokenizer}"))
            .find(|(index, _)| {
                let after = &rest[index + tokenizer.len() + 1..];
                after.is_empty() || after.starts_with('_')
            })
            .map(|(index, _)| (rest[..index].to_string(), tokenizer.to_string()))
    })
}

fn expected_files() -> Vec<PathBuf> {
    let dir = fixtures().join("trl");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("expected_") && name.ends_with(".json"))
        })
        .collect();
    files.sort();
    files
}

/// Compares one fixture file with our data path; returns the mismatches.
fn compare(file: &Path) -> Vec<String> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("file name");
    let (format, tokenizer_name) =
        parse_name(stem).unwrap_or_else(|| panic!("unexpected fixture name {stem}"));
    let tok = tokenizer(&tokenizer_name);
    let expected: ExpectedFile =
        serde_json::from_str(&std::fs::read_to_string(file).expect("read fixture"))
            .expect("parse fixture");
    let opts = TokenizeOptions {
        max_length: expected.sft_config.max_length,
        completion_only_loss: expected.sft_config.completion_only_loss,
        assistant_only_loss: expected.sft_config.assistant_only_loss.unwrap_or(false),
        ..TokenizeOptions::default()
    };
    let dataset = fixtures().join("trl").join(format!("{format}.jsonl"));
    let mut failures = Vec::new();

    // Row by row: tokenize_sample gives what TRL keeps; dropped rows have no loss token left.
    let rows = load_rows(&dataset).expect("load dataset");
    assert_eq!(rows.len(), expected.examples.len(), "{stem}: row count");
    for (row, theirs) in rows.iter().zip(&expected.examples) {
        let sample = parse_sample(row, &dataset).expect("parse row");
        let ours = tokenize_sample(&sample, &tok, &opts).expect("tokenize row");
        let label = format!("{stem} row {}", theirs.row);
        if theirs.dropped {
            if ours.num_loss_tokens() != 0 {
                failures.push(format!(
                    "{label}: TRL drops the row but we keep {} loss tokens",
                    ours.num_loss_tokens()
                ));
            }
            continue;
        }
        let (Some(input_ids), Some(labels)) = (&theirs.input_ids, &theirs.labels) else {
            panic!("{label}: kept row without input_ids/labels");
        };
        let trl_mask: Vec<u8> = labels.iter().map(|&l| u8::from(l != -100)).collect();
        if &ours.input_ids != input_ids {
            failures.push(format!(
                "{label}: input_ids\n  ours {:?}\n  TRL  {input_ids:?}\n  ours decoded {:?}\n  TRL  decoded {:?}",
                ours.input_ids,
                tok.decode(&ours.input_ids, false).unwrap_or_default(),
                tok.decode(input_ids, false).unwrap_or_default(),
            ));
        } else if ours.loss_mask != trl_mask {
            failures.push(format!(
                "{label}: loss_mask\n  ours {:?}\n  TRL  {trl_mask:?}",
                ours.loss_mask
            ));
        }
    }

    // The whole file: prepare_dataset keeps exactly TRL's rows, in order, and counts the dropped ones.
    let prepared = prepare_dataset(&dataset, &tok, &opts).expect("prepare dataset");
    let kept: Vec<Vec<u32>> = expected
        .examples
        .iter()
        .filter(|e| !e.dropped)
        .filter_map(|e| e.input_ids.clone())
        .collect();
    let ours: Vec<Vec<u32>> = prepared.examples.iter().map(|e| e.input_ids).collect();
    if ours != kept {
        failures.push(format!(
            "{stem}: prepare_dataset kept {} examples, TRL {}",
            ours.len(),
            kept.len()
        ));
    }
    let dropped = expected.examples.iter().filter(|e| e.dropped).count();
    if prepared.skipped_no_loss_tokens != dropped {
        failures.push(format!(
            "{stem}: skipped {} rows, TRL drops {dropped}",
            prepared.skipped_no_loss_tokens
        ));
    }
    failures
}

#[test]
fn prepared_examples_match_trl() {
    let files = expected_files();
    assert!(!files.is_empty(), "no trl/expected_*.json fixtures");
    let failures: Vec<String> = files.iter().flat_map(|file| compare(file)).collect();
    assert!(
        failures.is_empty(),
        "{} mismatches with TRL:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One row of `rendered_<tokenizer>.json`.
#[derive(Debug, Deserialize)]
struct Rendered {
    messages: Vec<serde_json::Value>,
    add_generation_prompt_false: String,
    add_generation_prompt_true: String,
}

#[test]
fn chat_template_renderings_match_transformers() {
    for name in ["chatml", "llama3"] {
        let tok = tokenizer(name);
        let path = fixtures().join("trl").join(format!("rendered_{name}.json"));
        let rows: Vec<Rendered> =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture"))
                .expect("parse fixture");
        assert!(!rows.is_empty(), "{}: no rows", path.display());
        for (index, row) in rows.iter().enumerate() {
            let rendered = tok
                .apply_chat_template(&row.messages, false)
                .expect("render");
            assert_eq!(
                rendered, row.add_generation_prompt_false,
                "{name} row {index}"
            );
            let rendered = tok
                .apply_chat_template(&row.messages, true)
                .expect("render");
            assert_eq!(
                rendered, row.add_generation_prompt_true,
                "{name} row {index} with add_generation_prompt"
            );
        }
    }
}

/// Tool-calling rows (a `tools` column as a list or as JSON text, `tool_calls` with object or
/// string arguments, `tool` turns) and `chat_template_kwargs` render as transformers'
/// `apply_chat_template(messages, tools=..., **chat_template_kwargs)` renders them
/// (scripts/make_trl_tools_fixtures.py).
#[test]
fn tool_calling_renderings_match_transformers() {
    let tok = tokenizer("toolchat");
    let path = fixtures().join("trl/rendered_tools_toolchat.json");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture"))
            .expect("parse fixture");
    assert_eq!(rows.len(), 4);
    for (index, entry) in rows.iter().enumerate() {
        let row = peft_sft::data::Row {
            line: index + 1,
            value: entry["row"].clone(),
        };
        let Sample::Messages(messages, vars) = parse_sample(&row, &path).expect("parse row") else {
            panic!("row {index} is not a conversation");
        };
        let rendered = tok
            .apply_chat_template_with(&messages, false, &vars)
            .expect("render");
        assert_eq!(rendered, entry["text"].as_str().unwrap(), "row {index}");
    }
}

#[test]
fn fixture_names_parse() {
    assert_eq!(
        parse_name("expected_conversational_prompt_completion_llama3_maxlen12"),
        Some(("conversational_prompt_completion".into(), "llama3".into()))
    );
    assert_eq!(
        parse_name("expected_text_chatml"),
        Some(("text".into(), "chatml".into()))
    );
}
