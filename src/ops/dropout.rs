//! LoRA dropout masks: keyed, so a mask is drawn again in the backward (or a chunk of rows at a
//! time) without being kept, filled on all cores by the vectorized kernel.

use crate::ops::cpu::simd::dropout_fill;
use crate::ops::cpu::PIECE;
use rayon::prelude::*;

/// Inverted-dropout mask with `n` entries for drop probability `p`: each entry is 0 with probability
/// `p`, else `1 / (1 - p)`; entry i depends only on `(key, i)`.
pub fn dropout_mask(n: usize, p: f64, key: u64) -> Vec<f32> {
    dropout_mask_from(0, n, p, key)
}

/// Entries `first..first + n` of [`dropout_mask`]'s mask for `(p, key)`: a part of one draw (the
/// rows of a chunk) equals the same entries of the whole.
pub fn dropout_mask_from(first: usize, n: usize, p: f64, key: u64) -> Vec<f32> {
    let keep = (1.0 / (1.0 - p)) as f32;
    // u = (h >> 11) / 2^53 < p, compared exactly in integers: (h >> 11) < ⌈p · 2^53⌉.
    let threshold = (p * (1u64 << 53) as f64).ceil() as u64;
    let piece = PIECE;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(piece)
        .enumerate()
        .for_each(|(c, out)| dropout_fill(out, (first + c * piece) as u64, key, threshold, keep));
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::mix64;

    #[test]
    fn dropout_mask_is_the_keyed_definition() {
        // The parallel, integer-compared kernel draws exactly what the definition does.
        for &(n, p, key) in &[(70_000, 0.1, 42), (5, 0.5, 7), (40_000, 0.05, u64::MAX)] {
            let keep = (1.0 / (1.0 - p)) as f32;
            let want: Vec<f32> = (0..n as u64)
                .map(|i| {
                    let u = (mix64(key ^ mix64(i)) >> 11) as f64 / (1u64 << 53) as f64;
                    if u < p {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect();
            assert_eq!(dropout_mask(n, p, key), want, "n={n} p={p}");
        }
    }

    #[test]
    fn dropout_mask_parts_equal_the_whole() {
        // Chunks of rows draw their part of one mask: pieces that start mid-piece included.
        let whole = dropout_mask(70_000, 0.3, 9);
        for (first, n) in [
            (0, 70_000),
            (1, 17),
            (1234, 68_766),
            (69_999, 1),
            (33_000, 20_000),
        ] {
            assert_eq!(dropout_mask_from(first, n, 0.3, 9), whole[first..first + n]);
        }
    }

    #[test]
    fn dropout_rate_is_close_to_p() {
        let m = dropout_mask(100_000, 0.1, 42);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "{dropped}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
    }
}
