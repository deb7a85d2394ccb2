//! RMSNorm's native kernel: one vectorized pass over the rows, forward or input gradient.

use super::{par_filled, simd, Held, PIECE};
use candle_core::{Result, Tensor};

/// RMSNorm over all rows of a contiguous f32 CPU x `[.., d]`: the forward (`grad` None) or the
/// input gradient for `grad` (like x).
pub(crate) fn rms_norm(
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
    let eps = eps as f32;
    let gs = gh.as_ref().map(Held::slice).transpose()?;
    Ok(par_filled(xs.len(), piece, |i, o| {
        let x = &xs[i * piece..][..o.len()];
        match gs {
            None => simd::rms_norm_forward(x, ws, eps, o),
            Some(gs) => simd::rms_norm_backward(x, ws, &gs[i * piece..][..o.len()], eps, o),
        }
    }))
}
