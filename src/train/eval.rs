//! Evaluation over a tokenized dataset: token-weighted `eval_loss`, `eval_mean_token_accuracy`,
//! `eval_entropy`, `eval_num_tokens`.

use crate::data::{collate, Example, Examples};
use crate::model::CausalLm;
use crate::ops::cross_entropy::LossOutput;
use crate::Result;
use candle_core::DType;
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
    /// Sum of the batches' router load-balancing losses (mixtures of experts that add it).
    pub aux_sum: f64,
    /// Sum of the batches' weighted load-balancing losses (`coef · aux_loss`).
    pub weighted_aux_sum: f64,
    /// Batches with a load-balancing loss.
    pub aux_batches: f64,
}

impl LossTotals {
    /// Adds another batch's totals.
    pub fn add(&mut self, o: &LossTotals) {
        self.loss_sum += o.loss_sum;
        self.loss_tokens += o.loss_tokens;
        self.correct_tokens += o.correct_tokens;
        self.entropy_sum += o.entropy_sum;
        self.entropy_tokens += o.entropy_tokens;
        self.aux_sum += o.aux_sum;
        self.weighted_aux_sum += o.weighted_aux_sum;
        self.aux_batches += o.aux_batches;
    }

    /// One batch's totals.
    pub fn of(out: &LossOutput) -> Result<Self> {
        let aux = out.aux_loss()?;
        let coef = out.router.as_ref().map_or(0.0, |r| r.coef);
        Ok(LossTotals {
            loss_sum: out.loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            loss_tokens: out.loss_tokens,
            correct_tokens: out.correct_tokens,
            entropy_sum: out.entropy_sum,
            entropy_tokens: out.entropy_tokens,
            aux_sum: aux.unwrap_or(0.0),
            weighted_aux_sum: coef * aux.unwrap_or(0.0),
            aux_batches: if aux.is_some() { 1.0 } else { 0.0 },
        })
    }

    /// Mean cross-entropy per loss token, plus the mean weighted load-balancing loss of the
    /// batches where the model adds one (TRL's loss then includes it).
    pub fn loss(&self) -> f64 {
        let aux = match self.aux_batches > 0.0 {
            true => self.weighted_aux_sum / self.aux_batches,
            false => 0.0,
        };
        self.loss_sum / self.loss_tokens.max(1.0) + aux
    }

    /// The batches' mean load-balancing loss (unweighted; TRL's `aux_loss`), where added.
    pub fn aux_loss(&self) -> Option<f64> {
        (self.aux_batches > 0.0).then(|| self.aux_sum / self.aux_batches)
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
        if let Some(aux) = self.aux_loss() {
            m.insert("eval_aux_loss".into(), aux.into());
        }
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
        totals.add(&LossTotals::of(&out)?);
    }
    Ok(totals)
}
