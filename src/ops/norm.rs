//! RMSNorm as Llama/Qwen/Mistral use it: `w * x / sqrt(mean(x^2) + eps)`, computed in f32.

use super::cpu::{is_cpu_f32, tensor, Held, PIECE};
use super::graft::{graft2, Output};
use super::rows;
use super::simd;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// RMS-normalises the last dimension of `x` and scales by `w`. The weight gets a gradient only
/// when it is trainable (full fine-tuning). On the CPU in f32 forward and input gradient are one
/// vectorized pass over the rows each. x: [.., d], w: [d] -> [.., d]
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let native = is_cpu_f32(x) && is_cpu_f32(w);
    let x_in = x.detach().contiguous()?;
    let out = if native {
        Output::host(rms_norm_cpu(&x_in, &w.detach(), None, eps)?, x_in.dims())
    } else {
        candle_nn::ops::rms_norm(&x_in, &w.detach(), eps as f32)?.into()
    };
    graft2(
        "rms-norm",
        x,
        w,
        out,
        Box::new(move |x, w, g, needs| {
            let fused_grad_x = native && needs[0];
            let grad_x = if fused_grad_x {
                Some(tensor(rms_norm_cpu(x, w, Some(g), eps)?, x.dims())?)
            } else {
                None
            };
            if !needs[1] && (fused_grad_x || !needs[0]) {
                return Ok((grad_x, None));
            }
            let (x2, g2) = (rows(x)?, rows(g)?);
            let inv_rms = (x2.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
            let x_hat = x2.broadcast_mul(&inv_rms)?;
            let grad_w = needs[1].then(|| (&g2 * &x_hat)?.sum(0)).transpose()?;
            let grad_x = match grad_x {
                Some(gx) => Some(gx),
                None if needs[0] => {
                    let g_hat = g2.broadcast_mul(w)?;
                    let dot = (&g_hat * &x_hat)?.mean_keepdim(1)?;
                    let gx = (g_hat - x_hat.broadcast_mul(&dot)?)?.broadcast_mul(&inv_rms)?;
                    Some(gx.reshape(x.shape())?)
                }
                None => None,
            };
            Ok((grad_x, grad_w))
        }),
    )
}

/// The CPU kernel over all rows of a contiguous x `[.., d]`: the forward (`grad` None) or the
/// input gradient for `grad` (like x).
pub(crate) fn rms_norm_cpu(
    x: &Tensor,
    w: &Tensor,
    grad: Option<&Tensor>,
    eps: f64,
) -> Result<Vec<f32>> {
    let (x_c, w_c) = (x.contiguous()?, w.contiguous()?);
    let grad_c = grad.map(Tensor::contiguous).transpose()?;
    let (xh, wh) = (Held::new(&x_c)?, Held::new(&w_c)?);
    let gh = grad_c.as_ref().map(Held::new).transpose()?;
    let (xs, ws) = (xh.slice()?, wh.slice()?);
    let d = ws.len();
    // Whole rows per task.
    let piece = (PIECE / d.max(1)).max(1) * d;
    let mut out = vec![0f32; xs.len()];
    let eps = eps as f32;
    match gh {
        None => out
            .par_chunks_mut(piece)
            .zip(xs.par_chunks(piece))
            .for_each(|(o, x)| simd::rms_norm_forward(x, ws, eps, o)),
        Some(gh) => out
            .par_chunks_mut(piece)
            .zip(xs.par_chunks(piece).zip(gh.slice()?.par_chunks(piece)))
            .for_each(|(o, (x, g))| simd::rms_norm_backward(x, ws, g, eps, o)),
    }
    Ok(out)
}
