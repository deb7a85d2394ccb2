//! The LoRA layer's weights and math (PEFT's `LoraLayer`): `y = W x + scale * B A dropout(x)`.
//! The model's linears hold one; `lora::layer` names it where PEFT's split puts it, beside the
//! config, injection, adapter files and merge that `lora/` holds.

use super::dropout::dropout_mask_from;
use crate::rng::{hash_str, key, Rng};
use candle_core::{DType, Device, Result, Tensor, Var};

/// The dtype of every LoRA weight, its gradient and its optimizer state: float32 whatever the base's
/// dtype, as PEFT keeps adapters over bf16/f16 bases (`autocast_adapter_dtype`). The products run
/// in the input's dtype ([`LoraLayer::a_in`]): bf16 mixed precision (`--bf16`).
pub const ADAPTER_DTYPE: DType = DType::F32;

/// One adapted module's low-rank pair.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// Down projection `[r, in]`.
    pub a: Var,
    /// Up projection `[out, r]`.
    pub b: Var,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the LoRA branch's input.
    pub dropout: f64,
}

/// PEFT's scaling factor.
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

impl LoraLayer {
    /// PEFT's default initialisation: A Kaiming-uniform with a = sqrt(5) (uniform in
    /// ±1/sqrt(in)), B zero, so the adapted model starts equal to the base. `seed` and the module
    /// name decide A.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        module: &str,
        in_features: usize,
        out_features: usize,
        r: usize,
        scale: f64,
        dropout: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let mut rng = Rng::new(key(&[seed, hash_str(module)]));
        let a: Vec<f32> = (0..r * in_features)
            .map(|_| rng.uniform(-bound, bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (r, in_features), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_features, r), dtype, device)?;
        Self::from_tensors(&a, &b, scale, dropout)
    }

    /// Wraps existing A `[r, in]` and B `[out, r]` (e.g. read from an adapter file).
    pub fn from_tensors(a: &Tensor, b: &Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(LoraLayer {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale,
            dropout,
        })
    }

    /// A, detached, in `dtype` (the input's: bf16 over a bf16 base), for products computed
    /// outside candle's graph whose gradients come back through [`Self::grad_of`].
    pub fn a_in(&self, dtype: DType) -> Result<Tensor> {
        self.a.as_tensor().detach().to_dtype(dtype)
    }

    /// B, detached, in `dtype` (see [`Self::a_in`]).
    pub fn b_in(&self, dtype: DType) -> Result<Tensor> {
        self.b.as_tensor().detach().to_dtype(dtype)
    }

    /// A gradient computed in the input's dtype, in the adapter's own (f32), for the optimizer.
    pub fn grad_of(grad: Tensor) -> Result<Tensor> {
        grad.to_dtype(ADAPTER_DTYPE)
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// This step's dropout mask for `rows` inputs of this module in `dtype` (the input's), or
    /// None when dropout is off (evaluation, or p = 0). x-shaped as `[rows, in]`.
    pub fn dropout_mask(
        &self,
        module: &str,
        rows: usize,
        step_key: Option<u64>,
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        self.dropout_mask_rows(module, 0, rows, step_key, dtype)
    }

    /// Rows `first..first + rows` of [`Self::dropout_mask`]'s mask for a longer input (a chunk of
    /// its rows): the same entries as the whole mask's. `[rows, in]`
    pub fn dropout_mask_rows(
        &self,
        module: &str,
        first: usize,
        rows: usize,
        step_key: Option<u64>,
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        let Some(step_key) = step_key.filter(|_| self.dropout > 0.0) else {
            return Ok(None);
        };
        let in_features = self.a.dims()[1];
        let mask = dropout_mask_from(
            first * in_features,
            rows * in_features,
            self.dropout,
            key(&[step_key, hash_str(module)]),
        );
        let mask = Tensor::from_vec(mask, (rows, in_features), self.a.device())?.to_dtype(dtype)?;
        Ok(Some(mask))
    }

    /// The dense update `scale * B A`, shaped like the base weight `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b
            .as_tensor()
            .matmul(self.a.as_tensor())?
            .affine(self.scale, 0.0)
    }
}
