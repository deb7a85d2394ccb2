//! Deterministic random numbers: a seeded SplitMix64 stream for initialisation and shuffling, and
//! keyed (counter-based) draws for dropout, so a step's randomness depends only on
//! (seed, step, module) and a resumed run reproduces an uninterrupted one without saved RNG state.

/// SplitMix64's finaliser: a strong 64-bit mix.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Combines keys into one 64-bit key (order matters).
pub fn key(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x51_7C_C1_B7_27_22_0A_95, |acc, &p| mix64(acc ^ p))
}

/// Stable 64-bit FNV-1a hash of a string (module names → keys).
pub fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// A seeded stream of random numbers.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A stream determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// Inverted-dropout mask with `n` entries for drop probability `p`: each entry is 0 with probability
/// `p`, else `1 / (1 - p)`; entry i depends only on `(key, i)`.
pub fn dropout_mask(n: usize, p: f64, key: u64) -> Vec<f32> {
    dropout_mask_from(0, n, p, key)
}

/// Entries `first..first + n` of [`dropout_mask`]'s mask for `(p, key)`: a part of one draw (the
/// rows of a chunk) equals the same entries of the whole.
pub fn dropout_mask_from(first: usize, n: usize, p: f64, key: u64) -> Vec<f32> {
    use rayon::prelude::*;
    let keep = (1.0 / (1.0 - p)) as f32;
    // u = (h >> 11) / 2^53 < p, compared exactly in integers: (h >> 11) < ⌈p · 2^53⌉.
    let threshold = (p * (1u64 << 53) as f64).ceil() as u64;
    let piece = crate::ops::cpu::PIECE;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(piece).enumerate().for_each(|(c, out)| {
        crate::ops::simd::dropout_fill(out, (first + c * piece) as u64, key, threshold, keep)
    });
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let a = Rng::new(7).permutation(100);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, Rng::new(7).permutation(100));
        assert_ne!(a, Rng::new(8).permutation(100));
    }

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
