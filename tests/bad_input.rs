//! The bad-input corpus: every case exits non-zero with one line (`error: ...`) that names the
//! flag, file, line or tensor and what to do, with no panic or backtrace, and leaves what was
//! already in the output folder as it was. Hyperparameter ranges, lying or broken model files,
//! hostile chat templates, data that cannot be read, adapters that do not fit.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// One case: a name, the CLI arguments (built in a scratch folder) and what the message must say.
struct Case {
    name: &'static str,
    args: Vec<String>,
    says: &'static str,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `train --lora` on the qwen2 fixture (or `model`) with the QA data (or `data`) into `out`.
fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = s(&["train", "--lora", "--max-steps", "2", "--device", "cpu"]);
    args.extend(
        [
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|x| x.to_string()),
    );
    args.extend(extra.iter().map(|x| x.to_string()));
    args
}

/// A copy (files only) of the fixture folder `rel` at `dir/name`.
fn fixture_copy(rel: &str, dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(fixture(rel)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
        }
    }
    copy
}

/// Rewrites the JSON header of the safetensors file `path` with `edit`, keeping the data (or
/// replacing the file's bytes entirely with `edit`'s return when it gives some).
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value) -> Option<Vec<u8>>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    if let Some(raw) = edit(&mut header) {
        std::fs::write(path, raw).unwrap();
        return;
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// The first tensor name of a safetensors header.
fn first_tensor(header: &serde_json::Value) -> String {
    header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone()
}

/// A model copy whose safetensors header `edit` changes.
fn lying_model(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value) -> Option<Vec<u8>>,
) -> PathBuf {
    let m = fixture_copy("models/qwen2", dir, name);
    edit_header(&m.join("model.safetensors"), edit);
    m
}

/// A model copy with `template` as its chat template.
fn templated_model(dir: &Path, name: &str, template: &str) -> PathBuf {
    let m = fixture_copy("models/qwen2", dir, name);
    std::fs::write(m.join("chat_template.jinja"), template).unwrap();
    m
}

/// A copy of the qwen2 PEFT adapter whose adapter_config.json `edit` changes.
fn edited_adapter(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let a = fixture_copy("peft/qwen2/adapter", dir, name);
    let path = a.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    a
}

fn merge(adapter: &Path, out: &Path) -> Vec<String> {
    s(&[
        "merge",
        "--model",
        fixture("models/qwen2").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ])
}

fn cases(dir: &Path, out: &Path) -> Vec<Case> {
    let model = fixture("models/qwen2");
    let data = fixture("data/qa_chat.jsonl");
    let t = |extra: &[&str]| train(&model, &data, out, extra);
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // A multimodal config peft-sft has no text model for (no top-level hidden_size): named as
    // such, not as a missing field.
    let multimodal = dir.join("llava");
    std::fs::create_dir_all(&multimodal).unwrap();
    std::fs::write(
        multimodal.join("config.json"),
        r#"{"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "text_config": {"hidden_size": 64}, "vision_config": {}}"#,
    )
    .unwrap();
    // EmbeddingGemma: a Gemma 3 whose attention looks both ways.
    let bidirectional = fixture_copy("models/gemma3", dir, "bidirectional");
    let config_path = bidirectional.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["use_bidirectional_attention"] = true.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut cases = vec![
        Case {
            name: "all-linear on a mixture of experts",
            args: train(&fixture("models/qwen3_moe"), &data, out, &[]),
            says: "--lora-target-modules q_proj,k_proj,v_proj,o_proj",
        },
        Case {
            name: "router loss weight on a dense model",
            args: t(&["--router-aux-loss-coef", "0.01"]),
            says: "--router-aux-loss-coef 0.01: Qwen2ForCausalLM is not a mixture of experts",
        },
        Case {
            name: "negative router loss weight",
            args: t(&["--router-aux-loss-coef", "-1"]),
            says: "--router-aux-loss-coef -1: must be a number >= 0",
        },
        Case {
            name: "bidirectional Gemma 3",
            args: train(&bidirectional, &data, out, &[]),
            says: "use_bidirectional_attention is true",
        },
        Case {
            name: "multimodal Llava",
            args: train(&multimodal, &data, out, &[]),
            says: "unsupported architecture `LlavaForConditionalGeneration`",
        },
        // Every hyperparameter's range, the negative numbers reaching the range check.
        Case {
            name: "negative learning rate",
            args: t(&["--learning-rate", "-1"]),
            says: "--learning-rate -1: must be a positive number",
        },
        Case {
            name: "zero learning rate",
            args: t(&["--learning-rate", "0"]),
            says: "--learning-rate 0: must be a positive number",
        },
        Case {
            name: "batch size 0",
            args: t(&["--per-device-train-batch-size", "0"]),
            says: "--per-device-train-batch-size 0",
        },
        Case {
            name: "max length 1",
            args: t(&["--max-length", "1"]),
            says: "--max-length 1",
        },
        Case {
            name: "warm-up longer than the run",
            args: t(&["--warmup-steps", "11"]),
            says: "--warmup-steps 11: longer than the run",
        },
        Case {
            name: "dropout 1",
            args: t(&["--lora-dropout", "1"]),
            says: "--lora-dropout 1",
        },
        Case {
            name: "alpha 0",
            args: t(&["--lora-alpha", "0"]),
            says: "--lora-alpha 0",
        },
        Case {
            name: "rank 0",
            args: t(&["--lora-r", "0"]),
            says: "--lora-r 0",
        },
        Case {
            name: "rank above the layer",
            args: t(&["--lora-r", "1000"]),
            says: "lora r 1000 is larger than model.layers.0.self_attn.q_proj",
        },
        Case {
            name: "eval steps 0",
            args: t(&["--eval-steps", "0"]),
            says: "--eval-steps",
        },
        Case {
            name: "accumulation 0",
            args: t(&["--gradient-accumulation-steps", "0"]),
            says: "--gradient-accumulation-steps 0",
        },
        Case {
            name: "negative epochs",
            args: t(&["--num-train-epochs", "-1"]),
            says: "--num-train-epochs -1",
        },
        Case {
            name: "negative weight decay",
            args: t(&["--weight-decay", "-0.1"]),
            says: "--weight-decay -0.1",
        },
        Case {
            name: "negative max grad norm",
            args: t(&["--max-grad-norm", "-1"]),
            says: "--max-grad-norm -1",
        },
        Case {
            name: "beta1 past 1",
            args: t(&["--adam-beta1", "1.5"]),
            says: "--adam-beta1 1.5",
        },
        Case {
            name: "keep no checkpoint",
            args: t(&["--save-total-limit", "0"]),
            says: "--save-total-limit 0",
        },
        Case {
            name: "negative NEFTune alpha",
            args: t(&["--neftune-noise-alpha", "-5"]),
            says: "--neftune-noise-alpha -5",
        },
        Case {
            name: "LoRA+ ratio 0",
            args: t(&["--loraplus-lr-ratio", "0"]),
            says: "--loraplus-lr-ratio 0",
        },
        Case {
            name: "unknown loss type",
            args: t(&["--loss-type", "kto"]),
            says: "--loss-type `kto`: expected nll",
        },
        Case {
            name: "unknown init",
            args: t(&["--init-lora-weights", "eva"]),
            says: "--init-lora-weights eva: expected true, gaussian",
        },
        Case {
            name: "LoftQ over a full-precision base",
            args: t(&["--init-lora-weights", "loftq"]),
            says: "--init-lora-weights loftq: LoftQ fits the adapter to the error of a quantized base: use it with --qlora",
        },
        Case {
            name: "module that cannot be saved",
            args: t(&["--modules-to-save", "norm"]),
            says: "modules_to_save `norm`",
        },
        Case {
            name: "layer past the model",
            args: t(&["--layers-to-transform", "5"]),
            says: "layers_to_transform 5",
        },
        Case {
            name: "negative layer index",
            args: t(&["--layers-to-transform", "-1"]),
            says: "--layers-to-transform -1: expected comma-separated non-negative integers",
        },
        Case {
            name: "DoRA with --full",
            args: train(&model, &data, out, &["--use-dora"])
                .into_iter()
                .map(|a| if a == "--lora" { "--full".into() } else { a })
                .collect(),
            says: "--use-dora true: DoRA rescales",
        },
        Case {
            name: "unknown 4-bit type",
            args: t(&["--qlora", "--bnb-4bit-quant-type", "int3"])
                .into_iter()
                .filter(|a| a != "--lora")
                .collect(),
            says: "--bnb-4bit-quant-type `int3`: expected nf4 or fp4",
        },
        Case {
            name: "unknown report target",
            args: t(&["--report-to", "wandb"]),
            says: "--report-to `wandb`",
        },
        Case {
            name: "unknown device",
            args: t(&["--device", "tpu"]),
            says: "--device `tpu`: expected cpu, cuda",
        },
        Case {
            name: "unknown target module",
            args: t(&["--lora-target-modules", "qkv"]),
            says: "target module `qkv` matches no linear layer",
        },
        Case {
            name: "resume from nothing",
            args: t(&[
                "--resume-from-checkpoint",
                dir.join("nowhere").to_str().unwrap(),
            ]),
            says: "not a peft-sft checkpoint folder",
        },
    ];

    // Model folders that lie or break.
    let m = fixture_copy("models/qwen2", dir, "truncated_tokenizer");
    let text = std::fs::read(m.join("tokenizer.json")).unwrap();
    std::fs::write(m.join("tokenizer.json"), &text[..500]).unwrap();
    cases.push(Case {
        name: "truncated tokenizer.json",
        args: train(&m, &data, out, &[]),
        says: "tokenizer.json:26: cannot load the tokenizer: not valid JSON",
    });
    let m = fixture_copy("models/qwen2", dir, "bin_only");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("pytorch_model.bin"), b"pickle").unwrap();
    cases.push(Case {
        name: "only pytorch_model.bin",
        args: train(&m, &data, out, &[]),
        says: "safe_serialization=True",
    });
    let m = lying_model(dir, "offsets_past_end", |h| {
        let name = first_tensor(h);
        let end = h[&name]["data_offsets"][1].as_u64().unwrap();
        h[&name]["data_offsets"][1] = (end + 1_000_000_000).into();
        None
    });
    cases.push(Case {
        name: "safetensors offsets past the end",
        args: train(&m, &data, out, &[]),
        says: "are not inside the file's",
    });
    let m = lying_model(dir, "huge_header", |_| {
        // A header length of 2^40 bytes, then nothing.
        let mut raw = (1u64 << 40).to_le_bytes().to_vec();
        raw.extend_from_slice(b"{}");
        Some(raw)
    });
    cases.push(Case {
        name: "safetensors header length of a terabyte",
        args: train(&m, &data, out, &[]),
        says: "model.safetensors: not a safetensors file: its header claims 1099511627776 bytes",
    });
    let m = lying_model(dir, "shape_mismatch", |h| {
        let name = first_tensor(h);
        h[&name]["shape"] = serde_json::json!([4096, 4096]);
        None
    });
    cases.push(Case {
        name: "safetensors shape that does not fit its bytes",
        args: train(&m, &data, out, &[]),
        says: "bytes for shape [4096, 4096]",
    });
    let m = lying_model(dir, "dtype_mismatch", |h| {
        let name = first_tensor(h);
        h[&name]["dtype"] = "F64".into();
        None
    });
    cases.push(Case {
        name: "safetensors dtype that does not fit its bytes",
        args: train(&m, &data, out, &[]),
        says: "bytes for shape",
    });
    let m = lying_model(dir, "duplicate_names", |h| {
        // Two entries of one name (a JSON object with a repeated key).
        let name = first_tensor(h);
        let entry = h[&name].to_string();
        let text = h.to_string();
        let dup = text.replacen('{', &format!("{{\"{name}\":{entry},"), 1);
        let mut bytes = dup.into_bytes();
        bytes.resize(bytes.len().div_ceil(8) * 8, b' ');
        let mut raw = (bytes.len() as u64).to_le_bytes().to_vec();
        raw.extend_from_slice(&bytes);
        let original = std::fs::read(fixture("models/qwen2/model.safetensors")).unwrap();
        let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
        raw.extend_from_slice(&original[8 + n..]);
        Some(raw)
    });
    cases.push(Case {
        name: "safetensors with a name twice",
        args: train(&m, &data, out, &[]),
        says: "is listed twice in the header",
    });
    let m = fixture_copy("models/qwen2", dir, "bad_config");
    std::fs::write(m.join("config.json"), b"{\"hidden_size\": ").unwrap();
    cases.push(Case {
        name: "truncated config.json",
        args: train(&m, &data, out, &[]),
        says: "config.json",
    });

    // Chat templates that raise, never end, or render megabytes.
    let m = templated_model(dir, "raises", "{{ raise_exception('no system messages') }}");
    cases.push(Case {
        name: "template that raises",
        args: train(&m, &data, out, &[]),
        says: "qa_chat.jsonl:1: chat template: no system messages",
    });
    let m = templated_model(dir, "loops", "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}{% endfor %}{% endfor %}{% endfor %}");
    cases.push(Case {
        name: "template that does not end",
        args: train(&m, &data, out, &[]),
        says: "ran more than 10000000 steps on one conversation",
    });
    let m = templated_model(dir, "megabytes", "{% for i in range(10000) %}{% for j in range(1000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}");
    cases.push(Case {
        name: "template that renders megabytes",
        args: train(&m, &data, out, &[]),
        says: "rendered more than 32 MiB for one conversation",
    });
    let m = templated_model(dir, "syntax", "{% for m in messages %}");
    cases.push(Case {
        name: "template that does not parse",
        args: train(&m, &data, out, &[]),
        says: "chat template",
    });

    // Data.
    let bad = file(
        "latin1.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n",
    );
    cases.push(Case {
        name: "data that is not UTF-8",
        args: train(&model, &bad, out, &[]),
        says: "latin1.jsonl:2: not valid UTF-8",
    });
    let empty = file("empty.jsonl", b"");
    cases.push(Case {
        name: "empty dataset",
        args: train(&model, &empty, out, &[]),
        says: "the dataset has no rows",
    });
    let huge = dir.join("one_line.jsonl");
    // A 1 GB line (sparse: no disk used), read no further than the line limit.
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    cases.push(Case {
        name: "a 1 GB line",
        args: train(&model, &huge, out, &[]),
        says: "one_line.jsonl:1: the line is longer than 64 MiB",
    });
    let array = file("array.jsonl", b"[1, 2]\n");
    cases.push(Case {
        name: "row that is not an object",
        args: train(&model, &array, out, &[]),
        says: "array.jsonl:1",
    });
    let broken = file("broken.jsonl", b"{\"text\": \"a\"}\n{\"text\": \n");
    cases.push(Case {
        name: "malformed JSON line",
        args: train(&model, &broken, out, &[]),
        says: "broken.jsonl:2",
    });
    let parts = file(
        "parts.jsonl",
        br#"{"messages": [{"role": "user", "content": [{"type": "image"}]}]}"#,
    );
    cases.push(Case {
        name: "content parts",
        args: train(&model, &parts, out, &[]),
        says: "only string content is supported",
    });
    let tools = file(
        "tools.jsonl",
        br#"{"messages": [{"role": "user", "content": "x"}], "tools": "{not json"}"#,
    );
    cases.push(Case {
        name: "tools that are not JSON",
        args: train(&model, &tools, out, &[]),
        says: "tools.jsonl:1: `tools` is a string that is not JSON",
    });
    cases.push(Case {
        name: "missing dataset",
        args: train(&model, &dir.join("nope.jsonl"), out, &[]),
        says: "nope.jsonl",
    });
    cases.push(Case {
        name: "missing model folder",
        args: train(&dir.join("no-model"), &data, out, &[]),
        says: "no-model",
    });
    let recipe = file("recipe.toml", b"learning_rate = 1e-4\nlora_rank = 8\n");
    cases.push(Case {
        name: "recipe with an unknown key",
        args: t(&["--config", recipe.to_str().unwrap()]),
        says: "lora_rank",
    });

    // Adapters.
    let a = edited_adapter(dir, "peft_type", |c| c["peft_type"] = "IA3".into());
    cases.push(Case {
        name: "adapter of another PEFT method",
        args: merge(&a, out),
        says: "peft_type `IA3`: only LORA adapters are supported",
    });
    let a = edited_adapter(dir, "newer_key", |c| {
        c["future_lora_option"] = serde_json::json!({"mode": "on"})
    });
    cases.push(Case {
        name: "adapter with a newer PEFT key",
        args: merge(&a, out),
        says: "`future_lora_option`",
    });
    let a = edited_adapter(dir, "lora_bias", |c| c["lora_bias"] = true.into());
    cases.push(Case {
        name: "adapter with lora_bias",
        args: merge(&a, out),
        says: "`lora_bias` = true is not supported",
    });
    let a = edited_adapter(dir, "raw_pissa", |c| {
        c["init_lora_weights"] = "pissa".into()
    });
    cases.push(Case {
        name: "unconverted PiSSA adapter",
        args: merge(&a, out),
        says: "path_initial_model_for_weight_conversion",
    });
    let a = edited_adapter(dir, "raw_loftq", |c| {
        c["init_lora_weights"] = "loftq".into()
    });
    cases.push(Case {
        name: "LoftQ adapter saved without PEFT's init_lora_weights=True",
        args: merge(&a, out),
        says: "load it over that base",
    });
    let gguf = fixture("qlora/gguf/model-q8_0.gguf");
    let mut args = s(&["train", "--qlora", "--max-steps", "2", "--device", "cpu"]);
    args.extend(s(&[
        "--model",
        gguf.to_str().unwrap(),
        "--tokenizer",
        fixture("models/llama").to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--init-lora-weights",
        "loftq",
    ]));
    cases.push(Case {
        name: "LoftQ over a GGUF base",
        args,
        says:
            "LoftQ starts from the full-precision weights, and a GGUF file's are quantized already",
    });
    let a = edited_adapter(dir, "rank", |c| c["r"] = 8.into());
    cases.push(Case {
        name: "adapter whose rank disagrees with its tensors",
        args: merge(&a, out),
        says: "lora_A.weight",
    });
    let a = fixture_copy("peft/qwen2/adapter", dir, "no_weights");
    std::fs::remove_file(a.join("adapter_model.safetensors")).unwrap();
    cases.push(Case {
        name: "adapter without weights",
        args: merge(&a, out),
        says: "adapter_model.safetensors",
    });
    cases
}

#[test]
fn every_bad_input_gets_one_clear_line_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // What the user already had in the output folder.
    std::fs::write(out.join("notes.txt"), b"keep me").unwrap();
    let cases = cases(tmp.path(), &out);
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let (ok, _, err) = run_cli(&args);
        let problem = if ok {
            Some("succeeded".to_string())
        } else if !err.starts_with("error: ") || err.trim().lines().count() != 1 {
            Some(format!("not one `error:` line: {err:?}"))
        } else if err.contains("panicked") || err.contains("backtrace") {
            Some(format!("panicked: {err}"))
        } else if !err.contains(case.says) {
            Some(format!("says {:?}, expected {:?}", err.trim(), case.says))
        } else {
            None
        };
        if let Some(problem) = problem {
            failures.push(format!("{}: {problem}", case.name));
        }
        // The folder's lock file (`io::lock_dir`, free once the process ends) may stay.
        let kept: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != ".peft-sft.lock")
            .collect();
        assert_eq!(
            (kept.clone(), std::fs::read(out.join("notes.txt")).unwrap()),
            (vec!["notes.txt".to_string()], b"keep me".to_vec()),
            "{}: the output folder changed: {kept:?}",
            case.name
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
