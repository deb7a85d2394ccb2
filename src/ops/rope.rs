//! Rotary position embeddings (the "rotate half" layout HF transformers uses), with the
//! `linear` and Llama-3 frequency scalings.

use super::cpu::{is_cpu_f32, par_filled, tensor, Held, PIECE};
use super::graft::graft1;
use super::simd;
use candle_core::{DType, Device, Result, Tensor};

/// How the rotary frequencies are rescaled for long contexts (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No rescaling.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1's band-wise frequency rescaling.
    Llama3 {
        /// Overall scaling factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as GGUF files store Llama 3.1's scaling (`rope_freqs.weight`).
    Factors(Vec<f64>),
}

/// The inverse frequencies of one attention head's rotary embedding.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f64>,
}

impl RotaryEmbedding {
    /// Frequencies for a head of size `head_dim` with base `theta`, as transformers computes them
    /// (the base frequencies in f32, like torch).
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| (1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)) as f64)
            .collect();
        let inv_freq = match scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        RotaryEmbedding { inv_freq }
    }

    /// The inverse frequencies, one per rotation pair.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// cos and sin tables for the given positions: `[t, head_dim / 2]` each, or `[b, t, head_dim / 2]`
    /// when `positions` has one row per batch element (packed sequences restart at each document).
    pub fn tables(
        &self,
        positions: &[Vec<u32>],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let rows = positions.len();
        let len = positions.first().map_or(0, Vec::len);
        let mut cos = Vec::with_capacity(rows * len * half);
        let mut sin = Vec::with_capacity(rows * len * half);
        for row in positions {
            for &p in row {
                for &f in &self.inv_freq {
                    // transformers computes position * inv_freq in f32.
                    let angle = (p as f32) * (f as f32);
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape: Vec<usize> = if rows == 1 {
            vec![len, half]
        } else {
            vec![rows, len, half]
        };
        let cos = Tensor::from_vec(cos, shape.clone(), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Rotates `x: [b, heads, t, head_dim]` by the position angles in `cos`/`sin` (from
/// [`RotaryEmbedding::tables`]). The backward is the inverse rotation of the gradient.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rope = candle_nn::rotary_emb::rope;
    let out = rope(&x.detach().contiguous()?, cos, sin)?;
    let (cos, sin) = (cos.clone(), sin.clone());
    graft1(
        "rope",
        x,
        out,
        Box::new(move |_, g| Ok(Some(rope(&g.contiguous()?, &cos, &sin.neg()?)?))),
    )
}

/// [`apply_rope`] in the token-major layout the projections produce: x `[b, t, heads, d]`.
pub fn apply_rope_tokens(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let out = rotate_tokens(&x.detach(), cos, sin, false)?;
    let (cos, sin) = (cos.clone(), sin.clone());
    graft1(
        "rope",
        x,
        out,
        Box::new(move |_, g| Ok(Some(rotate_tokens(g, &cos, &sin, true)?))),
    )
}

/// RoPE on untracked token-major rows `[b, t, heads, d]`, or its backward (the inverse rotation of
/// a gradient) when `inverse`. cos/sin: `[t', d / 2]` or `[b, t', d / 2]` with `t' ≥ t`.
pub(crate) fn rotate_tokens(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    if [&x, cos, sin].into_iter().all(is_cpu_f32) {
        return rotate_tokens_cpu(&x, cos, sin, inverse);
    }
    if inverse {
        candle_nn::rotary_emb::rope_thd(&x, cos, &sin.neg()?)
    } else {
        candle_nn::rotary_emb::rope_thd(&x, cos, sin)
    }
}

/// [`rotate_tokens`] on the CPU in f32: tokens in parallel (candle's kernel runs a batch element
/// per task, so one sequence ran on one core).
fn rotate_tokens_cpu(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    let (b, t, heads, d) = x.dims4()?;
    let half = d / 2;
    let table_rows = |table: &Tensor| -> Result<usize> {
        let dims = table.dims();
        let ok = dims.last() == Some(&half)
            && d == 2 * half
            && match dims.len() {
                2 => dims[0] >= t,
                3 => dims[0] == b && dims[1] >= t,
                _ => false,
            };
        if !ok {
            candle_core::bail!("rope: tables {dims:?} do not fit x {:?}", x.dims());
        }
        Ok(dims[dims.len() - 2])
    };
    let (rows, sin_rows) = (table_rows(cos)?, table_rows(sin)?);
    if rows != sin_rows || cos.rank() != sin.rank() {
        candle_core::bail!("rope: cos {:?} and sin {:?} differ", cos.dims(), sin.dims());
    }
    let batched = cos.rank() == 3;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let held = [Held::new(x)?, Held::new(&cos)?, Held::new(&sin)?];
    let (xs, cs, ss) = (held[0].slice()?, held[1].slice()?, held[2].slice()?);
    let sign = if inverse { -1.0 } else { 1.0 };
    let width = heads * d;
    let tokens = (PIECE / width.max(1)).max(1);
    let out = par_filled(xs.len(), tokens * width, |task, out| {
        for (j, out) in out.chunks_exact_mut(width).enumerate() {
            let token = task * tokens + j;
            let (bi, ti) = (token / t, token % t);
            let row = if batched { bi * rows + ti } else { ti } * half;
            let x = &xs[token * width..(token + 1) * width];
            simd::rope_rows(x, &cs[row..row + half], &ss[row..row + half], sign, out);
        }
    });
    tensor(out, x.dims())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn cpu_rotation_equals_candles_kernel_for_shared_and_per_row_tables() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, heads, d) = (2, 37, 3, 10);
        let x = Tensor::randn(0f32, 1.0, (b, t, heads, d), &dev)?;
        let rope = RotaryEmbedding::new(d, 10000.0, &RopeScaling::Default);
        // Tables longer than the sequence (shared), and one row of positions per batch element
        // (packed documents restart).
        let shared = rope.tables(&[(0..t as u32 + 5).collect()], DType::F32, &dev)?;
        let rows: Vec<Vec<u32>> = (0..b as u32)
            .map(|r| (0..t as u32).map(|i| (i * (r + 1)) % 11).collect())
            .collect();
        let per_row = rope.tables(&rows, DType::F32, &dev)?;
        for (cos, sin) in [shared, per_row] {
            for inverse in [false, true] {
                let ours = rotate_tokens_cpu(&x, &cos, &sin, inverse)?;
                let sin_used = if inverse { sin.neg()? } else { sin.clone() };
                let want = candle_nn::rotary_emb::rope_thd(&x, &cos, &sin_used)?;
                assert!(
                    max_diff(&ours, &want)? < 1e-6,
                    "inverse={inverse} {:?}",
                    cos.dims()
                );
            }
            // The inverse rotation undoes the rotation.
            let back =
                rotate_tokens_cpu(&rotate_tokens_cpu(&x, &cos, &sin, false)?, &cos, &sin, true)?;
            assert!(max_diff(&back, &x)? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn cpu_rotation_rejects_tables_that_do_not_fit() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 8, 2, 6), DType::F32, &dev)?;
        for table in [(7, 3), (8, 4)] {
            let c = Tensor::zeros(table, DType::F32, &dev)?;
            let err = rotate_tokens_cpu(&x, &c, &c, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("do not fit"), "{err}");
        }
        Ok(())
    }
}
