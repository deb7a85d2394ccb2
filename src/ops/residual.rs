//! Residual addition that never hands a gradient to an untracked operand.

use super::graft::graft2;
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
