//! The chunked LM-head loss's native kernel.

use super::{matmul, matmul_new, par_zeroed, simd, tensor, Held, Threads};
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// What the chunks add up to: loss, correct and entropy sums, and the gradients when wanted.
pub(crate) struct ChunkSums {
    pub(crate) loss_sum: f64,
    pub(crate) correct: f64,
    pub(crate) entropy_sum: f64,
    pub(crate) grad_h: Option<Tensor>,
    pub(crate) grad_w: Option<Tensor>,
}

/// The loss's chunk loop on the CPU in f32 (targets: id, loss weight and entropy weight per row;
/// `dft`: each token's loss weighed by its detached probability, TRL's DFT; `softcap`: logits
/// soft-capped, Gemma 2): each chunk's logits in one buffer, reduced row by row in one
/// vectorized pass that also turns them into the weighted `softmax - onehot` gradient in place;
/// `d hidden` rows are written straight into the whole output.
pub(crate) fn chunks(
    hd: &Tensor,
    wd: &Tensor,
    (target_ids, loss_weight, entropy_weight): (&[u32], &[f32], &[f32]),
    (want_grad_h, want_grad_w): (bool, bool),
    chunk: usize,
    (dft, softcap): (bool, Option<f32>),
) -> Result<ChunkSums> {
    let (n, h) = hd.dims2()?;
    let vocab = wd.dim(0)?;
    let (hd, wd) = (hd.contiguous()?, wd.contiguous()?);
    let (hh, wh) = (Held::new(&hd)?, Held::new(&wd)?);
    let (hs, ws) = (hh.slice()?, wh.slice()?);
    if let Some(&bad) = target_ids.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("lm_head_loss: target id {bad} is outside the vocabulary of {vocab}");
    }
    let mut sums = [0f64; 3];
    let mut grad_h = want_grad_h.then(|| par_zeroed(n * h));
    let mut grad_w = want_grad_w.then(|| par_zeroed(vocab * h));
    // One buffer for every chunk's logits, made by the first (largest) chunk's product.
    let mut logits: Vec<f32> = Vec::new();
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let h_chunk = &hs[start * h..(start + len) * h];
        let (dims, a, b) = ((len, vocab, h), (h_chunk, h, 1), (ws, 1, h));
        if logits.is_empty() {
            logits = matmul_new(dims, a, b, 1.0, Threads::All);
        } else {
            matmul(dims, (&mut logits, vocab), false, a, b, 1.0, Threads::All);
        }
        let logits = &mut logits[..len * vocab];
        let grad = want_grad_h || want_grad_w;
        let rows: Vec<[f64; 3]> = logits
            .par_chunks_mut(vocab)
            .enumerate()
            // One buffer per task for a soft-capped row (the cap's backward reads it).
            .map_init(Vec::new, |capped: &mut Vec<f32>, (r, row)| {
                let i = start + r;
                let target = target_ids[i] as usize;
                let (loss_w, ent_w) = (loss_weight[i], entropy_weight[i]);
                if let Some(cap) = softcap {
                    simd::softcap(row, cap);
                    if grad {
                        capped.clear();
                        capped.extend_from_slice(row);
                    }
                }
                let stats = simd::softmax_row_stats(row, target, grad.then_some(loss_w), dft);
                if let (Some(cap), true) = (softcap, grad) {
                    simd::softcap_backward(row, capped, cap);
                }
                // DFT weighs each token's loss by its detached probability.
                let weight = if dft {
                    loss_w as f64 * stats.target_probability as f64
                } else {
                    loss_w as f64
                };
                [
                    stats.cross_entropy as f64 * weight,
                    if stats.argmax == target {
                        loss_w as f64
                    } else {
                        0.0
                    },
                    stats.entropy as f64 * ent_w as f64,
                ]
            })
            .collect();
        for row in rows {
            sums.iter_mut().zip(row).for_each(|(s, r)| *s += r);
        }
        if let Some(gh) = grad_h.as_mut() {
            let out = &mut gh[start * h..(start + len) * h];
            matmul(
                (len, h, vocab),
                (out, h),
                false,
                (logits, vocab, 1),
                (ws, h, 1),
                1.0,
                Threads::All,
            );
        }
        if let Some(gw) = grad_w.as_mut() {
            // d head += logits_grad^T @ h_chunk
            let accumulate = start > 0;
            matmul(
                (vocab, h, len),
                (gw, h),
                accumulate,
                (logits, 1, vocab),
                (h_chunk, h, 1),
                1.0,
                Threads::All,
            );
        }
    }
    Ok(ChunkSums {
        loss_sum: sums[0],
        correct: sums[1],
        entropy_sum: sums[2],
        grad_h: grad_h.map(|g| tensor(g, &[n, h])).transpose()?,
        grad_w: grad_w.map(|g| tensor(g, &[vocab, h])).transpose()?,
    })
}
