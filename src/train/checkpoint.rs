//! Checkpoints: `OUTPUT/checkpoint-N/` holds the trainable weights (PEFT adapter or full model),
//! the optimizer state, the scheduler step, the RNG state and `trainer_state.json` with the log
//! history. Each is written to a temporary folder and renamed into place.

use crate::config::SftConfig;
use crate::io::{read_json, write_json};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// transformers' `TrainerState`, the fields peft-sft reads back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Planned steps.
    pub max_steps: usize,
    /// Logging interval.
    pub logging_steps: usize,
    /// Evaluation interval.
    pub eval_steps: usize,
    /// Checkpoint interval.
    pub save_steps: usize,
    /// Micro-batch size.
    pub train_batch_size: usize,
    /// Attended tokens trained on so far.
    pub num_input_tokens_seen: usize,
    /// Every log entry so far.
    pub log_history: Vec<serde_json::Value>,
    /// Lowest eval loss seen.
    pub best_metric: Option<f64>,
    /// The checkpoint with the lowest eval loss.
    pub best_model_checkpoint: Option<String>,
}

/// The state file's name.
pub const STATE_FILE: &str = "trainer_state.json";

/// The folder of the checkpoint at `step`.
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes a checkpoint by calling `write` on a temporary folder, then renaming it to
/// `checkpoint-{step}`.
pub fn save(
    output_dir: &Path,
    step: usize,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!(".checkpoint-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write(&tmp) {
        // Nothing half-written stays behind (a full disk gets its space back).
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(match e {
            Error::NoSpace { .. } => Error::NoSpace {
                needed_mib: list(output_dir)
                    .last()
                    .map(|(_, previous)| folder_bytes(previous).div_ceil(1 << 20)),
                path: dir,
            },
            e => e,
        });
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Bytes of the files directly in `dir` (a checkpoint folder has no subfolders).
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Checkpoint folders in `output_dir`, oldest step first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).exists().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Deletes the oldest checkpoints beyond `limit`, never the best one.
pub fn rotate(output_dir: &Path, limit: usize, best: Option<&str>) -> Result<()> {
    let all = list(output_dir);
    let excess = all.len().saturating_sub(limit);
    for (_, dir) in all
        .into_iter()
        .filter(|(_, d)| best.is_none_or(|b| Path::new(b) != d))
        .take(excess)
    {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// A checkpoint folder from `--resume-from-checkpoint` (a path, or `latest` in `output_dir`).
pub fn resolve(spec: &str, output_dir: &Path) -> Result<PathBuf> {
    let dir = if spec == "latest" {
        list(output_dir)
            .pop()
            .map(|(_, d)| d)
            .ok_or_else(|| Error::MissingFile {
                path: output_dir.join("checkpoint-*"),
                hint: "--resume-from-checkpoint latest found no checkpoint in the output folder"
                    .into(),
            })?
    } else {
        PathBuf::from(spec)
    };
    if !dir.join(STATE_FILE).exists() {
        return Err(Error::MissingFile {
            path: dir.join(STATE_FILE),
            hint: "not a peft-sft checkpoint folder".into(),
        });
    }
    Ok(dir)
}

/// Reads `trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    read_json(&dir.join(STATE_FILE))
}

/// Writes `trainer_state.json`.
pub fn write_state(dir: &Path, state: &TrainerState) -> Result<()> {
    write_json(&dir.join(STATE_FILE), state)
}

/// Where the learning-rate schedule stands at a checkpoint (`scheduler.json`).
#[derive(Debug, Clone, Copy)]
pub struct ScheduleAt {
    /// Optimizer steps done (`last_epoch`, as torch's schedulers count).
    pub step: usize,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Planned steps.
    pub total_steps: usize,
}

/// Writes a checkpoint's files besides the weights and the optimizer state: `scheduler.json`,
/// `rng_state.json` (the counter-based scheme: nothing to restore but the step),
/// `training_config.json` and `trainer_state.json`.
pub fn write_run_files(
    dir: &Path,
    config: &SftConfig,
    schedule: ScheduleAt,
    state: &TrainerState,
) -> Result<()> {
    write_json(
        &dir.join("scheduler.json"),
        &serde_json::json!({
            "last_epoch": schedule.step,
            "lr_scheduler_type": config.lr_scheduler_type,
            "warmup_steps": schedule.warmup_steps,
            "total_steps": schedule.total_steps,
            "base_learning_rate": config.learning_rate,
        }),
    )?;
    write_json(
        &dir.join("rng_state.json"),
        &serde_json::json!({
            "seed": config.seed,
            "scheme": "counter-based: shuffle = permutation(seed, epoch); dropout = mix(seed, step, micro_batch, module)",
            "next_step": schedule.step,
        }),
    )?;
    write_json(&dir.join("training_config.json"), config)?;
    write_state(dir, state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_and_the_best() {
        let tmp = tempfile::tempdir().unwrap();
        for step in [2, 4, 6, 8] {
            save(tmp.path(), step, |dir| {
                write_state(dir, &TrainerState::default())
            })
            .unwrap();
        }
        let best = checkpoint_dir(tmp.path(), 2).to_string_lossy().into_owned();
        rotate(tmp.path(), 2, Some(&best)).unwrap();
        let left: Vec<usize> = list(tmp.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![2, 8]);
        assert_eq!(
            resolve("latest", tmp.path()).unwrap(),
            checkpoint_dir(tmp.path(), 8)
        );
        assert!(resolve("latest", &tmp.path().join("none")).is_err());
    }
}
