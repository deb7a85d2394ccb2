//! Differentiable kernels for training. Each op has one dispatch point that picks its
//! implementation once from the operands' device and dtype ([`kernel::Kernel`]): a native CPU
//! kernel ([`cpu`]), a CUDA kernel (`ops/cuda/`, the `cuda` feature), or candle ops (fused candle-nn kernels
//! where they exist), which every device runs. Each op carries its own backward, which returns
//! gradients only for tracked inputs: frozen weights never receive a gradient and never enter
//! candle's autograd as operands.

pub mod activation;
pub mod attention;
pub mod checkpoint;
pub mod cpu;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod dropout;
pub mod glu;
pub mod graft;
pub mod kernel;
pub mod layer;
pub mod linear;
pub mod lora;
pub mod mask;
pub mod noise;
pub mod norm;
pub(crate) mod product;
pub mod residual;
pub mod rope;
pub mod router;
pub mod scores;

use candle_core::{Result, Tensor};

/// Flattens every dimension but the last: `[.., d] -> [n, d]`.
pub(crate) fn rows(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    x.reshape(((), d))
}
