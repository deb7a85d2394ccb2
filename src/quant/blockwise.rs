//! bitsandbytes' block-wise quantization on host slices: 4-bit (NF4/FP4, two codes per byte) of
//! weights and 8-bit (dynamic map) of the absmax statistics for double quantization. Scaling,
//! rounding, tie-breaking, padding and packing follow bitsandbytes' CPU implementation (0.50) so
//! the bytes are identical; `tests/quant_bnb.rs` checks them against bitsandbytes' output.

/// Splits `n` values into blocks of `blocksize`; the last may be partial.
pub fn block_count(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Max |x| of a block.
fn absmax_of(block: &[f32]) -> f32 {
    block.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// A 4-bit code table prepared for nearest-value search: the f32 midpoints between consecutive
/// sorted values, and the code index of each sorted position.
struct SortedCode {
    midpoints: [f32; 15],
    index: [u8; 16],
}

impl SortedCode {
    fn new(code: &[f32; 16]) -> Self {
        let mut order: Vec<usize> = (0..16).collect();
        // Stable, and equal values (FP4's two zeros) keep their table order.
        order.sort_by(|&a, &b| {
            code[a]
                .partial_cmp(&code[b])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut midpoints = [0f32; 15];
        for (i, m) in midpoints.iter_mut().enumerate() {
            *m = (code[order[i]] + code[order[i + 1]]) / 2.0;
        }
        let mut index = [0u8; 16];
        for (i, &o) in order.iter().enumerate() {
            index[i] = o as u8;
        }
        SortedCode { midpoints, index }
    }

    /// The code of `v`: the number of midpoints strictly below it picks the sorted position, so a
    /// value exactly on a midpoint takes the lower code (torch's `bucketize`).
    fn nearest(&self, v: f32) -> u8 {
        let pos = self.midpoints.iter().filter(|&&m| m < v).count();
        self.index[pos]
    }
}

/// Quantizes `values` to 4-bit codes in blocks of `blocksize`. Full blocks are scaled by the f32
/// reciprocal of their absmax (at least 1e-38), the partial last block is divided by its absmax
/// (stored as at least 1e-38); scaled values are clamped to [-1, 1] and take the nearest code.
/// Returns the codes packed two per byte (the first value in the high nibble; an odd count is
/// padded with the code of 0) and the absmax per block.
pub fn quantize_4bit(values: &[f32], blocksize: usize, code: &[f32; 16]) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    let sorted = SortedCode::new(code);
    let full = values.len() / blocksize;
    // Groups of blocks on all cores (a model's load time); an even group length keeps every
    // group's codes whole bytes, so the groups' bytes and absmax concatenate to the whole's.
    let group = blocksize
        * if blocksize.is_multiple_of(2) {
            4096
        } else {
            2 * 4096
        };
    let parts: Vec<(Vec<u8>, Vec<f32>)> = values
        .par_chunks(group)
        .enumerate()
        .map(|(g, chunk)| quantize_blocks(chunk, g * (group / blocksize), full, blocksize, &sorted))
        .collect();
    let mut packed = Vec::with_capacity(values.len().div_ceil(2));
    let mut absmax = Vec::with_capacity(block_count(values.len(), blocksize));
    for (p, a) in parts {
        packed.extend_from_slice(&p);
        absmax.extend_from_slice(&a);
    }
    (packed, absmax)
}

/// [`quantize_4bit`] of the consecutive blocks in `values`, the first being block `first` of
/// `full` full ones.
fn quantize_blocks(
    values: &[f32],
    first: usize,
    full: usize,
    blocksize: usize,
    sorted: &SortedCode,
) -> (Vec<u8>, Vec<f32>) {
    let mut absmax = Vec::with_capacity(block_count(values.len(), blocksize));
    let mut codes = Vec::with_capacity(values.len() + 1);
    for (i, block) in values.chunks(blocksize).enumerate() {
        let m = absmax_of(block);
        if first + i < full {
            absmax.push(m);
            let inv = 1.0 / m.max(1e-38);
            codes.extend(
                block
                    .iter()
                    .map(|&v| sorted.nearest((v * inv).clamp(-1.0, 1.0))),
            );
        } else {
            let m = m.max(1e-38);
            absmax.push(m);
            codes.extend(
                block
                    .iter()
                    .map(|&v| sorted.nearest((v / m).clamp(-1.0, 1.0))),
            );
        }
    }
    if codes.len() % 2 == 1 {
        codes.push(sorted.nearest(0.0));
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// Dequantizes packed 4-bit codes into `out`: `code[c] * absmax[block]` in f32.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    out: &mut [f32],
) {
    for (i, o) in out.iter_mut().enumerate() {
        let byte = packed[i / 2];
        let c = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        *o = code[c as usize] * absmax[i / blocksize];
    }
}

/// Bins of the 8-bit quantizer's lookup table over [-1, 1].
const LUT_BINS: usize = 65536;

/// bitsandbytes' CPU lookup table for a sorted 256-value map: bin `i` stands for the value
/// `-1 + 2i / 65535` and holds the number of map midpoints strictly below it.
fn lookup_table(code: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = Vec::with_capacity(LUT_BINS);
    let mut idx = 0usize;
    for i in 0..LUT_BINS {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_BINS - 1) as f32;
        while idx < mid.len() && mid[idx] < val {
            idx += 1;
        }
        lut.push(idx as u8);
    }
    lut
}

/// The lookup-table bin of a scaled value (clamped to [-1, 1], rounded half up).
fn bin_of(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5).mul_add((LUT_BINS - 1) as f32, 0.5) as u16 as usize
}

/// Quantizes `values` to 8-bit codes of the sorted 256-value `code` map in blocks of `blocksize`
/// (bitsandbytes' CPU `quantize_blockwise`): values are scaled by the reciprocal of the block's
/// absmax and binned into a 65536-entry lookup table (not an exact nearest search); an all-zero
/// block gets codes 0. Returns the codes and the absmax per block.
pub fn quantize_8bit(values: &[f32], blocksize: usize, code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let lut = lookup_table(code);
    let mut absmax = Vec::with_capacity(block_count(values.len(), blocksize));
    let mut out = Vec::with_capacity(values.len());
    for block in values.chunks(blocksize) {
        let m = absmax_of(block);
        absmax.push(m);
        if m == 0.0 {
            out.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / m;
        out.extend(block.iter().map(|&v| lut[bin_of(v * inv)]));
    }
    (out, absmax)
}

#[cfg(test)]
mod parallel_tests {
    use super::*;

    /// The groups quantized on all cores give the bytes and absmax of one pass over the whole,
    /// for even and odd block sizes, with a partial last block and an odd value count.
    #[test]
    fn groups_concatenate_to_the_whole() {
        let code = crate::quant::codebook::NF4;
        let sorted = SortedCode::new(&code);
        for (blocksize, n) in [(64, 64 * 4096 * 2 + 101), (3, 3 * 8192 * 2 + 7)] {
            let mut x = 0x2545_f491_u32;
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as f32 / u32::MAX as f32 - 0.5
                })
                .collect();
            let whole = quantize_blocks(&values, 0, n / blocksize, blocksize, &sorted);
            assert_eq!(
                quantize_4bit(&values, blocksize, &code),
                whole,
                "blocksize {blocksize}"
            );
        }
    }
}
