//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use peft_sft::model::weights::Weights;
use peft_sft::model::{CausalLm, ModelConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Asserts that the gradient of every trainable variable equals PEFT's, stored in `reference` as
/// `grad.base_model.model.<name>`, within `tol` relative to the reference's largest magnitude.
pub fn assert_peft_gradients(
    reference: &HashMap<String, Tensor>,
    grads: &candle_core::backprop::GradStore,
    trainable: &[(String, candle_core::Var)],
    tol: f32,
) {
    assert!(!trainable.is_empty(), "nothing trains");
    for (param, var) in trainable {
        let key = format!("grad.base_model.model.{param}");
        let expected = reference
            .get(&key)
            .unwrap_or_else(|| panic!("fixture lacks {key}"));
        let grad = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {param}"));
        let err = rel_err(grad, expected);
        assert!(
            err < tol,
            "gradient of {param} differs from PEFT's by {err}"
        );
    }
}

/// The repository root: `PEFT_SFT_REPO` when set (the GPU machine runs test binaries built
/// elsewhere, scripts/gpu-check.sh), else the one the tests were compiled in.
/// Every family's tiny fixture model under `tests/fixtures/models`.
pub const FAMILIES: &[&str] = &[
    "llama",
    "qwen2",
    "qwen3",
    "smollm3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "mixtral",
    "qwen3_moe",
];

pub fn repo() -> PathBuf {
    std::env::var_os("PEFT_SFT_REPO")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// The device the numerical tests compute on: the CPU, or CUDA device 0 when
/// `PEFT_SFT_TEST_DEVICE=cuda` (tests/gpu.rs on the GPU machine). One device per process: two
/// CUDA devices made apart refuse each other's tensors.
pub fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = std::env::var("PEFT_SFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
            peft_sft::device::select_device(&name)
                .unwrap_or_else(|e| panic!("PEFT_SFT_TEST_DEVICE={name}: {e}"))
        })
        .clone()
}

/// Loads a fixture model (f32, on [`device`]); `trainable` makes every weight a variable.
pub fn load_model(dir: &Path, trainable: bool) -> CausalLm {
    let config = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let weights = Weights::from_dir(dir).expect("weights");
    CausalLm::load(config, &weights, trainable, DType::F32, &device()).expect("model")
}

/// Every tensor of a safetensors file, on [`device`].
pub fn tensors(path: &Path) -> HashMap<String, Tensor> {
    peft_sft::io::read_safetensors(path, &device()).expect("safetensors")
}

/// The int64 `input_ids` of a reference file as u32.
pub fn input_ids(reference: &HashMap<String, Tensor>) -> Tensor {
    reference["input_ids"].to_dtype(DType::U32).expect("ids")
}

/// Largest absolute difference relative to the largest magnitude of `expected`.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f32 {
    let a = actual.to_dtype(DType::F32).unwrap();
    let b = expected
        .to_dtype(DType::F32)
        .unwrap()
        .reshape(a.shape())
        .unwrap();
    let diff = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12)
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    let a = actual.to_dtype(DType::F32).unwrap();
    let b = expected
        .to_dtype(DType::F32)
        .unwrap()
        .reshape(a.shape())
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Path of the built CLI: `PEFT_SFT_BIN` when set (scripts/gpu-check.sh), else cargo's.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("PEFT_SFT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_peft-sft").into())
    })
}

/// Runs the CLI, returning (success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        // Relative fixture paths resolve against the repository wherever the tests run.
        .current_dir(repo())
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "PEFT_SFT_CACHE",
            std::env::temp_dir().join("peft-sft-test-cache"),
        )
        .output()
        .expect("run peft-sft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The values of `key` (e.g. `loss`) in the records of `dir/metrics.jsonl` that have it.
pub fn logged(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter_map(|v| v.get(key).and_then(serde_json::Value::as_f64))
        .collect()
}

/// `train` on the qwen2 fixture with the QA chat data: `steps` steps of batch 4, learning rate
/// 5e-3 constant, a log entry every step, seed 3, on `device`, into `out`; then `extra`.
pub fn train_args<'a>(
    device: &'a str,
    out: &'a str,
    steps: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--model",
        "tests/fixtures/models/qwen2",
        "--dataset",
        "tests/fixtures/data/qa_chat.jsonl",
        "--output-dir",
        out,
        "--max-steps",
        steps,
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "5e-3",
        "--lr-scheduler-type",
        "constant",
        "--logging-steps",
        "1",
        "--seed",
        "3",
        "--device",
        device,
    ];
    args.extend_from_slice(extra);
    args
}
