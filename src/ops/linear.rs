//! Linear layers over frozen weights, with and without a LoRA branch.

use super::graft::{graft1, graft3};
use super::rows;
use crate::quant::QuantizedWeight;
use candle_core::{Result, Tensor, D};
use std::sync::Arc;

/// A frozen linear weight `[out, in]`: a plain tensor, or quantized codes that are dequantized for
/// each use (forward, then again in backward) so at most one layer's full-precision copy is alive.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// Full precision.
    Dense(Tensor),
    /// NF4 / int8 / GGUF.
    Quantized(Arc<QuantizedWeight>),
}

impl FrozenWeight {
    /// The full-precision weight: the tensor itself, or a temporary dequantized copy.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Quantized(q) => q
                .dequantize()
                .map_err(|e| candle_core::Error::Msg(e.to_string())),
        }
    }

    /// `x @ W^T` for x: [n, in] -> [n, out].
    fn xwt(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.dense()?.t()?)
    }

    /// `g @ W` for g: [n, out] -> [n, in] (the input gradient).
    fn gw(&self, g: &Tensor) -> Result<Tensor> {
        g.matmul(&self.dense()?)
    }
}

/// `x @ w^T + bias` for a frozen `w: [out, in]`; backward returns only the input gradient `g @ w`.
///
/// x: [.., in] -> [.., out]
pub fn frozen_linear(x: &Tensor, w: &FrozenWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let out = dense(&x.detach(), &w.dense()?, bias)?;
    let w = w.clone();
    graft1(
        "frozen-linear",
        x,
        out,
        Box::new(move |x, g| Ok(Some(w.gw(&rows(g)?)?.reshape(x.shape())?))),
    )
}

/// `x @ w^T + bias` computed on untracked tensors. x: [.., in] -> [.., out]
pub(crate) fn dense(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let y = rows(x)?.matmul(&w.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(dims)
}

/// The frozen part of a LoRA-adapted linear: base weight, optional bias, and the dropout mask of
/// this step (already scaled by `1 / (1 - p)`), if dropout is active.
pub struct LoraBase<'a> {
    /// Frozen base weight `[out, in]`.
    pub weight: &'a FrozenWeight,
    /// Frozen base bias `[out]`.
    pub bias: Option<&'a Tensor>,
    /// Dropout mask `[n, in]` applied to the LoRA branch's input only, as PEFT does.
    pub dropout_mask: Option<Tensor>,
}

/// PEFT's LoRA forward: `x @ W^T + bias + scale * (dropout(x) @ A^T) @ B^T`, as one op whose
/// backward yields gradients for `a`, `b` and (when tracked) `x`, and none for the frozen base.
///
/// x: [.., in], a: [r, in], b: [out, r] -> [.., out]
pub fn lora_linear(
    x: &Tensor,
    base: LoraBase<'_>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let x_rows = rows(&x.detach())?;
    let base_out = base.weight.xwt(&x_rows)?;
    let base_out = match base.bias {
        Some(bias) => base_out.broadcast_add(bias)?,
        None => base_out,
    };
    let lora_in = match &base.dropout_mask {
        Some(mask) => x_rows.mul(mask)?,
        None => x_rows,
    };
    let hidden = lora_in.matmul(&a.detach().t()?)?;
    // Folding the scale into the tiny B saves two passes over the [n, out] output.
    let b_scaled = b.detach().affine(scale, 0.0)?;
    let out = (base_out + hidden.matmul(&b_scaled.t()?)?)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out.dim(D::Minus1)?;
    }
    let out = out.reshape(dims)?;
    let weight = base.weight.clone();
    let mask = base.dropout_mask;
    graft3(
        "lora-linear",
        x,
        a,
        b,
        out,
        Box::new(move |x, a, _, g, needs| {
            let g = rows(g)?;
            let grad_hidden = g.matmul(&b_scaled)?;
            let grad_b = needs[2]
                .then(|| g.t()?.matmul(&hidden)?.affine(scale, 0.0))
                .transpose()?;
            let grad_a = needs[1]
                .then(|| grad_hidden.t()?.matmul(&lora_in))
                .transpose()?;
            let grad_x = if needs[0] {
                let through_lora = grad_hidden.matmul(a)?;
                let through_lora = match &mask {
                    Some(mask) => through_lora.mul(mask)?,
                    None => through_lora,
                };
                Some((weight.gw(&g)? + through_lora)?.reshape(x.shape())?)
            } else {
                None
            };
            Ok((grad_x, grad_a, grad_b))
        }),
    )
}
