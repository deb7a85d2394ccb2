//! RMSNorm as Llama/Qwen/Mistral use it: `w * x / sqrt(mean(x^2) + eps)`, computed in f32.

use super::cpu::{self, tensor};
use super::graft::{graft2, Output};
use super::kernel::Kernel;
use super::rows;
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
            let native = needs[0] && kernel(x, w) != Kernel::Composed;
            let grad_x = native.then(|| rms_norm_grad_x(x, w, g, eps)).transpose()?;
            let (composed_x, grad_w) =
                composed_grads(x, w, g, eps, [needs[0] && !native, needs[1]])?;
            Ok((grad_x.or(composed_x), grad_w))
        }),
    )
}

/// RMSNorm's dispatch point: the native kernel for f32 on the CPU, the CUDA kernel for f32 and
/// bf16 on a GPU, candle ops elsewhere.
fn kernel(x: &Tensor, w: &Tensor) -> Kernel {
    Kernel::of(&[x, w])
}

/// The forward on untracked tensors: the native kernel on the CPU in f32, candle-nn's elsewhere.
/// x: [.., d], w: [d] -> [.., d]
pub(crate) fn rms_norm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Output> {
    let x = x.contiguous()?;
    match kernel(&x, w) {
        Kernel::Cpu => Ok(Output::host(
            cpu::norm::rms_norm(&x, w, None, eps)?,
            x.dims(),
        )),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => Ok(super::cuda::rms_norm(&x, w, eps)?.into()),
        Kernel::Composed => Ok(candle_nn::ops::rms_norm(&x, w, eps as f32)?.into()),
    }
}

/// The gradient of x for the output gradient g (like x), on untracked tensors.
pub(crate) fn rms_norm_grad_x(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    match kernel(x, w) {
        Kernel::Cpu => return tensor(cpu::norm::rms_norm(x, w, Some(g), eps)?, x.dims()),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => return super::cuda::rms_norm_grad_x(x, w, g, eps),
        Kernel::Composed => {}
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
