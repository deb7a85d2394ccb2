//! AdamW as torch implements it (decoupled weight decay, bias-corrected moments), with gradient
//! clipping by global norm, and its state saved to and restored from a checkpoint.

use crate::io::{read_safetensors, write_safetensors};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::path::Path;

/// AdamW hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// transformers' defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named variables.
pub struct AdamW {
    params: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: usize,
    hyper: AdamWParams,
}

/// The optimizer state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

impl AdamW {
    /// Fresh state (zero moments) for `params`.
    pub fn new(params: Vec<(String, Var)>, hyper: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.zeros_like().and_then(|z| z.to_dtype(DType::F32));
        let exp_avg = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let exp_avg_sq = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
            hyper,
        })
    }

    /// The optimized variables, in order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Number of updates applied.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Applies one update with learning rate `lr` and gradients `grads` (one per param, in order).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let h = self.hyper;
        let bias1 = 1.0 - h.beta1.powi(self.step as i32);
        let bias2 = 1.0 - h.beta2.powi(self.step as i32);
        for (i, (_, var)) in self.params.iter().enumerate() {
            let g = grads[i].to_dtype(DType::F32)?;
            let m = ((&self.exp_avg[i] * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
            let denom = ((v.sqrt()? / bias2.sqrt())? + h.eps)?;
            let update = ((&m / denom)? * (lr / bias1))?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = if h.weight_decay != 0.0 {
                (p * (1.0 - lr * h.weight_decay))?
            } else {
                p
            };
            var.set(&(p - update)?.to_dtype(var.dtype())?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// Saves the moments and the step count.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            tensors.push((format!("exp_avg.{name}"), self.exp_avg[i].clone()));
            tensors.push((format!("exp_avg_sq.{name}"), self.exp_avg_sq[i].clone()));
        }
        let step = Tensor::new(&[self.step as u32], &candle_core::Device::Cpu)?;
        tensors.push(("step".into(), step));
        write_safetensors(&dir.join(OPTIMIZER_FILE), &tensors)
    }

    /// Restores the state written by [`AdamW::save`]; every param must be present with its shape.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(OPTIMIZER_FILE);
        let mut state = read_safetensors(&path, self.params[0].1.device())?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (prefix, slot) in [
                ("exp_avg", &mut self.exp_avg[i]),
                ("exp_avg_sq", &mut self.exp_avg_sq[i]),
            ] {
                let key = format!("{prefix}.{name}");
                let t = state.remove(&key).ok_or_else(|| Error::Tensor {
                    name: key.clone(),
                    message: format!(
                        "missing from {}: the checkpoint was written for other trainable weights",
                        path.display()
                    ),
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::Tensor {
                        name: key,
                        message: format!(
                            "shape {:?} in {} but the weight is {:?}",
                            t.dims(),
                            path.display(),
                            var.dims()
                        ),
                    });
                }
                *slot = t;
            }
        }
        let step = state.remove("step").ok_or_else(|| Error::Tensor {
            name: "step".into(),
            message: format!("missing from {}", path.display()),
        })?;
        self.step = step.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}

/// The global L2 norm of `grads` (before clipping), and the grads scaled so the norm is at most
/// `max_norm` (torch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` capped at 1).
pub fn clip_grad_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<(f64, Vec<Tensor>)> {
    let mut sq = 0f64;
    for g in &grads {
        sq += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm <= 0.0 {
        return Ok((norm, grads));
    }
    let factor = (max_norm / (norm + 1e-6)).min(1.0);
    if factor >= 1.0 {
        return Ok((norm, grads));
    }
    let scaled = grads
        .iter()
        .map(|g| g * factor)
        .collect::<candle_core::Result<_>>()?;
    Ok((norm, scaled))
}
