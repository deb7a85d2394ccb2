//! Untrusted files: seeded random mutations of each fixture format peft-sft reads — a model's
//! safetensors weights and an adapter's, a GGUF file, tokenizer.json, adapter_config.json, JSON
//! Lines data — are read through the library as a run would read them. Every case must end in a
//! value or an error: no panic (each case runs under `catch_unwind`, the message collected), and
//! no allocation beyond what the file justifies (the test process would abort).

mod common;
use common::*;
use peft_sft::rng::Rng;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Cases per format.
const CASES: usize = 600;

/// `bytes` changed by one of: a few random bytes (mostly in the first 2 KiB, where headers
/// are), a cut, a repeated slice, or a run of 0xFF.
fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let len = out.len().max(1);
    let pos = |rng: &mut Rng| {
        let head = len.min(2048);
        if rng.next_f64() < 0.8 {
            (rng.next_u64() as usize) % head
        } else {
            (rng.next_u64() as usize) % len
        }
    };
    match rng.next_u64() % 4 {
        0 => {
            for _ in 0..1 + rng.next_u64() % 8 {
                let at = pos(rng);
                if at < out.len() {
                    out[at] = rng.next_u64() as u8;
                }
            }
        }
        1 => out.truncate(pos(rng)),
        2 => {
            let (a, b) = (pos(rng), pos(rng));
            let (a, b) = (a.min(b), a.max(b).min(out.len()));
            let slice = out[a..b].to_vec();
            let at = pos(rng).min(out.len());
            out.splice(at..at, slice);
        }
        _ => {
            let at = pos(rng).min(out.len());
            let end = (at + 1 + (rng.next_u64() as usize) % 16).min(out.len());
            out[at..end].fill(0xFF);
        }
    }
    out
}

/// Runs `read` on `CASES` mutations of `original` written to `path`; returns the panics.
fn fuzz(name: &str, original: &[u8], path: &Path, seed: u64, read: impl Fn(&Path)) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut panics = Vec::new();
    for case in 0..CASES {
        std::fs::write(path, mutate(original, &mut rng)).unwrap();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(path))).is_err() {
            panics.push(format!("{name} case {case}"));
            std::fs::copy(path, path.with_extension(format!("panic{case}"))).ok();
        }
    }
    panics
}

#[test]
fn mutated_files_never_panic() {
    // Collect panic messages instead of printing them.
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = messages.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        sink.lock().unwrap().push(info.to_string());
    }));
    let tmp = tempfile::tempdir().unwrap();
    let dev = candle_core::Device::Cpu;
    let mut panics = Vec::new();

    // Model weights, read as a model load reads them.
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let weights = std::fs::read(fixture("models/qwen2/model.safetensors")).unwrap();
    panics.extend(fuzz(
        "model.safetensors",
        &weights,
        &model.join("model.safetensors"),
        1,
        |_| {
            if let Ok(w) = peft_sft::model::weights::Weights::from_dir(&model) {
                let names: Vec<String> = w.names().cloned().collect();
                for n in names {
                    let _ = w.get_raw(&n, &dev);
                }
            }
        },
    ));
    // An adapter's weights, read by candle's loader after our header check.
    let adapter = std::fs::read(fixture("peft/qwen2/adapter/adapter_model.safetensors")).unwrap();
    panics.extend(fuzz(
        "adapter_model.safetensors",
        &adapter,
        &tmp.path().join("a.safetensors"),
        2,
        |p| {
            let _ = peft_sft::io::read_safetensors(p, &dev);
        },
    ));
    // A GGUF file: header, names and every tensor.
    let gguf = std::fs::read(fixture("qlora/gguf/model-q4_0.gguf")).unwrap();
    panics.extend(fuzz(
        "model.gguf",
        &gguf,
        &tmp.path().join("m.gguf"),
        3,
        |p| {
            if let Ok(g) = peft_sft::quant::gguf::GgufFile::open(p) {
                let names: Vec<String> = g.names().iter().cloned().collect();
                for n in names {
                    let _ = g.tensor(&n, &dev);
                }
            }
        },
    ));
    // tokenizer.json (with the rest of the folder intact).
    let tok_dir = tmp.path().join("tok");
    std::fs::create_dir(&tok_dir).unwrap();
    for f in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(fixture("models/qwen2").join(f), tok_dir.join(f)).unwrap();
    }
    let tokenizer = std::fs::read(fixture("models/qwen2/tokenizer.json")).unwrap();
    panics.extend(fuzz(
        "tokenizer.json",
        &tokenizer,
        &tok_dir.join("tokenizer.json"),
        4,
        |_| {
            if let Ok(t) = peft_sft::data::ChatTokenizer::from_dir(&tok_dir) {
                let _ = t.encode("Hello, world! 1234 ünïcödé", true);
            }
        },
    ));
    // adapter_config.json.
    let cfg_dir = tmp.path().join("cfg");
    std::fs::create_dir(&cfg_dir).unwrap();
    let config = std::fs::read(fixture("peft/qwen2/adapter/adapter_config.json")).unwrap();
    panics.extend(fuzz(
        "adapter_config.json",
        &config,
        &cfg_dir.join("adapter_config.json"),
        5,
        |_| {
            let _ = peft_sft::lora::LoraConfig::from_dir(&cfg_dir);
        },
    ));
    // JSON Lines data, through row parsing.
    let data = std::fs::read(fixture("data/qa_chat.jsonl")).unwrap();
    panics.extend(fuzz(
        "data.jsonl",
        &data,
        &tmp.path().join("d.jsonl"),
        6,
        |p| {
            if let Ok(rows) = peft_sft::data::load_rows(p) {
                for row in &rows {
                    let _ = peft_sft::data::parse_sample(row, p);
                }
            }
        },
    ));

    std::panic::set_hook(previous);
    let messages = messages.lock().unwrap();
    assert!(
        panics.is_empty(),
        "{} panics (files kept as *.panicN):\n{}\n{}",
        panics.len(),
        panics.join("\n"),
        messages
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
