//! RMSNorm as Llama/Qwen/Mistral use it: `w * x / sqrt(mean(x^2) + eps)`, computed in f32.

use super::cpu::{is_cpu_f32, par_filled, tensor, Held, PIECE};
use super::graft::{graft2, Output};
use super::rows;
use super::simd;
use candle_core::{Result, Tensor};

/// RMS-normalises the last dimension of `x` and scales by `w`. The weight gets a gradient only
/// when it is trainable (full fine-tuning). On the CPU in f32 forward and input gradient are one
/// vectorized pass over the rows each. `x: [.., d], w: [d] -> [.., d]`
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let out = rms_norm_forward(&x.detach(), &w.detach(), eps)?;
    graft2(
        "rms-norm",
        x,
        w,
        out,
        Box::new(move |x, w, g, needs| {
            // The native kernel gives the input gradient; candle ops give the rest, in one pass
            // over the normalised rows.
            let native = needs[0] && is_cpu_f32(x) && is_cpu_f32(w);
            let grad_x = native
                .then(|| tensor(rms_norm_cpu(x, w, Some(g), eps)?, x.dims()))
                .transpose()?;
            let (composed_x, grad_w) =
                composed_grads(x, w, g, eps, [needs[0] && !native, needs[1]])?;
            Ok((grad_x.or(composed_x), grad_w))
        }),
    )
}

/// The forward on untracked tensors: the native kernel on the CPU in f32, candle-nn's elsewhere.
/// x: [.., d], w: [d] -> [.., d]
pub(crate) fn rms_norm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Output> {
    let x = x.contiguous()?;
    if is_cpu_f32(&x) && is_cpu_f32(w) {
        Ok(Output::host(rms_norm_cpu(&x, w, None, eps)?, x.dims()))
    } else {
        Ok(candle_nn::ops::rms_norm(&x, w, eps as f32)?.into())
    }
}

/// The gradient of x for the output gradient g (like x), on untracked tensors.
pub(crate) fn rms_norm_grad_x(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if is_cpu_f32(x) && is_cpu_f32(w) {
        return tensor(rms_norm_cpu(x, w, Some(g), eps)?, x.dims());
    }
    composed_grads(x, w, g, eps, [true, false])?
        .0
        .ok_or_else(|| candle_core::Error::Msg("rms-norm: no input gradient".into()))
}

/// `(grad_x, grad_w)` with candle ops, each where `needs` asks (nothing computed for neither).
fn composed_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    needs: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !needs[0] && !needs[1] {
        return Ok((None, None));
    }
    let (x2, g2) = (rows(x)?, rows(g)?);
    let inv_rms = (x2.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let x_hat = x2.broadcast_mul(&inv_rms)?;
    let grad_w = needs[1].then(|| (&g2 * &x_hat)?.sum(0)).transpose()?;
    let grad_x = needs[0]
        .then(|| {
            let g_hat = g2.broadcast_mul(w)?;
            let dot = (&g_hat * &x_hat)?.mean_keepdim(1)?;
            (g_hat - x_hat.broadcast_mul(&dot)?)?
                .broadcast_mul(&inv_rms)?
                .reshape(x.shape())
        })
        .transpose()?;
    Ok((grad_x, grad_w))
}

/// The CPU kernel over all rows of a contiguous x `[.., d]`: the forward (`grad` None) or the
/// input gradient for `grad` (like x).
fn rms_norm_cpu(x: &Tensor, w: &Tensor, grad: Option<&Tensor>, eps: f64) -> Result<Vec<f32>> {
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
