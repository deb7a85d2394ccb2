//! The linear op's native kernel: a sum of matrix products written into one buffer.

use super::narrow::{add_narrow_product, MAX_WIDTH};
use super::{matmul, matmul_new, par_filled, Held, Threads, PIECE};
use crate::ops::graft::Output;
use crate::ops::product::Product;
use candle_core::{Result, Tensor};

/// `bias + Σ lhs_i @ rhs_i` (each lhs `[n, k_i]`, f32 on the CPU) -> `[n, out]`: every product
/// accumulates into one buffer; LoRA terms (narrow, or masked by dropout, at most [`MAX_WIDTH`]
/// wide) through the narrow kernel, which applies the mask as it adds.
pub(crate) fn sum_of_products(bias: Option<&Tensor>, terms: &[Product<'_>]) -> Result<Output> {
    let n = terms[0].lhs.dim(0)?;
    let width = terms[0].out_width()?;
    // The sum's buffer: the bias rows, else made by the first (full) product, which writes it
    // without zeroing it first.
    let mut out = match bias {
        Some(b) => {
            let b = b.contiguous()?;
            let held = Held::new(&b)?;
            let b = held.slice()?;
            let rows = (PIECE / width.max(1)).max(1);
            Some(par_filled(n * width, rows * width, |_, piece| {
                piece
                    .chunks_exact_mut(width)
                    .for_each(|row| row.copy_from_slice(b))
            }))
        }
        None => None,
    };
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
        if k <= MAX_WIDTH && (k < width || p.mask.is_some()) {
            // A LoRA term (`hidden Bᵀ`, `grad_hidden A` with its dropout mask): the narrow kernel
            // adds it in place.
            let m = if p.transposed {
                rhs.t()?.contiguous()?
            } else {
                rhs
            };
            let mask = p.mask.map(Tensor::contiguous).transpose()?;
            let (lh, mh) = (Held::new(&lhs)?, Held::new(&m)?);
            let mask_held = mask.as_ref().map(Held::new).transpose()?;
            let mask = mask_held.as_ref().map(Held::slice).transpose()?;
            let out = out.get_or_insert_with(|| vec![0f32; n * width]);
            add_narrow_product(out, width, (lh.slice()?, k), mh.slice()?, mask);
            continue;
        }
        let (lh, rh) = (Held::new(&lhs)?, Held::new(&rhs)?);
        let b = if p.transposed {
            (rh.slice()?, 1, k)
        } else {
            (rh.slice()?, width, 1)
        };
        let a = (lh.slice()?, k, 1);
        match out.as_mut() {
            Some(out) => matmul((n, width, k), (out, width), true, a, b, 1.0, Threads::All),
            None => out = Some(matmul_new((n, width, k), a, b, 1.0, Threads::All)),
        }
    }
    let out = out.ok_or_else(|| candle_core::Error::Msg("no products to sum".into()))?;
    Ok(Output::host(out, (n, width)))
}
