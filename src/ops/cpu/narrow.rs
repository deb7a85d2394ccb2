//! Matrix products with one narrow side (at most [`MAX_WIDTH`] columns: a LoRA rank) on the CPU in
//! f32. A LoRA branch's products are all of this kind (`x Aᵀ`, `g B`, `gᵀ h`, `h Bᵀ` added to the
//! base output), and general gemm kernels tile them poorly: register-blocked loops over 16 lanes
//! that keep a block of output rows in registers do them at several times the speed.

use super::simd::{dispatch, LANES};
use super::{tensor, Held};
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// The widest narrow side the kernels take (four 16-lane vectors).
pub(crate) const MAX_WIDTH: usize = 4 * LANES;

/// Output rows per parallel task.
const TASK_ROWS: usize = 32;

/// One block of `R` output rows of [`narrow_product`], starting at row `first` of the row-major
/// `x` (`· × k`): every accumulator in registers, one pass over the shared `k` dimension. `m` is
/// `k × (V·16)` row-major (zero-padded), `out` `R × (V·16)`.
#[inline(always)]
fn product_tile<const R: usize, const V: usize>(
    first: usize,
    k: usize,
    x: &[f32],
    m: &[f32],
    out: &mut [f32],
) {
    let width = V * LANES;
    assert!((first + R) * k <= x.len(), "narrow product: lhs too short");
    let mut acc = [[[0f32; LANES]; V]; R];
    for (p, m_row) in m.chunks_exact(width).take(k).enumerate() {
        let mut m_vecs = [[0f32; LANES]; V];
        for (v, m_vec) in m_vecs.iter_mut().enumerate() {
            m_vec.copy_from_slice(&m_row[v * LANES..(v + 1) * LANES]);
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: row `first + i < first + R` and column `p < k` are inside `x`, checked
            // above (the per-element check would otherwise cost more than the multiply-add).
            let xv = unsafe { *x.get_unchecked((first + i) * k + p) };
            for (acc_vec, m_vec) in acc_row.iter_mut().zip(&m_vecs) {
                for l in 0..LANES {
                    acc_vec[l] = xv.mul_add(m_vec[l], acc_vec[l]);
                }
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate() {
        for (v, acc_vec) in acc_row.iter().enumerate() {
            let start = i * width + v * LANES;
            out[start..start + LANES].copy_from_slice(acc_vec);
        }
    }
}

/// Rows `first..` of [`narrow_product`] into `out` (`rows × (V·16)`): blocks of `R`, then single rows.
#[inline(always)]
fn product_rows<const R: usize, const V: usize>(
    first: usize,
    k: usize,
    x: &[f32],
    m: &[f32],
    out: &mut [f32],
) {
    let width = V * LANES;
    let rows = out.len() / width;
    let mut i = 0;
    while i + R <= rows {
        product_tile::<R, V>(first + i, k, x, m, &mut out[i * width..(i + R) * width]);
        i += R;
    }
    while i < rows {
        product_tile::<1, V>(first + i, k, x, m, &mut out[i * width..(i + 1) * width]);
        i += 1;
    }
}

dispatch! {
    /// Rows `first..` of `X · M` for a padded `m` of `vectors` 16-lane vectors per row.
    fn product_task(
        first: usize,
        k: usize,
        x: &[f32],
        m: &[f32],
        vectors: usize,
        out: &mut [f32]
    ) {
        // Blocks of about eight accumulator vectors: eight of AVX-512's 32 registers.
        match vectors {
            1 => product_rows::<8, 1>(first, k, x, m, out),
            2 => product_rows::<4, 2>(first, k, x, m, out),
            3 => product_rows::<2, 3>(first, k, x, m, out),
            _ => product_rows::<2, 4>(first, k, x, m, out),
        }
    }
}

/// `X · M` -> `[n, r]` row-major, for row-major `x` (`n × k`) and `m` (`k × r`, `r ≤ MAX_WIDTH`),
/// output rows in parallel.
fn narrow_product(n: usize, k: usize, x: &[f32], m: &[f32], r: usize) -> Vec<f32> {
    assert!(r > 0 && r <= MAX_WIDTH, "narrow product: width {r}");
    assert!(m.len() >= k * r, "narrow product: rhs too short");
    let vectors = r.div_ceil(LANES);
    let width = vectors * LANES;
    // Rows padded to whole vectors only where r is not a multiple of 16 (each tile checks x).
    let padded;
    let padded_m = if width == r {
        &m[..k * r]
    } else {
        padded = m
            .chunks_exact(r)
            .take(k)
            .flat_map(|row| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, width - r))
            })
            .collect::<Vec<f32>>();
        &padded[..]
    };
    let mut out = vec![0f32; n * width];
    out.par_chunks_mut(TASK_ROWS * width)
        .enumerate()
        .for_each(|(task, out)| {
            product_task(task * TASK_ROWS, k, x, padded_m, vectors, out);
        });
    if width != r {
        let mut packed = Vec::with_capacity(n * r);
        for row in out.chunks_exact(width) {
            packed.extend_from_slice(&row[..r]);
        }
        out = packed;
    }
    out
}

/// Columns per register block of [`add_tile`]: two 16-lane vectors.
const ADD_COLUMNS: usize = 2 * LANES;

/// `c[R rows × w] += (h[R × r] · m[r × w]) ∘ mask` (all row-major; no mask: all ones): blocks of
/// columns kept in registers over the whole `r`, then the remaining columns one at a time.
#[inline(always)]
fn add_tile<const R: usize>(
    c: &mut [f32],
    w: usize,
    (h, r): (&[f32], usize),
    m: &[f32],
    mask: Option<&[f32]>,
) {
    let mut j = 0;
    while j + ADD_COLUMNS <= w {
        let mut acc = [[0f32; ADD_COLUMNS]; R];
        if mask.is_none() {
            for (i, acc_row) in acc.iter_mut().enumerate() {
                acc_row.copy_from_slice(&c[i * w + j..i * w + j + ADD_COLUMNS]);
            }
        }
        for p in 0..r {
            let m_part = &m[p * w + j..p * w + j + ADD_COLUMNS];
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let hv = h[i * r + p];
                for l in 0..ADD_COLUMNS {
                    acc_row[l] = hv.mul_add(m_part[l], acc_row[l]);
                }
            }
        }
        for (i, acc_row) in acc.iter().enumerate() {
            let dst = &mut c[i * w + j..i * w + j + ADD_COLUMNS];
            match mask {
                None => dst.copy_from_slice(acc_row),
                Some(mask) => {
                    let mask = &mask[i * w + j..i * w + j + ADD_COLUMNS];
                    for l in 0..ADD_COLUMNS {
                        dst[l] = mask[l].mul_add(acc_row[l], dst[l]);
                    }
                }
            }
        }
        j += ADD_COLUMNS;
    }
    for col in j..w {
        for i in 0..R {
            let sum: f32 = (0..r).map(|p| h[i * r + p] * m[p * w + col]).sum();
            let scale = mask.map_or(1.0, |mask| mask[i * w + col]);
            c[i * w + col] += scale * sum;
        }
    }
}

dispatch! {
    /// Rows of [`add_narrow_product`]: blocks of four rows, then single rows.
    fn add_task(c: &mut [f32], w: usize, lhs: (&[f32], usize), m: &[f32], mask: Option<&[f32]>) {
        let (h, r) = lhs;
        let rows = c.len() / w;
        let mut i = 0;
        while i < rows {
            let block = if i + 4 <= rows { 4 } else { 1 };
            let (lo, hi) = (i * w, (i + block) * w);
            let h_rows = &h[i * r..(i + block) * r];
            let mask_rows = mask.map(|mask| &mask[lo..hi]);
            if block == 4 {
                add_tile::<4>(&mut c[lo..hi], w, (h_rows, r), m, mask_rows);
            } else {
                add_tile::<1>(&mut c[lo..hi], w, (h_rows, r), m, mask_rows);
            }
            i += block;
        }
    }
}

/// `c[n × w] += (h[n × r] · m[r × w]) ∘ mask` (all row-major, `n = c.len() / w`; no mask: all
/// ones): the product of a narrow `h` added to a wide output, rows in parallel. The mask is a LoRA
/// dropout mask, which applies to the LoRA term of an input gradient only.
pub(crate) fn add_narrow_product(
    c: &mut [f32],
    w: usize,
    (h, r): (&[f32], usize),
    m: &[f32],
    mask: Option<&[f32]>,
) {
    if w == 0 {
        return;
    }
    let n = c.len() / w;
    assert!(h.len() >= n * r, "narrow product: lhs too short");
    assert!(m.len() >= r * w, "narrow product: rhs too short");
    assert!(
        mask.is_none_or(|mask| mask.len() == c.len()),
        "narrow product: mask shape"
    );
    if r == 0 {
        return;
    }
    let rows = c
        .par_chunks_mut(TASK_ROWS * w)
        .zip(h.par_chunks(TASK_ROWS * r));
    match mask {
        None => rows.for_each(|(c, h)| add_task(c, w, (h, r), m, None)),
        Some(mask) => rows
            .zip(mask.par_chunks(TASK_ROWS * w))
            .for_each(|((c, h), mask)| add_task(c, w, (h, r), m, Some(mask))),
    }
}

/// Rows of `p` taken together by [`outer_task`]: each accumulator vector loaded meets eight of them.
const OUTER_ROWS: usize = 8;

/// `acc[j][i] += Σ_t p[t][i] · q[t][j]` over `R` rows (`p`: `R × w`, `q`: `R × r` with
/// `r ≤ MAX_WIDTH`, `acc`: `r × w`, row-major): the rows of `p` read front to back, 16 columns at a time.
#[inline(always)]
fn outer_block<const R: usize>(p: &[f32], q: &[f32], (w, r): (usize, usize), acc: &mut [f32]) {
    let full = w / LANES * LANES;
    let p = &p[..R * w];
    // The block's q transposed: column j's R values side by side.
    let mut qt = [[0f32; R]; MAX_WIDTH];
    for (t, q_row) in q.chunks_exact(r).take(R).enumerate() {
        for (qt_row, &v) in qt.iter_mut().zip(q_row) {
            qt_row[t] = v;
        }
    }
    for i in (0..full).step_by(LANES) {
        let mut pv = [[0f32; LANES]; R];
        for (t, v) in pv.iter_mut().enumerate() {
            v.copy_from_slice(&p[t * w + i..t * w + i + LANES]);
        }
        for (acc_row, qj) in acc.chunks_exact_mut(w).zip(&qt).take(r) {
            let a: &mut [f32; LANES] = (&mut acc_row[i..i + LANES]).try_into().unwrap();
            let mut sum = *a;
            for (v, &qv) in pv.iter().zip(qj) {
                for l in 0..LANES {
                    sum[l] = v[l].mul_add(qv, sum[l]);
                }
            }
            *a = sum;
        }
    }
    for i in full..w {
        for (acc_row, qj) in acc.chunks_exact_mut(w).zip(&qt).take(r) {
            let column = (0..R).map(|t| p[t * w + i] * qj[t]);
            acc_row[i] += column.sum::<f32>();
        }
    }
}

dispatch! {
    /// [`outer_block`] over every row of `p` (`rows × w`): blocks of [`OUTER_ROWS`], then single rows.
    fn outer_task(p: &[f32], q: &[f32], w: usize, r: usize, acc: &mut [f32]) {
        let rows = p.len() / w;
        let mut t = 0;
        while t + OUTER_ROWS <= rows {
            let (pb, qb) = (&p[t * w..], &q[t * r..]);
            outer_block::<OUTER_ROWS>(pb, qb, (w, r), acc);
            t += OUTER_ROWS;
        }
        while t < rows {
            outer_block::<1>(&p[t * w..], &q[t * r..], (w, r), acc);
            t += 1;
        }
    }
}

/// `qᵀ p` -> `[r, w]` row-major for row-major `p` (`n × w`) and `q` (`n × r`): each core sums
/// the outer products of its share of the rows (read in order: a reduction over rows would
/// otherwise step down the columns of `p`, a row's length apart), then the shares are added.
fn transposed_narrow_product(n: usize, w: usize, p: &[f32], q: &[f32], r: usize) -> Vec<f32> {
    assert!(r <= MAX_WIDTH, "narrow product: width {r}");
    assert!(
        p.len() >= n * w && q.len() >= n * r,
        "narrow product: operands too short"
    );
    let parts = rayon::current_num_threads().min(n).max(1);
    (0..parts)
        .into_par_iter()
        .map(|part| {
            let (lo, hi) = (n * part / parts, n * (part + 1) / parts);
            let mut acc = vec![0f32; r * w];
            if w > 0 {
                outer_task(&p[lo * w..hi * w], &q[lo * r..hi * r], w, r, &mut acc);
            }
            acc
        })
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        })
        .unwrap_or_else(|| vec![0f32; r * w])
}

/// `x @ m` for a narrow `m`, f32 CPU tensors. x: [n, k], m: [k, r ≤ MAX_WIDTH] -> [n, r]
pub(crate) fn matmul(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let ((n, k), r) = (x.dims2()?, m.dim(1)?);
    let (x, m) = (x.contiguous()?, m.contiguous()?);
    let (xh, mh) = (Held::new(&x)?, Held::new(&m)?);
    tensor(narrow_product(n, k, xh.slice()?, mh.slice()?, r), &[n, r])
}

/// `qᵀ @ p` for a narrow `q`, f32 CPU tensors: the sum over rows of outer products.
/// q: [n, r ≤ MAX_WIDTH], p: [n, w] -> [r, w]
pub(crate) fn transposed_matmul(q: &Tensor, p: &Tensor) -> Result<Tensor> {
    let ((n, w), r) = (p.dims2()?, q.dim(1)?);
    let (p, q) = (p.contiguous()?, q.contiguous()?);
    let (ph, qh) = (Held::new(&p)?, Held::new(&q)?);
    tensor(
        transposed_narrow_product(n, w, ph.slice()?, qh.slice()?, r),
        &[r, w],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    /// The definition: `[i][j] = Σ_p lhs(i, p) · rhs[p][j]` for a row-major `rhs` (`k × cols`).
    fn reference(
        rows: usize,
        cols: usize,
        k: usize,
        lhs: impl Fn(usize, usize) -> f32,
        rhs: &[f32],
    ) -> Vec<f32> {
        (0..rows * cols)
            .map(|e| {
                (0..k)
                    .map(|p| lhs(e / cols, p) * rhs[p * cols + e % cols])
                    .sum()
            })
            .collect()
    }

    #[test]
    fn narrow_product_matches_the_definition_for_every_width() {
        let mut rng = Rng::new(7);
        // Widths around each register block's edge; row counts around the task and tile edges.
        for &(n, k, r) in &[
            (1, 1, 1),
            (37, 19, 5),
            (70, 40, 16),
            (9, 33, 17),
            (33, 8, 32),
            (65, 3, 48),
            (41, 70, 64),
        ] {
            let x = random(&mut rng, n * k);
            let m = random(&mut rng, k * r);
            let want = reference(n, r, k, |i, p| x[i * k + p], &m);
            assert_close(&narrow_product(n, k, &x, &m, r), &want, "row-major lhs");
        }
    }

    #[test]
    fn transposed_product_matches_the_definition() {
        let mut rng = Rng::new(5);
        // Row counts around the eight-row blocks and the per-core split; widths around 16 lanes.
        for &(n, w, r) in &[
            (1, 1, 1),
            (7, 16, 3),
            (9, 33, 16),
            (70, 31, 17),
            (131, 48, 64),
        ] {
            let p = random(&mut rng, n * w);
            let q = random(&mut rng, n * r);
            let want = reference(r, w, n, |j, t| q[t * r + j], &p);
            let got = transposed_narrow_product(n, w, &p, &q, r);
            assert_close(&got, &want, "qᵀ p");
        }
    }

    #[test]
    fn add_narrow_product_adds_the_definition_to_the_output() {
        let mut rng = Rng::new(11);
        for &(n, w, r) in &[
            (1, 1, 1),
            (45, 31, 4),
            (70, 64, 16),
            (5, 100, 33),
            (38, 577, 64),
        ] {
            let c0 = random(&mut rng, n * w);
            let h = random(&mut rng, n * r);
            let m = random(&mut rng, r * w);
            let product = reference(n, w, r, |i, p| h[i * r + p], &m);
            let want: Vec<f32> = (0..n * w).map(|e| c0[e] + product[e]).collect();
            let mut c = c0.clone();
            add_narrow_product(&mut c, w, (&h, r), &m, None);
            assert_close(&c, &want, "sum");
            // A dropout mask scales the product only.
            let mask: Vec<f32> = (0..n * w)
                .map(|e| [0.0, 1.25][(e * 7 + e / 3) % 2])
                .collect();
            let want: Vec<f32> = (0..n * w).map(|e| c0[e] + mask[e] * product[e]).collect();
            let mut c = c0.clone();
            add_narrow_product(&mut c, w, (&h, r), &m, Some(&mask));
            assert_close(&c, &want, "masked sum");
        }
    }
}
