//! Vectorized elementwise kernels on f32 slices: plain loops over 16 lanes that the compiler
//! turns into AVX-512 code where the CPU has it, else AVX2/FMA (checked once per call), else SSE2,
//! and a fast `exp` those loops can inline.

/// Lanes the loops are written for: one AVX-512 register, two AVX2 ones.
pub(crate) const LANES: usize = 16;

macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for (every
                    // AVX-512 CPU has AVX2 and FMA).
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use dispatch;

/// `e^x` to a few ulp for `x ≤ 88`, 0 below -87 (and for -inf): `2^n · e^r` with
/// `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and `e^r` from its Taylor series to `r^7`
/// (truncation error below 6e-9 relative). The polynomial is in fused multiply-adds: call it from
/// [`dispatch`] bodies, where FMA is enabled (elsewhere `mul_add` is a library call).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in few bits and the rest, so n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer (ties to even) in the float unit.
    const ROUND: f32 = 12_582_912.0;
    let hidden = x < -87.0;
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if hidden { 0.0 } else { x };
    // n + ROUND, exactly: its bits are ROUND's plus n, so 2^n needs no float-to-int conversion
    // (Rust's saturating `as i32` does not vectorize).
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if hidden {
        0.0
    } else {
        p * two_n
    }
}

#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let larger = |a: f32, b: f32| if b > a { b } else { a };
    rest.iter()
        .fold(fold_lanes(acc, larger), |a, &b| larger(a, b))
}

/// The 16 lanes of `acc` combined by `f` as a tree (halves, quarters, ...): four vector steps
/// where a left-to-right fold is sixteen dependent scalar ones.
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] = f(acc[l], acc[l + width]);
        }
        width /= 2;
    }
    acc[0]
}

/// The sum of 16 lanes, as a tree.
#[inline(always)]
fn lane_sum(acc: [f32; LANES]) -> f32 {
    fold_lanes(acc, |a, b| a + b)
}

#[inline(always)]
fn dot_of(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    lane_sum(acc) + rest
}

#[inline(always)]
fn dot3_of(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len() / LANES * LANES;
    for i in (0..n).step_by(LANES) {
        let (x, y, z) = (&a[i..i + LANES], &b[i..i + LANES], &c[i..i + LANES]);
        for l in 0..LANES {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    let rest: f32 = (n..a.len()).map(|i| a[i] * b[i] * c[i]).sum();
    lane_sum(acc) + rest
}

dispatch! {
    /// `Σ a_i b_i`.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_of(a, b)
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

dispatch! {
    /// Inverted-dropout mask entries `start..start + out.len()` for `key`: entry i is 0 when the
    /// top 53 bits of `mix64(key ^ mix64(i))` are below `threshold`, else `keep`
    /// ([`crate::ops::dropout::dropout_mask`]).
    fn dropout_fill(out: &mut [f32], start: u64, key: u64, threshold: u64, keep: f32) {
        for (j, m) in out.iter_mut().enumerate() {
            let bits = crate::rng::mix64(key ^ crate::rng::mix64(start + j as u64));
            *m = if (bits >> 11) < threshold { 0.0 } else { keep };
        }
    }
}

dispatch! {
    /// SwiGLU: `out = silu(gate) · up`.
    fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

dispatch! {
    /// SwiGLU's gradients for the output gradient `grad`: `d up = grad · silu(gate)`,
    /// `d gate = grad · up · s · (1 + gate · (1 - s))` with `s = sigmoid(gate)`.
    fn swiglu_backward(
        gate: &[f32],
        up: &[f32],
        grad: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32]
    ) {
        let n = gate.len();
        let (up, grad, d_gate, d_up) = (&up[..n], &grad[..n], &mut d_gate[..n], &mut d_up[..n]);
        for i in 0..n {
            let (g, s) = (gate[i], sigmoid(gate[i]));
            d_up[i] = grad[i] * g * s;
            d_gate[i] = grad[i] * up[i] * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// `tanh(x) = 1 - 2 / (e^{2x} + 1)`, from [`exp`] (absolute error below 1e-7; ±1 saturated).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// `√(2/π)`, the tanh approximation of GELU's slope at 0.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term of the tanh approximation of GELU.
const GELU_CUBIC: f32 = 0.044_715;

dispatch! {
    /// GeGLU (Gemma's MLP): `out = gelu_tanh(gate) · up`, with PyTorch's `gelu(approximate="tanh")`:
    /// `gelu_tanh(x) = x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    fn geglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            let t = tanh(SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g));
            *o = 0.5 * g * (1.0 + t) * u;
        }
    }
}

dispatch! {
    /// GeGLU's gradients for the output gradient `grad`: `d up = grad · gelu_tanh(gate)`,
    /// `d gate = grad · up · (½(1 + t) + ½ x (1 - t²) √(2/π) (1 + 3 · 0.044715 x²))`.
    fn geglu_backward(
        gate: &[f32],
        up: &[f32],
        grad: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32]
    ) {
        let n = gate.len();
        let (up, grad, d_gate, d_up) = (&up[..n], &grad[..n], &mut d_gate[..n], &mut d_up[..n]);
        for i in 0..n {
            let x = gate[i];
            let t = tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
            let slope = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
            d_up[i] = grad[i] * 0.5 * x * (1.0 + t);
            d_gate[i] = grad[i] * up[i] * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * slope);
        }
    }
}

dispatch! {
    /// Soft-capping in place (Gemma 2's attention and final logits): `s = cap · tanh(s / cap)`
    /// (before masking: -inf becomes -cap).
    fn softcap(s: &mut [f32], cap: f32) {
        let inv = 1.0 / cap;
        s.iter_mut().for_each(|x| *x = cap * tanh(*x * inv));
    }
}

dispatch! {
    /// Soft-capping's backward in place: `grad ∘ (1 - (capped / cap)²)` for the capped values.
    fn softcap_backward(grad: &mut [f32], capped: &[f32], cap: f32) {
        let inv = 1.0 / cap;
        for (g, &c) in grad.iter_mut().zip(capped) {
            let t = c * inv;
            *g *= 1.0 - t * t;
        }
    }
}

dispatch! {
    /// RoPE ("rotate half") of one token's heads: each `2 · cos.len()`-wide head of `x` split in
    /// halves `(x1, x2)` becomes `(x1 c - x2 s, x2 c + x1 s)` with `s = sign · sin` (`sign` -1
    /// rotates back: the backward).
    fn rope_rows(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, out: &mut [f32]) {
        let half = cos.len();
        let sin = &sin[..half];
        for (x, out) in x.chunks_exact(2 * half).zip(out.chunks_exact_mut(2 * half)) {
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = out.split_at_mut(half);
            for i in 0..half {
                let (c, s) = (cos[i], sign * sin[i]);
                o1[i] = x1[i] * c - x2[i] * s;
                o2[i] = x2[i] * c + x1[i] * s;
            }
        }
    }
}

dispatch! {
    /// RMSNorm of each `w.len()`-wide row of `x`: `out = w · x / sqrt(mean(x²) + eps)`.
    fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let inv = 1.0 / (dot_of(x, x) / d as f32 + eps).sqrt();
            for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
                *o = x * inv * w;
            }
        }
    }
}

dispatch! {
    /// RMSNorm's input gradient, row by row: with `x̂ = x · inv`, `inv = 1 / rms(x)`,
    /// `dx = (g · w - x̂ · mean(g · w · x̂)) · inv`.
    fn rms_norm_backward(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
        let d = w.len();
        let rows = x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
        for ((x, g), dx) in rows {
            let inv = 1.0 / (dot_of(x, x) / d as f32 + eps).sqrt();
            let mean = dot3_of(g, w, x) * inv / d as f32;
            for (((o, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                *o = (g * w - x * inv * mean) * inv;
            }
        }
    }
}

dispatch! {
    /// One run of keys of the online softmax, row by row (`s`: `[m, n]` scores, -inf where
    /// hidden): updates each row's running max and sum, rescales its output row (`out`:
    /// `[m, d]`) and turns the scores into `exp(s - max)`.
    fn online_softmax_rows(
        s: &mut [f32],
        n: usize,
        max: &mut [f32],
        sum: &mut [f32],
        out: &mut [f32],
        d: usize
    ) {
        for (r, row) in s.chunks_exact_mut(n).enumerate() {
            let new_max = max_of(row).max(max[r]);
            if new_max == f32::NEG_INFINITY {
                // Nothing visible yet in this row.
                row.fill(0.0);
                continue;
            }
            let alpha = exp(max[r] - new_max);
            // exp and the row's sum in one pass
            let mut acc = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    let e = exp(c[l] - new_max);
                    c[l] = e;
                    acc[l] += e;
                }
            }
            let mut rest = 0.0;
            for x in chunks.into_remainder() {
                *x = exp(*x - new_max);
                rest += *x;
            }
            sum[r] = sum[r] * alpha + lane_sum(acc) + rest;
            if alpha != 1.0 {
                out[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
            }
            max[r] = new_max;
        }
    }
}

dispatch! {
    /// Scores to probabilities with each row's log-sum-exp: `p = exp(s - lse)`.
    fn probabilities(s: &mut [f32], n: usize, lse: &[f32]) {
        for (row, &l) in s.chunks_exact_mut(n).zip(lse) {
            row.iter_mut().for_each(|x| *x = exp(*x - l));
        }
    }
}

dispatch! {
    /// The softmax backward in place: `dp = p ∘ (dp - D_row)`.
    fn score_gradient(dp: &mut [f32], p: &[f32], n: usize, row_dot: &[f32]) {
        for ((g, p), &dot) in dp.chunks_exact_mut(n).zip(p.chunks_exact(n)).zip(row_dot) {
            g.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
        }
    }
}

/// One row's softmax statistics (see [`softmax_row_stats`]).
#[derive(Debug, Clone, Copy)]
pub struct RowStats {
    /// `lse - logit[target]`.
    pub cross_entropy: f32,
    /// `lse - Σ p · logit`.
    pub entropy: f32,
    /// The first index of the largest logit.
    pub argmax: usize,
    /// The target's probability `exp(logit[target] - lse)`.
    pub target_probability: f32,
}

dispatch! {
    /// Cross-entropy, entropy, argmax and target probability of one row of logits; with
    /// `grad_weight` the row is replaced by `(softmax - onehot(target)) · grad_weight`, the
    /// weighted gradient of the cross-entropy with respect to the logits (else it holds
    /// `exp(logit - max)`). With `dft` the weight is also multiplied by the target's probability
    /// (TRL's DFT loss, `-log p · p` with p detached).
    fn softmax_row_stats(row: &mut [f32], target: usize, grad_weight: Option<f32>, dft: bool) -> RowStats {
        let mut argmax = 0;
        let mut max = f32::NEG_INFINITY;
        for (i, &x) in row.iter().enumerate() {
            if x > max {
                max = x;
                argmax = i;
            }
        }
        let target_logit = row[target];
        let (mut sum, mut weighted) = ([0f32; LANES], [0f32; LANES]);
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let e = exp(c[l] - max);
                sum[l] += e;
                weighted[l] += e * c[l];
                c[l] = e;
            }
        }
        let (mut sum_rest, mut weighted_rest) = (0f32, 0f32);
        for x in chunks.into_remainder() {
            let e = exp(*x - max);
            sum_rest += e;
            weighted_rest += e * *x;
            *x = e;
        }
        let sum = lane_sum(sum) + sum_rest;
        let weighted = lane_sum(weighted) + weighted_rest;
        let lse = max + sum.ln();
        let target_probability = (target_logit - lse).exp();
        if let Some(w) = grad_weight {
            let w = if dft { w * target_probability } else { w };
            let scale = w / sum;
            row.iter_mut().for_each(|x| *x *= scale);
            row[target] -= w;
        }
        RowStats {
            cross_entropy: lse - target_logit,
            entropy: lse - weighted / sum,
            argmax,
            target_probability,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_tanh_and_gelu_match_the_library_functions() {
        let (mut worst_tanh, mut worst_gelu) = (0f64, 0f64);
        let mut x = -30.0f32;
        while x <= 30.0 {
            worst_tanh = worst_tanh.max((tanh(x) as f64 - (x as f64).tanh()).abs());
            let xd = x as f64;
            let gelu =
                0.5 * xd * (1.0 + (0.797_884_560_802_865_4 * (xd + 0.044715 * xd.powi(3))).tanh());
            let mut out = [0f32];
            geglu_forward(&[x], &[1.0], &mut out);
            worst_gelu = worst_gelu.max((out[0] as f64 - gelu).abs() / gelu.abs().max(1.0));
            x += 0.0007;
        }
        assert!(worst_tanh < 2e-7, "tanh: absolute error {worst_tanh}");
        assert!(worst_gelu < 1e-6, "gelu: error {worst_gelu}");
        let mut s = [f32::NEG_INFINITY, 0.0, 1e3];
        softcap(&mut s, 5.0);
        assert_eq!(
            s[0], -5.0,
            "-inf caps to -cap (masking comes after capping)"
        );
        assert_eq!(s[1], 0.0);
        assert!((s[2] - 5.0).abs() < 1e-6);
    }

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 20.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001;
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }
}
