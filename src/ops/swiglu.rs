//! The gated MLP activation `silu(gate) * up`.

use super::cpu;
use super::graft::{graft2, Output};
use super::kernel::Kernel;
use candle_core::{Result, Tensor};

/// `silu(gate) * up` with its backward: one vectorized pass each way on the CPU in f32, candle ops
/// elsewhere. gate, up: [.., i] -> [.., i]
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let out = swiglu_forward(&gate.detach(), &up.detach())?;
    graft2("swiglu", gate, up, out, Box::new(swiglu_backward))
}

/// SwiGLU's dispatch point: the native kernels for f32 on the CPU, the CUDA kernels for f32 and
/// bf16 on a GPU (gate and up of one shape for both), candle ops elsewhere.
fn kernel(gate: &Tensor, up: &Tensor) -> Kernel {
    match Kernel::of(&[gate, up]) {
        Kernel::Composed => Kernel::Composed,
        _ if gate.dims() != up.dims() => Kernel::Composed,
        chosen => chosen,
    }
}

/// The forward on untracked tensors. gate, up: [.., i] -> [.., i]
pub(crate) fn swiglu_forward(gate: &Tensor, up: &Tensor) -> Result<Output> {
    match kernel(gate, up) {
        Kernel::Cpu => cpu::swiglu::forward(gate, up),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => Ok(super::cuda::swiglu(gate, up)?.into()),
        Kernel::Composed => Ok((candle_nn::ops::silu(gate)? * up)?.into()),
    }
}

/// `(d_gate, d_up)` for the output gradient `g`, each where `needs` asks, on untracked tensors.
pub(crate) fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    needs: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let native = match kernel(gate, up) {
        Kernel::Cpu => Some(cpu::swiglu::backward(gate, up, g)?),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => Some(super::cuda::swiglu_backward(gate, up, g)?),
        Kernel::Composed => None,
    };
    if let Some((d_gate, d_up)) = native {
        return Ok((needs[0].then_some(d_gate), needs[1].then_some(d_up)));
    }
    let sig = candle_nn::ops::sigmoid(gate)?;
    let grad_up = needs[1].then(|| g * (gate * &sig)?).transpose()?;
    let grad_gate = if needs[0] {
        // d silu / dx = s * (1 + x * (1 - s))
        let one_minus = sig.affine(-1.0, 1.0)?;
        let dsilu = (&sig * (gate * one_minus)?.affine(1.0, 1.0)?)?;
        Some(((g * up)? * dsilu)?)
    } else {
        None
    };
    Ok((grad_gate, grad_up))
}
