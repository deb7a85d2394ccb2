//! RoPE's native kernel on the token-major layout.

use super::{par_filled, simd, tensor, Held, PIECE};
use candle_core::{Result, Tensor};

/// RoPE on token-major rows `[b, t, heads, d]` (f32 on the CPU), or its inverse: tokens in parallel (candle's kernel runs a batch element
/// per task, so one sequence ran on one core).
pub(crate) fn rotate_tokens(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
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
    use crate::ops::rope::{RopeScaling, RotaryEmbedding};
    use candle_core::{DType, Device};

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
                let ours = rotate_tokens(&x, &cos, &sin, inverse)?;
                let sin_used = if inverse { sin.neg()? } else { sin.clone() };
                let want = candle_nn::rotary_emb::rope_thd(&x, &cos, &sin_used)?;
                assert!(
                    max_diff(&ours, &want)? < 1e-6,
                    "inverse={inverse} {:?}",
                    cos.dims()
                );
            }
            // The inverse rotation undoes the rotation.
            let back = rotate_tokens(&rotate_tokens(&x, &cos, &sin, false)?, &cos, &sin, true)?;
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
            let err = rotate_tokens(&x, &c, &c, false).unwrap_err().to_string();
            assert!(err.contains("do not fit"), "{err}");
        }
        Ok(())
    }
}
