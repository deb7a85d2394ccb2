//! The gated MLP activation `silu(gate) * up`.

use super::cpu::{is_cpu_f32, par_filled, par_filled_pair, tensor, Held, PIECE};
use super::graft::{graft2, Output};
use super::simd;
use candle_core::{Result, Tensor};

/// `silu(gate) * up` with its backward: one vectorized pass each way on the CPU in f32, candle ops
/// elsewhere. gate, up: [.., i] -> [.., i]
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let out = swiglu_forward(&gate.detach(), &up.detach())?;
    graft2("swiglu", gate, up, out, Box::new(swiglu_backward))
}

/// Whether the native kernels apply.
fn native(gate: &Tensor, up: &Tensor) -> bool {
    is_cpu_f32(gate) && is_cpu_f32(up) && gate.dims() == up.dims()
}

/// The forward on untracked tensors. gate, up: [.., i] -> [.., i]
pub(crate) fn swiglu_forward(gate: &Tensor, up: &Tensor) -> Result<Output> {
    if native(gate, up) {
        swiglu_forward_cpu(gate, up)
    } else {
        Ok((candle_nn::ops::silu(gate)? * up)?.into())
    }
}

/// `(d_gate, d_up)` for the output gradient `g`, each where `needs` asks, on untracked tensors.
pub(crate) fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    needs: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if native(gate, up) {
        let (d_gate, d_up) = swiglu_backward_cpu(gate, up, g)?;
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

/// `silu(gate) * up` on the CPU in f32 (one vectorized pass). gate, up: [.., i] -> [.., i]
fn swiglu_forward_cpu(gate: &Tensor, up: &Tensor) -> Result<Output> {
    let (gate_c, up_c) = (gate.contiguous()?, up.contiguous()?);
    let (gh, uh) = (Held::new(&gate_c)?, Held::new(&up_c)?);
    let (gs, us) = (gh.slice()?, uh.slice()?);
    let out = par_filled(gs.len(), PIECE, |i, out| {
        let at = i * PIECE..i * PIECE + out.len();
        simd::swiglu_forward(&gs[at.clone()], &us[at], out)
    });
    Ok(Output::host(out, gate.dims()))
}

/// `(d_gate, d_up)` of `silu(gate) * up` for the output gradient `grad`, on the CPU in f32.
fn swiglu_backward_cpu(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (gate_c, up_c, grad_c) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
    let held = [Held::new(&gate_c)?, Held::new(&up_c)?, Held::new(&grad_c)?];
    let (gs, us, ds) = (held[0].slice()?, held[1].slice()?, held[2].slice()?);
    let (d_gate, d_up) = par_filled_pair(gs.len(), PIECE, |i, dg, du| {
        let at = i * PIECE..i * PIECE + dg.len();
        simd::swiglu_backward(&gs[at.clone()], &us[at.clone()], &ds[at], dg, du)
    });
    Ok((tensor(d_gate, gate.dims())?, tensor(d_up, gate.dims())?))
}
