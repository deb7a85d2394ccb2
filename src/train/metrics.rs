//! Training metrics as TRL logs them (`loss`, `grad_norm`, `learning_rate`, `epoch`, `num_tokens`,
//! `mean_token_accuracy`, `entropy`, `aux_loss`, `eval_*`): averaged over each logging window, written to
//! `OUTPUT/metrics.jsonl` (`report::jsonl`) and shown on a progress bar.

use serde_json::{Map, Value};
use std::time::Instant;

/// The metrics of one optimizer step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepMetrics {
    /// Token-weighted mean cross-entropy of the step (plus the weighted router load-balancing
    /// loss where a mixture of experts adds it, as TRL's `loss`).
    pub loss: f64,
    /// The routers' load-balancing loss (unweighted), averaged over the step's micro-batches.
    pub aux_loss: Option<f64>,
    /// Pre-clip gradient norm.
    pub grad_norm: f64,
    /// Fraction of loss tokens predicted correctly (argmax).
    pub accuracy: f64,
    /// Mean predictive entropy over attended tokens.
    pub entropy: f64,
    /// Attended (non-padding) tokens in the step.
    pub tokens: usize,
}

/// Accumulates step metrics between log lines.
#[derive(Debug, Default)]
pub struct Window {
    steps: usize,
    loss: f64,
    accuracy: f64,
    entropy: f64,
    /// Sum and count of the steps' load-balancing losses.
    aux_loss: (f64, usize),
    last_grad_norm: f64,
    tokens: usize,
    started: Option<Instant>,
}

impl Window {
    /// Adds one step.
    pub fn add(&mut self, m: &StepMetrics) {
        self.started.get_or_insert_with(Instant::now);
        self.steps += 1;
        self.loss += m.loss;
        self.accuracy += m.accuracy;
        self.entropy += m.entropy;
        if let Some(aux) = m.aux_loss {
            self.aux_loss.0 += aux;
            self.aux_loss.1 += 1;
        }
        self.last_grad_norm = m.grad_norm;
        self.tokens += m.tokens;
    }

    /// Whether no step was added since the last flush.
    pub fn is_empty(&self) -> bool {
        self.steps == 0
    }

    /// Tokens per second since the window opened.
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        if secs > 0.0 {
            self.tokens as f64 / secs
        } else {
            0.0
        }
    }

    /// The log entry for this window, TRL's names; resets the window.
    pub fn flush(
        &mut self,
        learning_rate: f64,
        epoch: f64,
        num_tokens: usize,
        step: usize,
    ) -> Map<String, Value> {
        let n = self.steps.max(1) as f64;
        let mut entry = Map::new();
        entry.insert("loss".into(), round(self.loss / n));
        entry.insert("grad_norm".into(), round(self.last_grad_norm));
        entry.insert("learning_rate".into(), Value::from(learning_rate));
        entry.insert("entropy".into(), round(self.entropy / n));
        entry.insert("num_tokens".into(), Value::from(num_tokens as f64));
        entry.insert("mean_token_accuracy".into(), round(self.accuracy / n));
        if self.aux_loss.1 > 0 {
            let mean = self.aux_loss.0 / self.aux_loss.1 as f64;
            entry.insert("aux_loss".into(), round(mean));
        }
        entry.insert("epoch".into(), round(epoch));
        entry.insert("step".into(), Value::from(step));
        *self = Window::default();
        entry
    }
}

fn round(x: f64) -> Value {
    Value::from((x * 1e6).round() / 1e6)
}
