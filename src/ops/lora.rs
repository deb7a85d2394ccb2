//! The LoRA layer's weights and math (PEFT's `LoraLayer`): `y = W x + scale * B A dropout(x)`,
//! and DoRA's (`use_dora`): `y = m / ‖W + scale B A‖ ⊙ (W x + scale B A x)`, the norm taken per
//! output row and treated as a constant in the backward, as PEFT does.
//! The model's linears hold one; `lora::layer` names it where PEFT's split puts it, beside the
//! config, injection, adapter files and merge that `lora/` holds.

use super::dropout::dropout_mask_from;
use super::graft::{grad_enabled, graft_carrying, park};
use super::linear::{
    dense, input_gradient, lora_input, lora_rows, lora_weight_grads, DoraKept, FrozenWeight,
    InputShare, LoraBase, LoraHidden,
};
use super::rows;
use crate::rng::{hash_str, key, Rng};
use candle_core::{DType, Device, Result, Tensor, TensorId, Var};
use std::sync::{Arc, Mutex};

/// The dtype of every LoRA weight, its gradient and its optimizer state: float32 whatever the base's
/// dtype, as PEFT keeps adapters over bf16/f16 bases (`autocast_adapter_dtype`). The products run
/// in the input's dtype ([`LoraLayer::a_in`]): bf16 mixed precision (`--bf16`).
pub const ADAPTER_DTYPE: DType = DType::F32;

/// PEFT's name of DoRA's magnitude vector, in module paths and saved keys.
pub const MAGNITUDE: &str = "lora_magnitude_vector";

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
    /// DoRA's magnitude vector, when the adapter is a DoRA adapter.
    pub dora: Option<Dora>,
    /// The A and B this layer started from when its initialisation moved them out of the base
    /// weight (PiSSA, OLoRA: the base holds `W - scale B0 A0`); saving writes the adapter
    /// relative to the original base from them (`lora::init`).
    pub initial: Option<Arc<(Tensor, Tensor)>>,
}

/// DoRA's trainable magnitude `m` `[out]` (PEFT's `lora_magnitude_vector`), and the weight norm of
/// the last forward without gradients, reused while A, B and the base weight are unchanged
/// (generation reads it once per adapter, not once per token).
#[derive(Debug, Clone)]
pub struct Dora {
    /// The magnitude of each output row.
    pub magnitude: Var,
    norm: Arc<Mutex<Option<(NormKey, Tensor)>>>,
    /// `‖W‖²` per row of the frozen base weight it was computed from.
    base_norm: Arc<Mutex<Option<(WeightId, Tensor)>>>,
}

/// What a cached weight norm was computed from: the base weight's identity and sums over A and B
/// (an optimizer step, a load or any other change of either moves them).
#[derive(Debug, Clone, Copy, PartialEq)]
struct NormKey {
    weight: WeightId,
    sums: [f64; 4],
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum WeightId {
    Tensor(TensorId),
    Quantized(usize),
}

/// A DoRA cache, locked.
fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("DoRA norm cache: poisoned lock".into()))
}

/// Which frozen weight a cached norm belongs to.
fn weight_id(w: &FrozenWeight) -> WeightId {
    match w {
        FrozenWeight::Dense(t) => WeightId::Tensor(t.id()),
        FrozenWeight::Quantized(q) => WeightId::Quantized(Arc::as_ptr(q) as usize),
    }
}

impl Dora {
    /// Wraps a magnitude vector `[out]`.
    pub fn new(magnitude: &Tensor) -> Result<Self> {
        Ok(Dora {
            magnitude: Var::from_tensor(magnitude)?,
            norm: Arc::default(),
            base_norm: Arc::default(),
        })
    }
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
            dora: None,
            initial: None,
        })
    }

    /// This layer as a DoRA layer with magnitude `m` `[out]`.
    pub fn with_magnitude(mut self, m: &Tensor) -> Result<Self> {
        self.dora = Some(Dora::new(m)?);
        Ok(self)
    }

    /// This layer as a freshly initialised DoRA layer over base weight `w`: the magnitude is the
    /// row norm of `W + scale B A`, as PEFT's `DoraLinearLayer.update_layer` sets it.
    pub fn with_initial_magnitude(self, w: &FrozenWeight) -> Result<Self> {
        let m = self.weight_norm(&w.dense()?)?;
        self.with_magnitude(&m)
    }

    /// `‖W + scale B A‖` per output row from `‖W‖²` per row (`base_sq`), without forming the
    /// `[out, in]` sum: `‖w_j‖² + 2 scale b_j·(A w_j) + scale² b_j (A Aᵀ) b_jᵀ`, whose only
    /// weight-sized work is the r-wide product `W Aᵀ`. `[out]` in f32, outside the graph.
    fn norm_from(&self, w: &Tensor, base_sq: &Tensor) -> Result<Tensor> {
        let a = self.a.as_tensor().detach().to_dtype(DType::F32)?;
        let b = self.b.as_tensor().detach().to_dtype(DType::F32)?;
        let w_a = w.detach().to_dtype(DType::F32)?.matmul(&a.t()?)?;
        let cross = (&b * &w_a)?.sum(1)?;
        let b_gram = (b.matmul(&a.matmul(&a.t()?)?)? * &b)?.sum(1)?;
        let s = self.scale;
        let sq = (base_sq + cross.affine(2.0 * s, 0.0)?)?.add(&b_gram.affine(s * s, 0.0)?)?;
        sq.relu()?.sqrt()
    }

    /// The trainable tensors: A, B and (DoRA) the magnitude.
    pub fn vars(&self) -> Vec<&Var> {
        let mut out = vec![&self.a, &self.b];
        out.extend(self.dora.as_ref().map(|d| &d.magnitude));
        out
    }

    /// `‖W + scale B A‖` per output row, `[out]` in f32, outside the graph (PEFT detaches it),
    /// from the full sum as PEFT computes it.
    pub fn weight_norm(&self, w: &Tensor) -> Result<Tensor> {
        let merged = (w.detach().to_dtype(DType::F32)? + self.delta_weight()?.detach())?;
        merged.sqr()?.sum(1)?.sqrt()
    }

    /// DoRA's `‖W + scale B A‖` per output row `[out]` in f32, detached (the backward treats it
    /// as a constant, as PEFT does); None for a plain LoRA layer. Without gradients (evaluation,
    /// generation) the norm is kept for the next call while the weights stay the same.
    pub fn dora_norm(&self, w: &FrozenWeight) -> Result<Option<Tensor>> {
        self.dora_norm_of(w, None)
    }

    /// [`Self::dora_norm`] given `w` already in full precision (`dense`), when the caller has
    /// dequantized it for its own product: a quantized weight is then dequantized once.
    fn dora_norm_of(&self, w: &FrozenWeight, dense: Option<&Tensor>) -> Result<Option<Tensor>> {
        let Some(dora) = &self.dora else {
            return Ok(None);
        };
        let key = (!grad_enabled()).then(|| self.norm_key(w)).transpose()?;
        if let (Some(key), Some((k, norm))) = (key, lock(&dora.norm)?.as_ref()) {
            if *k == key {
                return Ok(Some(norm.clone()));
            }
        }
        let dense = match dense {
            Some(d) => d.clone(),
            None => w.dense()?,
        };
        let base_sq = {
            let mut cached = lock(&dora.base_norm)?;
            match cached.as_ref() {
                Some((id, sq)) if *id == weight_id(w) => sq.clone(),
                _ => {
                    let sq = dense.detach().to_dtype(DType::F32)?.sqr()?.sum(1)?;
                    *cached = Some((weight_id(w), sq.clone()));
                    sq
                }
            }
        };
        let norm = self.norm_from(&dense, &base_sq)?;
        if let Some(key) = key {
            *lock(&dora.norm)? = Some((key, norm.clone()));
        }
        Ok(Some(norm))
    }

    fn norm_key(&self, w: &FrozenWeight) -> Result<NormKey> {
        let weight = weight_id(w);
        let sums = |t: &Tensor| -> Result<[f64; 2]> {
            let t = t.detach().to_dtype(DType::F64)?;
            Ok([
                t.sum_all()?.to_scalar::<f64>()?,
                t.sqr()?.sum_all()?.to_scalar::<f64>()?,
            ])
        };
        let ([a0, a1], [b0, b1]) = (sums(self.a.as_tensor())?, sums(self.b.as_tensor())?);
        Ok(NormKey {
            weight,
            sums: [a0, a1, b0, b1],
        })
    }

    /// The base weight with this adapter folded in, as PEFT's merge: `W + scale B A`, and for
    /// DoRA `m / ‖W + scale B A‖ ⊙ (W + scale B A)` row by row. In f32. w: [out, in]
    pub fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        let merged = (w.to_dtype(DType::F32)? + self.delta_weight()?.to_dtype(DType::F32)?)?;
        match &self.dora {
            None => Ok(merged),
            Some(dora) => {
                let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
                let m = dora.magnitude.as_tensor().to_dtype(DType::F32)?;
                merged.broadcast_mul(&m.unsqueeze(1)?.div(&norm)?)
            }
        }
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

/// PEFT's DoRA forward (`lora_magnitude_vector` on a linear):
/// `x W^T + bias + (f - 1) ⊙ (d W^T) + f ⊙ scale (d A^T) B^T` with `d = dropout(x)` and
/// `f = m / ‖W + scale B A‖` per output row — `f ⊙ (x W^T + scale (x A^T) B^T) + bias` without
/// dropout. The norm is a constant to the backward (PEFT detaches it); the op's backward computes
/// the gradients of A, B and m and hands them to candle's store through the op's carriers
/// ([`graft_carrying`]), and the input's when it is tracked.
///
/// x: [.., in] -> [.., out]
pub fn dora_linear(x: &Tensor, base: LoraBase<'_>, lora: &LoraLayer) -> Result<Tensor> {
    let dtype = x.dtype();
    let mask = base.dropout_mask;
    let (out, saved) = dora_rows(
        &rows(&x.detach())?,
        base.weight,
        base.bias,
        mask.as_ref(),
        lora,
    )?;
    let (a, b) = (lora.a_in(dtype)?, lora.b_in(dtype)?);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = b.dim(0)?;
    }
    let out = out.reshape(dims)?;
    let weight = base.weight.clone();
    let lora = lora.clone();
    let carried: Vec<Tensor> = lora
        .vars()
        .into_iter()
        .map(|v| v.as_tensor().clone())
        .collect();
    graft_carrying(
        "dora-linear",
        x,
        &carried,
        out,
        Box::new(move |x, g, needs_x| {
            let g = rows(g)?.contiguous()?;
            let kept = saved
                .dora
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("dora-linear: nothing kept".into()))?;
            // Parks the magnitude's gradient; g ⊙ f is the gradient of the unscaled output.
            let g_scaled = dora_backward(&g, kept, &lora)?;
            let lora_in = lora_input(&rows(x)?, mask.as_ref())?;
            let (grad_hidden, grad_a, grad_b) =
                lora_weight_grads(&g_scaled, &lora_in, (&saved, &b), lora.scale, (true, true))?;
            for (var, grad) in [(&lora.a, grad_a), (&lora.b, grad_b)] {
                if let Some(grad) = grad {
                    park(var.as_tensor(), LoraLayer::grad_of(grad)?)?;
                }
            }
            if !needs_x {
                return Ok(None);
            }
            let grad = match &mask {
                None => input_gradient(&[InputShare {
                    g: &g_scaled,
                    weight: &weight,
                    lora: Some((&grad_hidden, &a, None)),
                }])?,
                Some(mask) => {
                    // g W + ((f - 1) g W + grad_hidden A) ∘ mask
                    let through_w = input_gradient(&[InputShare {
                        g: &g,
                        weight: &weight,
                        lora: None,
                    }])?;
                    let dropped = input_gradient(&[InputShare {
                        g: &(&g_scaled - &g)?,
                        weight: &weight,
                        lora: Some((&grad_hidden, &a, None)),
                    }])?;
                    (through_w + dropped.mul(mask)?)?
                }
            };
            Ok(Some(grad.reshape(x.shape())?))
        }),
    )
}

/// The magnitude's gradient `Σ_rows (g ⊙ unscaled) / norm` (f32 `[out]`). g, unscaled: [n, out]
fn magnitude_grad(g: &Tensor, unscaled: &Tensor, norm: &Tensor) -> Result<Tensor> {
    // The column sums as a product with a row of ones: one pass at gemm speed (candle's
    // reduction over the leading dimension walks the rows one element at a time).
    let ones = Tensor::ones((1, g.dim(0)?), DType::F32, g.device())?;
    ones.matmul(&(g * unscaled)?.to_dtype(DType::F32)?)?
        .squeeze(0)?
        .div(norm)
}

/// DoRA's forward on untracked rows (the one-op layer's form of [`dora_linear`]):
/// `f ⊙ (d W^T + scale (d A^T) B^T) + (x - d) W^T + bias` with `d` the input under the dropout
/// `mask` (`x` without one), and what its backward ([`dora_backward`]) reads. x: [n, in] -> [n, out]
pub(crate) fn dora_rows(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
    lora: &LoraLayer,
) -> Result<(Tensor, LoraHidden)> {
    // A quantized weight dequantized once, for the norm and both products.
    let w = weight.dense()?;
    let (Some(dora), Some(norm)) = (&lora.dora, lora.dora_norm_of(weight, Some(&w))?) else {
        candle_core::bail!("dora_rows on a LoRA layer without a magnitude vector")
    };
    let dense_weight = FrozenWeight::Dense(w.clone());
    let dtype = x.dtype();
    let factor = dora
        .magnitude
        .as_tensor()
        .detach()
        .to_dtype(DType::F32)?
        .div(&norm)?
        .to_dtype(dtype)?;
    let unbiased = LoraBase {
        weight: &dense_weight,
        bias: None,
        dropout_mask: None,
    };
    let dropped = lora_input(x, mask)?;
    let (unscaled, mut hidden) = lora_rows(
        &dropped,
        &unbiased,
        &lora.a_in(dtype)?,
        &lora.b_in(dtype)?,
        lora.scale,
    )?;
    let unscaled = unscaled.into_tensor()?;
    let scaled = unscaled.broadcast_mul(&factor)?;
    let out = match (mask, bias) {
        // The dropped-out part of the input reaches the output through W alone.
        (Some(_), bias) => (dense(&(x - &dropped)?, &w, bias)? + scaled)?,
        (None, Some(bias)) => scaled.broadcast_add(bias)?,
        (None, None) => scaled,
    };
    hidden.dora = Some(DoraKept {
        unscaled,
        factor,
        norm,
    });
    Ok((out, hidden))
}

/// DoRA's part of a backward, for the output gradient `g: [n, out]`: parks the magnitude's
/// gradient and returns the gradient of the unscaled output, `g ⊙ f`, from which the LoRA pair's
/// gradients follow as for plain LoRA; so does the input's without dropout (with dropout it is
/// `g W + ((g ⊙ f - g) W + grad_hidden A) ∘ mask`).
pub(crate) fn dora_backward(g: &Tensor, kept: &DoraKept, lora: &LoraLayer) -> Result<Tensor> {
    let Some(dora) = &lora.dora else {
        candle_core::bail!("dora_backward on a LoRA layer without a magnitude vector")
    };
    let grad_m = magnitude_grad(g, &kept.unscaled, &kept.norm)?;
    park(dora.magnitude.as_tensor(), LoraLayer::grad_of(grad_m)?)?;
    g.broadcast_mul(&kept.factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// DoRA with dropout (which PEFT's reference cannot share: its masks come from torch's
    /// generator), with and without a bias, against the same formula in candle's differentiable
    /// ops: `x W^T + b + (f - 1) (d W^T) + f scale (d A^T) B^T`, f = m / ‖W + scale B A‖ (detached).
    #[test]
    fn dora_linear_equals_the_formula_in_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (n, i, o, r, scale) = (6, 12, 10, 3, 0.7);
        let w = Tensor::randn(0f32, 0.3, (o, i), &dev)?;
        let a = Tensor::randn(0f32, 0.3, (r, i), &dev)?;
        let b = Tensor::randn(0f32, 0.3, (o, r), &dev)?;
        let bias = Tensor::randn(0f32, 0.3, o, &dev)?;
        let lora = LoraLayer::from_tensors(&a, &b, scale, 0.25)?
            .with_initial_magnitude(&FrozenWeight::Dense(w.clone()))?;
        // Off the initial norm, so the magnitude matters.
        let dora = lora.dora.as_ref().unwrap();
        dora.magnitude.set(&dora.magnitude.affine(1.3, 0.05)?)?;
        let mask = lora
            .dropout_mask("m", n, Some(5), DType::F32)?
            .expect("dropout is on");
        for bias in [None, Some(&bias)] {
            for mask in [None, Some(&mask)] {
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, i), &dev)?)?;
                let probe = Tensor::randn(0f32, 1.0, (n, o), &dev)?;
                let base = LoraBase {
                    weight: &FrozenWeight::Dense(w.clone()),
                    bias,
                    dropout_mask: mask.cloned(),
                };
                let ours = dora_linear(x.as_tensor(), base, &lora)?;
                let grads = (&ours * &probe)?.sum_all()?.backward()?;

                let (av, bv) = (lora.a.as_tensor(), lora.b.as_tensor());
                let m = dora.magnitude.as_tensor();
                let norm = (&w + bv.matmul(av)?.affine(scale, 0.0)?)?
                    .sqr()?
                    .sum(1)?
                    .sqrt()?
                    .detach();
                let f = m.div(&norm)?;
                let d = match mask {
                    Some(mask) => x.as_tensor().mul(mask)?,
                    None => x.as_tensor().clone(),
                };
                let wx = x.as_tensor().matmul(&w.t()?)?;
                let dw = d.matmul(&w.t()?)?;
                let lora_out = d.matmul(&av.t()?)?.matmul(&bv.t()?)?.affine(scale, 0.0)?;
                let mut want =
                    ((wx + dw.broadcast_mul(&(&f - 1.0)?)?)? + lora_out.broadcast_mul(&f)?)?;
                if let Some(bias) = bias {
                    want = want.broadcast_add(bias)?;
                }
                let want_grads = (&want * &probe)?.sum_all()?.backward()?;
                let case = format!("bias {} mask {}", bias.is_some(), mask.is_some());
                assert!(max_diff(&ours, &want) < 1e-5, "{case}: forward");
                for (what, var) in [("x", x.as_tensor()), ("A", av), ("B", bv), ("magnitude", m)] {
                    let (g, want) = (grads.get(var).unwrap(), want_grads.get(var).unwrap());
                    assert!(max_diff(g, want) < 1e-4, "{case}: gradient of {what}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_cached_norm_follows_the_weights() -> Result<()> {
        let dev = Device::Cpu;
        let w = FrozenWeight::Dense(Tensor::randn(0f32, 0.3, (5, 4), &dev)?);
        let a = Tensor::randn(0f32, 0.3, (2, 4), &dev)?;
        let b = Tensor::randn(0f32, 0.3, (5, 2), &dev)?;
        let lora = LoraLayer::from_tensors(&a, &b, 2.0, 0.0)?.with_initial_magnitude(&w)?;
        let first = super::super::graft::without_grad(|| lora.dora_norm(&w))?.unwrap();
        assert!(max_diff(&first, &lora.weight_norm(&w.dense()?)?) < 1e-6);
        // An optimizer step on B: the next forward without gradients sees the new norm.
        lora.b.set(&lora.b.affine(1.5, 0.0)?)?;
        let second = super::super::graft::without_grad(|| lora.dora_norm(&w))?.unwrap();
        assert!(max_diff(&first, &second) > 1e-3);
        assert!(max_diff(&second, &lora.weight_norm(&w.dense()?)?) < 1e-6);
        Ok(())
    }
}
