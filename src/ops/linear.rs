//! Linear layers over frozen weights, with and without a LoRA branch.

use super::cpu::{self, narrow::MAX_WIDTH};
use super::graft::{graft1, graft3, Output};
use super::kernel::Kernel;
use super::product::Product;
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
            FrozenWeight::Quantized(q) => dequantize(q),
        }
    }
}

/// A frozen quantized weight, dequantized: the dispatch point of dequantization. 4-bit codes on
/// a GPU whose source dtype the CUDA kernels take run the CUDA kernel (bit for bit the CPU's
/// values); everything else is `quant`'s own (a host loop on the CPU, candle ops elsewhere).
fn dequantize(q: &QuantizedWeight) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let crate::quant::QuantizedData::FourBit(f) = &q.data {
        if Kernel::on(f.packed.device(), f.source_dtype) == Kernel::Cuda {
            let absmax = f
                .absmax
                .values()
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let (o, i) = q.shape;
            let dense = super::cuda::dequantize_4bit(
                &f.packed,
                &absmax,
                &f.code,
                (o * i, f.blocksize),
                f.source_dtype,
            )?;
            return dense.reshape((o, i))?.to_dtype(q.dtype);
        }
    }
    q.dequantize()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// `bias + Σ lhs_i @ rhs_i` (each lhs `[n, k_i]`) -> `[n, out]`: the linear op's dispatch point.
/// The native CPU kernel accumulates every product into one buffer (no intermediate sums); a
/// masked term needs its narrow kernel (which applies the mask as it adds), so a masked term wider
/// than [`MAX_WIDTH`] (rank) sends the whole sum to candle's matmul and add.
fn sum_of_products(bias: Option<&Tensor>, terms: &[Product<'_>]) -> Result<Output> {
    let mut operands: Vec<&Tensor> = terms
        .iter()
        .flat_map(|p| [p.lhs, p.rhs].into_iter().chain(p.mask))
        .collect();
    operands.extend(bias);
    let narrow_masks = terms
        .iter()
        .all(|p| p.mask.is_none() || p.lhs.dim(1).is_ok_and(|k| k <= MAX_WIDTH));
    match Kernel::of(&operands) {
        Kernel::Cpu if narrow_masks => cpu::linear::sum_of_products(bias, terms),
        _ => composed_sum_of_products(bias, terms),
    }
}

/// [`sum_of_products`] in candle ops.
fn composed_sum_of_products(bias: Option<&Tensor>, terms: &[Product<'_>]) -> Result<Output> {
    let mut acc: Option<Tensor> = None;
    for p in terms {
        let rhs = if p.transposed {
            p.rhs.t()?
        } else {
            p.rhs.clone()
        };
        let y = p.lhs.matmul(&rhs)?;
        let y = match p.mask {
            Some(mask) => y.mul(mask)?,
            None => y,
        };
        acc = Some(match acc {
            Some(a) => (a + y)?,
            None => y,
        });
    }
    let acc = acc.ok_or_else(|| candle_core::Error::Msg("no products to sum".into()))?;
    Ok(match bias {
        Some(b) => acc.broadcast_add(b)?,
        None => acc,
    }
    .into())
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
            let grad = input_gradient(&[InputShare {
                g: &rows(g)?,
                weight: &w,
                lora: None,
            }])?;
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

/// What a LoRA linear's backward reuses from its forward besides the input: the r-wide
/// `hidden = dropout(x) A^T`.
pub(crate) struct LoraHidden {
    hidden: Tensor,
    /// A DoRA module's: what its magnitude's gradient reads.
    pub(crate) dora: Option<DoraKept>,
}

/// What a DoRA module's backward reads besides the LoRA hidden: the projection's output before the
/// magnitude scales it `[n, out]`, the scale `m / ‖W + scale B A‖` (in the input's dtype) and the
/// norm (f32), both `[out]`.
pub(crate) struct DoraKept {
    pub(crate) unscaled: Tensor,
    pub(crate) factor: Tensor,
    pub(crate) norm: Tensor,
}

impl LoraHidden {
    /// The same on `device` (a copy where it is elsewhere).
    pub(crate) fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(LoraHidden {
            hidden: self.hidden.to_device(device)?,
            dora: self
                .dora
                .as_ref()
                .map(|d| -> Result<DoraKept> {
                    Ok(DoraKept {
                        unscaled: d.unscaled.to_device(device)?,
                        factor: d.factor.to_device(device)?,
                        norm: d.norm.to_device(device)?,
                    })
                })
                .transpose()?,
        })
    }
}

/// `x @ m` for a narrow `m` (a LoRA rank wide), the narrow products' dispatch point: the native
/// kernel for f32 on the CPU up to [`MAX_WIDTH`] columns, candle's matmul otherwise.
/// x: [n, k], m: [k, r] -> [n, r]
fn matmul_narrow(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    match Kernel::of(&[x, m]) {
        Kernel::Cpu if m.dim(1)? <= MAX_WIDTH => cpu::narrow::matmul(x, m),
        _ => x.matmul(m),
    }
}

/// `qᵀ @ p` for a narrow `q`, dispatched as [`matmul_narrow`]. q: [n, r], p: [n, w] -> [r, w]
fn transposed_matmul_narrow(q: &Tensor, p: &Tensor) -> Result<Tensor> {
    match Kernel::of(&[q, p]) {
        Kernel::Cpu if q.dim(1)? <= MAX_WIDTH => cpu::narrow::transposed_matmul(q, p),
        _ => q.t()?.matmul(p),
    }
}

/// The LoRA branch's input: `x`, masked when dropout is active. x: [n, in]
pub(crate) fn lora_input(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        Some(mask) => x.mul(mask),
        None => Ok(x.clone()),
    }
}

/// The LoRA branch's hidden `dropout(x) A^T` alone (no base product), for a backward that has
/// no use for the module's output. x: [n, in], a: [r, in] -> [n, r]
pub(crate) fn lora_hidden(x: &Tensor, mask: Option<&Tensor>, a: &Tensor) -> Result<LoraHidden> {
    Ok(LoraHidden {
        hidden: matmul_narrow(&lora_input(x, mask)?, &a.t()?)?,
        dora: None,
    })
}

/// PEFT's LoRA forward on untracked rows: `x W^T + bias + scale (dropout(x) A^T) B^T`.
///
/// x: [n, in], a: [r, in], b: [out, r] -> ([n, out], what the backward reuses)
pub(crate) fn lora_rows(
    x: &Tensor,
    base: &LoraBase<'_>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<(Output, LoraHidden)> {
    let LoraHidden { hidden, .. } = lora_hidden(x, base.dropout_mask.as_ref(), a)?;
    // Folding the scale into the tiny B saves two passes over the [n, out] output.
    let b_scaled = b.affine(scale, 0.0)?;
    let out = sum_of_products(
        base.bias,
        &[
            Product::t(x, &base.weight.dense()?),
            Product::t(&hidden, &b_scaled),
        ],
    )?;
    Ok((out, LoraHidden { hidden, dora: None }))
}

/// A LoRA pair's gradients for the output gradient `g: [n, out]`, given the branch's input
/// `lora_in: [n, in]` (see [`lora_input`]) and B `[out, r]` (untracked):
/// `(grad_hidden [n, r], grad_a, grad_b)`, the weight gradients only where asked for.
pub(crate) fn lora_weight_grads(
    g: &Tensor,
    lora_in: &Tensor,
    (saved, b): (&LoraHidden, &Tensor),
    scale: f64,
    (needs_a, needs_b): (bool, bool),
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let grad_hidden = matmul_narrow(g, &b.affine(scale, 0.0)?)?;
    // grad_B = gᵀ hidden, computed as its transpose (the narrow side first); the scaling writes
    // it out in grad_B's layout.
    let grad_b = needs_b
        .then(|| {
            transposed_matmul_narrow(&saved.hidden, g)?
                .t()?
                .affine(scale, 0.0)
        })
        .transpose()?;
    let grad_a = needs_a
        .then(|| transposed_matmul_narrow(&grad_hidden, lora_in))
        .transpose()?;
    Ok((grad_hidden, grad_a, grad_b))
}

/// One module's share of the gradient of its input: `g W`, plus `(grad_hidden A) ∘ mask` for a
/// LoRA module (the dropout mask applies to the LoRA branch only).
pub(crate) struct InputShare<'a> {
    /// The gradient of the module's output `[n, out]`.
    pub(crate) g: &'a Tensor,
    /// The frozen base weight `[out, in]`.
    pub(crate) weight: &'a FrozenWeight,
    /// `(grad_hidden [n, r], A [r, in], dropout mask [n, in])` of a LoRA module.
    pub(crate) lora: Option<(&'a Tensor, &'a Tensor, Option<&'a Tensor>)>,
}

/// The gradient of an input several modules read (q, k and v read one normalised input): every
/// unmasked product accumulates into one buffer. Quantized weights are dequantized one module at a
/// time (their partial sums added), so at most one full-precision copy is alive. -> [n, in]
pub(crate) fn input_gradient(shares: &[InputShare<'_>]) -> Result<Tensor> {
    let quantized = shares
        .iter()
        .any(|s| matches!(s.weight, FrozenWeight::Quantized(_)));
    let groups: Vec<&[InputShare<'_>]> = if quantized {
        shares.chunks(1).collect()
    } else {
        vec![shares]
    };
    let mut grad: Option<Tensor> = None;
    for group in groups {
        let dense = group
            .iter()
            .map(|s| s.weight.dense())
            .collect::<Result<Vec<_>>>()?;
        let mut terms = Vec::with_capacity(2 * group.len());
        for (share, w) in group.iter().zip(&dense) {
            terms.push(Product::n(share.g, w));
            match share.lora {
                Some((grad_hidden, a, None)) => terms.push(Product::n(grad_hidden, a)),
                Some((grad_hidden, a, Some(mask))) => {
                    terms.push(Product::n(grad_hidden, a).masked(mask))
                }
                None => {}
            }
        }
        let part = sum_of_products(None, &terms)?.into_tensor()?;
        grad = Some(match grad {
            Some(g) => (g + part)?,
            None => part,
        });
    }
    grad.ok_or_else(|| candle_core::Error::Msg("input gradient of no modules".into()))
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
    let (out, saved) = lora_rows(&rows(&x.detach())?, &base, &a.detach(), &b.detach(), scale)?;
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
        Box::new(move |x, a, b, g, needs| {
            let g = rows(g)?;
            // The masked input is rebuilt rather than kept: one product by the mask.
            let lora_in = lora_input(&rows(x)?, mask.as_ref())?;
            let (grad_hidden, grad_a, grad_b) =
                lora_weight_grads(&g, &lora_in, (&saved, b), scale, (needs[1], needs[2]))?;
            let grad_x = needs[0]
                .then(|| {
                    input_gradient(&[InputShare {
                        g: &g,
                        weight: &weight,
                        lora: Some((&grad_hidden, a, mask.as_ref())),
                    }])?
                    .reshape(x.shape())
                })
                .transpose()?;
            Ok((grad_x, grad_a, grad_b))
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_wrappers_equal_candle_matmul() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (50, 24), &dev)?;
        let m = Tensor::randn(0f32, 1.0, (24, 16), &dev)?;
        let q = Tensor::randn(0f32, 1.0, (50, 16), &dev)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(diff(&matmul_narrow(&x, &m)?, &x.matmul(&m)?)? < 1e-4);
        assert!(diff(&transposed_matmul_narrow(&q, &x)?, &q.t()?.matmul(&x)?)? < 1e-4);
        // A non-contiguous operand and a width past the kernels' limit take their paths too.
        let wide = Tensor::randn(0f32, 1.0, (24, 80), &dev)?;
        assert!(diff(&matmul_narrow(&x, &wide)?, &x.matmul(&wide)?)? < 1e-4);
        let mt = Tensor::randn(0f32, 1.0, (16, 24), &dev)?;
        assert!(diff(&matmul_narrow(&x, &mt.t()?)?, &x.matmul(&mt.t()?)?)? < 1e-4);
        Ok(())
    }
}
