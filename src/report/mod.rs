//! Tracking a run without Python: `metrics.jsonl`, TensorBoard event files under `OUTPUT/runs/`
//! and `loss_curve.png`, chosen with `--report-to` (TRL's name), plus the end-of-run summary.

pub mod jsonl;
pub mod plot;
pub mod summary;
pub mod tensorboard;

use crate::config::SftConfig;
use crate::{Error, Result};
use jsonl::MetricsFile;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The folder of a run's TensorBoard event files (`tensorboard --logdir OUTPUT/runs`).
pub const RUNS_DIR: &str = "runs";
/// The loss plot's file name.
pub const LOSS_CURVE: &str = "loss_curve.png";

/// TensorBoard's tag for a log key, as transformers' `TensorBoardCallback` names it: `eval_x`
/// becomes `eval/x`, `test_x` becomes `test/x`, anything else `train/x`.
pub fn tensorboard_tag(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("eval_") {
        format!("eval/{rest}")
    } else if let Some(rest) = key.strip_prefix("test_") {
        format!("test/{rest}")
    } else {
        format!("train/{key}")
    }
}

/// The trackers a run writes to, as `--report-to` selects them.
pub struct Tracking {
    metrics: Option<MetricsFile>,
    tensorboard: Option<tensorboard::EventWriter>,
    loss_curve: Option<PathBuf>,
}

impl Tracking {
    /// Opens the trackers of `config.report_to` in `output_dir`: `metrics.jsonl` (started with
    /// `history`, the log up to a resumed checkpoint) and `loss_curve.png` unless `none`; a new
    /// TensorBoard event file in `output_dir/runs/` for `tensorboard`. A resumed run
    /// (`resumed_at`, the checkpoint's step) marks a session start at the next step so
    /// TensorBoard drops what the interrupted run logged after its checkpoint.
    pub fn open(
        config: &SftConfig,
        output_dir: &Path,
        history: &[Value],
        resumed_at: Option<usize>,
    ) -> Result<Self> {
        let metrics = config
            .reports_to("jsonl")
            .then(|| MetricsFile::create(output_dir, history))
            .transpose()?;
        let tensorboard = if config.reports_to("tensorboard") {
            let writer = tensorboard::EventWriter::create(&output_dir.join(RUNS_DIR))?;
            if let Some(step) = resumed_at {
                writer.add_session_start(step as i64 + 1, tensorboard::now_seconds())?;
            }
            Some(writer)
        } else {
            None
        };
        let loss_curve = metrics.is_some().then(|| output_dir.join(LOSS_CURVE));
        Ok(Tracking {
            metrics,
            tensorboard,
            loss_curve,
        })
    }

    /// Records one log entry (a `metrics.jsonl` record with its `step`): a line of
    /// `metrics.jsonl`, and one TensorBoard scalar per numeric key but `step`.
    pub fn log(&self, entry: &Value) -> Result<()> {
        if let Some(metrics) = &self.metrics {
            metrics.append(entry)?;
        }
        if let (Some(writer), Some(record)) = (&self.tensorboard, entry.as_object()) {
            let step = record.get("step").and_then(Value::as_i64).unwrap_or(0);
            let tags: Vec<(String, f32)> = record
                .iter()
                .filter(|(key, _)| key.as_str() != "step")
                .filter_map(|(key, value)| Some((tensorboard_tag(key), value.as_f64()? as f32)))
                .collect();
            let scalars: Vec<(&str, f32)> = tags.iter().map(|(t, v)| (t.as_str(), *v)).collect();
            writer.add_scalars(step, tensorboard::now_seconds(), &scalars)?;
        }
        Ok(())
    }

    /// Redraws `loss_curve.png` from `history` (when it is tracked and there is a loss to draw).
    pub fn draw(&self, history: &[Value]) -> Result<()> {
        let has_loss = history
            .iter()
            .any(|r| r.get("loss").is_some() || r.get("eval_loss").is_some());
        match &self.loss_curve {
            Some(path) if has_loss => plot::draw_loss_curve(history, path),
            _ => Ok(()),
        }
    }
}

/// Reads the records of a `metrics.jsonl`, naming the file and line of a bad one.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            hint: "pass the --output-dir of a run trained with --report-to jsonl (the default)"
                .into(),
        },
        _ => Error::io(path, e),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| Error::Parse {
                path: path.to_path_buf(),
                line: Some(i + 1),
                message: format!("not a JSON record: {e}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_transformers_tensorboard_callback() {
        assert_eq!(tensorboard_tag("loss"), "train/loss");
        assert_eq!(tensorboard_tag("learning_rate"), "train/learning_rate");
        assert_eq!(tensorboard_tag("eval_loss"), "eval/loss");
        assert_eq!(
            tensorboard_tag("eval_mean_token_accuracy"),
            "eval/mean_token_accuracy"
        );
        assert_eq!(tensorboard_tag("epoch"), "train/epoch");
    }

    #[test]
    fn a_bad_metrics_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"loss\": 1.0, \"step\": 1}\n\n{oops\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:3"), "{err}");
        let err = read_metrics(&dir.path().join("none.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("none.jsonl") && err.contains("--report-to"),
            "{err}"
        );
    }
}
