//! The data path end to end on the fixture tokenizers: a dataset file to padded batches, with the
//! errors a user meets on bad input.

use std::path::{Path, PathBuf};

use candle_core::Device;
use peft_sft::data::{collate, prepare_dataset, ChatTokenizer, Example, TokenizeOptions};
use peft_sft::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn chatml() -> ChatTokenizer {
    ChatTokenizer::from_dir(&fixtures().join("tokenizers/chatml")).expect("chatml tokenizer")
}

#[test]
fn chat_dataset_to_batches_with_pad_equal_to_eos() {
    let tok = chatml();
    let eos = tok.eos_token_id().expect("eos id");
    let pad = tok.pad_token_id().expect("pad id");
    assert_eq!(pad, eos, "the chatml fixture pads with its EOS token");

    let prepared = prepare_dataset(
        &fixtures().join("data/qa_chat.jsonl"),
        &tok,
        &TokenizeOptions::default(),
    )
    .expect("prepare");
    assert_eq!(prepared.examples.len(), 20);
    assert_eq!(prepared.skipped_no_loss_tokens, 0);
    assert_eq!(prepared.truncated, 0);

    let owned = prepared.examples.to_vec();
    let batch_examples: Vec<&Example> = owned.iter().take(4).collect();
    let batch = collate(&batch_examples, pad, &Device::Cpu).expect("collate");
    let longest = batch_examples
        .iter()
        .map(|e| e.len())
        .max()
        .expect("non-empty");
    assert_eq!(batch.input_ids.dims(), &[4, longest]);

    let ids = batch.input_ids.to_vec2::<u32>().expect("ids");
    let loss = batch.loss_mask.to_vec2::<f32>().expect("loss mask");
    let attention = batch
        .attention_mask
        .to_vec2::<f32>()
        .expect("attention mask");
    for (row, example) in batch_examples.iter().enumerate() {
        let len = example.len();
        assert_eq!(&ids[row][..len], example.input_ids.as_slice());
        assert!(ids[row][len..].iter().all(|&id| id == pad));
        // Every real token (messages train on all tokens), including the real EOS tokens, is a target;
        // padding is not, although it carries the same id.
        assert!(loss[row][..len].iter().all(|&m| m == 1.0));
        assert!(loss[row][len..].iter().all(|&m| m == 0.0));
        assert!(attention[row][..len].iter().all(|&m| m == 1.0));
        assert!(attention[row][len..].iter().all(|&m| m == 0.0));
    }
    let real_tokens: usize = batch_examples.iter().map(|e| e.len()).sum();
    assert_eq!(batch.num_tokens, real_tokens);
    assert_eq!(batch.num_loss_tokens, real_tokens - batch_examples.len());
}

#[test]
fn prompt_completion_trains_on_the_completion_only() {
    let tok = chatml();
    let prepared = prepare_dataset(
        &fixtures().join("data/qa_prompt_completion.jsonl"),
        &tok,
        &TokenizeOptions::default(),
    )
    .expect("prepare");
    for example in prepared.examples.iter() {
        let first_target = example
            .loss_mask
            .iter()
            .position(|&m| m == 1)
            .expect("a target");
        assert!(first_target > 0, "the prompt is masked");
        assert!(example.loss_mask[first_target..].iter().all(|&m| m == 1));
        let completion = tok
            .decode(&example.input_ids[first_target..], false)
            .expect("decode");
        assert!(
            completion.ends_with("<|im_end|>"),
            "EOS is appended: {completion:?}"
        );
    }
}

#[test]
fn bad_rows_name_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("train.jsonl");
    std::fs::write(
        &path,
        "{\"text\": \"fine\"}\n\n{\"question\": \"q\", \"answer\": \"a\"}\n",
    )
    .expect("write");
    let err = prepare_dataset(&path, &chatml(), &TokenizeOptions::default()).expect_err("bad row");
    assert!(matches!(err, Error::BadRow { line: 3, .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("train.jsonl:3: no known dataset format"),
        "{err}"
    );

    std::fs::write(
        &path,
        "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n",
    )
    .expect("write");
    let err =
        prepare_dataset(&path, &chatml(), &TokenizeOptions::default()).expect_err("template error");
    let message = err.to_string();
    assert!(
        message.contains("train.jsonl:1:") && message.contains("Unknown role: tool"),
        "{message}"
    );
}

#[test]
fn missing_dataset_file_gives_a_hint() {
    let err = prepare_dataset(
        Path::new("no/such/train.jsonl"),
        &chatml(),
        &TokenizeOptions::default(),
    )
    .expect_err("missing");
    assert!(matches!(err, Error::MissingFile { .. }));
}
