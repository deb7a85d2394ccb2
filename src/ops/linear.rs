//! Linear layers over frozen weights, with and without a LoRA branch.

use super::cpu::{is_cpu_f32, matmul, Held, Threads};
use super::graft::{graft1, graft3, Output};
use super::rows;
use crate::quant::QuantizedWeight;
use candle_core::{Result, Tensor};
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

    /// `g @ W` for g: [n, out] -> [n, in] (the input gradient).
    fn gw(&self, g: &Tensor) -> Result<Tensor> {
        g.matmul(&self.dense()?)
    }
}

/// One term `lhs @ rhs` (or `lhs @ rhs^T`) of a [`sum_of_products`].
struct Product<'a> {
    lhs: &'a Tensor,
    rhs: &'a Tensor,
    transposed: bool,
}

impl<'a> Product<'a> {
    /// `lhs @ rhs^T` (rhs: [out, k]).
    fn t(lhs: &'a Tensor, rhs: &'a Tensor) -> Self {
        Product {
            lhs,
            rhs,
            transposed: true,
        }
    }

    /// `lhs @ rhs` (rhs: [k, out]).
    fn n(lhs: &'a Tensor, rhs: &'a Tensor) -> Self {
        Product {
            lhs,
            rhs,
            transposed: false,
        }
    }

    fn out_width(&self) -> Result<usize> {
        self.rhs.dim(if self.transposed { 0 } else { 1 })
    }
}

/// `bias + Σ lhs_i @ rhs_i` (each lhs `[n, k_i]`) -> `[n, out]`. On the CPU in f32 every product
/// accumulates into one buffer (no intermediate sums); elsewhere candle's matmul and add.
fn sum_of_products(bias: Option<&Tensor>, terms: &[Product<'_>]) -> Result<Output> {
    let native =
        terms.iter().all(|p| is_cpu_f32(p.lhs) && is_cpu_f32(p.rhs)) && bias.is_none_or(is_cpu_f32);
    if !native {
        let mut acc: Option<Tensor> = None;
        for p in terms {
            let rhs = if p.transposed {
                p.rhs.t()?
            } else {
                p.rhs.clone()
            };
            let y = p.lhs.matmul(&rhs)?;
            acc = Some(match acc {
                Some(a) => (a + y)?,
                None => y,
            });
        }
        let acc = acc.ok_or_else(|| candle_core::Error::Msg("no products to sum".into()))?;
        return Ok(match bias {
            Some(b) => acc.broadcast_add(b)?,
            None => acc,
        }
        .into());
    }
    let n = terms[0].lhs.dim(0)?;
    let width = terms[0].out_width()?;
    let mut out = vec![0f32; n * width];
    if let Some(b) = bias {
        let b = b.contiguous()?;
        let held = Held::new(&b)?;
        let b = held.slice()?;
        out.chunks_exact_mut(width)
            .for_each(|row| row.copy_from_slice(b));
    }
    let mut accumulate = bias.is_some();
    for p in terms {
        let (lhs, rhs) = (p.lhs.contiguous()?, p.rhs.contiguous()?);
        let k = lhs.dim(1)?;
        if lhs.dim(0)? != n || p.out_width()? != width || p.rhs.elem_count() != k * width {
            candle_core::bail!(
                "sum of products: shapes {:?} and {:?} do not fit",
                lhs.dims(),
                rhs.dims()
            );
        }
        let (lh, rh) = (Held::new(&lhs)?, Held::new(&rhs)?);
        let b = if p.transposed {
            (rh.slice()?, 1, k)
        } else {
            (rh.slice()?, width, 1)
        };
        matmul(
            (n, width, k),
            (&mut out, width),
            accumulate,
            (lh.slice()?, k, 1),
            b,
            1.0,
            Threads::All,
        );
        accumulate = true;
    }
    Ok(Output::host(out, (n, width)))
}

/// `x @ w^T + bias` for a frozen `w: [out, in]`; backward returns only the input gradient `g @ w`.
///
/// x: [.., in] -> [.., out]
pub fn frozen_linear(x: &Tensor, w: &FrozenWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let out = dense_output(&x.detach(), &w.dense()?, bias)?;
    let w = w.clone();
    graft1(
        "frozen-linear",
        x,
        out,
        Box::new(move |x, g| {
            let grad =
                sum_of_products(None, &[Product::n(&rows(g)?, &w.dense()?)])?.into_tensor()?;
            Ok(Some(grad.reshape(x.shape())?))
        }),
    )
}

/// `x @ w^T + bias` computed on untracked tensors. x: [.., in] -> [.., out]
pub(crate) fn dense(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    dense_output(x, w, bias)?.into_tensor()
}

/// [`dense`] as a grafted op's result (no copy of a CPU kernel's buffer).
fn dense_output(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Output> {
    let mut dims = x.dims().to_vec();
    let y = sum_of_products(bias, &[Product::t(&rows(x)?, w)])?;
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
    let lora_in = match &base.dropout_mask {
        Some(mask) => x_rows.mul(mask)?,
        None => x_rows.clone(),
    };
    let hidden = lora_in.matmul(&a.detach().t()?)?;
    // Folding the scale into the tiny B saves two passes over the [n, out] output.
    let b_scaled = b.detach().affine(scale, 0.0)?;
    let out = sum_of_products(
        base.bias,
        &[
            Product::t(&x_rows, &base.weight.dense()?),
            Product::t(&hidden, &b_scaled),
        ],
    )?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = b.dim(0)?;
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
                let grad = match &mask {
                    // Dropout applies to the LoRA branch only: its term is masked first.
                    Some(mask) => (weight.gw(&g)? + grad_hidden.matmul(a)?.mul(mask)?)?,
                    None => sum_of_products(
                        None,
                        &[
                            Product::n(&g, &weight.dense()?),
                            Product::n(&grad_hidden, a),
                        ],
                    )?
                    .into_tensor()?,
                };
                Some(grad.reshape(x.shape())?)
            } else {
                None
            };
            Ok((grad_x, grad_a, grad_b))
        }),
    )
}
