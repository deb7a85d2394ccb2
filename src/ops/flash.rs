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
use super::cpu::{matmul, Held, Threads};
use super::graft::{graft3_with_output, Output};
use super::simd;
use candle_core::{Device, Result, Tensor};
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
    let mask = mask.clone();
    graft3_with_output(
        "flash attention",
        (q, k, v),
        Output::host(out, (b, heads, t_q, d)),
        Box::new(move |_, _, _, out, g, needs| {
            let (out, g) = (out.contiguous()?, g.contiguous()?);
            let held = [
                Held::new(&qd)?,
                Held::new(&kd)?,
                Held::new(&vd)?,
                Held::new(&out)?,
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
            (s, n),
            false,
            (q, d, 1),
            (&k[k0 * d..k1 * d], 1, d),
            scale,
            Threads::One,
        );
        if mask.tile_kind(row, (q0, q0 + m), (k0, k1)) == TileKind::Partial {
            mask.hide(row, (q0, q0 + m), (k0, k1), s);
        }
        simd::online_softmax_rows(s, n, &mut max, &mut sum, out, d);
        // out += p v
        matmul(
            (m, d, n),
            (out, d),
            true,
            (s, n, 1),
            (&v[k0 * d..k1 * d], d, 1),
            1.0,
            Threads::One,
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
                    (p, n),
                    false,
                    (q_tile, d, 1),
                    (k_tile, 1, d),
                    self.scale,
                    Threads::One,
                );
                if self.mask.tile_kind(row, (q0, q0 + m), (k0, k1)) == TileKind::Partial {
                    self.mask.hide(row, (q0, q0 + m), (k0, k1), p);
                }
                simd::probabilities(p, n, &lse[q0..q0 + m]);
                // dp = dO v^T, then dS = p ∘ (dp - D) in place
                matmul(
                    (m, n, d),
                    (dp, n),
                    false,
                    (g_tile, d, 1),
                    (v_tile, 1, d),
                    1.0,
                    Threads::One,
                );
                simd::score_gradient(dp, p, n, &row_dot[q0..q0 + m]);
                // dV += p^T dO; dK += scale · dS^T q; dQ += scale · dS k
                matmul(
                    (n, d, m),
                    (dv_tile, d),
                    true,
                    (p, 1, n),
                    (g_tile, d, 1),
                    1.0,
                    Threads::One,
                );
                matmul(
                    (n, d, m),
                    (dk_tile, d),
                    true,
                    (dp, 1, n),
                    (q_tile, d, 1),
                    self.scale,
                    Threads::One,
                );
                matmul(
                    (m, d, n),
                    (&mut dq[q0 * d..(q0 + m) * d], d),
                    true,
                    (dp, n, 1),
                    (k_tile, d, 1),
                    self.scale,
                    Threads::One,
                );
            }
            k0 = k1;
        }
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
