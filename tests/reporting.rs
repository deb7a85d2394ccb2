//! Tracking without Python: `peft-sft train` writes TensorBoard event files under `OUTPUT/runs/`
//! with transformers' tag names, `loss_curve.png`, and an end-of-run summary; `peft-sft plot`
//! redraws the PNG; `--report-to` and `--load-best-model-at-end` do what TRL's flags do.

mod common;

use common::{fixture, logged, run_cli};
use peft_sft::config::SftConfig;
use peft_sft::report::tensorboard::{event_files, read_events, scalars, EventKind, SESSION_START};
use std::collections::BTreeMap;
use std::path::Path;

/// `peft-sft train` on the qwen2 fixture with a held-out eval split, plus `extra` flags.
fn train(out: &Path, extra: &[&str]) -> String {
    let model = fixture("models/qwen2");
    let data = fixture("data/qa_chat.jsonl");
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--eval-split-ratio",
        "0.2",
        "--logging-steps",
        "1",
        "--per-device-train-batch-size",
        "4",
        "--lora-dropout",
        "0",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = run_cli(&args);
    assert!(ok, "train failed: {stderr}");
    stderr
}

/// Width and height of a PNG, after checking its signature and that IHDR comes first.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// Every scalar of the run's event files: tag -> [(step, value)].
fn tensorboard_scalars(out: &Path) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut by_tag: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for file in event_files(&out.join("runs")).unwrap() {
        for s in scalars(&read_events(&file).unwrap()) {
            by_tag.entry(s.tag).or_default().push((s.step, s.value));
        }
    }
    by_tag
}

#[test]
fn train_writes_tensorboard_events_and_a_loss_curve_that_plot_redraws() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let stderr = train(
        &out,
        &["--max-steps", "6", "--eval-steps", "2", "--save-steps", "2"],
    );

    let files = event_files(&out.join("runs")).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .contains("tfevents"));
    let by_tag = tensorboard_scalars(&out);
    let tags: Vec<&str> = by_tag.keys().map(String::as_str).collect();
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/entropy",
        "train/mean_token_accuracy",
        "train/num_tokens",
        "train/epoch",
        "eval/loss",
        "eval/mean_token_accuracy",
        "eval/entropy",
        "eval/num_tokens",
    ] {
        assert!(tags.contains(&tag), "{tag} missing from {tags:?}");
    }
    assert!(
        !tags.iter().any(|t| t.ends_with("/step")),
        "step is the x axis, not a scalar: {tags:?}"
    );
    // One point per logged step, with metrics.jsonl's values.
    let train_loss = &by_tag["train/loss"];
    assert_eq!(
        train_loss.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<i64>>()
    );
    let jsonl_loss = logged(&out, "loss");
    for (&(_, tb), jl) in train_loss.iter().zip(&jsonl_loss) {
        assert_eq!(tb, *jl as f32);
    }
    let eval_loss = &by_tag["eval/loss"];
    assert_eq!(
        eval_loss.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![2, 4, 6]
    );
    assert_eq!(eval_loss[0].1, logged(&out, "eval_loss")[0] as f32);
    // The last step's learning rate of a linear schedule is 0: it must still be a point.
    assert_eq!(by_tag["train/learning_rate"].last(), Some(&(6, 0.0)));

    let png = out.join("loss_curve.png");
    assert_eq!(png_size(&png), (1000, 560));
    assert!(stderr.contains("best checkpoint: "), "{stderr}");

    std::fs::remove_file(&png).unwrap();
    let (ok, stdout, stderr) = run_cli(&["plot", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("loss_curve.png"), "{stdout}");
    assert_eq!(png_size(&png), (1000, 560));
    let elsewhere = dir.path().join("curve.png");
    let (ok, _, stderr) = run_cli(&[
        "plot",
        out.to_str().unwrap(),
        "--output",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(png_size(&elsewhere), (1000, 560));

    let (ok, _, stderr) = run_cli(&["plot", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("metrics.jsonl") && stderr.contains("--output-dir"),
        "{stderr}"
    );
}

#[test]
fn a_resumed_run_marks_a_session_start_so_tensorboard_drops_orphaned_steps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train(
        &out,
        &["--max-steps", "4", "--eval-steps", "2", "--save-steps", "2"],
    );
    train(
        &out,
        &[
            "--max-steps",
            "4",
            "--eval-steps",
            "2",
            "--save-steps",
            "2",
            "--resume-from-checkpoint",
            out.join("checkpoint-2").to_str().unwrap(),
        ],
    );
    let files = event_files(&out.join("runs")).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let resumed = read_events(&files[1]).unwrap();
    let start = resumed
        .iter()
        .find_map(|e| match &e.what {
            Some(EventKind::SessionLog(log)) => Some((e.step, log.status)),
            _ => None,
        })
        .expect("a SessionLog event in the resumed run's file");
    assert_eq!(start, (3, SESSION_START));
    let resumed_steps: Vec<i64> = scalars(&resumed)
        .iter()
        .filter(|s| s.tag == "train/loss")
        .map(|s| s.step)
        .collect();
    assert_eq!(resumed_steps, vec![3, 4]);
}

#[test]
fn report_to_selects_the_trackers() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl_only = dir.path().join("jsonl");
    train(&jsonl_only, &["--max-steps", "2", "--report-to", "jsonl"]);
    assert!(jsonl_only.join("metrics.jsonl").exists());
    assert!(jsonl_only.join("loss_curve.png").exists());
    assert!(!jsonl_only.join("runs").exists());

    let none = dir.path().join("none");
    train(&none, &["--max-steps", "2", "--report-to", "none"]);
    assert!(none.join("adapter_model.safetensors").exists());
    for absent in ["metrics.jsonl", "loss_curve.png", "runs"] {
        assert!(!none.join(absent).exists(), "{absent} written with none");
    }

    let model = fixture("models/qwen2");
    let (ok, _, stderr) = run_cli(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        "x.jsonl",
        "--output-dir",
        dir.path().join("bad").to_str().unwrap(),
        "--report-to",
        "tensorboard,wandb",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--report-to `wandb`") && stderr.contains("tensorboard"),
        "{stderr}"
    );
}

#[test]
fn config_validation_explains_report_to_and_load_best() {
    let base = SftConfig {
        model_name_or_path: "m".into(),
        dataset_name: "d.jsonl".into(),
        output_dir: "o".into(),
        ..SftConfig::default()
    };
    assert!(base.validate().is_ok());
    assert!(base.reports_to("jsonl") && base.reports_to("tensorboard"));
    let all = SftConfig {
        report_to: vec!["all".into()],
        ..base.clone()
    };
    assert!(all.reports_to("tensorboard") && all.reports_to("jsonl"));
    let none = SftConfig {
        report_to: vec!["none".into()],
        ..base.clone()
    };
    assert!(!none.reports_to("jsonl") && !none.reports_to("tensorboard"));

    let err = |c: SftConfig| c.validate().unwrap_err().to_string();
    let mixed = err(SftConfig {
        report_to: vec!["none".into(), "tensorboard".into()],
        ..base.clone()
    });
    assert!(mixed.contains("cannot be combined"), "{mixed}");
    let no_eval = err(SftConfig {
        load_best_model_at_end: true,
        ..base.clone()
    });
    assert!(no_eval.contains("--eval-split-ratio"), "{no_eval}");
    let misaligned = err(SftConfig {
        load_best_model_at_end: true,
        eval_split_ratio: Some(0.2),
        eval_steps: Some(3),
        save_steps: 4,
        ..base.clone()
    });
    assert!(
        misaligned.contains("--save-steps (4) to be a multiple of --eval-steps (3)"),
        "{misaligned}"
    );
}

/// With this learning rate the fixture run's eval loss is lowest at step 2 and rises by step 4
/// while the train loss keeps falling: the summary warns, and `--load-best-model-at-end` leaves
/// checkpoint-2's adapter in the output folder instead of the last step's.
#[test]
fn load_best_model_at_end_copies_the_best_checkpoint_and_the_summary_warns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let stderr = train(
        &out,
        &[
            "--max-steps",
            "4",
            "--eval-steps",
            "2",
            "--save-steps",
            "2",
            "--learning-rate",
            "0.05",
            "--lr-scheduler-type",
            "constant",
            "--load-best-model-at-end",
        ],
    );
    let eval = logged(&out, "eval_loss");
    assert!(
        eval[0] < eval[1],
        "the fixture run should overfit after step 2 (eval losses {eval:?}); pick settings where it does"
    );
    let best = out.join("checkpoint-2");
    assert!(
        stderr.contains(&format!("best checkpoint: {}", best.display())),
        "{stderr}"
    );
    assert!(stderr.contains("overfitting"), "{stderr}");
    let adapter = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&out), adapter(&best));
    assert_ne!(adapter(&out), adapter(&out.join("checkpoint-4")));
    assert!(!out.join("optimizer.safetensors").exists());
}
