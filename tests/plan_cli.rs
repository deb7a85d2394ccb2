//! `peft-sft plan`: the memory planner's command line — config.json, folder and flags in, a
//! breakdown that adds up and a length that fits out, and one measured peak it must stay near.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn plan(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_peft-sft"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run peft-sft plan")
}

fn plan_json(args: &[&str]) -> Value {
    let out = plan(&[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn mib(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// SmolLM2-135M's shape, as `scripts/bench_peft.py --make-model DIR --shape 135m` writes it.
fn smollm2_135m_config(dir: &Path) -> String {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "tie_word_embeddings": true, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn plan_reads_a_folder_or_its_config_and_the_parts_add_up() {
    let args = ["--max-length", "64", "--per-device-train-batch-size", "2"];
    let folder = plan_json(&[&["--model", "tests/fixtures/models/qwen2"], &args[..]].concat());
    let file = plan_json(
        &[
            &["--model", "tests/fixtures/models/qwen2/config.json"],
            &args[..],
        ]
        .concat(),
    );
    assert_eq!(folder["peak"], file["peak"]);
    assert_eq!(folder["phases"], file["phases"]);
    // The qwen2 fixture: 99,904 parameters (tied); LoRA r=16 on its 14 linears.
    assert_eq!(folder["params"], 99904);
    assert_eq!(
        folder["lora_params"],
        2 * 16 * (4 * 64 + 2 * (64 + 32) + 3 * (64 + 128))
    );
    let peak = &folder["peak"];
    let parts: f64 = [
        "weights_mib",
        "trainable_mib",
        "activations_mib",
        "workspace_mib",
    ]
    .iter()
    .map(|k| mib(peak, k))
    .sum::<f64>()
        + mib(peak, "baseline_mib");
    assert!((parts - mib(peak, "total_mib")).abs() < 0.5, "{peak}");
    let phase = folder["peak_phase"].as_str().unwrap();
    assert_eq!(folder["phases"][phase], folder["peak"]);
    for (name, p) in folder["phases"].as_object().unwrap() {
        assert!(mib(p, "total_mib") <= mib(peak, "total_mib"), "{name}");
    }
}

#[test]
fn plan_options_move_the_prediction_the_right_way() {
    let dir = tempfile::tempdir().unwrap();
    let config = smollm2_135m_config(dir.path());
    let total = |extra: &[&str]| {
        let base = [
            "--model",
            config.as_str(),
            "--max-length",
            "1024",
            "--per-device-train-batch-size",
            "1",
        ];
        mib(&plan_json(&[&base[..], extra].concat()), "total_mib")
    };
    let lora = total(&[]);
    assert!(total(&["--qlora"]) < lora);
    assert!(total(&["--full"]) > lora);
    assert!(total(&["--gradient-checkpointing"]) < lora);
    // Dropout masks are kept op by op (CUDA) and drawn again by the CPU's one-op layers.
    let cuda = total(&["--device", "cuda", "--dtype", "f32"]);
    assert!(total(&["--device", "cuda", "--dtype", "f32", "--lora-dropout", "0"]) < cuda);
    assert_eq!(total(&["--lora-dropout", "0"]), lora);
    assert!(total(&["--lora-target-modules", "q_proj,v_proj"]) < lora);
    assert!(total(&["--lora-r", "64"]) > lora);
    assert!(total(&["--device", "cuda", "--dtype", "bf16"]) < cuda);
    // The text table names every part.
    let out = plan(&["--model", config.as_str(), "--qlora"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for row in [
        "base weights",
        "LoRA + optimizer",
        "activations",
        "workspace",
        "baseline",
        "total",
    ] {
        assert!(text.contains(row), "{row} missing from\n{text}");
    }
}

#[test]
fn plan_budget_reports_the_longest_length_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let config = smollm2_135m_config(dir.path());
    let base = [
        "--model",
        config.as_str(),
        "--qlora",
        "--per-device-train-batch-size",
        "1",
    ];
    let fit = plan_json(&[&base[..], &["--budget-gib", "2"]].concat());
    let longest = fit["largest_max_length"]
        .as_u64()
        .expect("a length fits in 2 GiB");
    let at = |t: u64| {
        let t = t.to_string();
        mib(
            &plan_json(&[&base[..], &["--max-length", t.as_str()]].concat()),
            "total_mib",
        )
    };
    assert!(
        at(longest) <= 2048.0 && at(longest + 1) > 2048.0,
        "{longest}"
    );
    let none = plan_json(&[&base[..], &["--budget-gib", "0.01"]].concat());
    assert!(none["largest_max_length"].is_null());
}

/// Regression guard against a measurement: random SmolLM2-135M-shaped model (f32 safetensors
/// written by `scripts/bench_peft.py --make-model DIR --shape 135m`), LoRA r=16 all-linear, no
/// dropout, batch 1, T=2048, two steps of `cargo run --release --example bench_lora_step -- DIR
/// 2048 2 16 lora` with selective checkpointing (after 4cd4007) on the 2-core CPU machine: peak RSS
/// (VmHWM) 2079 MiB; the
/// example's process baseline (no tokenizer) is 9 MiB. benches/README.md, "Memory planner".
#[test]
fn plan_stays_within_ten_percent_of_a_measured_peak() {
    let dir = tempfile::tempdir().unwrap();
    let config = smollm2_135m_config(dir.path());
    let p = plan_json(&[
        "--model",
        config.as_str(),
        "--max-length",
        "2048",
        "--lora-r",
        "16",
        "--per-device-train-batch-size",
        "1",
        "--lora-dropout",
        "0",
        "--baseline-mib",
        "9",
    ]);
    let measured = 2078.6;
    let error = (mib(&p, "total_mib") - measured) / measured;
    assert!(error.abs() < 0.10, "predicted {} MiB", mib(&p, "total_mib"));
}

#[test]
fn plan_refuses_missing_configs_and_conflicting_methods() {
    let out = plan(&["--model", "tests/fixtures/no-such-model-folder"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
    let out = plan(&[
        "--model",
        "tests/fixtures/models/qwen2",
        "--qlora",
        "--full",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--full") || err.contains("--qlora"), "{err}");
}

/// `--offload-activations` is planned with gradient checkpointing on a GPU: the layer inputs (but
/// the first) leave the device, so a longer length fits; without checkpointing the flag is refused
/// with a message that says what to add.
#[test]
fn plan_offloads_layer_inputs_with_checkpointing_only() {
    let base = [
        "--model",
        "tests/fixtures/configs/llama-3.1-8b.json",
        "--qlora",
        "--lora-r",
        "32",
        "--per-device-train-batch-size",
        "1",
        "--device",
        "cuda",
        "--gradient-checkpointing",
        "--max-length",
        "8192",
    ];
    let kept = plan_json(&base);
    let offloaded = plan_json(&[&base[..], &["--offload-activations"]].concat());
    assert_eq!(offloaded["offload_activations"], true);
    // 31 layer inputs of 8192 × 4096 bf16 values (64 MiB each) leave the loss phase.
    let inputs = 31.0 * 64.0;
    let loss = |v: &Value| mib(&v["phases"]["loss"], "activations_mib");
    assert!((loss(&kept) - loss(&offloaded) - inputs).abs() < 0.5);
    let longest = |v: &[&str]| {
        plan_json(&[v, &["--budget-gib", "16"]].concat())["largest_max_length"]
            .as_u64()
            .unwrap()
    };
    let offloaded_args = [&base[..], &["--offload-activations"]].concat();
    assert!(longest(&offloaded_args) > longest(&base));
    let out = plan(&[
        "--model",
        "tests/fixtures/configs/llama-3.1-8b.json",
        "--device",
        "cuda",
        "--offload-activations",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gradient-checkpointing"), "{err}");
}
