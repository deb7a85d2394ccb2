//! End to end through the `peft-sft` binary on a tiny model: LoRA training teaches fixed answers,
//! generation with the adapter and with the merged model gives them, runs are reproducible,
//! resuming continues exactly, and full fine-tuning writes a model that loads back.

mod common;
use candle_core::Tensor;
use common::*;
use std::path::Path;

const MODEL: &str = "models/qwen2";

fn qa() -> Vec<(String, String)> {
    std::fs::read_to_string(fixture("data/qa_chat.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = &v["messages"];
            (
                m[0]["content"].as_str().unwrap().to_string(),
                m[1]["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn generate(model: &Path, adapter: Option<&Path>, question: &str) -> String {
    let model = model.to_str().unwrap();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--chat",
        "--prompt",
        question,
        "--max-new-tokens",
        "24",
    ];
    let adapter_s;
    if let Some(a) = adapter {
        adapter_s = a.to_str().unwrap().to_string();
        args.extend(["--adapter", adapter_s.as_str()]);
    }
    let (ok, out, err) = run_cli(&args);
    assert!(ok, "generate failed: {err}");
    out.trim().to_string()
}

fn correct(model: &Path, adapter: Option<&Path>) -> usize {
    qa().iter()
        .filter(|(q, a)| generate(model, adapter, q) == *a)
        .count()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn lora_learns_the_answers_and_the_merged_model_agrees() {
    let model = fixture(MODEL);
    assert_eq!(
        correct(&model, None),
        0,
        "the base model must not know the answers"
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let args = train_args(
        "cpu",
        out_s,
        "160",
        &[
            "--lora",
            "--lora-r",
            "16",
            "--lora-alpha",
            "32",
            "--lora-dropout",
            "0",
            "--save-steps",
            "80",
            "--eval-dataset",
            "tests/fixtures/data/qa_chat.jsonl",
            "--eval-steps",
            "80",
        ],
    );
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "train failed: {err}");
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "trainer_state.json",
    ] {
        assert!(out.join(file).exists(), "missing {file}");
    }
    assert!(out.join("checkpoint-80/optimizer.safetensors").exists());
    let log = metrics(&out);
    let train_log: Vec<&serde_json::Value> =
        log.iter().filter(|e| e.get("loss").is_some()).collect();
    let first = train_log[0]["loss"].as_f64().unwrap();
    let last = train_log.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first / 4.0, "loss {first} -> {last}");
    for key in [
        "loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "num_tokens",
        "mean_token_accuracy",
        "entropy",
    ] {
        assert!(log[0].get(key).is_some(), "metrics lack {key}");
    }
    let evals: Vec<&serde_json::Value> = log
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "eval at steps 80 and 160");
    assert!(evals[1]["eval_loss"].as_f64().unwrap() < evals[0]["eval_loss"].as_f64().unwrap());
    assert!(evals[1]["eval_mean_token_accuracy"].as_f64().unwrap() > 0.9);
    let learned = correct(&model, Some(&out));
    assert_eq!(learned, 20, "only {learned}/20 answers learned");

    let merged = tmp.path().join("merged");
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out_s,
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "merge failed: {err}");
    assert!(err.contains("largest logit difference"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["tie_word_embeddings"], true,
        "tied embeddings stay tied"
    );
    assert!(!tensors(&merged.join("model.safetensors")).contains_key("lm_head.weight"));
    assert_eq!(correct(&merged, None), learned);

    let mut adapted = load_model(&model, false);
    peft_sft::lora::load_adapter(&mut adapted, &out).unwrap();
    let merged_model = load_model(&merged, false);
    let ids = candle_core::Tensor::new(
        &[[3u32, 17, 42, 99, 7, 250, 31, 8]],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let err = rel_err(
        &merged_model.forward(&ids).unwrap(),
        &adapted.forward(&ids).unwrap(),
    );
    assert!(err < 1e-4, "merged and adapter logits differ by {err}");
}

#[test]
fn same_seed_gives_the_same_run_and_resume_continues_exactly() {
    resume_is_exact(&[]);
}

/// Each adapter method and training option keeps the guarantee: DoRA (its magnitude and its
/// optimizer state checkpointed), LoRA+, the DFT loss, NEFTune's keyed noise.
#[test]
fn every_adapter_method_resumes_exactly() {
    for extra in [
        &["--use-dora"][..],
        &["--loraplus-lr-ratio", "16"],
        &["--loss-type", "dft"],
        &["--neftune-noise-alpha", "5"],
        &["--modules-to-save", "lm_head,embed_tokens"],
        &["--init-lora-weights", "pissa"],
        &["--init-lora-weights", "olora", "--qlora"],
        &[
            "--init-lora-weights",
            "loftq",
            "--qlora",
            "--loftq-iter",
            "2",
        ],
        // A mixture of experts with PEFT's all-linear: router and stacked experts' pairs in the
        // checkpoint and the optimizer state (no dropout there, as PEFT).
        &[
            "--model",
            "tests/fixtures/models/mixtral",
            "--lora-dropout",
            "0",
        ],
    ] {
        resume_is_exact(extra);
    }
}

/// Two runs with the same seed log the same values, and a run resumed from a copy of the step-3
/// checkpoint ends with the uninterrupted run's steps 4..6 and adapter, byte for byte.
fn resume_is_exact(method: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let mode = if method.contains(&"--qlora") {
        "--qlora"
    } else {
        "--lora"
    };
    // `--model X` and `--lora-dropout X` in `method` replace the defaults.
    let value = |flag: &str| {
        method
            .iter()
            .position(|m| *m == flag)
            .map(|i| method[i + 1])
    };
    let (model, dropout) = (value("--model"), value("--lora-dropout").unwrap_or("0.1"));
    let mut extra = vec![
        mode,
        "--lora-dropout",
        dropout,
        "--save-steps",
        "3",
        "--gradient-accumulation-steps",
        "2",
    ];
    let mut rest = method.iter();
    while let Some(m) = rest.next() {
        match *m {
            "--qlora" => {}
            "--model" | "--lora-dropout" => {
                rest.next();
            }
            other => extra.push(other),
        }
    }
    let (a_str, b_str, c_str) = (
        a.to_str().unwrap().to_string(),
        b.to_str().unwrap().to_string(),
        c.to_str().unwrap().to_string(),
    );
    let train = |dir: &'_ str| -> Vec<String> {
        let mut args = train_args("cpu", dir, "6", &extra);
        if let Some(model) = model {
            args[2] = model;
        }
        args.into_iter().map(String::from).collect()
    };
    for dir in [&a_str, &b_str] {
        let args = train(dir);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = run_cli(&refs);
        assert!(ok, "{method:?}: {err}");
    }
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(
        ma, mb,
        "{method:?}: two runs with the same seed must log the same values"
    );
    // Resume a copy of the step-3 checkpoint in a fresh folder and compare steps 4..6.
    std::fs::create_dir_all(c.join("checkpoint-3")).unwrap();
    for entry in std::fs::read_dir(a.join("checkpoint-3")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), c.join("checkpoint-3").join(entry.file_name())).unwrap();
    }
    let mut args = train(&c_str);
    args.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = run_cli(&refs);
    assert!(ok, "{method:?}: {err}");
    let mc = metrics(&c);
    assert_eq!(mc.len(), ma.len());
    assert_eq!(
        mc[3..],
        ma[3..],
        "{method:?}: resumed steps must equal the uninterrupted run's"
    );
    let (ta, tc) = (
        tensors(&a.join("adapter_model.safetensors")),
        tensors(&c.join("adapter_model.safetensors")),
    );
    assert_eq!(tc.len(), ta.len());
    for (k, v) in &ta {
        assert_eq!(
            rel_err(&tc[k], v),
            0.0,
            "{method:?}: {k} differs after resume"
        );
    }
}

/// `--use-dora`: the adapter PEFT's DoRA writes (a magnitude vector per module, `use_dora` in the
/// config), a falling loss, and `merge` folding the magnitude in (the merged model's logits equal
/// the adapter's; merge checks them on its probe and says so).
#[test]
fn dora_trains_saves_the_magnitudes_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        out_s,
        "12",
        &["--use-dora", "--lora-r", "8", "--lora-dropout", "0.05"],
    ));
    assert!(ok, "{err}");
    let saved = tensors(&out.join("adapter_model.safetensors"));
    let magnitudes = saved
        .keys()
        .filter(|k| k.ends_with(".lora_magnitude_vector"))
        .count();
    assert_eq!(
        magnitudes * 3,
        saved.len(),
        "A, B and a magnitude per module"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], true);
    let loss = logged(&out, "loss");
    assert!(loss[loss.len() - 1] < loss[0], "loss {loss:?}");

    let merged = tmp.path().join("merged");
    let model = fixture(MODEL);
    merge_checked(&model, &out, &merged);
    let mut adapted = load_model(&model, false);
    peft_sft::lora::load_adapter(&mut adapted, &out).unwrap();
    let ids =
        candle_core::Tensor::new(&[[3u32, 17, 42, 99, 7, 250]], &candle_core::Device::Cpu).unwrap();
    let err = rel_err(
        &load_model(&merged, false).forward(&ids).unwrap(),
        &adapted.forward(&ids).unwrap(),
    );
    assert!(err < 1e-4, "merged and DoRA adapter logits differ by {err}");

    // DoRA rescales an adapter: with --full there is none.
    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        tmp.path().join("full").to_str().unwrap(),
        "1",
        &["--full", "--use-dora"],
    ));
    assert!(
        !ok && err.contains("--use-dora true: DoRA rescales"),
        "{err}"
    );
}

#[test]
fn full_fine_tuning_lowers_the_loss_and_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("full");
    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        out.to_str().unwrap(),
        "20",
        &["--full", "--learning-rate", "1e-3"],
    ));
    assert!(ok, "{err}");
    let log = metrics(&out);
    assert!(log.last().unwrap()["loss"].as_f64().unwrap() < log[0]["loss"].as_f64().unwrap());
    for file in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).exists(), "missing {file}");
    }
    let trained = load_model(&out, false);
    let base = load_model(&fixture(MODEL), false);
    let ids = candle_core::Tensor::new(&[[3u32, 17, 42, 99]], &candle_core::Device::Cpu).unwrap();
    assert!(
        rel_err(
            &trained.forward(&ids).unwrap(),
            &base.forward(&ids).unwrap()
        ) > 1e-3
    );
}

#[test]
fn eval_json_prints_exactly_one_object() {
    let model = fixture(MODEL);
    let (ok, out, err) = run_cli(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        fixture("data/qa_prompt_completion.jsonl").to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    for key in [
        "eval_loss",
        "eval_mean_token_accuracy",
        "eval_entropy",
        "eval_num_tokens",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert!(v["eval_loss"].as_f64().unwrap() > 0.0);
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    use peft_sft::config::SftConfig;
    use peft_sft::train::{train, Reporting};
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, batch: usize, accumulation: usize| {
        let out = tmp.path().join(name);
        let config = SftConfig {
            model_name_or_path: fixture(MODEL).to_string_lossy().into_owned(),
            dataset_name: fixture("data/qa_prompt_completion.jsonl")
                .to_string_lossy()
                .into_owned(),
            output_dir: out.to_string_lossy().into_owned(),
            max_steps: 2,
            per_device_train_batch_size: batch,
            gradient_accumulation_steps: accumulation,
            learning_rate: 1e-2,
            lora_dropout: 0.0,
            logging_steps: 1,
            device: "cpu".into(),
            ..SftConfig::default()
        };
        train(&config, Reporting::default()).unwrap();
        metrics(&out)
    };
    // Same examples per step (the shuffle is per epoch, cut into 4 or 2x2); the loss is normalised
    // by the loss tokens of the whole step either way, so loss and gradient norm agree.
    let (big, accumulated) = (run("big", 4, 1), run("acc", 2, 2));
    assert_eq!(big.len(), 2);
    for (b, a) in big.iter().zip(&accumulated) {
        for key in ["loss", "grad_norm", "mean_token_accuracy"] {
            let (x, y) = (b[key].as_f64().unwrap(), a[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 2e-6 * x.abs().max(1.0),
                "{key}: {x} vs {y}"
            );
        }
    }
}

/// `--bf16`: the base and activations in bf16, the adapter in f32. The loss curve follows the f32
/// run within 2% over 20 steps, the adapter saved is f32 and it differs from the f32 run's (the
/// flag did change the arithmetic).
#[test]
fn bf16_mixed_precision_follows_the_f32_run() {
    let tmp = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (name, extra) in [("f32", "false"), ("bf16", "true")] {
        let out = tmp.path().join(name);
        let out_s = out.to_str().unwrap();
        let args = train_args(
            "cpu",
            out_s,
            "20",
            &["--lora", "--lora-dropout", "0.05", "--bf16", extra],
        );
        let (ok, _, err) = run_cli(&args);
        assert!(ok, "{name}: {err}");
        runs.push((logged(&out, "loss"), out));
    }
    let ((f32_loss, f32_dir), (bf16_loss, bf16_dir)) = (&runs[0], &runs[1]);
    assert_eq!(f32_loss.len(), 20);
    for (step, (a, b)) in f32_loss.iter().zip(bf16_loss).enumerate() {
        let rel = (b - a).abs() / a.abs();
        assert!(rel < 0.02, "step {}: bf16 loss {b} vs f32 {a}", step + 1);
    }
    assert!(
        bf16_loss[19] < 0.8 * bf16_loss[0],
        "bf16 did not learn: {bf16_loss:?}"
    );
    let read = |dir: &Path| tensors(&dir.join("adapter_model.safetensors"));
    let (a, b) = (read(f32_dir), read(bf16_dir));
    let mut differ = false;
    for (name, t) in &b {
        assert_eq!(
            t.dtype(),
            candle_core::DType::F32,
            "{name} saved as {:?}",
            t.dtype()
        );
        differ |= max_abs_diff(t, &a[name]) > 0.0;
    }
    assert!(differ, "--bf16 trained the same adapter as f32");
}

/// LoRA+ (`--loraplus-lr-ratio 16`, PEFT's create_loraplus_optimizer): after one AdamW step from
/// PEFT's initialisation (B = 0, so A's first gradient is zero), every B matrix has moved exactly
/// 16 times as far as without LoRA+ (Adam's step is proportional to its learning rate), and A is
/// the same.
#[test]
fn loraplus_moves_the_b_matrices_ratio_times_as_far() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let out_s = out.to_str().unwrap().to_string();
        let mut extra = extra.to_vec();
        extra.extend_from_slice(&["--lora-dropout", "0"]);
        let (ok, _, err) = run_cli(&train_args("cpu", &out_s, "1", &extra));
        assert!(ok, "{err}");
        tensors(&out.join("adapter_model.safetensors"))
    };
    let plain = run("plain", &[]);
    let plus = run("plus", &["--loraplus-lr-ratio", "16"]);
    assert_eq!(plain.len(), plus.len());
    let mut b_matrices = 0;
    for (name, p) in &plain {
        let q = &plus[name];
        if name.contains("lora_B") {
            b_matrices += 1;
            let scaled = (p * 16.0).unwrap();
            assert!(max_abs_diff(q, &scaled) <= 1e-6, "{name}");
            assert!(
                max_abs_diff(p, &p.zeros_like().unwrap()) > 0.0,
                "{name} moved"
            );
        } else {
            assert_eq!(max_abs_diff(q, p), 0.0, "{name}");
        }
    }
    assert!(b_matrices > 0);
}

/// `--loss-type dft` reaches the loss: the logged loss is TRL's DFT loss, below the NLL of the
/// same first step (each token's loss weighed by its probability, below 1).
#[test]
fn loss_type_dft_trains_with_the_dft_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let first_loss = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let out_s = out.to_str().unwrap().to_string();
        let (ok, _, err) = run_cli(&train_args("cpu", &out_s, "1", extra));
        assert!(ok, "{err}");
        logged(&out, "loss")[0]
    };
    let nll = first_loss("nll", &[]);
    let dft = first_loss("dft", &["--loss-type", "dft"]);
    assert!(dft > 0.0 && dft < nll, "dft {dft} vs nll {nll}");
    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        tmp.path().join("bad").to_str().unwrap(),
        "1",
        &["--loss-type", "kto"],
    ));
    assert!(
        !ok && err.contains("--loss-type `kto`: expected nll"),
        "{err}"
    );
}

/// `--neftune-noise-alpha` reaches the training forward (the first step's loss moves) and the
/// noise is keyed (the same run twice logs the same loss).
#[test]
fn neftune_noise_changes_the_training_loss_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let first_loss = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let out_s = out.to_str().unwrap().to_string();
        let (ok, _, err) = run_cli(&train_args("cpu", &out_s, "1", extra));
        assert!(ok, "{err}");
        logged(&out, "loss")[0]
    };
    let plain = first_loss("plain", &[]);
    let noisy = first_loss("noisy", &["--neftune-noise-alpha", "15"]);
    let again = first_loss("again", &["--neftune-noise-alpha", "15"]);
    assert_ne!(plain, noisy);
    assert_eq!(noisy, again);
}

/// `--layers-to-transform`, `--exclude-modules`: only layer 1's target modules, less down_proj,
/// get adapters, and adapter_config.json carries PEFT's keys; an index past the model's layers is
/// refused naming them.
#[test]
fn layer_selection_flags_reach_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        out.to_str().unwrap(),
        "1",
        &[
            "--layers-to-transform",
            "1",
            "--exclude-modules",
            "down_proj",
        ],
    ));
    assert!(ok, "{err}");
    let saved = tensors(&out.join("adapter_model.safetensors"));
    let mut modules: Vec<String> = saved
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_A.weight"))
        .map(|k| k.trim_start_matches("base_model.model.").to_string())
        .collect();
    modules.sort();
    let expected: Vec<String> = ["gate_proj", "up_proj"]
        .iter()
        .map(|m| format!("model.layers.1.mlp.{m}"))
        .chain(
            ["k_proj", "o_proj", "q_proj", "v_proj"]
                .iter()
                .map(|m| format!("model.layers.1.self_attn.{m}")),
        )
        .collect();
    assert_eq!(modules, expected);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(config["exclude_modules"], serde_json::json!(["down_proj"]));

    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        tmp.path().join("bad").to_str().unwrap(),
        "1",
        &["--layers-to-transform", "5"],
    ));
    assert!(
        !ok && err.contains("layers_to_transform 5: none of the target modules is in a layer with that index; the model's layers are 0–1"),
        "{err}"
    );
    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        tmp.path().join("bad2").to_str().unwrap(),
        "1",
        &["--layers-to-transform", "-1"],
    ));
    assert!(
        !ok && err
            .contains("--layers-to-transform -1: expected comma-separated non-negative integers"),
        "{err}"
    );
}

/// `--modules-to-save lm_head,embed_tokens` on the tied Qwen2: trained copies saved under PEFT's
/// keys beside the adapter (the base's weights untouched), listed in adapter_config.json; with
/// LoRA+ the embedding's copy moves at `--loraplus-lr-embedding` (Adam's first step is the rate
/// times the gradient's sign), the head's at the learning rate.
#[test]
fn modules_to_save_train_copies_saved_under_peft_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tensors(&fixture(MODEL).join("model.safetensors"));
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "--modules-to-save",
            "lm_head,embed_tokens",
            "--lora-dropout",
            "0",
        ];
        args.extend_from_slice(extra);
        let (ok, _, err) = run_cli(&train_args("cpu", out.to_str().unwrap(), "1", &args));
        assert!(ok, "{err}");
        (out.clone(), tensors(&out.join("adapter_model.safetensors")))
    };
    let (out, plain) = run("plain", &[]);
    let embed = &plain["base_model.model.model.embed_tokens.weight"];
    let head = &plain["base_model.model.lm_head.weight"];
    let start = &base["model.embed_tokens.weight"];
    let moved = |t: &candle_core::Tensor| max_abs_diff(t, start);
    // One Adam step at 5e-3 from the base's (tied) matrix, each copy on its own gradient.
    assert!((moved(embed) - 5e-3).abs() < 1e-4, "{}", moved(embed));
    assert!((moved(head) - 5e-3).abs() < 1e-4, "{}", moved(head));
    assert!(max_abs_diff(embed, head) > 0.0, "the copies train apart");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["lm_head", "embed_tokens"])
    );
    let (_, plus) = run("plus", &["--loraplus-lr-ratio", "16"]);
    let moved_plus = moved(&plus["base_model.model.model.embed_tokens.weight"]);
    // Within the f32 spacing of the weights (about 1e-8 at their size).
    assert!((moved_plus - 1e-6).abs() < 5e-8, "{moved_plus}");
    assert!((moved(&plus["base_model.model.lm_head.weight"]) - 5e-3).abs() < 1e-4);

    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        tmp.path().join("bad").to_str().unwrap(),
        "1",
        &["--modules-to-save", "norm"],
    ));
    assert!(
        !ok && err.contains("modules_to_save `norm`: peft-sft trains full copies of the embedding and the LM head only"),
        "{err}"
    );
}

/// `--init-lora-weights pissa`: the saved adapter is relative to the original base (rank 2r,
/// alpha 2x, init true) and `merge` onto the original base reproduces the trained model; a raw
/// PiSSA adapter (PEFT's unconverted save) is refused with the way out; PiSSA over a 4-bit base
/// and an unknown init are refused.
#[test]
fn pissa_saves_an_adapter_of_the_original_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let (ok, _, err) = run_cli(&train_args(
        "cpu",
        out_s,
        "4",
        &[
            "--init-lora-weights",
            "pissa",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
        ],
    ));
    assert!(ok, "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            &config["r"],
            &config["lora_alpha"],
            &config["init_lora_weights"]
        ),
        (
            &serde_json::json!(8),
            &serde_json::json!(16.0),
            &serde_json::json!(true)
        )
    );
    let merged = tmp.path().join("merged");
    let model = fixture(MODEL);
    merge_checked(&model, &out, &merged);

    // PEFT's unconverted save of a PiSSA adapter applies to a residual base only.
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::copy(
        out.join("adapter_model.safetensors"),
        raw.join("adapter_model.safetensors"),
    )
    .unwrap();
    let raw_config = config.to_string().replace(
        "\"init_lora_weights\":true",
        "\"init_lora_weights\":\"pissa\"",
    );
    std::fs::write(raw.join("adapter_config.json"), raw_config).unwrap();
    let mut base = load_model(&model, false);
    let err = peft_sft::lora::load_adapter(&mut base, &raw)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("path_initial_model_for_weight_conversion"),
        "{err}"
    );

    for (extra, says) in [
        (
            &["--init-lora-weights", "pissa", "--qlora"][..],
            "PiSSA needs the base in full precision",
        ),
        (
            &["--init-lora-weights", "loftq"][..],
            "--init-lora-weights loftq: LoftQ fits the adapter to the error of a quantized base: use it with --qlora",
        ),
        (
            &["--init-lora-weights", "corda"][..],
            "--init-lora-weights corda: expected true, gaussian, pissa",
        ),
        (
            &["--init-lora-weights", "loftq", "--qlora", "--loftq-iter", "0"][..],
            "--loftq-iter 0: must be at least 1",
        ),
    ] {
        let (ok, _, err) = run_cli(&train_args(
            "cpu",
            tmp.path().join("bad").to_str().unwrap(),
            "1",
            extra,
        ));
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
    }
}

/// `--init-lora-weights loftq`: the run saves the quantized base LoftQ left (dequantized) as
/// `loftq_base/`, and the adapter names it as its base with `init_lora_weights: true` (PEFT's LoftQ
/// example's way); that base plus the adapter is the trained model (the same logits as LoftQ
/// recomputed from the original weights, and merge onto it checks out); int8 (`--load-in-8bit`)
/// works too; PEFT's raw `loftq` adapter config and a GGUF base are refused with the way out.
#[test]
fn loftq_saves_its_base_and_an_adapter_of_it() {
    use peft_sft::model::{load_pretrained_with, LoadOptions};
    let tmp = tempfile::tempdir().unwrap();
    for (mode, bits) in [(&["--qlora"][..], 4), (&["--lora", "--load-in-8bit"], 8)] {
        let out = tmp.path().join(format!("run{bits}"));
        let mut extra = vec!["--init-lora-weights", "loftq", "--loftq-iter", "2"];
        extra.extend(mode);
        let (ok, _, err) = run_cli(&train_args("cpu", out.to_str().unwrap(), "3", &extra));
        assert!(ok, "{err}");
        let loftq_base = out.join("loftq_base");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["init_lora_weights"], serde_json::json!(true));
        assert!(config
            .get("loftq_config")
            .is_none_or(|c| c == &serde_json::json!({})));
        let named = std::path::PathBuf::from(config["base_model_name_or_path"].as_str().unwrap());
        assert_eq!(
            named.canonicalize().unwrap(),
            loftq_base.canonicalize().unwrap()
        );

        // The saved base (full precision) plus the adapter ...
        let ids = Tensor::new(&[[3u32, 17, 42, 9, 77, 5, 12]], &device()).unwrap();
        let mut saved = load_model(&loftq_base, false);
        peft_sft::lora::load_adapter(&mut saved, &out).unwrap();
        let from_saved = saved.forward(&ids).unwrap();
        // ... is LoftQ's quantized base, recomputed from the original weights, plus the adapter.
        let scheme = if bits == 4 {
            peft_sft::config::four_bit_scheme("nf4", true).unwrap()
        } else {
            peft_sft::quant::QuantScheme::Int8
        };
        let options = LoadOptions {
            quantize: Some(scheme),
            ..LoadOptions::default()
        };
        let original = fixture(MODEL);
        let mut model = load_pretrained_with(original.to_str().unwrap(), options, &device())
            .unwrap()
            .model;
        let mut lora = peft_sft::lora::LoraConfig::from_dir(&out).unwrap();
        lora.init_lora_weights = serde_json::json!("loftq");
        lora.other.insert(
            "loftq_config".into(),
            serde_json::json!({"loftq_bits": bits, "loftq_iter": 2}),
        );
        let weights = peft_sft::model::weights::Weights::from_dir(&original).unwrap();
        let originals = peft_sft::lora::init::checkpoint_originals(&weights);
        peft_sft::lora::inject_with(&mut model, &lora, 3, Some(&originals)).unwrap();
        peft_sft::lora::remove_adapters(&mut model);
        peft_sft::lora::load_adapter(&mut model, &out).unwrap();
        let err = rel_err(&model.forward(&ids).unwrap(), &from_saved);
        assert!(
            err < 1e-5,
            "{bits}-bit: the saved LoftQ base gives logits {err} away"
        );
        merge_checked(&loftq_base, &out, &tmp.path().join(format!("merged{bits}")));

        // PEFT's adapter saved without its example's init_lora_weights=True asks for LoftQ again.
        let raw = tmp.path().join(format!("raw{bits}"));
        std::fs::create_dir_all(&raw).unwrap();
        std::fs::copy(
            out.join("adapter_model.safetensors"),
            raw.join("adapter_model.safetensors"),
        )
        .unwrap();
        let raw_config = config.to_string().replace(
            "\"init_lora_weights\":true",
            "\"init_lora_weights\":\"loftq\"",
        );
        std::fs::write(raw.join("adapter_config.json"), raw_config).unwrap();
        let err = peft_sft::lora::load_adapter(&mut load_model(&loftq_base, false), &raw)
            .unwrap_err()
            .to_string();
        assert!(err.contains("load it over that base"), "{err}");
    }
}

/// `peft-sft merge` of `adapter` onto `model` into `merged`, which must succeed with its probe
/// check (the merged model's logits against the adapter's) reported.
fn merge_checked(model: &Path, adapter: &Path, merged: &Path) {
    let (ok, _, err) = run_cli(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(ok && err.contains("largest logit difference"), "{err}");
}

/// Gemma 3's multimodal wrapper through the CLI: the adapter names the text model's modules as
/// PEFT does on `Gemma3ForConditionalGeneration` (`model.language_model...`, a target pattern
/// that leaves the vision tower alone); merge writes the whole checkpoint — the text model in
/// the original layout, every vision tensor as it was — and it reloads to the adapter's logits.
#[test]
fn gemma3_multimodal_trains_its_text_model_and_merges_the_whole_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (adapter, merged) = (tmp.path().join("adapter"), tmp.path().join("merged"));
    let base = fixture("models/gemma3_multimodal");
    let mut args = train_args(
        "cpu",
        adapter.to_str().unwrap(),
        "3",
        &["--learning-rate", "1e-2"],
    );
    args[2] = "tests/fixtures/models/gemma3_multimodal";
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "{err}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let pattern = config["target_modules"].as_str().expect("a pattern");
    assert!(pattern.starts_with(r"model\.language_model\."), "{pattern}");
    let keys = tensors(&adapter.join("adapter_model.safetensors"));
    assert!(keys
        .keys()
        .all(|k| k.starts_with("base_model.model.model.language_model.layers.")));
    merge_checked(&base, &adapter, &merged);
    let (before, after) = (
        tensors(&base.join("model.safetensors")),
        tensors(&merged.join("model.safetensors")),
    );
    let mut names: Vec<&String> = before.keys().collect();
    names.sort();
    let mut merged_names: Vec<&String> = after.keys().collect();
    merged_names.sort();
    assert_eq!(
        names, merged_names,
        "the merged checkpoint has the base's tensors"
    );
    for name in names.iter().filter(|n| !n.starts_with("language_model.")) {
        assert_eq!(
            max_abs_diff(&after[*name], &before[*name]),
            0.0,
            "{name} changed"
        );
    }
    let mut with_adapter = load_model(&base, false);
    peft_sft::lora::load_adapter(&mut with_adapter, &adapter).unwrap();
    let reloaded = load_model(&merged, false);
    let ids = Tensor::new(&[[3u32, 17, 42, 99, 7]], &candle_core::Device::Cpu).unwrap();
    let err = rel_err(
        &reloaded.forward(&ids).unwrap(),
        &with_adapter.forward(&ids).unwrap(),
    );
    assert!(err < 1e-4, "merged logits differ by {err}");
}

/// A mixture of experts trains with its routers' load-balancing loss as TRL does: the config's
/// coefficient (0.001) by default, logged as `aux_loss` and `eval_aux_loss`, the logged loss
/// including the weighted term; `--router-aux-loss-coef 0` leaves it out. With gradient
/// checkpointing (layers recomputed in the backward, router and experts' LoRA pairs included)
/// the run is the same as without.
#[test]
fn moe_trains_with_the_router_load_balancing_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out = tmp.path().join(name);
        let mut args: Vec<String> = train_args("cpu", out.to_str().unwrap(), "3", &[])
            .into_iter()
            .map(String::from)
            .collect();
        args[2] = "tests/fixtures/models/mixtral".into();
        for a in [
            "--lora-dropout",
            "0",
            "--gradient-accumulation-steps",
            "2",
            "--eval-dataset",
            "tests/fixtures/data/qa_chat.jsonl",
            "--eval-steps",
            "3",
        ]
        .iter()
        .chain(extra)
        {
            args.push(a.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = run_cli(&args);
        assert!(ok, "{name}: {err}");
        metrics(&out)
    };
    let values = |log: &[serde_json::Value], key: &str| -> Vec<f64> {
        log.iter().filter_map(|e| e.get(key)?.as_f64()).collect()
    };
    let default = run("default", &[]);
    let aux = values(&default, "aux_loss");
    assert_eq!(aux.len(), 3, "aux_loss in every step's entry");
    assert!(aux.iter().all(|a| a.is_finite() && *a > 0.0), "{aux:?}");
    assert_eq!(values(&default, "eval_aux_loss").len(), 1);
    let off = run("off", &["--router-aux-loss-coef", "0"]);
    assert!(values(&off, "aux_loss").is_empty() && values(&off, "eval_aux_loss").is_empty());
    // The first step starts from the same weights: its loss differs by the weighted term only.
    let (with, without) = (values(&default, "loss")[0], values(&off, "loss")[0]);
    assert!(
        (with - without - 0.001 * aux[0]).abs() < 3e-6,
        "loss {with} = {without} + 0.001 · {}?",
        aux[0]
    );
    let strong = ["--router-aux-loss-coef", "0.5"];
    let plain = run("strong", &strong);
    let checkpointed = run(
        "checkpointed",
        &[strong[0], strong[1], "--gradient-checkpointing"],
    );
    for key in ["loss", "aux_loss", "grad_norm", "eval_loss"] {
        let (a, b) = (values(&plain, key), values(&checkpointed, key));
        assert_eq!(a.len(), b.len(), "{key}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "{key}: {a:?} vs {b:?}"
            );
        }
    }
    // A weight 500 times larger moves the run elsewhere.
    assert_ne!(values(&plain, "grad_norm"), values(&default, "grad_norm"));
}
