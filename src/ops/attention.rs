//! Scaled dot-product attention for training and inference: causal, optional sliding window,
//! optional document boundaries (packed rows), grouped-query heads.
//!
//! This is the reference implementation: it keeps the `[t, t]` probabilities for the backward.

use super::graft::graft3;
use candle_core::{DType, Device, Result, Tensor, D};

/// Which keys each query may attend to, as an additive bias `[b or 1, 1, t_q, t_k]` of 0 and -inf.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    bias: Tensor,
}

impl AttentionMask {
    /// Causal mask for `t_q` queries at positions `offset..offset + t_q` over `offset + t_q` keys;
    /// `window` limits each query to the last `window` keys (Mistral's sliding window: key j is
    /// visible from query i when `i - j < window`); `documents` (one id per token and row) keeps
    /// attention inside each packed document.
    pub fn new(
        t_q: usize,
        offset: usize,
        window: Option<usize>,
        documents: Option<&[Vec<u32>]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let t_k = offset + t_q;
        let rows: Vec<Option<&Vec<u32>>> = match documents {
            Some(docs) => docs.iter().map(Some).collect(),
            None => vec![None],
        };
        let mut bias = Vec::with_capacity(rows.len() * t_q * t_k);
        for docs in &rows {
            for qi in 0..t_q {
                let i = qi + offset;
                for j in 0..t_k {
                    let visible = j <= i
                        && window.is_none_or(|w| i - j < w)
                        && docs.is_none_or(|d| d[i] == d[j]);
                    bias.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let bias = Tensor::from_vec(bias, (rows.len(), 1, t_q, t_k), device)?.to_dtype(dtype)?;
        Ok(AttentionMask { bias })
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

/// Sums the gradient of repeated heads back onto their key/value head.
fn sum_groups(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.reshape((b, h / n_rep, n_rep, t, d))?.sum(2)
}

/// `softmax(q k^T * scale + mask) v` with grouped-query heads.
///
/// q: [b, heads, t_q, d], k, v: [b, kv_heads, t_k, d] -> [b, heads, t_q, d]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    let (qd, kd, vd) = (
        q.detach(),
        repeat_kv(&k.detach(), n_rep)?,
        repeat_kv(&v.detach(), n_rep)?,
    );
    let scores = (qd.matmul(&kd.t()?)? * scale)?.broadcast_add(&mask.bias)?;
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
            let grad_scores = (&probs * grad_probs.broadcast_sub(&row_dot)?)?;
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
