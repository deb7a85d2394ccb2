//! The fixed code tables of bitsandbytes' formats: the 16-value NormalFloat (NF4) and FP4 codes of
//! 4-bit weights, and the signed 8-bit "dynamic" map that double quantization applies to the
//! per-block absmax values.

/// bitsandbytes' NF4 code: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero. These are
/// the f32 values bitsandbytes stores as `quant_map` in every NF4 checkpoint.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// bitsandbytes' FP4 code (1 sign, 2 exponent, 1 mantissa bit; code values divided by 12 so the
/// largest is 1). Indices 0 and 8 are both zero (bitsandbytes stores +0.0 for both).
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// `n` evenly spaced f32 values from `start` to `end`, rounded as torch's CPU `linspace` does: the
/// first half counts up from `start`, the second half down from `end`, each a fused multiply-add.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n as f32 - 1.0);
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`, 7 exponent bits):
/// for each decade 10^-6 .. 10^0, the midpoints of evenly spaced fractions in [0.1, 1] (twice as
/// many per decade as the previous), both signs, plus 0 and 1; sorted ascending (256 values).
pub fn dynamic_map() -> [f32; 256] {
    const EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    let mut push_decade = |i: i32, items: usize| {
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(i - (EXPONENT_BITS - 1)) as f32;
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| scale * m));
        data.extend(means.iter().map(|m| -scale * m));
    };
    for i in 0..EXPONENT_BITS {
        push_decade(i, (1usize << (i + NON_SIGN_BITS - EXPONENT_BITS)) + 1);
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}
