//! Flash attention on the CPU (f32): forward and backward in tiles of 128 queries × 128 keys, with an
//! online softmax, so no `[t, t]` matrix ever exists — the forward keeps only the output and each
//! query's log-sum-exp, and the backward recomputes each tile's probabilities from them.
//!
//! The kernel works on the token-major layout the projections produce (`[b, t, heads, d]`): a head's
//! rows are read and written through strides, so no heads-first copy of q, k, v or the output is
//! made. Tiles the mask hides entirely (above the causal diagonal, outside a sliding window, before
//! the first document a query tile can see) are never computed; tiles it shows entirely are not
//! masked element by element. Grouped-query heads read their key/value head in place (no
//! repetition). Tile products go through the `gemm` crate (single-threaded per tile); tiles run in
//! parallel on rayon's pool. The backward follows FlashAttention-2: per query head and chunk of
//! keys, dK and dV of those keys are owned by one task, dQ is summed over the key chunks afterwards.

use super::{matmul, par_filled, par_zeroed, simd, tensor, Held, Threads};
use crate::ops::graft::{graft3_with_output, Output};
use crate::ops::mask::AttentionMask;
use crate::ops::scores::Scores;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Queries per tile: a forward task's rows, the unit the backward groups its queries by.
const BQ: usize = 128;
/// Keys per tile: the unit the backward's tasks own.
const BK: usize = 128;
/// Keys per online-softmax step in the forward, and queries per product in the backward: a query
/// tile meets up to this many keys (a key tile this many queries) at once. Fewer, wider calls than
/// 128 × 128 tiles: less of the gemm crate's per-call work and of the softmax's per-row work
/// (with the transposed tiles below, T=8192 forward −14%, backward −11%).
const RUN: usize = 512;

/// Sizes of one attention call: q `[b, t_q, heads, d]`, k and v `[b, t_k, kv_heads, d]`
/// (token-major).
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

    /// Distance between consecutive queries (or output rows) of one head.
    fn q_stride(&self) -> usize {
        self.heads * self.d
    }

    /// Distance between consecutive keys (or values) of one head.
    fn kv_stride(&self) -> usize {
        self.kv_heads * self.d
    }

    /// Where query head `h` of batch row `bi` starts in q (and the output).
    fn q_base(&self, bi: usize, h: usize) -> usize {
        bi * self.t_q * self.q_stride() + h * self.d
    }

    /// Where the key/value head that query head `h` reads starts in k and v.
    fn kv_base(&self, bi: usize, h: usize) -> usize {
        bi * self.t_k * self.kv_stride() + (h / self.n_rep()) * self.d
    }
}

/// Keys or values transposed tile by tile: per batch row and key/value head, per tile of [`BK`]
/// keys, the tile's `[d, BK]` (zero past the last key). A product against such a tile reads its
/// operand contiguously along the keys, which the gemm crate takes as it is; from the token-major
/// layout it packs (copies) the tile again in every call — measured 117 against 166 GFLOP/s on one
/// core for a 128 × 512 × 64 score product.
fn transposed_tiles(x: &[f32], dims: Dims) -> Vec<f32> {
    let Dims {
        t_k, kv_heads, d, ..
    } = dims;
    let tiles = t_k.div_ceil(BK);
    let stride = dims.kv_stride();
    par_filled(dims.b * kv_heads * tiles * d * BK, d * BK, |at, out| {
        let (head, tile) = (at / tiles, at % tiles);
        let (bi, g) = (head / kv_heads, head % kv_heads);
        let k0 = tile * BK;
        for j in 0..BK.min(t_k - k0) {
            let src = &x[(bi * t_k + k0 + j) * stride + g * d..][..d];
            for (p, &value) in src.iter().enumerate() {
                out[p * BK + j] = value;
            }
        }
    })
}

/// Where tile `tile` of [`transposed_tiles`] starts for query head `h` of batch row `bi`.
fn tile_base(dims: Dims, bi: usize, h: usize, tile: usize) -> usize {
    let head = bi * dims.kv_heads + h / dims.n_rep();
    (head * dims.t_k.div_ceil(BK) + tile) * dims.d * BK
}

/// `dst[:, c]` for the keys `k0..k1` (`dst`: `[m, k1 - k0]` at row stride `dst_rs`) `= beta · A ·
/// (the keys' transposed tiles)` — one product per key tile, the keys' range starting on a tile.
fn times_key_tiles(
    (m, d): (usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    a: (&[f32], usize, usize),
    tiles: &[f32],
    (k0, k1): (usize, usize),
    beta: f32,
) {
    debug_assert_eq!(k0 % BK, 0);
    let mut at = k0;
    while at < k1 {
        let n = (at + BK).min(k1) - at;
        let tile = &tiles[(at - k0) / BK * d * BK..];
        matmul(
            (m, n, d),
            (&mut dst[at - k0..], dst_rs),
            false,
            a,
            (tile, BK, 1),
            beta,
            Threads::One,
        );
        at += BK;
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
/// k and v, in the heads-first layout of [`crate::ops::attention::attention`]: q `[b, heads, t_q, d]`,
/// k, v `[b, kv_heads, t_k, d]` -> `[b, heads, t_q, d]` (transposed to and from the kernel's layout).
pub fn attention_flash_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: impl Into<Scores>,
) -> Result<Tensor> {
    let scale = scale.into();
    let tokens = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    attention_flash_cpu_tokens(&tokens(q)?, &tokens(k)?, &tokens(v)?, mask, scale)?.transpose(1, 2)
}

/// The flash kernel in the token-major layout: q `[b, t_q, heads, d]`, k, v `[b, t_k, kv_heads, d]`
/// -> `[b, t_q, heads, d]`; differentiable in q, k and v.
pub fn attention_flash_cpu_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: impl Into<Scores>,
) -> Result<Tensor> {
    let scale = scale.into();
    let dims = call_dims(q, k, v, mask)?;
    let (qd, kd, vd) = (
        q.detach().contiguous()?,
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    let (out, lse) = {
        let (qs, ks, vs) = (Held::new(&qd)?, Held::new(&kd)?, Held::new(&vd)?);
        forward(qs.slice()?, ks.slice()?, vs.slice()?, dims, mask, scale)
    };
    let mask = mask.clone();
    graft3_with_output(
        "flash attention",
        (q, k, v),
        Output::host(out, (dims.b, dims.t_q, dims.heads, dims.d)),
        Box::new(move |_, _, _, out, g, needs| {
            let (dq, dk, dv) = backward_untracked((&qd, &kd, &vd), out, &lse, g, &mask, scale)?;
            Ok((
                needs[0].then_some(dq),
                needs[1].then_some(dk),
                needs[2].then_some(dv),
            ))
        }),
    )
}

/// The sizes of a call: q `[b, t_q, heads, d]`, k and v `[b, t_k, kv_heads, d]`, checked against
/// each other and the mask.
fn call_dims(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Dims> {
    let (b, t_q, heads, d) = q.dims4()?;
    let (kb, t_k, kv_heads, kd) = k.dims4()?;
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
    if mask.document_rows().is_some_and(|r| r != b) {
        candle_core::bail!("flash attention: document ids for another batch size");
    }
    Ok(Dims {
        b,
        heads,
        kv_heads,
        t_q,
        t_k,
        d,
    })
}

/// The forward on untracked tensors, for an op that writes its own backward: the output
/// `[b, t_q, heads, d]` and each query's log-sum-exp, which [`backward_untracked`] reads.
pub(crate) fn forward_untracked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: Scores,
) -> Result<(Tensor, Vec<f32>)> {
    let dims = call_dims(q, k, v, mask)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let held = [Held::new(&q)?, Held::new(&k)?, Held::new(&v)?];
    let (qs, ks, vs) = (held[0].slice()?, held[1].slice()?, held[2].slice()?);
    let (out, lse) = forward(qs, ks, vs, dims, mask, scale);
    Ok((tensor(out, q.dims())?, lse))
}

/// `(dq, dk, dv)` (like q, k, v) for the output gradient `g` (like `out`), from what
/// [`forward_untracked`] returned.
pub(crate) fn backward_untracked(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Tensor,
    lse: &[f32],
    g: &Tensor,
    mask: &AttentionMask,
    scale: Scores,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = call_dims(q, k, v, mask)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (out, g) = (out.contiguous()?, g.contiguous()?);
    let held = [
        Held::new(&q)?,
        Held::new(&k)?,
        Held::new(&v)?,
        Held::new(&out)?,
        Held::new(&g)?,
    ];
    let [qs, ks, vs, os, gs] = [0, 1, 2, 3, 4].map(|i| held[i].slice());
    let (dq, dk, dv) = backward(
        Saved {
            q: qs?,
            k: ks?,
            v: vs?,
            out: os?,
            lse,
        },
        gs?,
        dims,
        mask,
        scale,
    );
    Ok((
        tensor(dq, q.dims())?,
        tensor(dk, k.dims())?,
        tensor(dv, v.dims())?,
    ))
}

/// The forward pass: returns the output `[b, t_q, heads, d]` and each query's log-sum-exp
/// `[b, heads, t_q]` (of the scaled, masked scores). Tiles of every head run in parallel into a
/// heads-first buffer, which one pass then writes token-major.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    mask: &AttentionMask,
    scores: Scores,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { heads, t_q, d, .. } = dims;
    let scale = Scale::of(scores);
    let kt = transposed_tiles(k, dims);
    let mut out_heads = par_zeroed(q.len());
    let mut lse = vec![0f32; q.len() / d];
    out_heads
        .par_chunks_mut(t_q * d)
        .zip(lse.par_chunks_mut(t_q))
        .enumerate()
        .for_each(|(bh, (out, lse))| {
            out.par_chunks_mut(BQ * d)
                .zip(lse.par_chunks_mut(BQ))
                .enumerate()
                .for_each(|(tile, (out, lse))| {
                    let at = TileAt {
                        bi: bh / heads,
                        h: bh % heads,
                        q0: tile * BQ,
                    };
                    forward_tile((q, &kt, v), dims, at, (out, lse), mask, scale);
                });
        });
    let row = dims.q_stride();
    let out = par_filled(q.len(), t_q * row, |bi, out| {
        for (i, dst) in out.chunks_exact_mut(row).enumerate() {
            for (h, dst) in dst.chunks_exact_mut(d).enumerate() {
                let src = ((bi * heads + h) * t_q + i) * d;
                dst.copy_from_slice(&out_heads[src..src + d]);
            }
        }
    });
    (out, lse)
}

/// [`Scores`] in the kernel's precision.
#[derive(Debug, Clone, Copy)]
struct Scale {
    scale: f32,
    cap: Option<f32>,
}

impl Scale {
    fn of(scores: Scores) -> Self {
        Scale {
            scale: scores.scale as f32,
            cap: scores.softcap.map(|c| c as f32),
        }
    }
}

/// Which query tile of which head.
#[derive(Debug, Clone, Copy)]
struct TileAt {
    bi: usize,
    h: usize,
    q0: usize,
}

/// One query tile of one head in the forward: online softmax over the key tiles it can see
/// (`out`: the tile's `[m, d]` rows of the head, `lse`: `[m]`).
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    (q, kt, v): (&[f32], &[f32], &[f32]),
    dims: Dims,
    TileAt { bi, h, q0 }: TileAt,
    (out, lse): (&mut [f32], &mut [f32]),
    mask: &AttentionMask,
    Scale { scale, cap }: Scale,
) {
    let d = dims.d;
    let m = lse.len();
    let (qs, ks) = (dims.q_stride(), dims.kv_stride());
    let q_tile = &q[dims.q_base(bi, h) + q0 * qs..];
    let vh = &v[dims.kv_base(bi, h)..];
    let (lo, hi) = mask.tile_keys(bi, q0, q0 + m);
    let mut s = vec![0f32; m * RUN];
    let mut max = vec![f32::NEG_INFINITY; m];
    let mut sum = vec![0f32; m];
    // From the key tile of the first key the queries see (the mask hides those before it).
    let mut k0 = lo / BK * BK;
    while k0 < hi {
        let k1 = (k0 + RUN).min(hi);
        let n = k1 - k0;
        let s = &mut s[..m * n];
        // s = scale · q k^T
        let tiles = &kt[tile_base(dims, bi, h, k0 / BK)..];
        times_key_tiles((m, d), (s, n), (q_tile, qs, 1), tiles, (k0, k1), scale);
        if let Some(cap) = cap {
            simd::softcap(s, cap);
        }
        if mask.tile_kind(bi, (q0, q0 + m), (k0, k1)) == TileKind::Partial {
            mask.hide(bi, (q0, q0 + m), (k0, k1), s);
        }
        simd::online_softmax_rows(s, n, &mut max, &mut sum, out, d);
        // out += p v, a key tile at a time (one product over all the run's keys streams the values
        // from L2 for every few rows: 143 against 169 GFLOP/s on one core)
        for c0 in (0..n).step_by(BK) {
            let c1 = (c0 + BK).min(n);
            matmul(
                (m, d, c1 - c0),
                (out, d),
                true,
                (&s[c0..], n, 1),
                (&vh[(k0 + c0) * ks..], ks, 1),
                1.0,
                Threads::One,
            );
        }
        k0 = k1;
    }
    for r in 0..m {
        let inv = 1.0 / sum[r];
        out[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
        lse[r] = max[r] + sum[r].ln();
    }
}

/// What the backward reads: the (contiguous, token-major) inputs, the output and each query's
/// log-sum-exp.
pub struct Saved<'a> {
    /// Queries `[b, t_q, heads, d]`.
    pub q: &'a [f32],
    /// Keys `[b, t_k, kv_heads, d]`.
    pub k: &'a [f32],
    /// Values, like `k`.
    pub v: &'a [f32],
    /// The forward's output, like `q`.
    pub out: &'a [f32],
    /// The forward's log-sum-exp `[b, heads, t_q]`.
    pub lse: &'a [f32],
}

/// The backward pass: `(dq, dk, dv)` (token-major, like the inputs) for the gradient `g` of the
/// output.
pub fn backward(
    saved: Saved<'_>,
    g: &[f32],
    dims: Dims,
    mask: &AttentionMask,
    scores: Scores,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let scale = Scale::of(scores);
    let Dims {
        b,
        heads,
        kv_heads,
        t_q,
        t_k,
        d,
    } = dims;
    // D_i = Σ_c dO_ic O_ic, the row term of the softmax backward, heads-first [b, heads, t_q].
    let mut row_dot = vec![0f32; b * heads * t_q];
    row_dot
        .par_chunks_mut(t_q)
        .enumerate()
        .for_each(|(bh, dots)| {
            let base = dims.q_base(bh / heads, bh % heads);
            for (i, x) in dots.iter_mut().enumerate() {
                let at = base + i * dims.q_stride();
                *x = simd::dot(&g[at..at + d], &saved.out[at..at + d]);
            }
        });
    let (kt, vt) = (
        transposed_tiles(saved.k, dims),
        transposed_tiles(saved.v, dims),
    );
    let chunks = key_chunks(b * heads, t_k, rayon::current_num_threads());
    // Per batch row (the mask's rows), where each key chunk starts: about equal work each.
    let starts: Vec<Vec<usize>> = (0..b)
        .map(|bi| chunk_starts(mask, bi, (t_q, t_k), chunks))
        .collect();
    // Per query head, heads-first: dQ's parts per key chunk, dK and dV.
    let mut dq_parts = par_zeroed(b * heads * chunks * t_q * d);
    let mut dk_heads = par_zeroed(b * heads * t_k * d);
    let mut dv_heads = par_zeroed(b * heads * t_k * d);
    dq_parts
        .par_chunks_mut(chunks * t_q * d)
        .zip(dk_heads.par_chunks_mut(t_k * d))
        .zip(dv_heads.par_chunks_mut(t_k * d))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| {
            let starts = &starts[bh / heads];
            dq.par_chunks_mut(t_q * d)
                .zip(key_parts(dk, starts, d))
                .zip(key_parts(dv, starts, d))
                .zip(starts.par_iter())
                .for_each(|(((dq, dk), dv), &k_start)| {
                    let task = HeadTask {
                        bh,
                        k_start,
                        saved: &saved,
                        transposed: (&kt, &vt),
                        g,
                        row_dot: &row_dot,
                        dims,
                        mask,
                        scale,
                    };
                    task.run(dq, dk, dv);
                });
        });
    // dQ: the key chunks' parts summed, written token-major.
    let dq = par_filled(b * t_q * heads * d, t_q * heads * d, |bi, dq| {
        for h in 0..heads {
            let parts = &dq_parts[(bi * heads + h) * chunks * t_q * d..][..chunks * t_q * d];
            for (i, dst) in dq.chunks_exact_mut(d).skip(h).step_by(heads).enumerate() {
                for part in parts.chunks_exact(t_q * d) {
                    let src = &part[i * d..(i + 1) * d];
                    dst.iter_mut().zip(src).for_each(|(a, s)| *a += s);
                }
            }
        }
    });
    drop(dq_parts);
    // dK, dV: the query heads sharing each key/value head summed, written token-major.
    let n_rep = dims.n_rep();
    let group_sum = |per_head: &[f32]| -> Vec<f32> {
        par_filled(b * t_k * kv_heads * d, t_k * kv_heads * d, |bi, out| {
            for group in 0..kv_heads {
                for (j, dst) in out
                    .chunks_exact_mut(d)
                    .skip(group)
                    .step_by(kv_heads)
                    .enumerate()
                {
                    for rep in 0..n_rep {
                        let h = bi * heads + group * n_rep + rep;
                        let src = &per_head[(h * t_k + j) * d..(h * t_k + j + 1) * d];
                        dst.iter_mut().zip(src).for_each(|(a, s)| *a += s);
                    }
                }
            }
        })
    };
    let dk = group_sum(&dk_heads);
    drop(dk_heads);
    let dv = group_sum(&dv_heads);
    (dq, dk, dv)
}

/// Key chunks per query head in the backward's tasks (a query head and a chunk of its keys each,
/// writing its own dQ part): at least two tasks per thread, and a task count the threads divide
/// (nine heads on two threads as nine tasks kept one core idle for the last; the chunks are cut
/// for equal work, [`chunk_starts`]), at most one per key tile.
pub(crate) fn key_chunks(batch_heads: usize, t_k: usize, threads: usize) -> usize {
    let (heads, threads) = (batch_heads.max(1), threads.max(1));
    let tiles = t_k.div_ceil(BK).max(1);
    let mut chunks = (2 * threads).div_ceil(heads);
    while (heads * chunks) % threads != 0 && chunks < threads {
        chunks += 1;
    }
    chunks.min(tiles)
}

/// A head's `[t_k, d]` rows cut where each key chunk starts (`starts`, the first at 0).
fn key_parts<'a>(rows: &'a mut [f32], starts: &[usize], d: usize) -> Vec<&'a mut [f32]> {
    let mut rest = rows;
    let mut parts = Vec::with_capacity(starts.len());
    for pair in starts.windows(2) {
        let (part, tail) = rest.split_at_mut((pair[1] - pair[0]) * d);
        parts.push(part);
        rest = tail;
    }
    parts.push(rest);
    parts
}

/// Where each of `chunks` key chunks of batch row `row` starts (whole key tiles, the first at 0):
/// cut so each meets about the same number of query rows — under a causal mask the first keys
/// are seen by every later query, the last by few.
fn chunk_starts(
    mask: &AttentionMask,
    row: usize,
    (t_q, t_k): (usize, usize),
    chunks: usize,
) -> Vec<usize> {
    let tiles = t_k.div_ceil(BK);
    // Query rows that meet each key tile.
    let mut work = vec![0usize; tiles];
    for q0 in (0..t_q).step_by(BQ) {
        let q1 = (q0 + BQ).min(t_q);
        let (lo, hi) = mask.tile_keys(row, q0, q1);
        for w in &mut work[(lo / BK).min(tiles)..hi.div_ceil(BK).min(tiles)] {
            *w += q1 - q0;
        }
    }
    let total: usize = work.iter().sum::<usize>().max(1);
    let mut starts = vec![0];
    let mut done = 0;
    for (tile, w) in work.iter().enumerate() {
        // The next chunk starts at this tile if the work so far plus half of it reaches the
        // chunk's share (the cut nearest the share), leaving a tile for each later chunk.
        let next = starts.len();
        if next < chunks
            && tile > 0
            && (2 * done + w) * chunks >= 2 * total * next
            && tiles - tile >= chunks - next
        {
            starts.push(tile * BK);
        }
        done += w;
    }
    while starts.len() < chunks {
        // Too little work to share (all of it in the first tiles): one tile each at the end.
        let last = starts[starts.len() - 1];
        starts.push(last + BK);
    }
    starts
}

/// One backward task: a query head and a chunk of its keys.
struct HeadTask<'a> {
    bh: usize,
    k_start: usize,
    saved: &'a Saved<'a>,
    /// Keys and values by transposed tiles ([`transposed_tiles`]).
    transposed: (&'a [f32], &'a [f32]),
    g: &'a [f32],
    row_dot: &'a [f32],
    dims: Dims,
    mask: &'a AttentionMask,
    scale: Scale,
}

impl HeadTask<'_> {
    /// Adds this chunk's share of dQ (`dq`: the head's `[t_q, d]` part) and writes dK, dV of its
    /// keys (`dk`, `dv`: `[chunk rows, d]`).
    fn run(&self, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let Dims { t_q, d, .. } = self.dims;
        let (qs, ks) = (self.dims.q_stride(), self.dims.kv_stride());
        let bh = self.bh;
        let (bi, h) = (bh / self.dims.heads, bh % self.dims.heads);
        let kv = self.dims.kv_base(bi, h);
        let kh = &self.saved.k[kv..];
        let q_at = self.dims.q_base(bi, h);
        let (qh, gh) = (&self.saved.q[q_at..], &self.g[q_at..]);
        let lse = &self.saved.lse[bh * t_q..(bh + 1) * t_q];
        let row_dot = &self.row_dot[bh * t_q..(bh + 1) * t_q];
        let k_end = self.k_start + dk.len() / d;
        // Key bounds of every query tile, computed once.
        let bounds: Vec<(usize, usize)> = (0..t_q.div_ceil(BQ))
            .map(|t| self.mask.tile_keys(bi, t * BQ, ((t + 1) * BQ).min(t_q)))
            .collect();
        let mut p = vec![0f32; RUN * BK];
        let mut dp = vec![0f32; RUN * BK];
        // The soft-capped scores of a tile, for the cap's backward.
        let Scale { scale, cap } = self.scale;
        let mut capped = vec![0f32; if cap.is_some() { RUN * BK } else { 0 }];
        let mut k0 = self.k_start;
        while k0 < k_end {
            let k1 = (k0 + BK).min(k_end);
            let n = k1 - k0;
            let k_tile = &kh[k0 * ks..];
            let at = tile_base(self.dims, bi, h, k0 / BK);
            let (kt_tile, vt_tile) = (&self.transposed.0[at..], &self.transposed.1[at..]);
            let dk_tile = &mut dk[(k0 - self.k_start) * d..(k1 - self.k_start) * d];
            let dv_tile = &mut dv[(k0 - self.k_start) * d..(k1 - self.k_start) * d];
            for (q0, q1) in query_runs(&bounds, (k0, k1), t_q) {
                let m = q1 - q0;
                let (p, dp) = (&mut p[..m * n], &mut dp[..m * n]);
                let (q_tile, g_tile) = (&qh[q0 * qs..], &gh[q0 * qs..]);
                // p = exp(scale · q k^T - lse)
                let one = Threads::One;
                matmul(
                    (m, n, d),
                    (p, n),
                    false,
                    (q_tile, qs, 1),
                    (kt_tile, BK, 1),
                    scale,
                    one,
                );
                if let Some(cap) = cap {
                    simd::softcap(p, cap);
                    capped[..m * n].copy_from_slice(p);
                }
                if self.mask.tile_kind(bi, (q0, q1), (k0, k1)) == TileKind::Partial {
                    self.mask.hide(bi, (q0, q1), (k0, k1), p);
                }
                simd::probabilities(p, n, &lse[q0..q1]);
                // dp = dO v^T, then dS = p ∘ (dp - D) in place
                matmul(
                    (m, n, d),
                    (dp, n),
                    false,
                    (g_tile, qs, 1),
                    (vt_tile, BK, 1),
                    1.0,
                    one,
                );
                simd::score_gradient(dp, p, n, &row_dot[q0..q1]);
                if let Some(cap) = cap {
                    simd::softcap_backward(dp, &capped[..m * n], cap);
                }
                // dV += p^T dO; dK += scale · dS^T q; dQ += scale · dS k
                matmul(
                    (n, d, m),
                    (dv_tile, d),
                    true,
                    (p, 1, n),
                    (g_tile, qs, 1),
                    1.0,
                    one,
                );
                matmul(
                    (n, d, m),
                    (dk_tile, d),
                    true,
                    (dp, 1, n),
                    (q_tile, qs, 1),
                    scale,
                    one,
                );
                let dq_tile = &mut dq[q0 * d..q1 * d];
                matmul(
                    (m, d, n),
                    (dq_tile, d),
                    true,
                    (dp, n, 1),
                    (k_tile, ks, 1),
                    scale,
                    one,
                );
            }
            k0 = k1;
        }
    }
}

/// The query runs that meet keys `k0..k1`: consecutive query tiles whose key bounds
/// (`bounds`, per tile of [`BQ`] queries) reach into them, up to [`RUN`] queries each.
fn query_runs(
    bounds: &[(usize, usize)],
    (k0, k1): (usize, usize),
    t_q: usize,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    let meets = move |t: usize| {
        let (lo, hi) = bounds[t];
        k1 > lo && k0 < hi
    };
    let mut t = 0;
    std::iter::from_fn(move || {
        while t < bounds.len() && !meets(t) {
            t += 1;
        }
        if t == bounds.len() {
            return None;
        }
        let first = t;
        while t < bounds.len() && meets(t) && (t - first + 1) * BQ <= RUN {
            t += 1;
        }
        Some((first * BQ, (t * BQ).min(t_q)))
    })
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
        for (qi, scores) in (q0..q1).zip(s.chunks_exact_mut(n)) {
            let i = self.offset() + qi;
            // Keys after the query and before its window, as ranges.
            let last = (i + 1).clamp(k0, k1) - k0;
            scores[last..].fill(f32::NEG_INFINITY);
            let first = self
                .window()
                .map_or(0, |w| (i + 1).saturating_sub(w).clamp(k0, k1) - k0);
            scores[..first].fill(f32::NEG_INFINITY);
            if self.document_rows().is_some() {
                for (c, x) in scores.iter_mut().enumerate().take(last).skip(first) {
                    if !self.visible(row, i, k0 + c) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Query rows meeting the keys of each chunk (`starts` as [`chunk_starts`] cuts them).
    fn chunk_work(mask: &AttentionMask, t: usize, starts: &[usize]) -> Vec<usize> {
        let mut work = vec![0; starts.len()];
        for i in 0..t {
            let (lo, hi) = mask.tile_keys(0, i, i + 1);
            for j in lo..hi {
                work[starts.iter().rposition(|&s| s <= j).unwrap()] += 1;
            }
        }
        work
    }

    #[test]
    fn backward_tasks_are_a_multiple_of_the_threads() {
        // SmolLM2-135M's nine heads on two threads: two chunks each (nine tasks left one core
        // idle for the last); many heads need no split; one head gets two tasks per thread.
        assert_eq!(key_chunks(9, 8192, 2), 2);
        assert_eq!(key_chunks(32, 8192, 2), 1);
        assert_eq!(key_chunks(1, 8192, 2), 4);
        assert_eq!(key_chunks(9, 8192, 16), 16);
        // Never more chunks than key tiles.
        assert_eq!(key_chunks(1, 200, 2), 2);
        assert_eq!(key_chunks(1, 100, 8), 1);
    }

    #[test]
    fn key_chunks_share_the_work_of_causal_and_windowed_masks() -> Result<()> {
        let t = 8192;
        for (window, chunks) in [(None, 2), (None, 4), (Some(1000), 4)] {
            let mask = AttentionMask::new(t, 0, window, None, DType::F32, &Device::Cpu)?;
            let starts = chunk_starts(&mask, 0, (t, t), chunks);
            assert_eq!(starts.len(), chunks);
            assert_eq!(starts[0], 0);
            assert!(starts.windows(2).all(|w| w[0] < w[1] && w[1] % BK == 0));
            let work = chunk_work(&mask, t, &starts);
            let (min, max) = (work.iter().min().unwrap(), work.iter().max().unwrap());
            // Within a key tile's work of each other (a tile meets at most every query).
            assert!(
                max - min <= BK * t,
                "window {window:?}: {work:?} from {starts:?}"
            );
        }
        // Causal halves: the first chunk ends near t·(1 - 1/√2), not at t/2.
        let mask = AttentionMask::new(t, 0, None, None, DType::F32, &Device::Cpu)?;
        let cut = chunk_starts(&mask, 0, (t, t), 2)[1];
        assert!((2304..=2560).contains(&cut), "{cut}");
        Ok(())
    }

    #[test]
    fn every_key_chunk_keeps_a_tile() -> Result<()> {
        // Three tiles, three chunks; and packed documents that leave the last keys' tiles
        // almost no work still give each chunk a tile.
        let mask = AttentionMask::new(300, 0, None, None, DType::F32, &Device::Cpu)?;
        assert_eq!(chunk_starts(&mask, 0, (300, 300), 3), vec![0, 128, 256]);
        let docs = vec![(0..1024u32)
            .map(|i| u32::from(i >= 1000))
            .collect::<Vec<_>>()];
        let mask = AttentionMask::new(1024, 0, Some(8), Some(&docs), DType::F32, &Device::Cpu)?;
        let starts = chunk_starts(&mask, 0, (1024, 1024), 4);
        assert_eq!(starts.len(), 4);
        assert!(starts.windows(2).all(|w| w[0] < w[1] && w[1] % BK == 0));
        assert!(*starts.last().unwrap() < 1024);
        Ok(())
    }
}
