//! NEFTune (transformers' `neftune_noise_alpha`, arXiv 2310.05914): uniform noise added to the
//! input embeddings while training, of magnitude `alpha / sqrt(L · d)` for a batch of `L` tokens
//! per row and width `d`. The draws are keyed, like dropout's: a step's noise depends only on its
//! key, so a resumed run adds the same noise as an uninterrupted one.

use crate::rng::{key, Rng};
use candle_core::{Result, Tensor};

/// Stream tag of NEFTune's draws (apart from dropout's).
const NEFTUNE: u64 = 0x004E_4546_5455_4E45;

/// `x + U(-m, m)` with `m = alpha / sqrt(t · d)`, drawn from `draw_key`. x: [b, t, d]
pub fn neftune(x: &Tensor, alpha: f64, draw_key: u64) -> Result<Tensor> {
    let (_, t, d) = x.dims3()?;
    let magnitude = alpha / ((t * d) as f64).sqrt();
    let mut rng = Rng::new(key(&[draw_key, NEFTUNE]));
    let values: Vec<f32> = (0..x.elem_count())
        .map(|_| rng.uniform(-magnitude, magnitude) as f32)
        .collect();
    let noise = Tensor::from_vec(values, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x + noise
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn noise_is_uniform_within_alpha_over_root_l_d_and_keyed() -> Result<()> {
        let x = Tensor::zeros((2, 50, 16), DType::F32, &Device::Cpu)?;
        let bound = 5.0 / (50.0f64 * 16.0).sqrt();
        let a = neftune(&x, 5.0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(a.iter().all(|v| (v.abs() as f64) < bound));
        // Spread over the whole range, centred on 0.
        let max = a.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        assert!(
            max > 0.95 * bound && mean.abs() < 0.05 * bound,
            "{max} {mean}"
        );
        assert_eq!(a, neftune(&x, 5.0, 1)?.flatten_all()?.to_vec1::<f32>()?);
        assert_ne!(a, neftune(&x, 5.0, 2)?.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
