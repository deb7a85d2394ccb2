//! The gated MLP activations' native kernels (SwiGLU, GeGLU): one vectorized pass each way.

use super::{par_filled, par_filled_pair, simd, tensor, Held, PIECE};
use crate::ops::activation::Activation;
use crate::ops::graft::Output;
use candle_core::{Result, Tensor};

/// `act(gate) * up` on the CPU in f32 (one vectorized pass). gate, up: [.., i] -> [.., i]
pub(crate) fn forward(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Output> {
    let (gate_c, up_c) = (gate.contiguous()?, up.contiguous()?);
    let (gh, uh) = (Held::new(&gate_c)?, Held::new(&up_c)?);
    let (gs, us) = (gh.slice()?, uh.slice()?);
    let kernel = match act {
        Activation::Silu => simd::swiglu_forward,
        Activation::GeluTanh => simd::geglu_forward,
    };
    let out = par_filled(gs.len(), PIECE, |i, out| {
        let at = i * PIECE..i * PIECE + out.len();
        kernel(&gs[at.clone()], &us[at], out)
    });
    Ok(Output::host(out, gate.dims()))
}

/// `(d_gate, d_up)` of `act(gate) * up` for the output gradient `grad`, on the CPU in f32.
pub(crate) fn backward(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
    act: Activation,
) -> Result<(Tensor, Tensor)> {
    let (gate_c, up_c, grad_c) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
    let held = [Held::new(&gate_c)?, Held::new(&up_c)?, Held::new(&grad_c)?];
    let (gs, us, ds) = (held[0].slice()?, held[1].slice()?, held[2].slice()?);
    let kernel = match act {
        Activation::Silu => simd::swiglu_backward,
        Activation::GeluTanh => simd::geglu_backward,
    };
    let (d_gate, d_up) = par_filled_pair(gs.len(), PIECE, |i, dg, du| {
        let at = i * PIECE..i * PIECE + dg.len();
        kernel(&gs[at.clone()], &us[at.clone()], &ds[at], dg, du)
    });
    Ok((tensor(d_gate, gate.dims())?, tensor(d_up, gate.dims())?))
}
