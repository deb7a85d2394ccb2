//! The gated MLP activation `act(gate) * up`: SwiGLU (`silu`, Llama and most families) or GeGLU
//! (`gelu_pytorch_tanh`, Gemma).

pub use super::activation::Activation;
use super::cpu;
use super::graft::{graft2, Output};
use super::kernel::Kernel;
use candle_core::{Result, Tensor};

/// `act(gate) * up` with its backward: one vectorized pass each way on the CPU in f32, candle
/// ops elsewhere. gate, up: [.., i] -> [.., i]
pub fn glu(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let out = glu_forward(&gate.detach(), &up.detach(), act)?;
    graft2(
        "gated-mlp",
        gate,
        up,
        out,
        Box::new(move |gate, up, g, needs| glu_backward(gate, up, g, needs, act)),
    )
}

/// The gated activation's dispatch point: the native kernels for f32 on the CPU, the CUDA
/// kernels (SwiGLU) for f32 and bf16 on a GPU (gate and up of one shape for both), candle ops
/// elsewhere.
fn kernel(gate: &Tensor, up: &Tensor, act: Activation) -> Kernel {
    let chosen = Kernel::of(&[gate, up]);
    // The CUDA kernels compute SwiGLU only.
    if gate.dims() != up.dims() || (!chosen.is_cpu() && act != Activation::Silu) {
        return Kernel::Composed;
    }
    chosen
}

/// The forward on untracked tensors. gate, up: [.., i] -> [.., i]
pub(crate) fn glu_forward(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Output> {
    match kernel(gate, up, act) {
        Kernel::Cpu => cpu::glu::forward(gate, up, act),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => Ok(super::cuda::swiglu(gate, up)?.into()),
        Kernel::Composed => Ok(match act {
            Activation::Silu => (candle_nn::ops::silu(gate)? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        }
        .into()),
    }
}

/// `(d_gate, d_up)` for the output gradient `g`, each where `needs` asks, on untracked tensors.
pub(crate) fn glu_backward(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    needs: [bool; 2],
    act: Activation,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let native = match kernel(gate, up, act) {
        Kernel::Cpu => Some(cpu::glu::backward(gate, up, g, act)?),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => Some(super::cuda::swiglu_backward(gate, up, g)?),
        Kernel::Composed => None,
    };
    if let Some((d_gate, d_up)) = native {
        return Ok((needs[0].then_some(d_gate), needs[1].then_some(d_up)));
    }
    let (activated, slope) = match act {
        Activation::Silu => {
            let sig = candle_nn::ops::sigmoid(gate)?;
            // d silu / dx = s * (1 + x * (1 - s))
            let one_minus = sig.affine(-1.0, 1.0)?;
            let slope = (&sig * (gate * one_minus)?.affine(1.0, 1.0)?)?;
            ((gate * &sig)?, slope)
        }
        Activation::GeluTanh => {
            // t = tanh(√(2/π)(x + 0.044715 x³)); gelu = x(1 + t)/2;
            // d gelu / dx = (1 + t)/2 + x (1 - t²) √(2/π)(1 + 3 · 0.044715 x²)/2
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let x2 = gate.sqr()?;
            let inner = (gate * x2.affine(0.044715, 1.0)?)?.affine(c, 0.0)?;
            let t = inner.tanh()?;
            let one_plus = t.affine(1.0, 1.0)?;
            let sech2 = t.sqr()?.affine(-1.0, 1.0)?;
            let poly = x2.affine(3.0 * 0.044715 * c, c)?;
            let slope = ((&one_plus + (gate * sech2)?.mul(&poly)?)? * 0.5)?;
            ((gate * one_plus)?.affine(0.5, 0.0)?, slope)
        }
    };
    let grad_up = needs[1].then(|| g * activated).transpose()?;
    let grad_gate = needs[0].then(|| (g * up)? * slope).transpose()?;
    Ok((grad_gate, grad_up))
}
