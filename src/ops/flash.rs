//! Flash attention on the CPU (f32): forward and backward in tiles of 64 queries × 64 keys, with an
//! online softmax, so no `[t, t]` matrix ever exists — the forward keeps only the output and each
//! query's log-sum-exp, and the backward recomputes each tile's probabilities from them.
//!
//! Tiles the mask hides entirely (above the causal diagonal, outside a sliding window, before the
//! first document a query tile can see) are never computed; tiles it shows entirely are not masked
//! element by element. Grouped-query heads read their key/value head in place (no repetition).
//! Tile products go through the `gemm` crate (single-threaded per tile); tiles run in parallel on
//! rayon's pool. The backward follows FlashAttention-2: per query head and chunk of keys, dK and dV
//! of those keys are owned by one task, dQ is summed over the key chunks afterwards.

use super::attention::AttentionMask;
use super::graft::graft3;
use candle_core::{Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Queries per tile.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;

/// Sizes of one attention call: q `[b, heads, t_q, d]`, k and v `[b, kv_heads, t_k, d]`.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Batch rows.
    pub b: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Queries per row.
    pub t_q: usize,
    /// Keys per row.
    pub t_k: usize,
    /// Head width.
    pub d: usize,
}

impl Dims {
    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Offset of key/value head for query head `bh` (flat batch × head index).
    fn kv_offset(&self, bh: usize) -> usize {
        let (bi, h) = (bh / self.heads, bh % self.heads);
        (bi * self.kv_heads + h / self.n_rep()) * self.t_k * self.d
    }
}

/// How a query tile × key tile meets the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TileKind {
    /// Every query sees every key.
    Full,
    /// Mixed: masked element by element.
    Partial,
}

/// `softmax(q k^T * scale + mask) v` on the CPU in f32 with the flash kernel, differentiable in q,
/// k and v. q: [b, heads, t_q, d], k, v: [b, kv_heads, t_k, d] -> [b, heads, t_q, d]
pub fn attention_flash_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, heads, t_q, d) = q.dims4()?;
    let (kb, kv_heads, t_k, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || heads % kv_heads != 0 {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if mask.t_k() != t_k || mask.t_q() != t_q {
        candle_core::bail!(
            "flash attention: the mask is for {} queries over {} keys, the call has {t_q} over {t_k}",
            mask.t_q(),
            mask.t_k()
        );
    }
    let dims = Dims {
        b,
        heads,
        kv_heads,
        t_q,
        t_k,
        d,
    };
    let (qd, kd, vd) = (
        q.detach().contiguous()?,
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    let scale = scale as f32;
    let (out, lse) = {
        let (qs, ks, vs) = (Held::new(&qd)?, Held::new(&kd)?, Held::new(&vd)?);
        forward(qs.slice()?, ks.slice()?, vs.slice()?, dims, mask, scale)
    };
    let out = Tensor::from_vec(out, (b, heads, t_q, d), &Device::Cpu)?;
    let saved_out = out.clone();
    let mask = mask.clone();
    graft3(
        "flash attention",
        q,
        k,
        v,
        out,
        Box::new(move |_, _, _, g, needs| {
            let g = g.contiguous()?;
            let held = [
                Held::new(&qd)?,
                Held::new(&kd)?,
                Held::new(&vd)?,
                Held::new(&saved_out)?,
                Held::new(&g)?,
            ];
            let [qs, ks, vs, os, gs] = [0, 1, 2, 3, 4].map(|i| held[i].slice());
            let grads = backward(
                Saved {
                    q: qs?,
                    k: ks?,
                    v: vs?,
                    out: os?,
                    lse: &lse,
                },
                gs?,
                dims,
                &mask,
                scale,
            );
            let (dq, dk, dv) = grads;
            let tensor =
                |x: Vec<f32>, t: usize, h: usize| Tensor::from_vec(x, (b, h, t, d), &Device::Cpu);
            Ok((
                needs[0].then(|| tensor(dq, t_q, heads)).transpose()?,
                needs[1].then(|| tensor(dk, t_k, kv_heads)).transpose()?,
                needs[2].then(|| tensor(dv, t_k, kv_heads)).transpose()?,
            ))
        }),
    )
}

/// A contiguous f32 CPU tensor's storage, held for reading.
struct Held<'a> {
    storage: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        Ok(Held { storage, layout })
    }

    fn slice(&self) -> Result<&[f32]> {
        let Storage::Cpu(cpu) = &*self.storage else {
            candle_core::bail!("flash attention: the CPU kernel got a tensor on another device")
        };
        let data = cpu.as_slice::<f32>()?;
        match self.layout.contiguous_offsets() {
            Some((start, end)) => Ok(&data[start..end]),
            None => candle_core::bail!("flash attention: a non-contiguous input"),
        }
    }
}

/// The forward pass: returns the output `[b, heads, t_q, d]` and each query's log-sum-exp
/// `[b, heads, t_q]` (of the scaled, masked scores).
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    mask: &AttentionMask,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { t_q, t_k, d, .. } = dims;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; q.len() / d];
    out.par_chunks_mut(t_q * d)
        .zip(lse.par_chunks_mut(t_q))
        .enumerate()
        .for_each(|(bh, (out, lse))| {
            let kv = dims.kv_offset(bh);
            let (kh, vh) = (&k[kv..kv + t_k * d], &v[kv..kv + t_k * d]);
            let qh = &q[bh * t_q * d..(bh + 1) * t_q * d];
            let row = bh / dims.heads;
            out.par_chunks_mut(BQ * d)
                .zip(lse.par_chunks_mut(BQ))
                .enumerate()
                .for_each(|(tile, (out, lse))| {
                    let q0 = tile * BQ;
                    let q_tile = &qh[q0 * d..(q0 + lse.len()) * d];
                    forward_tile(q_tile, kh, vh, out, lse, mask, row, q0, scale, d);
                });
        });
    (out, lse)
}

/// One query tile of the forward: online softmax over the key tiles it can see.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    mask: &AttentionMask,
    row: usize,
    q0: usize,
    scale: f32,
    d: usize,
) {
    let m = lse.len();
    let (lo, hi) = mask.tile_keys(row, q0, q0 + m);
    let mut s = vec![0f32; m * BK];
    let mut max = vec![f32::NEG_INFINITY; m];
    let mut sum = vec![0f32; m];
    let mut k0 = lo;
    while k0 < hi {
        let k1 = (k0 + BK).min(hi);
        let n = k1 - k0;
        let s = &mut s[..m * n];
        // s = scale · q k^T
        matmul(
            (m, n, d),
            s,
            n,
            false,
            (q, d, 1),
            (&k[k0 * d..k1 * d], 1, d),
            scale,
        );
        if mask.tile_kind(row, (q0, q0 + m), (k0, k1)) == TileKind::Partial {
            mask.hide(row, (q0, q0 + m), (k0, k1), s);
        }
        simd::online_softmax_rows(s, n, &mut max, &mut sum, out, d);
        // out += p v
        matmul(
            (m, d, n),
            out,
            d,
            true,
            (s, n, 1),
            (&v[k0 * d..k1 * d], d, 1),
            1.0,
        );
        k0 = k1;
    }
    for r in 0..m {
        let inv = 1.0 / sum[r];
        out[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
        lse[r] = max[r] + sum[r].ln();
    }
}

/// What the backward reads: the (contiguous) inputs, the output and each query's log-sum-exp.
pub struct Saved<'a> {
    /// Queries `[b, heads, t_q, d]`.
    pub q: &'a [f32],
    /// Keys `[b, kv_heads, t_k, d]`.
    pub k: &'a [f32],
    /// Values, like `k`.
    pub v: &'a [f32],
    /// The forward's output, like `q`.
    pub out: &'a [f32],
    /// The forward's log-sum-exp `[b, heads, t_q]`.
    pub lse: &'a [f32],
}

/// The backward pass: `(dq, dk, dv)` for the gradient `g` of the output.
pub fn backward(
    saved: Saved<'_>,
    g: &[f32],
    dims: Dims,
    mask: &AttentionMask,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims {
        b,
        heads,
        t_q,
        t_k,
        d,
        ..
    } = dims;
    // D_i = Σ_c dO_ic O_ic, the row term of the softmax backward.
    let row_dot: Vec<f32> = g
        .par_chunks(d)
        .zip(saved.out.par_chunks(d))
        .map(|(g, o)| simd::dot(g, o))
        .collect();
    // Key chunks per head: enough tasks for the pool even with one row and few heads.
    let key_tiles = t_k.div_ceil(BK);
    let wanted = (4 * rayon::current_num_threads()).div_ceil(b * heads);
    let chunk_rows = BK * key_tiles.div_ceil(wanted.clamp(1, key_tiles.max(1)));
    let chunks = t_k.div_ceil(chunk_rows).max(1);
    let mut dq_parts = vec![0f32; b * heads * chunks * t_q * d];
    let mut dk_heads = vec![0f32; b * heads * t_k * d];
    let mut dv_heads = vec![0f32; b * heads * t_k * d];
    dq_parts
        .par_chunks_mut(chunks * t_q * d)
        .zip(dk_heads.par_chunks_mut(t_k * d))
        .zip(dv_heads.par_chunks_mut(t_k * d))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| {
            dq.par_chunks_mut(t_q * d)
                .zip(dk.par_chunks_mut(chunk_rows * d))
                .zip(dv.par_chunks_mut(chunk_rows * d))
                .enumerate()
                .for_each(|(chunk, ((dq, dk), dv))| {
                    let task = HeadTask {
                        bh,
                        k_start: chunk * chunk_rows,
                        saved: &saved,
                        g,
                        row_dot: &row_dot,
                        dims,
                        mask,
                        scale,
                    };
                    task.run(dq, dk, dv);
                });
        });
    // dQ: sum of the key chunks' parts.
    let mut dq = vec![0f32; b * heads * t_q * d];
    dq.par_chunks_mut(t_q * d)
        .zip(dq_parts.par_chunks(chunks * t_q * d))
        .for_each(|(dq, parts)| {
            for part in parts.chunks(t_q * d) {
                dq.iter_mut().zip(part).for_each(|(a, p)| *a += p);
            }
        });
    drop(dq_parts);
    // dK, dV: sum over the query heads that share each key/value head.
    let n_rep = dims.n_rep();
    let group_sum = |per_head: &[f32]| -> Vec<f32> {
        let mut out = vec![0f32; b * dims.kv_heads * t_k * d];
        out.par_chunks_mut(t_k * d)
            .enumerate()
            .for_each(|(group, out)| {
                for rep in 0..n_rep {
                    let h = group * n_rep + rep;
                    let src = &per_head[h * t_k * d..(h + 1) * t_k * d];
                    out.iter_mut().zip(src).for_each(|(a, s)| *a += s);
                }
            });
        out
    };
    let dk = group_sum(&dk_heads);
    drop(dk_heads);
    let dv = group_sum(&dv_heads);
    (dq, dk, dv)
}

/// One backward task: a query head and a chunk of its keys.
struct HeadTask<'a> {
    bh: usize,
    k_start: usize,
    saved: &'a Saved<'a>,
    g: &'a [f32],
    row_dot: &'a [f32],
    dims: Dims,
    mask: &'a AttentionMask,
    scale: f32,
}

impl HeadTask<'_> {
    /// Adds this chunk's share of dQ (`dq`: the head's `[t_q, d]` part) and writes dK, dV of its
    /// keys (`dk`, `dv`: `[chunk rows, d]`).
    fn run(&self, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let Dims { t_q, t_k, d, .. } = self.dims;
        let bh = self.bh;
        let row = bh / self.dims.heads;
        let kv = self.dims.kv_offset(bh);
        let (kh, vh) = (
            &self.saved.k[kv..kv + t_k * d],
            &self.saved.v[kv..kv + t_k * d],
        );
        let qh = &self.saved.q[bh * t_q * d..(bh + 1) * t_q * d];
        let gh = &self.g[bh * t_q * d..(bh + 1) * t_q * d];
        let lse = &self.saved.lse[bh * t_q..(bh + 1) * t_q];
        let row_dot = &self.row_dot[bh * t_q..(bh + 1) * t_q];
        let k_end = self.k_start + dk.len() / d;
        // Key bounds of every query tile, computed once.
        let bounds: Vec<(usize, usize)> = (0..t_q.div_ceil(BQ))
            .map(|t| self.mask.tile_keys(row, t * BQ, ((t + 1) * BQ).min(t_q)))
            .collect();
        let mut p = vec![0f32; BQ * BK];
        let mut dp = vec![0f32; BQ * BK];
        let mut k0 = self.k_start;
        while k0 < k_end {
            let k1 = (k0 + BK).min(k_end);
            let n = k1 - k0;
            let (k_tile, v_tile) = (&kh[k0 * d..k1 * d], &vh[k0 * d..k1 * d]);
            let dk_tile = &mut dk[(k0 - self.k_start) * d..(k1 - self.k_start) * d];
            let dv_tile = &mut dv[(k0 - self.k_start) * d..(k1 - self.k_start) * d];
            for (tile, &(lo, hi)) in bounds.iter().enumerate() {
                if k1 <= lo || k0 >= hi {
                    continue;
                }
                let q0 = tile * BQ;
                let m = (q0 + BQ).min(t_q) - q0;
                let (p, dp) = (&mut p[..m * n], &mut dp[..m * n]);
                let q_tile = &qh[q0 * d..(q0 + m) * d];
                let g_tile = &gh[q0 * d..(q0 + m) * d];
                // p = exp(scale · q k^T - lse)
                matmul(
                    (m, n, d),
                    p,
                    n,
                    false,
                    (q_tile, d, 1),
                    (k_tile, 1, d),
                    self.scale,
                );
                if self.mask.tile_kind(row, (q0, q0 + m), (k0, k1)) == TileKind::Partial {
                    self.mask.hide(row, (q0, q0 + m), (k0, k1), p);
                }
                simd::probabilities(p, n, &lse[q0..q0 + m]);
                // dp = dO v^T, then dS = p ∘ (dp - D) in place
                matmul((m, n, d), dp, n, false, (g_tile, d, 1), (v_tile, 1, d), 1.0);
                simd::score_gradient(dp, p, n, &row_dot[q0..q0 + m]);
                // dV += p^T dO; dK += scale · dS^T q; dQ += scale · dS k
                matmul((n, d, m), dv_tile, d, true, (p, 1, n), (g_tile, d, 1), 1.0);
                matmul(
                    (n, d, m),
                    dk_tile,
                    d,
                    true,
                    (dp, 1, n),
                    (q_tile, d, 1),
                    self.scale,
                );
                matmul(
                    (m, d, n),
                    &mut dq[q0 * d..(q0 + m) * d],
                    d,
                    true,
                    (dp, n, 1),
                    (k_tile, d, 1),
                    self.scale,
                );
            }
            k0 = k1;
        }
    }
}

/// `dst[m × n] (row stride dst_rs) = (dst if accumulate, else 0) + beta · A · B` where
/// `A[i][p] = a[i·a_rs + p·a_cs]` (`m × k`) and `B[p][j] = b[p·b_rs + j·b_cs]` (`k × n`).
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        dst.len() > last(m, dst_rs, n, 1),
        "flash attention: dst too short"
    );
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * dst_rs..i * dst_rs + n].fill(0.0));
        }
        return;
    }
    assert!(
        a.len() > last(m, a_rs, k, a_cs),
        "flash attention: lhs too short"
    );
    assert!(
        b.len() > last(k, b_rs, n, b_cs),
        "flash attention: rhs too short"
    );
    // SAFETY: the assertions above keep every index the product touches inside the slices; dst
    // is borrowed mutably and cannot alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

impl AttentionMask {
    /// Keys `[lo, hi)` that any of the queries `q0..q1` (indices into this call's queries) may see
    /// in batch row `row`: causal, window and document bounds.
    fn tile_keys(&self, row: usize, q0: usize, q1: usize) -> (usize, usize) {
        let (i0, i1) = (self.offset() + q0, self.offset() + q1);
        let window_lo = |i: usize| self.window().map_or(0, |w| (i + 1).saturating_sub(w));
        let lo = match self.document_firsts(row) {
            // Per query the later of its document's first key and its window's first key.
            Some(first) => (i0..i1)
                .map(|i| (first[i] as usize).max(window_lo(i)))
                .min()
                .unwrap_or(i0),
            None => window_lo(i0),
        };
        (lo, i1)
    }

    /// Whether the tile needs masking element by element.
    fn tile_kind(
        &self,
        row: usize,
        (q0, q1): (usize, usize),
        (k0, k1): (usize, usize),
    ) -> TileKind {
        let (i0, i1) = (self.offset() + q0, self.offset() + q1);
        let causal = k1 - 1 <= i0;
        let window = self.window().is_none_or(|w| i1 - 1 - k0 < w);
        let documents = self
            .document_runs(row)
            .is_none_or(|run| run[i1 - 1] as usize <= k0);
        if causal && window && documents {
            TileKind::Full
        } else {
            TileKind::Partial
        }
    }

    /// Sets the scores of hidden query × key pairs of the tile to -inf (`s`: `[q1 - q0, k1 - k0]`).
    fn hide(&self, row: usize, (q0, q1): (usize, usize), (k0, k1): (usize, usize), s: &mut [f32]) {
        let n = k1 - k0;
        for (r, qi) in (q0..q1).enumerate() {
            let i = self.offset() + qi;
            for (c, j) in (k0..k1).enumerate() {
                if !self.visible(row, i, j) {
                    s[r * n + c] = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// The elementwise tile work, vectorized: written as plain loops over 8 lanes that the compiler
/// turns into AVX2/FMA code where the CPU has it (checked once per call), else SSE2.
mod simd {
    /// Lanes the loops are written for.
    const LANES: usize = 8;

    macro_rules! dispatch {
        ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
            $(#[$doc])*
            pub fn $name($($arg: $ty),*) $(-> $ret)? {
                #[inline(always)]
                fn body($($arg: $ty),*) $(-> $ret)? $body
                #[cfg(target_arch = "x86_64")]
                {
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

    /// `e^x` to a few ulp for `x ≤ 88`, 0 below -87 (and for -inf): `2^n · e^r` with
    /// `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and `e^r` from its Taylor series to `r^7`
    /// (truncation error below 6e-9 relative).
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
        let n = (x * LOG2_E + ROUND) - ROUND;
        let r = (x - n * LN2_HI) - n * LN2_LO;
        let mut p = 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
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
        rest.iter()
            .chain(acc.iter())
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
    }

    #[inline(always)]
    fn sum_of(x: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
    }

    dispatch! {
        /// `Σ a_i b_i`.
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            let mut acc = [0f32; LANES];
            let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
            let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
            for (x, y) in ca.zip(cb) {
                for l in 0..LANES {
                    acc[l] += x[l] * y[l];
                }
            }
            acc.iter().sum::<f32>() + rest
        }
    }

    dispatch! {
        /// One key tile of the online softmax, row by row (`s`: `[m, n]` scores, -inf where
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
                row.iter_mut().for_each(|x| *x = exp(*x - new_max));
                sum[r] = sum[r] * alpha + sum_of(row);
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
}

#[cfg(test)]
mod tests {
    use super::simd;

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 20.0 {
            let want = (x as f64).exp();
            let got = simd::exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001;
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(simd::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(simd::exp(-100.0), 0.0);
        assert_eq!(simd::exp(0.0), 1.0);
    }
}
