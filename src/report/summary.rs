//! The end-of-run summary: which checkpoint had the lowest eval loss, and warnings a user should
//! act on (eval loss rising while train loss falls; a train loss that never moved). Also
//! `--load-best-model-at-end`: the best checkpoint's weights copied to the output folder.

use crate::{Error, Result};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// Evaluations looked at for the overfitting warning (the last ones of the run).
pub const OVERFIT_WINDOW: usize = 3;
/// Smallest rise of the eval loss over [`OVERFIT_WINDOW`], relative to its start, that warns.
pub const OVERFIT_MIN_RISE: f64 = 0.01;
/// A train loss whose first-to-last relative change is below this "never moved".
pub const FLAT_LOSS_CHANGE: f64 = 0.01;

/// Files of a checkpoint that hold training state, not the model: `--load-best-model-at-end`
/// leaves them behind.
pub const TRAINING_STATE_FILES: &[&str] = &[
    "optimizer.safetensors",
    "scheduler.json",
    "rng_state.json",
    "trainer_state.json",
    "training_config.json",
];

/// The checkpoint with the lowest eval loss.
#[derive(Debug, Clone, PartialEq)]
pub struct BestCheckpoint {
    /// Its folder (`OUTPUT/checkpoint-N`).
    pub path: String,
    /// Its eval loss.
    pub eval_loss: f64,
}

/// Something in the log a user should act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Warning {
    /// Over the last evaluations the eval loss rose every time while the train loss fell.
    Overfitting {
        /// Step of the first evaluation of the window.
        from_step: i64,
        /// Step of the last evaluation.
        to_step: i64,
        /// Eval loss at `from_step` and at `to_step`.
        eval_loss: (f64, f64),
        /// Latest train loss logged at or before `from_step` and `to_step`.
        train_loss: (f64, f64),
    },
    /// The train loss changed by less than [`FLAT_LOSS_CHANGE`] from its first to its last log.
    LossFlat {
        /// Steps of the first and last train log.
        steps: (i64, i64),
        /// The first and last train loss.
        loss: (f64, f64),
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::Overfitting {
                from_step,
                to_step,
                eval_loss,
                train_loss,
            } => write!(
                f,
                "eval loss rose from {:.4} (step {from_step}) to {:.4} (step {to_step}) while train \
                 loss fell from {:.4} to {:.4}: the model is overfitting. Use the best checkpoint \
                 (--load-best-model-at-end copies it to the output folder), fewer epochs, or more data",
                eval_loss.0, eval_loss.1, train_loss.0, train_loss.1
            ),
            Warning::LossFlat { steps, loss } => write!(
                f,
                "the train loss barely moved ({:.4} at step {} -> {:.4} at step {}, {:+.2}%): raise \
                 --learning-rate, train longer, or check that the loss covers the tokens to learn \
                 (peft-sft data inspect)",
                loss.0,
                steps.0,
                loss.1,
                steps.1,
                100.0 * (loss.1 - loss.0) / loss.0.abs().max(f64::MIN_POSITIVE)
            ),
        }
    }
}

/// What `peft-sft train` reports when it finishes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunSummary {
    /// The checkpoint with the lowest eval loss (transformers' `best_model_checkpoint`).
    pub best_checkpoint: Option<BestCheckpoint>,
    /// The lowest eval loss of the run and its step, checkpointed or not.
    pub lowest_eval: Option<(i64, f64)>,
    /// What to act on.
    pub warnings: Vec<Warning>,
}

/// The (step, value) points of `key` in `history`.
fn points(history: &[Value], key: &str) -> Vec<(i64, f64)> {
    history
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_i64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// The step of a `checkpoint-N` folder.
fn checkpoint_step(path: &str) -> Option<i64> {
    Path::new(path)
        .file_name()?
        .to_str()?
        .strip_prefix("checkpoint-")?
        .parse()
        .ok()
}

/// Summarizes a run from its log history (the records of `metrics.jsonl`) and the trainer
/// state's `best_model_checkpoint` / `best_metric`.
pub fn summarize(
    history: &[Value],
    best_model_checkpoint: Option<&str>,
    best_metric: Option<f64>,
) -> RunSummary {
    let train = points(history, "loss");
    let eval = points(history, "eval_loss");
    let best_checkpoint = best_model_checkpoint.and_then(|path| {
        let step = checkpoint_step(path);
        let eval_loss = eval
            .iter()
            .rev()
            .find(|&&(s, _)| Some(s) == step)
            .map(|&(_, v)| v)
            .or(best_metric)?;
        Some(BestCheckpoint {
            path: path.to_string(),
            eval_loss,
        })
    });
    let lowest_eval =
        eval.iter()
            .copied()
            .fold(None, |best: Option<(i64, f64)>, (s, v)| match best {
                Some((_, b)) if b <= v => best,
                _ => Some((s, v)),
            });
    let mut warnings = Vec::new();
    if let Some(w) = overfitting(&train, &eval) {
        warnings.push(w);
    }
    if let (Some(&first), Some(&last)) = (train.first(), train.last()) {
        let change = (last.1 - first.1).abs() / first.1.abs().max(f64::MIN_POSITIVE);
        if train.len() >= 2 && change < FLAT_LOSS_CHANGE {
            warnings.push(Warning::LossFlat {
                steps: (first.0, last.0),
                loss: (first.1, last.1),
            });
        }
    }
    RunSummary {
        best_checkpoint,
        lowest_eval,
        warnings,
    }
}

/// The overfitting warning: over the last [`OVERFIT_WINDOW`] evaluations (at least 2) the eval
/// loss rose at each one, by [`OVERFIT_MIN_RISE`] in all, while the train loss fell.
fn overfitting(train: &[(i64, f64)], eval: &[(i64, f64)]) -> Option<Warning> {
    let window = &eval[eval.len().saturating_sub(OVERFIT_WINDOW)..];
    let (&(from_step, eval_first), &(to_step, eval_last)) = (window.first()?, window.last()?);
    let rising = window.len() >= 2 && window.windows(2).all(|w| w[1].1 > w[0].1);
    if !rising || eval_last - eval_first < OVERFIT_MIN_RISE * eval_first.abs() {
        return None;
    }
    let train_at = |step: i64| {
        train
            .iter()
            .rev()
            .find(|&&(s, _)| s <= step)
            .map(|&(_, v)| v)
    };
    let (train_first, train_last) = (train_at(from_step)?, train_at(to_step)?);
    (train_last < train_first).then_some(Warning::Overfitting {
        from_step,
        to_step,
        eval_loss: (eval_first, eval_last),
        train_loss: (train_first, train_last),
    })
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(best) = &self.best_checkpoint {
            writeln!(
                f,
                "best checkpoint: {} (eval_loss {:.4})",
                best.path, best.eval_loss
            )?;
        }
        if let Some((step, loss)) = self.lowest_eval {
            let checkpointed = self
                .best_checkpoint
                .as_ref()
                .is_some_and(|b| checkpoint_step(&b.path) == Some(step));
            if !checkpointed {
                writeln!(
                    f,
                    "lowest eval_loss {loss:.4} was at step {step}, which has no checkpoint \
                     (make --save-steps a multiple of --eval-steps to keep it)"
                )?;
            }
        }
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        Ok(())
    }
}

/// Copies the model files of `checkpoint` (adapter or full model, tokenizer files; not
/// [`TRAINING_STATE_FILES`]) into `output_dir`, each written to a temporary file and renamed.
/// Returns the files written.
pub fn load_best_model(checkpoint: &Path, output_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(checkpoint).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: checkpoint.to_path_buf(),
            hint: "the best checkpoint was deleted; train again or copy another checkpoint's \
                   files to the output folder"
                .into(),
        },
        _ => Error::io(checkpoint, e),
    })?;
    let mut sources: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !TRAINING_STATE_FILES.contains(&n))
        })
        .collect();
    sources.sort();
    let mut written = Vec::with_capacity(sources.len());
    for source in sources {
        let Some(name) = source.file_name() else {
            continue;
        };
        let dest = output_dir.join(name);
        crate::io::write_atomic(&dest, |tmp| {
            std::fs::copy(&source, tmp)
                .map(drop)
                .map_err(|e| Error::io(&source, e))
        })?;
        written.push(dest);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn train_log(step: i64, loss: f64) -> Value {
        json!({"loss": loss, "learning_rate": 1e-4, "step": step})
    }

    fn eval_log(step: i64, loss: f64) -> Value {
        json!({"eval_loss": loss, "step": step})
    }

    #[test]
    fn warns_when_eval_rises_while_train_falls() {
        let history = vec![
            train_log(10, 2.0),
            eval_log(10, 1.9),
            train_log(20, 1.5),
            eval_log(20, 1.6),
            train_log(30, 1.0),
            eval_log(30, 1.7),
            train_log(40, 0.6),
            eval_log(40, 1.9),
        ];
        let summary = summarize(&history, Some("out/checkpoint-20"), Some(1.6));
        assert_eq!(
            summary.best_checkpoint,
            Some(BestCheckpoint {
                path: "out/checkpoint-20".into(),
                eval_loss: 1.6
            })
        );
        assert_eq!(summary.lowest_eval, Some((20, 1.6)));
        assert_eq!(
            summary.warnings,
            vec![Warning::Overfitting {
                from_step: 20,
                to_step: 40,
                eval_loss: (1.6, 1.9),
                train_loss: (1.5, 0.6),
            }]
        );
        let text = summary.to_string();
        assert!(
            text.contains("best checkpoint: out/checkpoint-20 (eval_loss 1.6000)"),
            "{text}"
        );
        assert!(text.contains("overfitting"), "{text}");
        assert!(!text.contains("has no checkpoint"), "{text}");
    }

    #[test]
    fn no_overfitting_warning_when_eval_falls_or_wobbles() {
        let falling = vec![
            train_log(1, 2.0),
            eval_log(1, 2.1),
            train_log(2, 1.5),
            eval_log(2, 1.8),
            train_log(3, 1.0),
            eval_log(3, 1.6),
        ];
        assert!(summarize(&falling, None, None).warnings.is_empty());
        // Up, down, up: not a trend.
        let wobbling = vec![
            train_log(1, 2.0),
            eval_log(1, 1.6),
            eval_log(2, 1.8),
            eval_log(3, 1.7),
            train_log(4, 1.0),
            eval_log(4, 1.9),
        ];
        assert!(summarize(&wobbling, None, None).warnings.is_empty());
        // Rising by less than 1% in all is noise.
        let noise = vec![
            train_log(1, 2.0),
            eval_log(1, 1.600),
            train_log(2, 1.0),
            eval_log(2, 1.601),
        ];
        assert!(summarize(&noise, None, None).warnings.is_empty());
    }

    #[test]
    fn warns_when_the_train_loss_never_moved() {
        let history = vec![train_log(1, 7.17), train_log(2, 7.15), train_log(3, 7.16)];
        let summary = summarize(&history, None, None);
        assert_eq!(
            summary.warnings,
            vec![Warning::LossFlat {
                steps: (1, 3),
                loss: (7.17, 7.16)
            }]
        );
        assert!(summary.to_string().contains("barely moved"));
        let learning = vec![train_log(1, 7.0), train_log(2, 6.5)];
        assert!(summarize(&learning, None, None).warnings.is_empty());
        assert!(summarize(&history[..1], None, None).warnings.is_empty());
    }

    #[test]
    fn names_an_uncheckpointed_lowest_eval() {
        let history = vec![
            train_log(2, 2.0),
            eval_log(2, 1.5),
            train_log(3, 1.0),
            eval_log(3, 1.2),
        ];
        let text = summarize(&history, Some("o/checkpoint-2"), Some(1.5)).to_string();
        assert!(
            text.contains("best checkpoint: o/checkpoint-2 (eval_loss 1.5000)"),
            "{text}"
        );
        assert!(
            text.contains("lowest eval_loss 1.2000 was at step 3"),
            "{text}"
        );
    }

    #[test]
    fn load_best_model_copies_weights_not_training_state() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("checkpoint-2");
        std::fs::create_dir_all(&checkpoint).unwrap();
        for name in ["adapter_model.safetensors", "adapter_config.json"]
            .iter()
            .chain(TRAINING_STATE_FILES)
        {
            std::fs::write(checkpoint.join(name), format!("best {name}")).unwrap();
        }
        std::fs::write(dir.path().join("adapter_model.safetensors"), "last").unwrap();
        let written = load_best_model(&checkpoint, dir.path()).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("adapter_model.safetensors")).unwrap(),
            "best adapter_model.safetensors"
        );
        assert!(!dir.path().join("optimizer.safetensors").exists());
        let err = load_best_model(&dir.path().join("checkpoint-9"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checkpoint-9") && err.contains("deleted"),
            "{err}"
        );
    }
}
