//! Residual addition that never hands a gradient to an untracked operand.

use super::cpu::{par_filled, Held, PIECE};
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

/// `a + b` of two f32 CPU tensors of one shape (made contiguous), in parallel: the elements.
pub(crate) fn sum_cpu(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    if a.dims() != b.dims() {
        candle_core::bail!("residual sum: shapes {:?} and {:?}", a.dims(), b.dims());
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (ah, bh) = (Held::new(&a)?, Held::new(&b)?);
    let (xs, ys) = (ah.slice()?, bh.slice()?);
    Ok(par_filled(xs.len(), PIECE, |i, o| {
        let (x, y) = (&xs[i * PIECE..], &ys[i * PIECE..]);
        o.iter_mut()
            .zip(x.iter().zip(y))
            .for_each(|(o, (x, y))| *o = x + y)
    }))
}
