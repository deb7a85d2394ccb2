//! Scaled dot-product attention for training and inference: causal, optional sliding window,
//! optional document boundaries (packed rows), grouped-query heads.
//!
//! Two kernels composed of candle ops (so every device runs them): the reference one keeps the
//! `[t, t]` probabilities for the backward; the blocked one takes queries in blocks that only meet
//! the keys the causal (and window) mask lets them see, keeps only the output and each row's
//! log-sum-exp, and recomputes the probabilities block by block in the backward — once by query
//! blocks for dQ, once by key blocks for dK and dV. [`attention`] picks by size. For f32 on the
//! CPU the flash kernel ([`cpu::flash`]) runs instead; `kernel` is the dispatch point.

pub use super::mask::AttentionMask;
pub use super::scores::Scores;

use super::cpu;
use super::graft::{graft3, without_grad};
use super::kernel::Kernel;
use candle_core::{Result, Tensor, Var, D};

/// Rows of queries (and columns of keys) per block.
pub(crate) const BLOCK: usize = 256;

fn blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(BLOCK)
        .map(move |s| (s, (s + BLOCK).min(len)))
}

/// Scores of one block, `capped(q k^T * scale) + bias`, and with a soft cap the factor
/// `1 - tanh²` its backward multiplies the scores' gradient by.
/// q: [b, h, m, d], k: [b, h, n, d] -> [b, h, m, n]
fn block_scores(
    q: &Tensor,
    k: &Tensor,
    bias: &Tensor,
    scores: Scores,
) -> Result<(Tensor, Option<Tensor>)> {
    let s = (q.matmul(&k.t()?)? * scores.scale)?;
    let Some(cap) = scores.softcap else {
        return Ok((s.broadcast_add(bias)?, None));
    };
    let t = (s / cap)?.tanh()?;
    let slope = t.sqr()?.affine(-1.0, 1.0)?;
    Ok(((t * cap)?.broadcast_add(bias)?, Some(slope)))
}

/// The scores' gradient through the soft cap (`slope` from [`block_scores`]).
fn through_cap(grad: Tensor, slope: &Option<Tensor>) -> Result<Tensor> {
    match slope {
        Some(slope) => grad * slope,
        None => Ok(grad),
    }
}

/// Repeats each key/value head `n_rep` times: `[b, kv, t, d] -> [b, kv * n_rep, t, d]`.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))
}

/// Detached, contiguous q and k/v repeated to the query heads, with the repeat factor.
fn detached_heads(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, Tensor, Tensor, Tensor)> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    Ok((
        n_rep,
        q.detach().contiguous()?,
        repeat_kv(&k.detach(), n_rep)?.contiguous()?,
        repeat_kv(&v.detach(), n_rep)?.contiguous()?,
    ))
}

/// Sums the gradient of repeated heads back onto their key/value head.
fn sum_groups(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.reshape((b, h / n_rep, n_rep, t, d))?.sum(2)
}

/// `softmax(q k^T * scale + mask) v` with grouped-query heads. Keeps the probabilities for the
/// backward while they are small (at most [`KEEP_PROBABILITIES_BYTES`] per call: faster, as
/// nothing is recomputed), else runs the blocked, recomputing kernel.
///
/// q: [b, heads, t_q, d], k, v: [b, kv_heads, t_k, d] -> [b, heads, t_q, d]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: impl Into<Scores>,
) -> Result<Tensor> {
    let scale = scale.into();
    let (b, h, t_q, _) = q.dims4()?;
    if kernel(q, mask)?.is_cpu() {
        return cpu::flash::attention_flash_cpu(q, k, v, mask, scale);
    }
    let bytes = b * h * t_q * k.dim(2)? * q.dtype().size_in_bytes();
    if bytes <= KEEP_PROBABILITIES_BYTES {
        attention_keeping_probabilities(q, k, v, mask, scale)
    } else {
        attention_blocked(q, k, v, mask, scale)
    }
}

/// [`attention`] in the token-major layout the projections produce: q `[b, t_q, heads, d]`, k, v
/// `[b, t_k, kv_heads, d]` -> `[b, t_q, heads, d]`. On the CPU in f32 the flash kernel reads and
/// writes this layout directly (no heads-first copies); elsewhere the inputs are transposed for
/// [`attention`] and its output back.
pub fn attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: impl Into<Scores>,
) -> Result<Tensor> {
    let scale = scale.into();
    if kernel(q, mask)?.is_cpu() {
        return cpu::flash::attention_flash_cpu_tokens(q, k, v, mask, scale);
    }
    let heads_first = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    attention(
        &heads_first(q)?,
        &heads_first(k)?,
        &heads_first(v)?,
        mask,
        scale,
    )?
    .transpose(1, 2)
}

/// Whether a layer should hand attention its inputs token-major ([`attention_tokens`]): where the
/// kernel for `x`'s device and dtype reads that layout directly (the CPU flash kernel, f32), which
/// saves the heads-first copies. The model asks this instead of checking the device itself.
pub fn prefers_token_layout(x: &Tensor) -> bool {
    Kernel::of(&[x]).is_cpu()
}

/// Attention's dispatch point: the CPU flash kernel ([`cpu::flash`]) for f32 on the CPU with
/// document ids (if any) for each of q's batch rows, else the kernels composed of candle ops.
pub(crate) fn kernel(q: &Tensor, mask: &AttentionMask) -> Result<Kernel> {
    let b = q.dim(0)?;
    Ok(match Kernel::of(&[q]) {
        Kernel::Cpu if mask.document_rows().is_none_or(|r| r == b) => Kernel::Cpu,
        _ => Kernel::Composed,
    })
}

/// What [`forward_untracked`] keeps for [`backward_untracked`] besides q, k, v and the output:
/// the flash kernel's log-sum-exp per query (empty for candle's kernels, whose backward
/// recomputes the attention on its own graph).
pub(crate) type Kept = Vec<f32>;

/// Attention on untracked token-major q `[b, t_q, heads, d]`, k, v `[b, t_k, kv_heads, d]`, for
/// an op that writes its own backward, with the `kernel` the op chose (see [`kernel`]; an op
/// offloading its activations runs candle's): the output `[b, t_q, heads, d]` and what the
/// backward needs.
pub(crate) fn forward_untracked(
    kernel: Kernel,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: &AttentionMask,
    scale: Scores,
) -> Result<(Tensor, Kept)> {
    match kernel {
        Kernel::Cpu => cpu::flash::forward_untracked(q, k, v, mask, scale),
        _ => Ok((
            without_grad(|| attention_tokens(q, k, v, mask, scale))?,
            Vec::new(),
        )),
    }
}

/// `(dq, dk, dv)` (like q, k, v) for the gradient `g` of [`forward_untracked`]'s output `out`,
/// from what it kept: the flash backward, or attention recomputed on its own graph.
pub(crate) fn backward_untracked(
    kernel: Kernel,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (out, kept): (&Tensor, &Kept),
    g: &Tensor,
    mask: &AttentionMask,
    scale: Scores,
) -> Result<(Tensor, Tensor, Tensor)> {
    if kernel.is_cpu() {
        return cpu::flash::backward_untracked((q, k, v), out, kept, g, mask, scale);
    }
    let [qv, kv, vv] = [q, k, v].map(|t| Var::from_tensor(&t.detach()));
    let (qv, kv, vv) = (qv?, kv?, vv?);
    let out = attention_tokens(&qv, &kv, &vv, mask, scale)?;
    let grads = (out * g.reshape(q.dims())?.detach())?
        .sum_all()?
        .backward()?;
    let grad = |var: &Var| {
        grads
            .get(var)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("attention recomputation: no gradient".into()))
    };
    Ok((grad(&qv)?, grad(&kv)?, grad(&vv)?))
}

/// Largest probability matrix (bytes, all heads) that [`attention`] keeps for the backward:
/// 9 heads at T=512 (9.4 MB) are kept, at T=2048 (151 MB) recomputed.
pub const KEEP_PROBABILITIES_BYTES: usize = 16 * 1024 * 1024;

/// The reference kernel: one softmax over the full `[t_q, t_k]` scores, probabilities kept for the
/// backward. q: [b, heads, t_q, d], k, v: [b, kv_heads, t_k, d] -> [b, heads, t_q, d]
pub fn attention_keeping_probabilities(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: impl Into<Scores>,
) -> Result<Tensor> {
    let scores = scale.into();
    let scale = scores.scale;
    let (n_rep, qd, kd, vd) = detached_heads(q, k, v)?;
    let bias = mask.block((0, qd.dim(2)?), (0, mask.t_k()))?;
    let (scores, slope) = block_scores(&qd, &kd, &bias, scores)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    drop(scores);
    let out = probs.matmul(&vd)?;
    graft3(
        "attention",
        q,
        k,
        v,
        out,
        Box::new(move |q, _, _, g, needs| {
            let g = g.contiguous()?;
            let grad_v = needs[2]
                .then(|| sum_groups(&probs.t()?.matmul(&g)?, n_rep))
                .transpose()?;
            let grad_probs = g.matmul(&vd.t()?)?;
            let row_dot = (&grad_probs * &probs)?.sum_keepdim(D::Minus1)?;
            let grad_scores = through_cap((&probs * grad_probs.broadcast_sub(&row_dot)?)?, &slope)?;
            let grad_q = needs[0]
                .then(|| grad_scores.matmul(&kd)? * scale)
                .transpose()?;
            let grad_k = needs[1]
                .then(|| sum_groups(&(grad_scores.t()?.matmul(q)? * scale)?, n_rep))
                .transpose()?;
            Ok((grad_q, grad_k, grad_v))
        }),
    )
}

/// The blocked kernel: per query block only the keys the mask allows, output and per-row
/// log-sum-exp kept, probabilities recomputed in the backward (by query blocks for dQ, by key
/// blocks for dK and dV). q: [b, heads, t_q, d], k, v: [b, kv_heads, t_k, d] -> [b, heads, t_q, d]
pub fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: impl Into<Scores>,
) -> Result<Tensor> {
    let scores = scale.into();
    let scale = scores.scale;
    let (n_rep, qd, kd, vd) = detached_heads(q, k, v)?;
    let t_q = qd.dim(2)?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (q0, q1) in blocks(t_q) {
        let (k0, k1) = mask.key_range(q0, q1);
        let (scores, _) = block_scores(
            &qd.narrow(2, q0, q1 - q0)?,
            &kd.narrow(2, k0, k1 - k0)?,
            &mask.block((q0, q1), (k0, k1))?,
            scores,
        )?;
        let max = scores.max_keepdim(D::Minus1)?;
        let exp = scores.broadcast_sub(&max)?.exp()?;
        let sum = exp.sum_keepdim(D::Minus1)?;
        outs.push(
            exp.broadcast_div(&sum)?
                .matmul(&vd.narrow(2, k0, k1 - k0)?)?,
        );
        lses.push((sum.log()? + max)?);
    }
    let out = Tensor::cat(&outs, 2)?;
    let lse = Tensor::cat(&lses, 2)?;
    let saved_out = out.clone();
    let mask = mask.clone();
    graft3(
        "attention",
        q,
        k,
        v,
        out,
        Box::new(move |_, _, _, g, needs| {
            let g = g.contiguous()?;
            // D_i = sum_j dO_ij O_ij, the row term of the softmax backward.
            let row_dot = (&g * &saved_out)?.sum_keepdim(D::Minus1)?;
            // The block's probabilities and the soft cap's slope there.
            type Probs = (Tensor, Option<Tensor>);
            let probs = |(q0, q1): (usize, usize), (k0, k1): (usize, usize)| -> Result<Probs> {
                let (s, slope) = block_scores(
                    &qd.narrow(2, q0, q1 - q0)?,
                    &kd.narrow(2, k0, k1 - k0)?,
                    &mask.block((q0, q1), (k0, k1))?,
                    scores,
                )?;
                Ok((s.broadcast_sub(&lse.narrow(2, q0, q1 - q0)?)?.exp()?, slope))
            };
            let grad_scores = |(p, slope): &Probs,
                               (q0, q1): (usize, usize),
                               (k0, k1): (usize, usize)|
             -> Result<Tensor> {
                let grad_p = g
                    .narrow(2, q0, q1 - q0)?
                    .matmul(&vd.narrow(2, k0, k1 - k0)?.t()?)?;
                through_cap(
                    (p * grad_p.broadcast_sub(&row_dot.narrow(2, q0, q1 - q0)?)?)?,
                    slope,
                )
            };
            let grad_q = if needs[0] {
                let mut parts = Vec::new();
                for qb in blocks(t_q) {
                    let kb = mask.key_range(qb.0, qb.1);
                    let ds = grad_scores(&probs(qb, kb)?, qb, kb)?;
                    parts.push((ds.matmul(&kd.narrow(2, kb.0, kb.1 - kb.0)?)? * scale)?);
                }
                Some(Tensor::cat(&parts, 2)?)
            } else {
                None
            };
            let (mut grad_k, mut grad_v) = (Vec::new(), Vec::new());
            if needs[1] || needs[2] {
                let (b, h, _, d) = kd.dims4()?;
                for kb in blocks(kd.dim(2)?) {
                    let qb = mask.query_range(kb.0, kb.1, t_q);
                    if qb.0 == qb.1 {
                        grad_k.push(Tensor::zeros(
                            (b, h, kb.1 - kb.0, d),
                            kd.dtype(),
                            kd.device(),
                        )?);
                        grad_v.push(Tensor::zeros(
                            (b, h, kb.1 - kb.0, d),
                            vd.dtype(),
                            vd.device(),
                        )?);
                        continue;
                    }
                    let p = probs(qb, kb)?;
                    let g_block = g.narrow(2, qb.0, qb.1 - qb.0)?;
                    grad_v.push(p.0.t()?.matmul(&g_block)?);
                    let ds = grad_scores(&p, qb, kb)?;
                    grad_k.push((ds.t()?.matmul(&qd.narrow(2, qb.0, qb.1 - qb.0)?)? * scale)?);
                }
            }
            let grad_k = needs[1]
                .then(|| sum_groups(&Tensor::cat(&grad_k, 2)?, n_rep))
                .transpose()?;
            let grad_v = needs[2]
                .then(|| sum_groups(&Tensor::cat(&grad_v, 2)?, n_rep))
                .transpose()?;
            Ok((grad_q, grad_k, grad_v))
        }),
    )
}
