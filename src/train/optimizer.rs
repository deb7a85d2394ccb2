//! AdamW as torch implements it (decoupled weight decay, bias-corrected moments), with gradient
//! clipping by global norm, and its state saved to and restored from a checkpoint.

use crate::io::{read_safetensors, write_safetensors};
use crate::ops::cpu::{par_filled, par_filled_pair, tensor, Held, PIECE};
use crate::ops::kernel::Kernel;
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

/// One step's rates: the learning rate and both bias corrections.
#[derive(Debug, Clone, Copy)]
struct Rates {
    lr: f64,
    bias1: f64,
    bias2: f64,
    hyper: AdamWParams,
}

/// One parameter's AdamW update with candle ops (any device and dtype; moments in f32).
/// -> (param in f32, exp_avg, exp_avg_sq)
fn update_ops(
    param: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    r: Rates,
) -> Result<(Tensor, Tensor, Tensor)> {
    let h = r.hyper;
    let g = grad.to_dtype(DType::F32)?;
    let m = ((m * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
    let v = ((v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
    let denom = ((v.sqrt()? / r.bias2.sqrt())? + h.eps)?;
    let update = ((&m / denom)? * (r.lr / r.bias1))?;
    let p = param.to_dtype(DType::F32)?;
    let p = if h.weight_decay != 0.0 {
        (p * (1.0 - r.lr * h.weight_decay))?
    } else {
        p
    };
    Ok(((p - update)?, m, v))
}

/// One parameter's AdamW update on the CPU in f32, fused: the new moments in one parallel pass
/// over the gradient and the old moments, the new parameter in a second (the candle-op path makes
/// about a dozen passes, mostly on one core). The arithmetic is [`update_ops`]', in its order.
/// -> (param, exp_avg, exp_avg_sq)
fn update_cpu(
    param: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    r: Rates,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (param, grad) = (param.contiguous()?, grad.contiguous()?);
    let (m, v) = (m.contiguous()?, v.contiguous()?);
    if [&grad, &m, &v].iter().any(|t| t.dims() != param.dims()) {
        return Err(candle_core::Error::Msg(format!(
            "AdamW: gradient {:?} or moments {:?} do not match the parameter {:?}",
            grad.dims(),
            m.dims(),
            param.dims()
        ))
        .into());
    }
    let (hp, hg) = (Held::new(&param)?, Held::new(&grad)?);
    let (hm, hv) = (Held::new(&m)?, Held::new(&v)?);
    let (ps, gs, ms, vs) = (hp.slice()?, hg.slice()?, hm.slice()?, hv.slice()?);
    let h = r.hyper;
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let (c1, c2) = ((1.0 - h.beta1) as f32, (1.0 - h.beta2) as f32);
    let (m_new, v_new) = par_filled_pair(ps.len(), PIECE, |i, mo, vo| {
        let at = i * PIECE..i * PIECE + mo.len();
        let (g, m, v) = (&gs[at.clone()], &ms[at.clone()], &vs[at]);
        for j in 0..mo.len() {
            mo[j] = m[j] * b1 + g[j] * c1;
            vo[j] = v[j] * b2 + g[j] * g[j] * c2;
        }
    });
    // The op path divides by a scalar as a multiplication by its reciprocal (candle's affine).
    let inv_sqrt_bias2 = (1.0 / r.bias2.sqrt()) as f32;
    let (eps, step) = (h.eps as f32, (r.lr / r.bias1) as f32);
    // Multiplying by exactly 1 leaves every float as it is: the op path's skipped decay.
    let decay = if h.weight_decay != 0.0 {
        (1.0 - r.lr * h.weight_decay) as f32
    } else {
        1.0
    };
    let p_new = par_filled(ps.len(), PIECE, |i, po| {
        let at = i * PIECE..i * PIECE + po.len();
        let (p, m, v) = (&ps[at.clone()], &m_new[at.clone()], &v_new[at]);
        for j in 0..po.len() {
            let update = m[j] / (v[j].sqrt() * inv_sqrt_bias2 + eps) * step;
            po[j] = p[j] * decay - update;
        }
    });
    let dims = param.dims();
    Ok((
        tensor(p_new, dims)?,
        tensor(m_new, dims)?,
        tensor(v_new, dims)?,
    ))
}

/// AdamW over named variables.
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Each variable's learning rate as a multiple of the step's (1, or LoRA+'s ratio).
    lr_scale: Vec<f64>,
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
            lr_scale: vec![1.0; params.len()],
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
            hyper,
        })
    }

    /// LoRA+ (PEFT's `create_loraplus_optimizer`): the LoRA B matrices, and any 1-D trainable
    /// tensor, learn at `ratio` × the learning rate; the rest at the learning rate. Weight decay
    /// is decoupled with each variable's own rate, as torch's AdamW does per parameter group.
    pub fn set_loraplus_ratio(&mut self, ratio: f64) {
        for ((name, var), scale) in self.params.iter().zip(&mut self.lr_scale) {
            *scale = if name.contains("lora_B") || var.rank() == 1 {
                ratio
            } else {
                1.0
            };
        }
    }

    /// Sets the learning-rate multiplier of the variable named `name` (LoRA+'s embedding rate);
    /// no variable of that name: nothing changes.
    pub fn set_lr_scale(&mut self, name: &str, scale: f64) {
        for ((n, _), s) in self.params.iter().zip(&mut self.lr_scale) {
            if n == name {
                *s = scale;
            }
        }
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
            let rates = Rates {
                lr: lr * self.lr_scale[i],
                bias1,
                bias2,
                hyper: h,
            };
            let p = var.as_tensor();
            let moments = (&self.exp_avg[i], &self.exp_avg_sq[i]);
            let (p, m, v) = match Kernel::of(&[p, &grads[i], moments.0, moments.1]) {
                Kernel::Cpu => update_cpu(p, &grads[i], moments, rates)?,
                _ => update_ops(p, &grads[i], moments, rates)?,
            };
            var.set(&p.to_dtype(var.dtype())?)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_cpu_update_equals_the_op_path_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        // Longer than one parallel piece, with a ragged last piece; with and without decay.
        let shape = (3, PIECE / 2 + 7);
        let randn = || Tensor::randn(0f32, 1.0, shape, &dev);
        for weight_decay in [0.0, 0.1] {
            let hyper = AdamWParams {
                weight_decay,
                ..AdamWParams::default()
            };
            let (p, g, m) = (randn()?, randn()?, randn()?);
            let v = randn()?.sqr()?;
            for (lr, step) in [(1e-3, 1), (3e-4, 17)] {
                let rates = Rates {
                    lr,
                    bias1: 1.0 - hyper.beta1.powi(step),
                    bias2: 1.0 - hyper.beta2.powi(step),
                    hyper,
                };
                let fused = update_cpu(&p, &g, (&m, &v), rates)?;
                let ops = update_ops(&p, &g, (&m, &v), rates)?;
                for (a, b) in [(fused.0, ops.0), (fused.1, ops.1), (fused.2, ops.2)] {
                    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert_eq!(diff, 0.0, "lr {lr} step {step} weight decay {weight_decay}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fused_cpu_update_rejects_a_gradient_of_another_shape() {
        let dev = Device::Cpu;
        let p = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let g = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        let rates = Rates {
            lr: 1e-3,
            bias1: 0.1,
            bias2: 0.001,
            hyper: AdamWParams::default(),
        };
        let err = update_cpu(&p, &g, (&p, &p), rates).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
    }
}
