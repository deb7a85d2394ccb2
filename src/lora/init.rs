//! PEFT's `init_lora_weights` beyond its default: `gaussian`, and the initialisations that move the
//! adapter's start out of the base weight — PiSSA (`pissa`, or `pissa_niter_N` with a randomized
//! SVD: W's top r singular components become B A and the base keeps the rest) and OLoRA (`olora`:
//! the first r columns of W's QR decomposition). The base then holds the residual
//! `W - scale B0 A0`, so the adapted model starts equal to the original.
//!
//! Such an adapter only applies to that residual. Saving writes it relative to the original base,
//! as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`: `A' = [A; A0]`,
//! `B' = [B, -B0]`, rank and alpha doubled (the scale unchanged), `init_lora_weights: true` — a
//! plain LoRA adapter any consumer applies to the original model. A run resumed from such a
//! checkpoint splits it back ([`restore_residual`]).
//!
//! LoftQ (`loftq`, with PEFT's `loftq_config`) alternates between quantizing and a rank-r SVD so
//! that the quantized base plus B A approximates the original full-precision weight; the base is
//! the quantized weight LoftQ leaves, and the adapter applies to that base only ([`loftq`]).
//!
//! SVD and QR come from `faer` (in f64; PEFT's are torch's in f32).

use crate::lora::layer::LoraLayer;
use crate::model::layers::LinearWeight;
use crate::model::param::Param;
use crate::model::weights::Weights;
use crate::model::CausalLm;
use crate::quant::{QuantScheme, QuantizedWeight};
use crate::rng::{hash_str, key, Rng};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use faer::Mat;
use std::sync::Arc;

/// The folder of a run's output where a LoftQ run saves the base its adapter applies to.
pub const LOFTQ_BASE: &str = "loftq_base";

/// The initialisations peft-sft implements, as PEFT names them.
pub const SUPPORTED: &str = "true, gaussian, pissa, pissa_niter_N, olora, loftq";

/// PEFT's `init_lora_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A Kaiming-uniform, B zero.
    Default,
    /// `gaussian`: A normal with std 1/r, B zero.
    Gaussian,
    /// `pissa` (exact SVD) or `pissa_niter_N` (randomized SVD with N subspace iterations).
    Pissa {
        /// Subspace iterations of the randomized SVD; None: the exact one.
        niter: Option<usize>,
    },
    /// `olora`: QR of the weight.
    Olora,
    /// `loftq`: the quantized base and a rank-r SVD of its error, alternated
    /// ([`LoraConfig::loftq_config`](crate::lora::LoraConfig::loftq_config)).
    Loftq,
}

impl LoraInit {
    /// Reads `init_lora_weights` as written in adapter_config.json (a bool or a string).
    pub fn from_config(value: &serde_json::Value) -> Result<Self> {
        let unsupported = |what: &str| {
            Error::Config(format!(
                "init_lora_weights {what} is not supported (supported: {SUPPORTED})"
            ))
        };
        match value {
            serde_json::Value::Bool(true) | serde_json::Value::Null => Ok(LoraInit::Default),
            serde_json::Value::String(s) => match s.as_str() {
                "true" | "True" => Ok(LoraInit::Default),
                "gaussian" => Ok(LoraInit::Gaussian),
                "pissa" => Ok(LoraInit::Pissa { niter: None }),
                "olora" => Ok(LoraInit::Olora),
                "loftq" => Ok(LoraInit::Loftq),
                other => match other.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                    Some(Ok(n)) => Ok(LoraInit::Pissa { niter: Some(n) }),
                    _ => Err(unsupported(&format!("`{other}`"))),
                },
            },
            other => Err(unsupported(&other.to_string())),
        }
    }

    /// Whether the initialisation moves part of the base weight into the adapter.
    pub fn moves_base(self) -> bool {
        matches!(self, LoraInit::Pissa { .. } | LoraInit::Olora)
    }
}

/// PEFT's `gaussian` A for module `name`: normal with std 1/r, `[r, in]`, seeded by `seed` and
/// the module name.
pub fn gaussian(name: &str, r: usize, inp: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = Rng::new(key(&[seed, hash_str(name), 0x6761_7573]));
    let v: Vec<f32> = (0..r * inp)
        .map(|_| (rng.normal() / r as f64) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (r, inp), device)?)
}

/// `t` (2-D) as an f64 matrix.
fn to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let (rows, cols) = t.dims2()?;
    let v: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(Mat::from_fn(rows, cols, |i, j| v[i * cols + j] as f64))
}

/// An f32 tensor of `rows × cols` from `f(i, j)` on `device`.
fn tensor_from(
    rows: usize,
    cols: usize,
    device: &Device,
    f: impl Fn(usize, usize) -> f64,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|k| f(k / cols, k % cols) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

/// The thin orthonormal basis of `x`'s columns (Q of its QR decomposition).
fn orthonormal(x: &Mat<f64>) -> Mat<f64> {
    x.qr().compute_thin_Q()
}

/// `(U [m, q], S [q], V [n, q])`: torch's `svd_lowrank(w, q, niter)` — a Gaussian sketch of the
/// range refined by `niter` subspace iterations, then the exact SVD of the small projection.
fn svd_lowrank(
    w: &Mat<f64>,
    q: usize,
    niter: usize,
    rng: &mut Rng,
) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let transposed = w.nrows() < w.ncols();
    let a = if transposed {
        w.transpose().to_owned()
    } else {
        w.clone()
    };
    let sketch = Mat::from_fn(a.ncols(), q, |_, _| rng.normal());
    let mut basis = orthonormal(&(&a * &sketch));
    for _ in 0..niter {
        basis = orthonormal(&(a.transpose() * &basis));
        basis = orthonormal(&(&a * &basis));
    }
    let small = basis.transpose() * &a;
    let svd = small
        .thin_svd()
        .map_err(|e| Error::Config(format!("randomized SVD did not converge: {e:?}")))?;
    let u = &basis * svd.U();
    let s: Vec<f64> = (0..q).map(|i| svd.S().column_vector()[i]).collect();
    let v = svd.V().to_owned();
    Ok(if transposed { (v, s, u) } else { (u, s, v) })
}

/// PiSSA's or OLoRA's starting `(A [r, in], B [out, r])` for the weight `w [out, in]`, in f32 on
/// `w`'s device, as PEFT's `pissa_init` / `olora_init` compute them (up to the sign of each
/// component, which the SVD and QR leave free: B A is the same). `key` seeds the randomized SVD.
pub fn decompose(
    init: LoraInit,
    w: &Tensor,
    r: usize,
    scale: f64,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    let (out, inp) = w.dims2()?;
    if r > out.min(inp) {
        return Err(Error::Config(format!(
            "lora r {r} is larger than the weight's smaller side ({out} × {inp}): PiSSA and OLoRA take r of its components"
        )));
    }
    let m = to_mat(w)?;
    let device = w.device();
    match init {
        LoraInit::Pissa { niter } => {
            let (u, s, v) = match niter {
                None => {
                    let svd = m
                        .thin_svd()
                        .map_err(|e| Error::Config(format!("SVD did not converge: {e:?}")))?;
                    let s = (0..r).map(|i| svd.S().column_vector()[i]).collect();
                    (svd.U().to_owned(), s, svd.V().to_owned())
                }
                Some(n) => svd_lowrank(&m, r, n, &mut Rng::new(seed))?,
            };
            // PEFT: S_r / scale split evenly between A and B.
            let root: Vec<f64> = s.iter().map(|x| (x / scale).max(0.0).sqrt()).collect();
            let a = tensor_from(r, inp, device, |i, j| root[i] * v[(j, i)])?;
            let b = tensor_from(out, r, device, |o, i| u[(o, i)] * root[i])?;
            Ok((a, b))
        }
        LoraInit::Olora => {
            let qr = m.qr();
            let (q, rr) = (qr.compute_thin_Q(), qr.thin_R().to_owned());
            let a = tensor_from(r, inp, device, |i, j| rr[(i, j)])?;
            let b = tensor_from(out, r, device, |o, i| q[(o, i)])?;
            Ok((a, b))
        }
        other => Err(Error::Config(format!(
            "internal: {other:?} does not decompose the weight"
        ))),
    }
}

/// `W - scale B0 A0` in `w`'s dtype: what the base holds while an adapter that started at
/// (A0, B0) trains. Computed the same way at the start of a run and on resume (bit for bit).
pub fn residual(w: &Tensor, a0: &Tensor, b0: &Tensor, scale: f64) -> Result<Tensor> {
    let moved = b0.matmul(a0)?.affine(scale, 0.0)?;
    Ok((w.to_dtype(DType::F32)? - moved)?.to_dtype(w.dtype())?)
}

/// Replaces `weight` (the module `name`'s) by the residual of (A0, B0): a dense weight in place,
/// a 4-bit or int8 weight quantized again with its own scheme (as PEFT re-quantizes OLoRA's
/// residual). PiSSA over a quantized weight is refused, as PEFT refuses it.
pub fn move_out_of_base(
    weight: &mut LinearWeight,
    name: &str,
    init: LoraInit,
    (a0, b0): (&Tensor, &Tensor),
    scale: f64,
) -> Result<()> {
    match weight {
        LinearWeight::Dense(p) => {
            let trainable = p.var().is_some();
            *p = Param::new(residual(p.tensor(), a0, b0, scale)?, trainable)?;
        }
        LinearWeight::Quantized(q) => {
            if matches!(init, LoraInit::Pissa { .. }) {
                return Err(Error::Config(format!(
                    "{name}: PiSSA needs the base in full precision (PEFT refuses it over a quantized weight): initialize with --lora, merge or save the residual, then quantize it; or use olora, which re-quantizes its residual"
                )));
            }
            let scheme = q.scheme().ok_or_else(|| {
                Error::Config(format!(
                    "{name}: OLoRA re-quantizes the base's residual, which peft-sft does for NF4/FP4 and int8 weights, not GGUF ones ({}); use a safetensors base with --qlora",
                    q.format_name()
                ))
            })?;
            let dense = q.dequantize()?;
            let device = dense.device().clone();
            let res = residual(&dense, a0, b0, scale)?;
            *q = Arc::new(QuantizedWeight::quantize(&res, scheme, q.dtype, &device)?);
        }
    }
    Ok(())
}

/// Initialises the adapter of module `name` over `weight` (PiSSA or OLoRA), moving (A0, B0) out of
/// the base: returns the layer, which remembers its start for saving.
pub fn init_moving_base(
    weight: &mut LinearWeight,
    name: &str,
    init: LoraInit,
    (r, scale, dropout): (usize, f64, f64),
    seed: u64,
) -> Result<LoraLayer> {
    let w = match &*weight {
        LinearWeight::Dense(p) => p.tensor().clone(),
        LinearWeight::Quantized(q) => q.dequantize()?,
    };
    let (a0, b0) = decompose(init, &w, r, scale, key(&[seed, hash_str(name)]))?;
    move_out_of_base(weight, name, init, (&a0, &b0), scale)?;
    let mut layer = LoraLayer::from_tensors(&a0, &b0, scale, dropout)?;
    layer.initial = Some(Arc::new((a0, b0)));
    Ok(layer)
}

/// The top `r` components of `m` split evenly between the factors, as PEFT's
/// `_low_rank_decomposition`: `(R [r, in], L [out, r])` with `L = U_r sqrt(S_r)` and
/// `R = sqrt(S_r) V_rᵀ`, in f32 on the CPU.
fn low_rank(m: &Mat<f64>, r: usize) -> Result<(Tensor, Tensor)> {
    let svd = m
        .thin_svd()
        .map_err(|e| Error::Config(format!("SVD did not converge: {e:?}")))?;
    let root: Vec<f64> = (0..r)
        .map(|i| svd.S().column_vector()[i].max(0.0).sqrt())
        .collect();
    let (u, v) = (svd.U(), svd.V());
    let a = tensor_from(r, m.ncols(), &Device::Cpu, |i, j| root[i] * v[(j, i)])?;
    let b = tensor_from(m.nrows(), r, &Device::Cpu, |o, i| u[(o, i)] * root[i])?;
    Ok((a, b))
}

/// PEFT's `loftq_init` over the full-precision weight `w [out, in]`: `iters` rounds of quantizing
/// (`W` first, then `W - B A`) with `scheme` and taking the rank-`r` SVD of `W` minus the
/// dequantized weight. Returns the last round's quantized weight (dequantizing to `dtype`, on
/// `device`) and `(A, B)` — not divided by the LoRA scale, as PEFT leaves them.
///
/// The arithmetic is f32 on the CPU as PEFT's (its SVD in f32, ours in f64), so the quantized
/// weight is the one PEFT computes except where W - B A falls on a code boundary.
pub fn loftq(
    w: &Tensor,
    scheme: QuantScheme,
    r: usize,
    iters: usize,
    (dtype, device): (DType, &Device),
) -> Result<(QuantizedWeight, Tensor, Tensor)> {
    let (out, inp) = w.dims2()?;
    if r > out.min(inp) {
        return Err(Error::Config(format!(
            "lora r {r} is larger than the weight's smaller side ({out} × {inp}): LoftQ takes r components of its quantization error"
        )));
    }
    if iters == 0 {
        return Err(Error::Config(
            "loftq_iter must be at least 1 (PEFT's default is 1)".into(),
        ));
    }
    let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let mut target = w.clone();
    for round in 1..=iters {
        let q = QuantizedWeight::quantize(&target, scheme, DType::F32, &Device::Cpu)?;
        let error = (&w - q.dequantize()?.to_dtype(DType::F32)?)?;
        let (a, b) = low_rank(&to_mat(&error)?, r)?;
        if round == iters {
            let q = QuantizedWeight::quantize(&target, scheme, dtype, device)?;
            return Ok((q, a.to_device(device)?, b.to_device(device)?));
        }
        target = (&w - b.matmul(&a)?)?;
    }
    unreachable!("the last round returns")
}

/// The bits of a quantization scheme as PEFT's `loftq_bits` counts them.
fn scheme_bits(scheme: QuantScheme) -> usize {
    match scheme {
        QuantScheme::FourBit { .. } => 4,
        QuantScheme::Int8 => 8,
    }
}

/// Initialises the adapter of module `name` by LoftQ: `original` is the module's full-precision
/// weight (from the checkpoint), `weight` its quantized form in the model, which is replaced by
/// LoftQ's quantized weight in the same scheme. `bits` and `iters` are the adapter config's
/// `loftq_config`; `bits` must be the base's. The adapter lives on `device`.
pub fn init_loftq(
    weight: &mut LinearWeight,
    name: &str,
    original: &Tensor,
    (bits, iters): (usize, usize),
    (r, scale, dropout): (usize, f64, f64),
    device: &Device,
) -> Result<LoraLayer> {
    let LinearWeight::Quantized(q) = &*weight else {
        return Err(Error::Config(format!(
            "{name}: LoftQ quantizes the base and fits the adapter to the quantization error: load the base quantized (--qlora for loftq_bits 4, --load-in-8bit for 8)"
        )));
    };
    let scheme = q.scheme().ok_or_else(|| {
        Error::Config(format!(
            "{name}: LoftQ re-quantizes the base from its full-precision weights, which peft-sft does for NF4/FP4 and int8 bases, not GGUF ones ({}); use a safetensors base with --qlora",
            q.format_name()
        ))
    })?;
    if scheme_bits(scheme) != bits {
        return Err(Error::Config(format!(
            "{name}: loftq_bits {bits}, but the base is quantized to {} bits: use --qlora for 4, --load-in-8bit for 8",
            scheme_bits(scheme)
        )));
    }
    if original.dims2()? != q.shape {
        return Err(Error::Tensor {
            name: format!("{name}.weight"),
            message: format!(
                "the full-precision weight has shape {:?}, the model's {:?}",
                original.dims(),
                q.shape
            ),
        });
    }
    let (quantized, a, b) = loftq(original, scheme, r, iters, (q.dtype, device))?;
    *weight = LinearWeight::Quantized(Arc::new(quantized));
    Ok(LoraLayer::from_tensors(&a, &b, scale, dropout)?)
}

/// The full-precision weight of each linear module in the checkpoint `weights`, for
/// [`inject_with`](crate::lora::inject_with)'s LoftQ: a GGUF file or a bitsandbytes 4-bit
/// checkpoint has none (its weights are quantized already).
pub fn checkpoint_originals(weights: &Weights) -> impl Fn(&str) -> Result<Tensor> + '_ {
    move |module: &str| {
        let name = format!("{module}.weight");
        if weights.gguf().is_some() || crate::model::bnb::is_four_bit(weights, &name) {
            return Err(Error::Config(format!(
                "{name}: LoftQ starts from the full-precision weights, and this checkpoint's are quantized already; use the original (safetensors, full-precision) model with --qlora"
            )));
        }
        Ok(weights.get_raw(&name, &Device::Cpu)?.to_dtype(DType::F32)?)
    }
}

/// The tensors of `layer` relative to the original base (PEFT's `subtract_mutated_init`):
/// `([A; A0], [B, -B0])`, or `(A, B)` when it did not move its start out of the base.
pub fn relative_to_original(layer: &LoraLayer) -> Result<(Tensor, Tensor)> {
    let (a, b) = (layer.a.as_tensor(), layer.b.as_tensor());
    match &layer.initial {
        None => Ok((a.clone(), b.clone())),
        Some(start) => {
            let (a0, b0) = (&start.0, &start.1);
            Ok((
                Tensor::cat(&[a, &a0.to_dtype(a.dtype())?], 0)?,
                Tensor::cat(&[b, &b0.neg()?.to_dtype(b.dtype())?], 1)?,
            ))
        }
    }
}

/// After a PiSSA/OLoRA checkpoint (saved relative to the original base, rank 2r) was loaded onto
/// the original base: splits each layer back into its trained half (A, B) and its start (A0, B0)
/// and moves the start out of the base again, as at the beginning of the run.
pub fn restore_residual(
    model: &mut CausalLm,
    init: LoraInit,
    r_of: impl Fn(&str) -> Result<usize>,
) -> Result<()> {
    for lin in model.linears_mut() {
        let Some(layer) = lin.lora.take() else {
            continue;
        };
        let r = r_of(&lin.name)?;
        if layer.rank() != 2 * r {
            return Err(Error::Config(format!(
                "{}: the checkpoint's adapter has rank {}, but a {init:?} run with r = {r} saves rank {} (its trained half and its start); resume with the run's own --lora-r and --init-lora-weights",
                lin.name,
                layer.rank(),
                2 * r
            )));
        }
        let (a2, b2) = (layer.a.as_tensor(), layer.b.as_tensor());
        let (a, a0) = (a2.narrow(0, 0, r)?, a2.narrow(0, r, r)?.contiguous()?);
        let (b, b0) = (
            b2.narrow(1, 0, r)?.contiguous()?,
            b2.narrow(1, r, r)?.neg()?.contiguous()?,
        );
        move_out_of_base(&mut lin.weight, &lin.name, init, (&a0, &b0), layer.scale)?;
        let mut restored =
            LoraLayer::from_tensors(&a.contiguous()?, &b, layer.scale, layer.dropout)?;
        restored.dora = layer.dora.clone();
        restored.initial = Some(Arc::new((a0, b0)));
        lin.lora = Some(restored);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[40, 24]` matrix with singular values 2^-k (well separated) and seeded random vectors.
    fn decaying(seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let u = orthonormal(&Mat::from_fn(40, 24, |_, _| rng.normal()));
        let v = orthonormal(&Mat::from_fn(24, 24, |_, _| rng.normal()));
        let w = Mat::from_fn(40, 24, |i, j| {
            (0..24)
                .map(|k| u[(i, k)] * 0.5f64.powi(k as i32) * v[(j, k)])
                .sum()
        });
        tensor_from(40, 24, &Device::Cpu, |i, j| w[(i, j)]).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn init_values_parse_as_peft_writes_them() {
        let parse = |v: serde_json::Value| LoraInit::from_config(&v).map_err(|e| e.to_string());
        assert_eq!(parse(serde_json::json!(true)), Ok(LoraInit::Default));
        assert_eq!(
            parse(serde_json::json!("pissa_niter_4")),
            Ok(LoraInit::Pissa { niter: Some(4) })
        );
        assert_eq!(parse(serde_json::json!("olora")), Ok(LoraInit::Olora));
        assert_eq!(parse(serde_json::json!("loftq")), Ok(LoraInit::Loftq));
        for bad in [
            serde_json::json!("corda"),
            serde_json::json!(false),
            serde_json::json!("pissa_niter_x"),
        ] {
            assert!(
                parse(bad.clone())
                    .unwrap_err()
                    .contains("supported: true, gaussian"),
                "{bad}"
            );
        }
    }

    /// The randomized SVD finds the top components of a matrix whose spectrum decays: its B A
    /// equals the exact SVD's within a small part of the first dropped singular value, and the
    /// same seed draws the same sketch.
    #[test]
    fn pissa_niter_approaches_the_exact_decomposition() {
        let w = decaying(3);
        let (r, scale) = (4, 2.0);
        let product = |(a, b): (Tensor, Tensor)| b.matmul(&a).unwrap();
        let exact = product(decompose(LoraInit::Pissa { niter: None }, &w, r, scale, 0).unwrap());
        let approx = |seed| {
            product(decompose(LoraInit::Pissa { niter: Some(4) }, &w, r, scale, seed).unwrap())
        };
        // The 5th singular value is 1/16; r = 4 components of scale 2 carry 1/scale of them.
        assert!(
            max_diff(&exact, &approx(1)) < 1e-3,
            "{}",
            max_diff(&exact, &approx(1))
        );
        assert_eq!(max_diff(&approx(1), &approx(1)), 0.0);
        // The residual plus scale B A is the weight again.
        let (a, b) = decompose(LoraInit::Olora, &w, r, scale, 0).unwrap();
        let res = residual(&w, &a, &b, scale).unwrap();
        let back = (res + b.matmul(&a).unwrap().affine(scale, 0.0).unwrap()).unwrap();
        assert!(max_diff(&back, &w) < 1e-6);
        assert!(decompose(LoraInit::Olora, &w, 25, scale, 0)
            .unwrap_err()
            .to_string()
            .contains("lora r 25 is larger than the weight's smaller side (40 × 24)"));
    }
}
