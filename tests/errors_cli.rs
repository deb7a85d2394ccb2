//! Bad input gets one clear error naming the file, line or tensor, a non-zero exit, and leaves
//! what was already in the output folder untouched.

mod common;
use common::*;
use std::path::Path;

fn train_err(model: &str, dataset: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "train",
        "--lora",
        "--model",
        model,
        "--dataset",
        dataset.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = run_cli(&args);
    assert!(!ok, "expected failure");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

fn model() -> String {
    fixture("models/qwen2").to_string_lossy().into_owned()
}

#[test]
fn malformed_jsonl_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    let err = train_err(&model(), &data, &tmp.path().join("out"), &[]);
    assert!(err.contains("bad.jsonl:2"), "{err}");
}

#[test]
fn a_row_of_no_known_format_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"fine\"}\n{\"question\": \"q\", \"answer\": \"a\"}\n",
    )
    .unwrap();
    let err = train_err(&model(), &data, &tmp.path().join("out"), &[]);
    assert!(
        err.contains("rows.jsonl:2") && err.contains("question"),
        "{err}"
    );
}

#[test]
fn missing_model_folder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = train_err(
        "./no-such-model",
        &fixture("data/qa_chat.jsonl"),
        &tmp.path().join("out"),
        &[],
    );
    assert!(err.contains("no-such-model"), "{err}");
}

#[test]
fn unknown_target_module_lists_the_linear_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let err = train_err(
        &model(),
        &fixture("data/qa_chat.jsonl"),
        &tmp.path().join("out"),
        &["--lora-target-modules", "query_key_value"],
    );
    assert!(
        err.contains("query_key_value") && err.contains("q_proj") && err.contains("down_proj"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_names_it_and_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gpt2");
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("models/qwen2/config.json")).unwrap(),
    )
    .unwrap();
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    config["model_type"] = "gpt2".into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = train_err(
        dir.to_str().unwrap(),
        &fixture("data/qa_chat.jsonl"),
        &tmp.path().join("out"),
        &[],
    );
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
        "{err}"
    );
}

#[test]
fn adapter_of_the_wrong_shape_names_the_tensor_and_leaves_the_output_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // An adapter trained for qwen3 does not fit qwen2.
    let adapter = tmp.path().join("adapter");
    let mut m = load_model(&fixture("models/qwen3"), false);
    let config = peft_sft::lora::LoraConfig {
        r: 2,
        target_modules: peft_sft::lora::TargetModules::List(vec!["q_proj".into()]),
        ..Default::default()
    };
    peft_sft::lora::inject(&mut m, &config, 0).unwrap();
    peft_sft::lora::save_adapter(&m, &config, &adapter).unwrap();
    let out = tmp.path().join("merged");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"precious").unwrap();
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        &model(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("q_proj.lora_B.weight") && err.contains("does not fit"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"precious"
    );
}

#[test]
fn an_uncached_hub_id_offline_says_so_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "generate",
            "--model",
            "nobody-here/no-such-model",
            "--prompt",
            "hi",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path())
        .env("HF_HUB_CACHE", tmp.path().join("hub"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("nobody-here/no-such-model"),
        "{err}"
    );
}

#[test]
fn rows_with_no_loss_token_after_truncation_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("long_prompts.jsonl");
    let long = "word ".repeat(200);
    let rows = format!(
        "{{\"prompt\": \"{long}\", \"completion\": \" yes\"}}\n{{\"prompt\": \"Short?\", \"completion\": \" Fine.\"}}\n"
    );
    std::fs::write(&data, rows).unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = run_cli(&[
        "train",
        "--lora",
        "--model",
        &model(),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--max-length",
        "32",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("skipped 1 training rows"), "{err}");
}

#[test]
fn options_that_cannot_apply_refuse_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let err = train_err(
        &model(),
        &fixture("data/qa_prompt_completion.jsonl"),
        &tmp.path().join("out"),
        &["--assistant-only-loss"],
    );
    assert!(
        err.contains("qa_prompt_completion.jsonl:1") && err.contains("needs conversational data"),
        "{err}"
    );
    let out = tmp.path().join("q");
    let (ok, _, err) = run_cli(&[
        "train",
        "--qlora",
        "--bnb-4bit-quant-type",
        "int3",
        "--model",
        &model(),
        "--dataset",
        fixture("data/qa_chat.jsonl").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--bnb-4bit-quant-type `int3`: expected nf4 or fp4"),
        "{err}"
    );
    assert!(!out.exists(), "a bad configuration writes nothing");
}

#[test]
fn out_of_range_numbers_are_refused_naming_the_flag_and_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("data/qa_chat.jsonl");
    for (flags, want) in [
        (
            &["--learning-rate", "-1"][..],
            "--learning-rate -1: must be a positive number",
        ),
        (
            &["--learning-rate=-1"],
            "--learning-rate -1: must be a positive number",
        ),
        (
            &["--per-device-train-batch-size", "-1"],
            "--per-device-train-batch-size -1:",
        ),
        (
            &["--per-device-train-batch-size", "0"],
            "must be at least 1",
        ),
        (
            &["--max-length", "1"],
            "--max-length 1: must be at least 2 tokens",
        ),
        (
            &["--warmup-ratio", "2"],
            "--warmup-ratio 2: must be a fraction",
        ),
        (
            &["--lora-alpha", "0"],
            "--lora-alpha 0: must be a positive number",
        ),
        (
            &["--lora-dropout", "1"],
            "--lora-dropout 1: must be in [0, 1)",
        ),
        (
            &["--warmup-steps", "5"],
            "--warmup-steps 5: longer than the run (--max-steps 1)",
        ),
    ] {
        let out = tmp.path().join("out");
        let err = train_err(&model(), &data, &out, flags);
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(
            !out.exists(),
            "{flags:?}: a refused configuration writes nothing"
        );
    }
}

#[test]
fn a_second_run_on_a_folder_in_use_is_refused_and_a_killed_run_leaves_it_free() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap().to_string();
    // A long run, killed once it holds the folder.
    let mut first = std::process::Command::new(bin())
        .args(train_args(
            "cpu",
            &out_s,
            "100000",
            &["--save-steps", "100000"],
        ))
        .current_dir(repo())
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(peft_sft::io::LOCK_FILE);
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.contains("pid")) {
        assert!(
            started.elapsed().as_secs() < 120,
            "the first run never took the folder"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (ok, _, err) = run_cli(&train_args("cpu", &out_s, "1", &[]));
    assert!(!ok, "a second run on a folder in use must stop");
    assert!(
        err.contains("in use by another peft-sft process") && err.contains("peft-sft train, pid"),
        "{err}"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // The lock died with the killed process: the folder is free again.
    let (ok, _, err) = run_cli(&train_args("cpu", &out_s, "1", &[]));
    assert!(ok, "{err}");
}

/// A copy (files only) of the fixture folder `rel` at `dir/name`.
fn fixture_copy(rel: &str, dir: &Path, name: &str) -> std::path::PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(fixture(rel)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    copy
}

/// Multiplies the tensor `name` of the safetensors file `path` by `factor` (NaN, inf) in place.
fn scale_tensor(path: &Path, name: &str, factor: f64) {
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        peft_sft::io::read_safetensors(path, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let t = &mut tensors.iter_mut().find(|(n, _)| n == name).unwrap().1;
    *t = (t.clone() * factor).unwrap();
    peft_sft::io::write_safetensors(path, &tensors).unwrap();
}

/// A copy of the qwen2 fixture model with a NaN in one frozen weight: every step's loss is NaN.
fn poisoned_model(dir: &Path) -> std::path::PathBuf {
    let model = fixture_copy("models/qwen2", dir, "model");
    let weights = model.join("model.safetensors");
    scale_tensor(&weights, "model.layers.0.mlp.down_proj.weight", f64::NAN);
    model
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = poisoned_model(tmp.path());
    let out = tmp.path().join("out");
    let err = train_err(
        model.to_str().unwrap(),
        &fixture("data/qa_chat.jsonl"),
        &out,
        &[],
    );
    assert!(
        err.contains("step 1: the loss (NaN) is not finite")
            && err.contains("no checkpoint was saved before it"),
        "{err}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn an_adapter_with_non_finite_values_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixture_copy("peft/qwen2/adapter", tmp.path(), "adapter");
    let weights = adapter.join("adapter_model.safetensors");
    let mut names: Vec<String> = tensors(&weights).into_keys().collect();
    names.sort();
    let poisoned = names[0].clone();
    scale_tensor(&weights, &poisoned, f64::INFINITY);
    let out = tmp.path().join("merged");
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        &model(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(&poisoned) && err.contains("NaN or infinite values"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn skip_nonfinite_steps_skips_that_many_then_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let model = poisoned_model(tmp.path());
    let data = fixture("data/qa_chat.jsonl");
    let run = |out: &Path, skip: &str| {
        run_cli(&[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "2",
            "--logging-steps",
            "1",
            "--device",
            "cpu",
            "--skip-nonfinite-steps",
            skip,
        ])
    };
    let out = tmp.path().join("skip2");
    let (ok, _, err) = run(&out, "2");
    assert!(ok, "{err}");
    assert!(
        err.contains("skipped 2 steps whose values were not finite (--skip-nonfinite-steps 2); first at step 1: the loss (NaN)"),
        "{err}"
    );
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.matches("skipped_nonfinite").count(), 2, "{log}");
    // Nothing was applied: the saved adapter is PEFT's initialisation, finite.
    let adapter = tensors(&out.join("adapter_model.safetensors"));
    assert!(adapter.values().all(|t| t
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .is_finite()));
    let (ok, _, err) = run(&tmp.path().join("skip1"), "1");
    assert!(!ok);
    assert!(
        err.contains("step 2: the loss (NaN) is not finite"),
        "{err}"
    );
    // The budget holds across a resume: step 1 was skipped before the checkpoint, so the resumed
    // run stops at step 2 instead of skipping it too.
    let out = tmp.path().join("resumed");
    let resume_args = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "1",
            "--save-steps",
            "1",
            "--device",
            "cpu",
            "--skip-nonfinite-steps",
            "1",
        ];
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    let (ok, _, err) = resume_args(&[]);
    assert!(ok && out.join("checkpoint-1").exists(), "{err}");
    let (ok, _, err) = resume_args(&["--max-steps", "2", "--resume-from-checkpoint", "latest"]);
    assert!(!ok, "the resumed run skipped a second step");
    assert!(
        err.contains("step 2: the loss (NaN) is not finite"),
        "{err}"
    );
}

#[test]
fn bad_files_and_folders_get_one_clear_line_each() {
    let tmp = tempfile::tempdir().unwrap();
    let copy_model = |name: &str| fixture_copy("models/qwen2", tmp.path(), name);
    let data = fixture("data/qa_chat.jsonl");
    // A truncated tokenizer.json.
    let m = copy_model("truncated");
    let text = std::fs::read(m.join("tokenizer.json")).unwrap();
    std::fs::write(m.join("tokenizer.json"), &text[..500]).unwrap();
    let err = train_err(m.to_str().unwrap(), &data, &tmp.path().join("o1"), &[]);
    assert!(
        err.contains("tokenizer.json:26: cannot load the tokenizer: not valid JSON"),
        "{err}"
    );
    // Only PyTorch .bin weights: never unpickled, the conversion named.
    let m = copy_model("bin");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("pytorch_model.bin"), b"pickle").unwrap();
    let err = train_err(m.to_str().unwrap(), &data, &tmp.path().join("o2"), &[]);
    assert!(err.contains("safe_serialization=True"), "{err}");
    // A safetensors header whose offsets run past the data.
    let m = copy_model("lying");
    let path = m.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    let end = header[&name]["data_offsets"][1].as_u64().unwrap();
    header[&name]["data_offsets"][1] = (end + 1_000_000_000).into();
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let err = train_err(m.to_str().unwrap(), &data, &tmp.path().join("o3"), &[]);
    assert!(
        err.contains("model.safetensors") && err.contains(&name),
        "{err}"
    );
    // A chat template that raises: the row and the template's message.
    let m = copy_model("raises");
    std::fs::write(
        m.join("chat_template.jinja"),
        "{{ raise_exception('no system messages') }}",
    )
    .unwrap();
    let err = train_err(m.to_str().unwrap(), &data, &tmp.path().join("o4"), &[]);
    assert!(
        err.contains("qa_chat.jsonl:1: chat template: no system messages"),
        "{err}"
    );
    // Data that is not UTF-8: file and line.
    let bad = tmp.path().join("latin1.jsonl");
    std::fs::write(&bad, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n").unwrap();
    let err = train_err(&model(), &bad, &tmp.path().join("o5"), &[]);
    assert!(err.contains("latin1.jsonl:2: not valid UTF-8"), "{err}");
    // An empty dataset.
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, b"").unwrap();
    let err = train_err(&model(), &empty, &tmp.path().join("o6"), &[]);
    assert!(err.contains("the dataset has no rows"), "{err}");
    // An output "folder" that is a file: named, and the file left as it was.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"precious").unwrap();
    let err = train_err(&model(), &data, &file, &[]);
    assert!(err.contains("exists and is not a folder"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn a_merge_into_a_folder_in_use_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    // This process holds the folder, as a running train or merge would.
    let _held = peft_sft::io::lock_dir(&out, "a test").unwrap();
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        &model(),
        "--adapter",
        fixture("peft/qwen2/adapter").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("in use by another peft-sft process (a test, pid"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());
}
