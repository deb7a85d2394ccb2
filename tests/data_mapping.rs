//! Datasets outside TRL's formats: columns mapped with --prompt-field / --completion-template /
//! --system-prompt, a held-out split with --eval-split-ratio, and a chat template from a file.

mod common;

use common::*;

#[test]
fn medical_style_columns_train_with_a_held_out_split() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("medical.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "Question": format!("What helps with symptom {i}?"),
                "Complex_CoT": format!("Symptom {i} usually responds to rest."),
                "Response": format!("Rest, number {i}."),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let template = tmp.path().join("template.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        data.to_str().unwrap(),
        "--prompt-field",
        "Question",
        "--completion-template",
        "<think>{Complex_CoT}</think>{Response}",
        "--system-prompt",
        "You are a careful doctor.",
        "--chat-template",
        template.to_str().unwrap(),
        "--eval-split-ratio",
        "0.25",
        "--eval-steps",
        "2",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "3",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"eval_loss\""), "{log}");
    // The template trained with travels with the adapter.
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        std::fs::read_to_string(&template).unwrap()
    );

    // A column that is not there names the file, the line and the columns that are.
    let (ok, _, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        data.to_str().unwrap(),
        "--prompt-field",
        "Query",
        "--completion-field",
        "Response",
        "--output-dir",
        tmp.path().join("bad").to_str().unwrap(),
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(!ok);
    assert!(
        err.contains(
            "medical.jsonl:1: no column `Query`; the row has `Question`, `Complex_CoT`, `Response`"
        ),
        "{err}"
    );
}

#[test]
fn bad_rows_stop_the_run_or_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mixed.jsonl");
    let good = |i: usize| {
        serde_json::json!({"messages": [
            {"role": "user", "content": format!("q{i}")},
            {"role": "assistant", "content": format!("a{i}")}
        ]})
        .to_string()
    };
    let lines = [
        good(0),
        r#"{"messages": [{"role": "user", "content": ["part"]}]}"#.to_string(),
        good(1),
        r#"{"prompt": "no completion"}"#.to_string(),
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}"#
            .to_string(),
        r#"{"messages": [{"role": "wizard", "content": "q"}]}"#.to_string(),
        good(2),
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = |extra: &[&str]| {
        let out = tmp.path().join(format!("out{}", extra.len()));
        let mut args = vec![
            "train",
            "--model",
            "tests/fixtures/models/qwen2",
            "--dataset",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "1",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    let (ok, _, err) = run(&[]);
    assert!(!ok);
    assert!(
        err.contains("mixed.jsonl:2:") && err.contains("only string content is supported"),
        "{err}"
    );
    let (ok, _, err) = run(&["--on-bad-row", "skip"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("skipped 4 unusable rows")
            && err.contains("first at ")
            && err.contains("mixed.jsonl:2: "),
        "{err}"
    );
}

#[test]
fn data_inspect_marks_loss_tokens_and_prints_json_masks() {
    let (ok, out, err) = run_cli(&[
        "data",
        "inspect",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_prompt_completion.jsonl",
        "--n",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("20 examples"), "{out}");
    assert!(out.contains("Answer:[[ Paris.<|im_end|>]]"), "{out}");
    assert!(out.contains("length histogram"), "{out}");
    let (ok, out, err) = run_cli(&[
        "data",
        "inspect",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_prompt_completion.jsonl",
        "--json",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    let ids = lines[0]["input_ids"].as_array().unwrap().len();
    let mask = lines[0]["loss_mask"].as_array().unwrap();
    assert_eq!(ids, mask.len());
    assert_eq!(mask.iter().filter(|b| b.as_u64() == Some(1)).count(), 5);
}

/// `data inspect --config recipe.toml` shows the recipe's method and tokenizes as the recipe says
/// (here `completion_only_loss = false`: every token carries loss), a flag given on the command line
/// winning over the recipe (`--max-length`).
#[test]
fn data_inspect_with_a_recipe_shows_its_method_and_uses_its_data_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        "mode = \"qlora\"\nuse_dora = true\ninit_lora_weights = \"loftq\"\nloftq_iter = 2\nlora_r = 8\nlora_alpha = 8.0\ncompletion_only_loss = false\nmax_length = 4096\n",
    )
    .unwrap();
    let inspect = |extra: &[&str]| {
        let mut args = vec![
            "data",
            "inspect",
            "--model",
            "tests/fixtures/models/qwen2",
            "--dataset",
            "tests/fixtures/data/qa_prompt_completion.jsonl",
            "--config",
            recipe.to_str().unwrap(),
            "--n",
            "1",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = run_cli(&args);
        assert!(ok, "{err}");
        out
    };
    let out = inspect(&[]);
    assert!(
        out.contains("QLoRA (nf4, double quantization) r=8 alpha=8 all-linear dropout 0.05, DoRA, init loftq (2 iterations)"),
        "{out}"
    );
    assert!(out.contains("20 examples; 0 truncated"), "{out}");
    // completion_only_loss = false: the prompt carries loss too.
    assert!(out.contains("[[Question:"), "{out}");
    let out = inspect(&["--max-length", "6"]);
    assert!(out.contains("20 examples; 20 truncated"), "{out}");
}

#[test]
fn sanity_check_reports_the_loss_an_example_and_a_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        tmp.path().to_str().unwrap(),
        "--learning-rate",
        "5e-3",
        "--per-device-train-batch-size",
        "4",
        "--device",
        "cpu",
        "--sanity-check",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("the loss fell from") && out.contains("over 15 steps"),
        "{out}"
    );
    assert!(
        out.contains("[[") && out.contains("What is the capital of France?"),
        "{out}"
    );
    assert!(out.contains("generation after 15 steps"), "{out}");
    assert!(tmp
        .path()
        .join("sanity-check/adapter_model.safetensors")
        .exists());
}

#[test]
fn sanity_check_of_a_long_runs_recipe_shortens_its_warm_up_and_still_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = run_cli(&[
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        tmp.path().to_str().unwrap(),
        "--learning-rate",
        "5e-3",
        "--per-device-train-batch-size",
        "4",
        "--warmup-steps",
        "100",
        "--device",
        "cpu",
        "--sanity-check",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("the loss fell from"), "{out}");
}
