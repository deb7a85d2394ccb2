//! The load-balancing loss of mixture-of-experts routers (Switch Transformer's auxiliary loss, as
//! transformers' `load_balancing_loss_func` computes it and TRL adds it with `router_aux_loss_coef`).
//!
//! Over the `L` routed layers and the `N` attended tokens of a batch (padding excluded),
//! `f_e` is the fraction of top-k choices that went to expert `e` and `P_e` the mean router
//! probability of `e`, both averaged over layers and tokens; the loss is `E · Σ_e f_e · P_e`.
//! The choices have no gradient, so `d loss / d p[l, n, e] = E · f_e · m_n / (L · N)` for every
//! layer — known only once every layer has routed. Each layer records its counts as it routes,
//! and its router probabilities carry a backward that adds that gradient to theirs when the
//! weight is set ([`RouterLoss::set_scale`], after the forward). The same holds when a checkpointed
//! layer recomputes its forward in the backward: the record is sealed by then, so the recomputation
//! only attaches the gradient.

use super::graft::{grad_enabled, graft1};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::{Arc, Mutex};

/// What the routed layers of one forward pass recorded.
#[derive(Debug, Default)]
struct Record {
    /// Experts per layer (0 until the first layer routes).
    experts: usize,
    /// Layers that routed.
    layers: usize,
    /// Per expert: the attended tokens' top-k choices, summed over layers.
    choices: Vec<f64>,
    /// Per expert: the attended tokens' router probabilities, summed over layers.
    probabilities: Vec<f64>,
    /// Set once the forward is over: a recomputation does not record again.
    sealed: bool,
    /// `d objective / d p[n, e] / m_n` (`[1, experts]`), once [`RouterLoss::set_scale`] ran.
    weight: Option<Tensor>,
}

/// The load-balancing loss of one batch's forward pass (cheap to clone: the record is shared by
/// the layers, their checkpointed recomputations and the loss).
#[derive(Debug, Clone)]
pub struct RouterLoss {
    /// The loss's weight in the training objective (`router_aux_loss_coef`).
    pub coef: f64,
    /// Per flattened token (`[b · t]`, batch-major): 1 when attended, 0 for padding.
    mask: Arc<Vec<f32>>,
    record: Arc<Mutex<Record>>,
}

impl RouterLoss {
    /// A record for a batch whose flattened tokens have attention `mask` (1 attended, 0 padding).
    pub fn new(coef: f64, mask: Vec<f32>) -> Self {
        RouterLoss {
            coef,
            mask: Arc::new(mask),
            record: Arc::default(),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Record>> {
        self.record
            .lock()
            .map_err(|_| candle_core::Error::Msg("router loss: poisoned lock".into()))
    }

    /// Records one layer's routing and returns its router probabilities `probs`, which then
    /// carry the loss's gradient in the backward (added to whatever reaches them through the
    /// routing weights).
    ///
    /// probs: `[n, experts]` f32 router probabilities (tracked); host: the same values;
    /// chosen: `[n · k]` expert per top-k slot, row-major.
    pub fn route(&self, probs: Tensor, host: &[Vec<f32>], chosen: &[u32]) -> Result<Tensor> {
        let n = host.len();
        if n != self.mask.len() {
            candle_core::bail!(
                "router loss: {n} routed tokens for a batch of {}",
                self.mask.len()
            );
        }
        let experts = host.first().map_or(0, Vec::len);
        {
            let mut r = self.lock()?;
            if !r.sealed {
                if r.layers == 0 {
                    r.experts = experts;
                    r.choices = vec![0.0; experts];
                    r.probabilities = vec![0.0; experts];
                } else if r.experts != experts {
                    candle_core::bail!(
                        "router loss: layers route to {} and {experts} experts",
                        r.experts
                    );
                }
                let k = chosen.len() / n.max(1);
                for (i, &e) in chosen.iter().enumerate() {
                    r.choices[e as usize] += self.mask[i / k.max(1)] as f64;
                }
                for (row, &m) in host.iter().zip(self.mask.iter()) {
                    if m != 0.0 {
                        for (sum, &p) in r.probabilities.iter_mut().zip(row) {
                            *sum += (m * p) as f64;
                        }
                    }
                }
                r.layers += 1;
            }
        }
        if !grad_enabled() || !probs.track_op() {
            return Ok(probs);
        }
        let (record, mask) = (self.record.clone(), self.mask.clone());
        graft1(
            "router_loss",
            &probs,
            probs.clone(),
            Box::new(move |p, grad| {
                let weight = record
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("router loss: poisoned lock".into()))?
                    .weight
                    .clone()
                    .ok_or_else(|| {
                        candle_core::Error::Msg(
                            "router loss: back-propagated before its weight was set \
                             (back-propagate LossOutput::objective, not loss_sum)"
                                .into(),
                        )
                    })?;
                let m = Tensor::from_slice(mask.as_slice(), (mask.len(), 1), p.device())?;
                let aux = m
                    .broadcast_mul(&weight.to_device(p.device())?)?
                    .to_dtype(p.dtype())?;
                Ok(Some((grad + aux)?))
            }),
        )
    }

    /// The loss `E · Σ_e f_e · P_e` (transformers' `aux_loss`, unweighted); None when no layer
    /// routed an attended token.
    pub fn value(&self) -> Result<Option<f64>> {
        let r = self.lock()?;
        let Some(norm) = self.normaliser(&r) else {
            return Ok(None);
        };
        let dot: f64 = r
            .choices
            .iter()
            .zip(&r.probabilities)
            .map(|(c, p)| (c / norm) * (p / norm))
            .sum();
        Ok(Some(r.experts as f64 * dot))
    }

    /// `L · N`: routed layers times attended tokens.
    fn normaliser(&self, r: &Record) -> Option<f64> {
        let tokens: f64 = self.mask.iter().map(|&m| m as f64).sum();
        let norm = r.layers as f64 * tokens;
        (norm > 0.0).then_some(norm)
    }

    /// Ends the forward's record and sets the loss's weight in the objective the backward
    /// differentiates: `scale · coef · loss` (the trainer's `scale` divides by the gradient
    /// accumulation steps, as TRL does).
    pub fn set_scale(&self, scale: f64, device: &Device) -> Result<()> {
        let mut r = self.lock()?;
        r.sealed = true;
        let weight: Vec<f32> = match self.normaliser(&r) {
            None => vec![0.0; r.experts],
            Some(norm) => r
                .choices
                .iter()
                .map(|c| (scale * self.coef * r.experts as f64 * (c / norm) / norm) as f32)
                .collect(),
        };
        let experts = weight.len();
        r.weight = Some(Tensor::from_vec(weight, (1, experts), device)?.to_dtype(DType::F32)?);
        Ok(())
    }
}
