//! The gated MLP activation `silu(gate) * up`.

use super::graft::graft2;
use candle_core::{Result, Tensor};

/// `silu(gate) * up` with its backward. gate, up: [.., i] -> [.., i]
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let out = (candle_nn::ops::silu(&gate.detach())? * up.detach())?;
    graft2(
        "swiglu",
        gate,
        up,
        out,
        Box::new(|gate, up, g, needs| {
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
        }),
    )
}
