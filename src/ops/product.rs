//! One matrix product of a sum of products: the terms a linear layer's output and input gradient
//! are made of, described once for the native and the composed kernels.

use candle_core::{Result, Tensor};

/// One term `lhs @ rhs` (or `lhs @ rhs^T`) of a sum of products (a linear layer's output or input gradient).
pub(crate) struct Product<'a> {
    /// The left operand `[n, k]`.
    pub(crate) lhs: &'a Tensor,
    /// The right operand: `[k, out]`, or `[out, k]` when `transposed`.
    pub(crate) rhs: &'a Tensor,
    /// Whether the product is `lhs @ rhs^T`.
    pub(crate) transposed: bool,
    /// A dropout mask `[n, out]` the product is multiplied by (a LoRA input-gradient term).
    pub(crate) mask: Option<&'a Tensor>,
}

impl<'a> Product<'a> {
    /// `lhs @ rhs^T` (rhs: [out, k]).
    pub(crate) fn t(lhs: &'a Tensor, rhs: &'a Tensor) -> Self {
        Product {
            lhs,
            rhs,
            transposed: true,
            mask: None,
        }
    }

    /// `lhs @ rhs` (rhs: [k, out]).
    pub(crate) fn n(lhs: &'a Tensor, rhs: &'a Tensor) -> Self {
        Product {
            lhs,
            rhs,
            transposed: false,
            mask: None,
        }
    }

    /// This product multiplied elementwise by `mask`.
    pub(crate) fn masked(self, mask: &'a Tensor) -> Self {
        Product {
            mask: Some(mask),
            ..self
        }
    }

    /// The product's output width.
    pub(crate) fn out_width(&self) -> Result<usize> {
        self.rhs.dim(if self.transposed { 0 } else { 1 })
    }
}
