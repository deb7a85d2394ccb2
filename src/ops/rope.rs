//! Rotary position embeddings (the "rotate half" layout HF transformers uses), with the
//! `linear`, Llama-3 and LongRoPE frequency scalings, over all of a head or its first part
//! (`partial_rotary_factor`: the tables are narrower than the head, the rest passes unrotated).

use super::cpu;
use super::graft::graft1;
use super::kernel::Kernel;
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
    /// LongRoPE (Phi-3, Phi-4-mini): per-frequency divisors `short_factor`, or `long_factor` when
    /// a position reaches past `original_max_position_embeddings`, and cos/sin scaled by
    /// `attention_factor`.
    LongRope {
        /// Divisors for sequences within the original context.
        short_factor: Vec<f64>,
        /// Divisors for longer sequences.
        long_factor: Vec<f64>,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
        /// The factor on cos and sin.
        attention_factor: f64,
    },
}

/// The inverse frequencies of one attention head's rotary embedding.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f64>,
    /// LongRoPE: the frequencies past the original context, from which position on, and the
    /// factor on cos and sin.
    long: Option<(Vec<f64>, usize, f32)>,
}

impl RotaryEmbedding {
    /// Frequencies for a head of size `head_dim` with base `theta`, as transformers computes them
    /// (the base frequencies in f32, like torch).
    /// `head_dim` is the rotated width (a head's, or its first part with a partial rotary factor).
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let powers = |i: usize| (theta as f32).powf((2 * i) as f32 / head_dim as f32);
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| (1.0f32 / powers(i)) as f64)
            .collect();
        // transformers' LongRoPE: 1 / (factor · base^(2i/d)), in f32.
        let divided = |factors: &[f64]| -> Vec<f64> {
            (0..head_dim / 2)
                .map(|i| {
                    (1.0f32 / (factors.get(i).copied().unwrap_or(1.0) as f32 * powers(i))) as f64
                })
                .collect()
        };
        let mut long = None;
        let inv_freq = match scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                long = Some((
                    divided(long_factor),
                    *original_max_position_embeddings as usize,
                    *attention_factor as f32,
                ));
                divided(short_factor)
            }
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
        RotaryEmbedding { inv_freq, long }
    }

    /// LongRoPE: the sequence length past which the long frequencies apply (the original
    /// context); None for every other scaling.
    pub fn long_from(&self) -> Option<usize> {
        self.long.as_ref().map(|(_, original, _)| *original)
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
        // LongRoPE: the long frequencies when any position reaches past the original context
        // (transformers decides by the largest position id), and the factor on cos and sin.
        let last = positions.iter().flatten().max().map_or(0, |&p| p as usize);
        let (inv_freq, factor) = match &self.long {
            Some((long, original, factor)) if last + 1 > *original => (long, *factor),
            Some((_, _, factor)) => (&self.inv_freq, *factor),
            None => (&self.inv_freq, 1.0),
        };
        let mut cos = Vec::with_capacity(rows * len * half);
        let mut sin = Vec::with_capacity(rows * len * half);
        for row in positions {
            for &p in row {
                for &f in inv_freq {
                    // transformers computes position * inv_freq in f32.
                    let angle = (p as f32) * (f as f32);
                    cos.push(angle.cos() * factor);
                    sin.push(angle.sin() * factor);
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

/// `rotate` applied to the first `2 · cos width` features of each head of `x` (the rest passes
/// as is: a partial rotary factor), or to all of them.
fn on_rotated_part(
    x: &Tensor,
    cos: &Tensor,
    rotate: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let rotated = 2 * cos.dim(candle_core::D::Minus1)?;
    if rotated >= d {
        return rotate(x);
    }
    let part = rotate(&x.narrow(candle_core::D::Minus1, 0, rotated)?.contiguous()?)?;
    let rest = x.narrow(candle_core::D::Minus1, rotated, d - rotated)?;
    Tensor::cat(&[&part, &rest], candle_core::D::Minus1)?.contiguous()
}

/// Rotates `x: [b, heads, t, head_dim]` by the position angles in `cos`/`sin` (from
/// [`RotaryEmbedding::tables`]). The backward is the inverse rotation of the gradient.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rope = move |x: &Tensor, cos: &Tensor, sin: &Tensor| {
        on_rotated_part(x, cos, |part| candle_nn::rotary_emb::rope(part, cos, sin))
    };
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

/// RoPE's dispatch point (token-major layout): the native kernel for f32 on the CPU, the CUDA
/// kernel for f32 and bf16 on a GPU, candle-nn's elsewhere. RoPE on untracked token-major rows `[b, t, heads, d]`, or its backward (the inverse rotation of
/// a gradient) when `inverse`. cos/sin: `[t', d / 2]` or `[b, t', d / 2]` with `t' ≥ t`.
pub(crate) fn rotate_tokens(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let kernel = Kernel::of(&[&x, cos, sin]);
    on_rotated_part(&x, cos, |x| match kernel {
        Kernel::Cpu => cpu::rope::rotate_tokens(x, cos, sin, inverse),
        #[cfg(feature = "cuda")]
        Kernel::Cuda => super::cuda::rope_tokens(x, cos, sin, inverse),
        _ if inverse => candle_nn::rotary_emb::rope_thd(x, cos, &sin.neg()?),
        _ => candle_nn::rotary_emb::rope_thd(x, cos, sin),
    })
}
