//! RMSNorm as Llama/Qwen/Mistral use it: `w * x / sqrt(mean(x^2) + eps)`, computed in f32.

use super::graft::graft2;
use super::rows;
use candle_core::{Result, Tensor};

/// RMS-normalises the last dimension of `x` and scales by `w`. The weight gets a gradient only
/// when it is trainable (full fine-tuning). x: [.., d], w: [d] -> [.., d]
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let out = candle_nn::ops::rms_norm(&x.detach().contiguous()?, &w.detach(), eps as f32)?;
    graft2(
        "rms-norm",
        x,
        w,
        out,
        Box::new(move |x, w, g, needs| {
            let x2 = rows(x)?;
            let g2 = rows(g)?;
            let inv_rms = (x2.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
            let x_hat = x2.broadcast_mul(&inv_rms)?;
            let grad_w = needs[1].then(|| (&g2 * &x_hat)?.sum(0)).transpose()?;
            let grad_x = if needs[0] {
                let g_hat = g2.broadcast_mul(w)?;
                let dot = (&g_hat * &x_hat)?.mean_keepdim(1)?;
                let gx = (g_hat - x_hat.broadcast_mul(&dot)?)?.broadcast_mul(&inv_rms)?;
                Some(gx.reshape(x.shape())?)
            } else {
                None
            };
            Ok((grad_x, grad_w))
        }),
    )
}
