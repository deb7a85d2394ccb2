//! Packing and assistant-only loss against TRL 1.16 (fixtures by
//! `scripts/make_trl_packing_fixtures.py`): the best-fit-decreasing rows (ids, document lengths,
//! which source rows went where), the padding-free collated batch (ids, labels, position ids), and
//! `assistant_masks` from a chat template with `{% generation %}` blocks.

use std::path::{Path, PathBuf};

use candle_core::Device;
use peft_sft::data::{collate, pack_bfd, prepare_dataset, ChatTokenizer, Example, TokenizeOptions};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(name: &str) -> Value {
    let path = fixtures().join("trl_packing").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn chatml() -> ChatTokenizer {
    ChatTokenizer::from_dir(&fixtures().join("tokenizers/chatml")).expect("tokenizer")
}

#[test]
fn best_fit_decreasing_rows_equal_trl() {
    let mut checked = 0;
    for dataset in ["qa_chat", "messages"] {
        for max_length in [32, 64, 128] {
            let expected = read(&format!("expected_{dataset}_bfd_{max_length}.json"));
            let path =
                Path::new(env!("CARGO_MANIFEST_DIR")).join(expected["dataset"].as_str().unwrap());
            let opts = TokenizeOptions {
                max_length: None,
                ..TokenizeOptions::default()
            };
            let prepared = prepare_dataset(&path, &chatml(), &opts).expect("prepare");
            // The store view packs as the in-memory packer does (both are checked against TRL).
            let rows = prepared.examples.pack(max_length).to_vec();
            assert_eq!(rows, pack_bfd(&prepared.examples.to_vec(), max_length));
            let packed = expected["packed"].as_array().unwrap();
            assert_eq!(
                rows.len(),
                packed.len(),
                "{dataset} {max_length}: row count"
            );
            for (ours, theirs) in rows.iter().zip(packed) {
                assert_eq!(
                    ours.input_ids,
                    u32s(&theirs["input_ids"]),
                    "{dataset} {max_length}"
                );
                let lengths: Vec<usize> = u32s(&theirs["seq_lengths"])
                    .into_iter()
                    .map(|x| x as usize)
                    .collect();
                assert_eq!(ours.seq_lengths, lengths, "{dataset} {max_length}");
                let labels = i64s(&theirs["labels"]);
                let mask: Vec<u8> = labels.iter().map(|&l| u8::from(l != -100)).collect();
                assert_eq!(ours.loss_mask, mask, "{dataset} {max_length}");
            }
            // The trainer's padding-free batch of the first rows.
            let take = expected["collated_rows"].as_array().unwrap().len();
            let refs: Vec<&Example> = rows.iter().take(take).collect();
            let batch = collate(&refs, 0, &Device::Cpu).expect("collate");
            let collated = &expected["collated"];
            assert_eq!(
                batch.input_ids.to_vec2::<u32>().unwrap()[0],
                u32s(&collated["input_ids"][0]),
                "{dataset} {max_length}: collated ids"
            );
            assert_eq!(batch.positions[0], u32s(&collated["position_ids"][0]));
            let mask: Vec<f32> = i64s(&collated["labels"][0])
                .iter()
                .map(|&l| if l == -100 { 0.0 } else { 1.0 })
                .collect();
            assert_eq!(batch.loss_mask.to_vec2::<f32>().unwrap()[0], mask);
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

/// Our assistant-only masks with `template` equal TRL's `assistant_masks` for the generation
/// template (ids too, every kept row compared).
fn assert_trl_assistant_masks(template: String) {
    let expected = read("expected_messages_chatml_generation_assistant_only.json");
    let tok = chatml().with_chat_template(template);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(expected["dataset"].as_str().unwrap());
    let opts = TokenizeOptions {
        assistant_only_loss: true,
        ..TokenizeOptions::default()
    };
    let prepared = prepare_dataset(&path, &tok, &opts).expect("prepare");
    let rows: Vec<&Value> = expected["examples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["dropped"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(prepared.examples.len(), rows.len());
    for (ours, theirs) in prepared.examples.iter().zip(rows) {
        assert_eq!(ours.input_ids, u32s(&theirs["input_ids"]));
        let mask: Vec<u8> = u32s(&theirs["assistant_masks"])
            .into_iter()
            .map(|x| x as u8)
            .collect();
        assert!(mask.contains(&1) && mask.contains(&0));
        assert_eq!(ours.loss_mask, mask, "row {}", theirs["row"]);
    }
}

fn generation_template() -> String {
    std::fs::read_to_string(fixtures().join("trl_packing/chatml_generation.jinja"))
        .expect("template")
}

#[test]
fn assistant_masks_equal_trl_for_generation_blocks() {
    assert_trl_assistant_masks(generation_template());
}

#[test]
fn templates_without_generation_blocks_mask_each_assistant_turn() {
    // The fixture template without its generation tags renders the same text; the fallback
    // (rendering prefixes) must find the same assistant spans, up to the end-of-turn newline.
    assert_trl_assistant_masks(
        generation_template()
            .replace("{% generation %}", "")
            .replace("{% endgeneration %}", ""),
    );
}
