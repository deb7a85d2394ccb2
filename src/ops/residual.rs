//! Residual addition that never hands a gradient to an untracked operand.

use super::cpu;
use super::graft::{graft2, Output};
use super::kernel::Kernel;
use candle_core::{Result, Tensor};

/// `a + b`. candle's own add stores a gradient for both operands even when one is untracked (the
/// first layer's frozen embedding output, say); this keeps the gradient store to what trains.
pub fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.track_op() == b.track_op() {
        return a + b;
    }
    let out = (a.detach() + b.detach())?;
    graft2(
        "residual-add",
        a,
        b,
        out,
        Box::new(|_, _, g, needs| Ok((needs[0].then(|| g.clone()), needs[1].then(|| g.clone())))),
    )
}

/// `a + b` of untracked tensors of one shape, the sum's dispatch point: one parallel pass for f32
/// on the CPU, candle's add elsewhere.
pub(crate) fn sum(a: &Tensor, b: &Tensor) -> Result<Output> {
    match Kernel::of(&[a, b]) {
        Kernel::Cpu => Ok(Output::host(cpu::sum(a, b)?, a.dims())),
        _ => Ok((a + b)?.into()),
    }
}
