//! The LM head and the token cross-entropy in one chunked op: the full `[n, vocab]` logits are
//! never held; each chunk of rows is projected, reduced, and recomputed in the backward.
//! The same pass yields TRL's `mean_token_accuracy` and `entropy`.

use super::graft::graft2;
use candle_core::{DType, Result, Tensor, D};

/// Per-row targets of a flattened batch.
#[derive(Debug, Clone)]
pub struct LossTargets {
    /// Next-token id for each row (any id where the weight is 0).
    pub target_ids: Vec<u32>,
    /// Loss weight per row: 1 for tokens the loss trains on, 0 elsewhere.
    pub loss_weight: Vec<f32>,
    /// Weight of each row in the entropy average (TRL averages over attended tokens).
    pub entropy_weight: Vec<f32>,
}

/// The result of [`lm_head_loss`].
#[derive(Debug)]
pub struct LossOutput {
    /// Sum of weighted token cross-entropies (a tracked scalar: call `backward` on a scaled copy).
    pub loss_sum: Tensor,
    /// Sum of loss weights (number of loss tokens).
    pub loss_tokens: f64,
    /// Loss tokens whose argmax prediction equals the target.
    pub correct_tokens: f64,
    /// Sum of predictive entropies over rows with entropy weight.
    pub entropy_sum: f64,
    /// Sum of entropy weights.
    pub entropy_tokens: f64,
}

/// Rows per chunk so that one chunk's logits stay near 16M values.
fn chunk_rows(vocab: usize) -> usize {
    (16 * 1024 * 1024 / vocab.max(1)).max(1)
}

/// Cross-entropy of `hidden @ head^T` against the targets, summed with the loss weights.
/// The head weight gets a gradient only when it is trainable (full fine-tuning).
///
/// hidden: [n, h], head: [vocab, h]; targets have n rows.
pub fn lm_head_loss(hidden: &Tensor, head: &Tensor, targets: &LossTargets) -> Result<LossOutput> {
    let n = hidden.dim(0)?;
    if targets.target_ids.len() != n
        || targets.loss_weight.len() != n
        || targets.entropy_weight.len() != n
    {
        candle_core::bail!("lm_head_loss: {n} rows but targets of another length");
    }
    let device = hidden.device().clone();
    let (hd, wd) = (hidden.detach(), head.detach());
    let chunk = chunk_rows(wd.dim(0)?);
    let mut loss_sum = 0f64;
    let mut correct = 0f64;
    let mut entropy_sum = 0f64;
    let mut lse_chunks = Vec::new();
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let logits = hd
            .narrow(0, start, len)?
            .matmul(&wd.t()?)?
            .to_dtype(DType::F32)?;
        let ids = Tensor::from_slice(&targets.target_ids[start..start + len], (len, 1), &device)?;
        let loss_w = Tensor::from_slice(&targets.loss_weight[start..start + len], len, &device)?;
        let ent_w = Tensor::from_slice(&targets.entropy_weight[start..start + len], len, &device)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let exp = shifted.exp()?;
        let sum_exp = exp.sum_keepdim(D::Minus1)?;
        let lse = (sum_exp.log()? + &max)?;
        let target_logit = logits.gather(&ids, 1)?;
        let ce = (&lse - target_logit)?.squeeze(1)?;
        loss_sum += (&ce * &loss_w)?.sum_all()?.to_scalar::<f32>()? as f64;
        let hits = logits
            .argmax(D::Minus1)?
            .eq(&ids.squeeze(1)?)?
            .to_dtype(DType::F32)?;
        correct += (hits * &loss_w)?.sum_all()?.to_scalar::<f32>()? as f64;
        // entropy = lse - sum(p * logits)
        let expected_logit = (exp.broadcast_div(&sum_exp)? * &logits)?.sum(D::Minus1)?;
        let entropy = (lse.squeeze(1)? - expected_logit)?;
        entropy_sum += (entropy * &ent_w)?.sum_all()?.to_scalar::<f32>()? as f64;
        lse_chunks.push(lse);
    }
    let loss_tokens: f64 = targets.loss_weight.iter().map(|&w| w as f64).sum();
    let entropy_tokens: f64 = targets.entropy_weight.iter().map(|&w| w as f64).sum();
    let out = Tensor::new(loss_sum as f32, &device)?.to_dtype(hidden.dtype())?;
    let target_ids = targets.target_ids.clone();
    let loss_weight = targets.loss_weight.clone();
    let loss_sum = graft2(
        "lm-head-loss",
        hidden,
        head,
        out,
        Box::new(move |h, w, g, needs| {
            let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let device = h.device();
            let mut grad_h = Vec::new();
            let mut grad_w: Option<Tensor> = None;
            for (i, start) in (0..n).step_by(chunk).enumerate() {
                let len = chunk.min(n - start);
                let h_chunk = h.narrow(0, start, len)?;
                let logits = h_chunk.matmul(&w.t()?)?.to_dtype(DType::F32)?;
                let probs = logits.broadcast_sub(&lse_chunks[i])?.exp()?;
                let ids = Tensor::from_slice(&target_ids[start..start + len], (len, 1), device)?;
                let ones = Tensor::ones((len, 1), DType::F32, device)?;
                let onehot = probs.zeros_like()?.scatter_add(&ids, &ones, 1)?;
                let weight: Vec<f32> = loss_weight[start..start + len]
                    .iter()
                    .map(|w| w * g)
                    .collect();
                let weight = Tensor::from_vec(weight, (len, 1), device)?;
                let grad_logits = (probs - onehot)?
                    .broadcast_mul(&weight)?
                    .to_dtype(h.dtype())?;
                if needs[0] {
                    grad_h.push(grad_logits.matmul(w)?);
                }
                if needs[1] {
                    let gw = grad_logits.t()?.matmul(&h_chunk)?;
                    grad_w = Some(match grad_w {
                        Some(acc) => (acc + gw)?,
                        None => gw,
                    });
                }
            }
            let grad_h = needs[0].then(|| Tensor::cat(&grad_h, 0)).transpose()?;
            Ok((grad_h, grad_w))
        }),
    )?;
    Ok(LossOutput {
        loss_sum,
        loss_tokens,
        correct_tokens: correct,
        entropy_sum,
        entropy_tokens,
    })
}
