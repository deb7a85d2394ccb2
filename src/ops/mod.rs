//! Differentiable kernels for training. Each op computes its forward with candle (fused candle-nn
//! kernels where they exist) and carries its own backward, which returns gradients only for tracked
//! inputs: frozen weights never receive a gradient and never enter candle's autograd as operands.

pub mod attention;
pub mod checkpoint;
pub(crate) mod cpu;
pub mod cross_entropy;
pub mod dropout;
pub mod flash;
pub mod graft;
pub mod linear;
pub mod lora;
pub mod mask;
pub(crate) mod narrow;
pub mod norm;
pub mod residual;
pub mod rope;
pub(crate) mod simd;
pub mod swiglu;

use candle_core::{Result, Tensor};

/// Flattens every dimension but the last: `[.., d] -> [n, d]`.
pub(crate) fn rows(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    x.reshape(((), d))
}
