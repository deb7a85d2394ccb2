//! Evaluation over a tokenized dataset: token-weighted `eval_loss`, `eval_mean_token_accuracy`,
//! `eval_entropy`, `eval_num_tokens`.

use crate::data::{collate, Example, Examples};
use crate::model::CausalLm;
use crate::Result;
use serde_json::{Map, Value};

/// Totals of a loss pass over batches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossTotals {
    /// Sum of token cross-entropies.
    pub loss_sum: f64,
    /// Number of loss tokens.
    pub loss_tokens: f64,
    /// Loss tokens predicted correctly.
    pub correct_tokens: f64,
    /// Sum of per-token entropies.
    pub entropy_sum: f64,
    /// Tokens in the entropy average (attended tokens).
    pub entropy_tokens: f64,
}

impl LossTotals {
    /// Adds another batch's totals.
    pub fn add(&mut self, o: &LossTotals) {
        self.loss_sum += o.loss_sum;
        self.loss_tokens += o.loss_tokens;
        self.correct_tokens += o.correct_tokens;
        self.entropy_sum += o.entropy_sum;
        self.entropy_tokens += o.entropy_tokens;
    }

    /// Mean cross-entropy per loss token.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.loss_tokens.max(1.0)
    }

    /// Fraction of loss tokens predicted correctly.
    pub fn accuracy(&self) -> f64 {
        self.correct_tokens / self.loss_tokens.max(1.0)
    }

    /// Mean entropy per attended token.
    pub fn entropy(&self) -> f64 {
        self.entropy_sum / self.entropy_tokens.max(1.0)
    }

    /// The metrics with TRL's `eval_` names.
    pub fn eval_metrics(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("eval_loss".into(), self.loss().into());
        m.insert("eval_mean_token_accuracy".into(), self.accuracy().into());
        m.insert("eval_entropy".into(), self.entropy().into());
        m.insert("eval_num_tokens".into(), (self.loss_tokens as u64).into());
        m
    }
}

/// Runs the model over `examples` in order, `batch_size` at a time, without dropout.
pub fn evaluate(
    model: &CausalLm,
    examples: &Examples,
    batch_size: usize,
    pad_id: u32,
) -> Result<LossTotals> {
    let mut totals = LossTotals::default();
    let all: Vec<usize> = (0..examples.len()).collect();
    for chunk in all.chunks(batch_size.max(1)) {
        let owned: Vec<Example> = chunk.iter().map(|&i| examples.get(i)).collect();
        let refs: Vec<&Example> = owned.iter().collect();
        let batch = collate(&refs, pad_id, &model.device)?;
        let out = model.batch_loss(&batch, None)?;
        totals.add(&LossTotals {
            loss_sum: out
                .loss_sum
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?,
            loss_tokens: out.loss_tokens,
            correct_tokens: out.correct_tokens,
            entropy_sum: out.entropy_sum,
            entropy_tokens: out.entropy_tokens,
        });
    }
    Ok(totals)
}
