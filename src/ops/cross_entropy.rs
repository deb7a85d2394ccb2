//! The LM head and the token cross-entropy in one chunked op: the full `[n, vocab]` logits are
//! never held; each chunk of rows is projected, reduced, and recomputed in the backward.
//! The same pass yields TRL's `mean_token_accuracy` and `entropy`.

use super::cpu::{self, cross_entropy::ChunkSums};
use super::graft::{grad_enabled, graft2};
use super::kernel::Kernel;
use super::router::RouterLoss;
use candle_core::{DType, Result, Tensor, D};

/// Which token loss the LM head trains with (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossKind {
    /// Negative log-likelihood (cross-entropy), TRL's `nll`.
    #[default]
    Nll,
    /// Dynamic Fine-Tuning (TRL's `dft`): each token's `-log p` weighed by its probability `p`,
    /// detached (arXiv 2508.05629).
    Dft,
}

/// Per-row targets of a flattened batch.
#[derive(Debug, Clone)]
pub struct LossTargets {
    /// Next-token id for each row (any id where the weight is 0).
    pub target_ids: Vec<u32>,
    /// Loss weight per row: 1 for tokens the loss trains on, 0 elsewhere.
    pub loss_weight: Vec<f32>,
    /// Weight of each row in the entropy average (TRL averages over attended tokens).
    pub entropy_weight: Vec<f32>,
    /// The token loss.
    pub kind: LossKind,
    /// Gemma 2's `final_logit_softcapping`: the logits are `cap · tanh(logits / cap)`.
    pub softcap: Option<f64>,
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
    /// A mixture of experts' load-balancing loss, when the model adds it (see
    /// [`LossOutput::objective`]).
    pub router: Option<RouterLoss>,
}

impl LossOutput {
    /// The scalar to back-propagate: `loss_scale · loss_sum`, plus `aux_scale · coef · aux_loss`
    /// when the model adds its routers' load-balancing loss (`router`; its gradient reaches the
    /// router probabilities through the layers, whose record this call seals). A trainer that
    /// normalises by the step's loss tokens passes `1 / tokens` and, as TRL, `1 / micro-batches`.
    pub fn objective(&self, loss_scale: f64, aux_scale: f64) -> Result<Tensor> {
        if let Some(router) = &self.router {
            router.set_scale(aux_scale, self.loss_sum.device())?;
        }
        self.loss_sum.affine(loss_scale, 0.0)
    }

    /// The routers' load-balancing loss (unweighted, transformers' `aux_loss`), when added.
    pub fn aux_loss(&self) -> Result<Option<f64>> {
        match &self.router {
            Some(router) => router.value(),
            None => Ok(None),
        }
    }
}

/// Rows per chunk so that one chunk's logits stay near 16M values.
pub(crate) fn chunk_rows(vocab: usize) -> usize {
    (16 * 1024 * 1024 / vocab.max(1)).max(1)
}

/// Cross-entropy of `hidden @ head^T` against the targets, summed with the loss weights.
/// The head weight gets a gradient only when it is trainable (full fine-tuning).
///
/// The loss is a scalar, so its gradient is known up to the incoming scale while the chunk's
/// logits are at hand: each chunk's `d loss / d hidden` (and `d loss / d head` when the head
/// trains) is computed in the forward pass, and the backward only scales it. No logits are kept
/// or recomputed.
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
    let grad = grad_enabled();
    let (want_grad_h, want_grad_w) = (grad && hidden.track_op(), grad && head.track_op());
    let wanted = (want_grad_h, want_grad_w);
    let sums = chunks(&hd, &wd, targets, wanted, chunk_rows(wd.dim(0)?))?;
    let ChunkSums {
        loss_sum,
        correct,
        entropy_sum,
        grad_h,
        grad_w,
    } = sums;
    let loss_tokens: f64 = targets.loss_weight.iter().map(|&w| w as f64).sum();
    let entropy_tokens: f64 = targets.entropy_weight.iter().map(|&w| w as f64).sum();
    let out = Tensor::new(loss_sum as f32, &device)?.to_dtype(hidden.dtype())?;
    let loss_sum = graft2(
        "lm-head-loss",
        hidden,
        head,
        out,
        Box::new(move |_, _, g, needs| {
            let scale = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let scaled = |t: &Option<Tensor>, needed: bool| -> Result<Option<Tensor>> {
                match t {
                    Some(t) if needed => Ok(Some(t.affine(scale, 0.0)?)),
                    _ => Ok(None),
                }
            };
            Ok((scaled(&grad_h, needs[0])?, scaled(&grad_w, needs[1])?))
        }),
    )?;
    Ok(LossOutput {
        loss_sum,
        loss_tokens,
        correct_tokens: correct,
        entropy_sum,
        entropy_tokens,
        router: None,
    })
}

/// The loss's dispatch point: the chunk loop in the native kernel for f32 on the CPU, with the
/// fused CUDA row pass on a GPU (f32 or bf16), in candle ops elsewhere.
fn chunks(
    hd: &Tensor,
    wd: &Tensor,
    targets: &LossTargets,
    wanted: (bool, bool),
    chunk: usize,
) -> Result<ChunkSums> {
    match Kernel::of(&[hd, wd]) {
        Kernel::Cpu => {
            let dft = targets.kind == LossKind::Dft;
            let cap = targets.softcap.map(|c| c as f32);
            cpu::cross_entropy::chunks(hd, wd, rows_of(targets), wanted, chunk, (dft, cap))
        }
        // The fused CUDA row pass has no soft cap: candle's ops run capped heads.
        #[cfg(feature = "cuda")]
        Kernel::Cuda if targets.softcap.is_none() => chunks_cuda(hd, wd, targets, wanted, chunk),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => chunks_candle(hd, wd, targets, wanted, chunk),
        Kernel::Composed => chunks_candle(hd, wd, targets, wanted, chunk),
    }
}

/// The targets as the native kernel reads them: ids, loss weights, entropy weights.
fn rows_of(t: &LossTargets) -> (&[u32], &[f32], &[f32]) {
    (&t.target_ids, &t.loss_weight, &t.entropy_weight)
}

/// The chunk loop on a GPU: each chunk's logits by candle's matmul (cuBLAS), in f32; one fused
/// pass per row ([`super::cuda::cross_entropy_rows`]) for the loss, accuracy and entropy sums and,
/// when wanted, the logits' gradient (instead of a dozen candle ops and their temporaries); the
/// gradients' products by candle's matmul again.
#[cfg(feature = "cuda")]
fn chunks_cuda(
    hd: &Tensor,
    wd: &Tensor,
    targets: &LossTargets,
    (want_grad_h, want_grad_w): (bool, bool),
    chunk: usize,
) -> Result<ChunkSums> {
    let (n, vocab) = (hd.dim(0)?, wd.dim(0)?);
    if let Some(&bad) = targets.target_ids.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("lm_head_loss: target id {bad} is outside the vocabulary of {vocab}");
    }
    let device = hd.device().clone();
    let mut sums = [0f64; 3];
    let mut grad_h = Vec::new();
    let mut grad_w: Option<Tensor> = None;
    for start in (0..n).step_by(chunk.max(1)) {
        let len = chunk.min(n - start);
        let rows = start..start + len;
        let h_chunk = hd.narrow(0, start, len)?;
        let logits = h_chunk.matmul(&wd.t()?)?.to_dtype(DType::F32)?;
        let ids = Tensor::from_slice(&targets.target_ids[rows.clone()], len, &device)?;
        let loss_w = Tensor::from_slice(&targets.loss_weight[rows.clone()], len, &device)?;
        let ent_w = Tensor::from_slice(&targets.entropy_weight[rows], len, &device)?;
        let (stats, grad_logits) = super::cuda::cross_entropy_rows(
            &logits,
            &ids,
            (&loss_w, &ent_w),
            (want_grad_h || want_grad_w, targets.kind == LossKind::Dft),
        )?;
        drop(logits);
        for (sum, part) in sums.iter_mut().zip(stats.sum(0)?.to_vec1::<f32>()?) {
            *sum += part as f64;
        }
        if let Some(grad_logits) = grad_logits {
            let grad_logits = grad_logits.to_dtype(hd.dtype())?;
            if want_grad_h {
                grad_h.push(grad_logits.matmul(wd)?);
            }
            if want_grad_w {
                let gw = grad_logits.t()?.matmul(&h_chunk)?;
                grad_w = Some(match grad_w {
                    Some(acc) => (acc + gw)?,
                    None => gw,
                });
            }
        }
    }
    Ok(ChunkSums {
        loss_sum: sums[0],
        correct: sums[1],
        entropy_sum: sums[2],
        grad_h: want_grad_h.then(|| Tensor::cat(&grad_h, 0)).transpose()?,
        grad_w,
    })
}

/// The chunk loop with candle ops (every device).
fn chunks_candle(
    hd: &Tensor,
    wd: &Tensor,
    targets: &LossTargets,
    wanted: (bool, bool),
    chunk: usize,
) -> Result<ChunkSums> {
    let (want_grad_h, want_grad_w) = wanted;
    let device = hd.device().clone();
    let n = hd.dim(0)?;
    let mut loss_sum = 0f64;
    let mut correct = 0f64;
    let mut entropy_sum = 0f64;
    let mut grad_h = Vec::new();
    let mut grad_w: Option<Tensor> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let h_chunk = hd.narrow(0, start, len)?;
        let raw = h_chunk.matmul(&wd.t()?)?.to_dtype(DType::F32)?;
        // With a soft cap, the logits and the slope `1 - tanh²` their gradient passes through.
        let (logits, slope) = match targets.softcap {
            Some(cap) => {
                let t = (raw / cap)?.tanh()?;
                let slope = t.sqr()?.affine(-1.0, 1.0)?;
                ((t * cap)?, Some(slope))
            }
            None => (raw, None),
        };
        let ids = Tensor::from_slice(&targets.target_ids[start..start + len], (len, 1), &device)?;
        let loss_w =
            Tensor::from_slice(&targets.loss_weight[start..start + len], (len, 1), &device)?;
        let ent_w = Tensor::from_slice(&targets.entropy_weight[start..start + len], len, &device)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let sum_exp = exp.sum_keepdim(D::Minus1)?;
        let lse = (sum_exp.log()? + &max)?;
        let target_logit = logits.gather(&ids, 1)?;
        let ce = (&lse - target_logit)?;
        // DFT weighs each token's loss (and its gradient) by its detached probability exp(-ce).
        let trained_w = match targets.kind {
            LossKind::Nll => loss_w.clone(),
            LossKind::Dft => (&loss_w * ce.neg()?.exp()?)?,
        };
        loss_sum += (&ce * &trained_w)?.sum_all()?.to_scalar::<f32>()? as f64;
        let hits = logits
            .argmax(D::Minus1)?
            .eq(&ids.squeeze(1)?)?
            .to_dtype(DType::F32)?;
        correct += (hits * loss_w.squeeze(1)?)?.sum_all()?.to_scalar::<f32>()? as f64;
        let probs = exp.broadcast_div(&sum_exp)?;
        // entropy = lse - sum(p * logits)
        let expected_logit = (&probs * &logits)?.sum(D::Minus1)?;
        let entropy = (lse.squeeze(1)? - expected_logit)?;
        entropy_sum += (entropy * &ent_w)?.sum_all()?.to_scalar::<f32>()? as f64;
        if want_grad_h || want_grad_w {
            // d ce / d logits = softmax - onehot(target), weighted per row.
            let minus_one = Tensor::full(-1f32, (len, 1), &device)?;
            let grad_logits = probs
                .scatter_add(&ids, &minus_one, 1)?
                .broadcast_mul(&trained_w)?;
            let grad_logits = match &slope {
                Some(slope) => (grad_logits * slope)?,
                None => grad_logits,
            }
            .to_dtype(hd.dtype())?;
            if want_grad_h {
                grad_h.push(grad_logits.matmul(wd)?);
            }
            if want_grad_w {
                let gw = grad_logits.t()?.matmul(&h_chunk)?;
                grad_w = Some(match grad_w {
                    Some(acc) => (acc + gw)?,
                    None => gw,
                });
            }
        }
    }
    Ok(ChunkSums {
        loss_sum,
        correct,
        entropy_sum,
        grad_h: want_grad_h.then(|| Tensor::cat(&grad_h, 0)).transpose()?,
        grad_w,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_chunks_equal_the_candle_chunks_across_chunk_edges() -> Result<()> {
        let (n, h, vocab) = (37, 8, 50);
        let hd = Tensor::randn(0f32, 1.0, (n, h), &Device::Cpu)?;
        let wd = Tensor::randn(0f32, 1.0, (vocab, h), &Device::Cpu)?;
        let cases = [
            (LossKind::Nll, None),
            (LossKind::Dft, None),
            (LossKind::Nll, Some(1.5)),
        ];
        for (kind, softcap) in cases {
            let targets = LossTargets {
                target_ids: (0..n as u32).map(|i| (i * 7) % vocab as u32).collect(),
                loss_weight: (0..n).map(|i| (i % 3) as f32 * 0.5).collect(),
                entropy_weight: (0..n).map(|i| (i % 2) as f32).collect(),
                kind,
                softcap,
            };
            let want = (true, true);
            let how = (kind == LossKind::Dft, softcap.map(|c| c as f32));
            let ours = cpu::cross_entropy::chunks(&hd, &wd, rows_of(&targets), want, 10, how)?;
            let reference = chunks_candle(&hd, &wd, &targets, want, 10)?;
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
            assert!(
                close(ours.loss_sum, reference.loss_sum),
                "{kind:?} {softcap:?}"
            );
            assert!(close(ours.entropy_sum, reference.entropy_sum));
            assert_eq!(ours.correct, reference.correct);
            for (a, b) in [
                (ours.grad_h, reference.grad_h),
                (ours.grad_w, reference.grad_w),
            ] {
                let (a, b) = (a.expect("gradient"), b.expect("gradient"));
                let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-5 * size,
                    "{kind:?}: gradient differs by {diff} of {size}"
                );
            }
        }
        Ok(())
    }
}
