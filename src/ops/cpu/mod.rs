//! The native CPU kernels (f32), one file per op, and what they share: reading a tensor's
//! elements in place, buffers filled in parallel, and matrix products on slices (the `gemm` crate
//! candle itself uses). [`super::kernel::Kernel`] decides when they run; each op's file in
//! [`crate::ops`] is its dispatch point.

pub(crate) mod cross_entropy;
pub mod flash;
pub(crate) mod glu;
pub(crate) mod linear;
pub(crate) mod narrow;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod simd;

use candle_core::{Layout, Result, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per task of the elementwise kernels (64 KiB of f32): enough work to amortize a task,
/// small enough to spread over every core.
pub(crate) const PIECE: usize = 16 * 1024;

/// A new f32 CPU tensor from its elements.
pub(crate) fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}

/// A contiguous f32 CPU tensor's storage, held for reading.
pub(crate) struct Held<'a> {
    storage: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    /// Borrows `t`'s storage (a read lock) until dropped.
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        Ok(Held { storage, layout })
    }

    /// The tensor's elements; an error unless it is a contiguous f32 CPU tensor.
    pub(crate) fn slice(&self) -> Result<&[f32]> {
        let Storage::Cpu(cpu) = &*self.storage else {
            candle_core::bail!("CPU kernel: got a tensor on another device")
        };
        let data = cpu.as_slice::<f32>()?;
        match self.layout.contiguous_offsets() {
            Some((start, end)) => Ok(&data[start..end]),
            None => candle_core::bail!("CPU kernel: a non-contiguous input"),
        }
    }
}

/// Threads for one product: one (the caller is already one of many parallel tasks) or all of
/// rayon's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// The calling thread only.
    One,
    /// All of rayon's threads.
    All,
}

impl Threads {
    fn parallelism(self) -> gemm::Parallelism {
        match self {
            Threads::One => gemm::Parallelism::None,
            Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
        }
    }
}

/// A new buffer of `len` floats, written in parallel pieces of `piece` elements (the last may be
/// shorter) by `fill(index, piece)`. Each task zeroes its piece just before filling it, in its own
/// core's cache: zeroing the whole buffer up front ran on the calling thread (memset and the fresh
/// pages' faults) while the other cores waited.
pub(crate) fn par_filled(
    len: usize,
    piece: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(piece.max(1))
        .enumerate()
        .for_each(|(i, chunk)| fill(i, zeroed(chunk)));
    // SAFETY: the pieces cover `0..len`, and `zeroed` initialised each.
    unsafe { out.set_len(len) };
    out
}

/// A new buffer of `len` zeros, zeroed in parallel pieces (for buffers that tasks of another shape
/// fill by accumulation).
pub(crate) fn par_zeroed(len: usize) -> Vec<f32> {
    par_filled(len, PIECE, |_, _| {})
}

/// [`par_filled`] for two buffers of one length filled together: `fill(index, a, b)` gets the
/// same piece of each.
pub(crate) fn par_filled_pair(
    len: usize,
    piece: usize,
    fill: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b): (Vec<f32>, Vec<f32>) = (Vec::with_capacity(len), Vec::with_capacity(len));
    a.spare_capacity_mut()[..len]
        .par_chunks_mut(piece.max(1))
        .zip(b.spare_capacity_mut()[..len].par_chunks_mut(piece.max(1)))
        .enumerate()
        .for_each(|(i, (a, b))| fill(i, zeroed(a), zeroed(b)));
    // SAFETY: the pieces cover `0..len` of both, and `zeroed` initialised each.
    unsafe {
        a.set_len(len);
        b.set_len(len);
    }
    (a, b)
}

/// Zeroes a piece of fresh memory and hands it out as floats.
fn zeroed(chunk: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    chunk.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just initialised, and `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(chunk as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Panics unless every element a product of these dimensions and strides addresses is inside its
/// slice; whether it has any work (`m`, `n` and `k` nonzero).
fn check_product(
    (m, n, k): (usize, usize, usize),
    (dst_len, dst_rs): (usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst_len > last(m, dst_rs, n, 1), "matmul: dst too short");
    if k == 0 {
        return false;
    }
    assert!(a.len() > last(m, a_rs, k, a_cs), "matmul: lhs too short");
    assert!(b.len() > last(k, b_rs, n, b_cs), "matmul: rhs too short");
    true
}

/// `beta · A · B` in a new row-major `[m, n]` buffer (operands as in [`matmul`]). The product
/// writes every element without reading it, so the buffer is never zeroed first.
pub(crate) fn matmul_new(
    (m, n, k): (usize, usize, usize),
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    beta: f32,
    threads: Threads,
) -> Vec<f32> {
    if !check_product((m, n, k), (m * n, n), a, b) {
        return vec![0.0; m * n];
    }
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `check_product` keeps every index the product touches inside the operands and the
    // new buffer's capacity; without accumulation `product` writes each of the `m · n` elements
    // (every part its block, the gemm crate each element of a block) before anything reads them.
    unsafe {
        product(
            (m, n, k),
            Dst(out.as_mut_ptr(), n),
            false,
            Src(a.0.as_ptr(), a.1, a.2),
            Src(b.0.as_ptr(), b.1, b.2),
            beta,
            threads,
        );
        out.set_len(m * n);
    }
    out
}

/// `dst[m × n] (row stride dst_rs) = (dst if accumulate, else 0) + beta · A · B` where
/// `A[i][p] = a[i·a_rs + p·a_cs]` (`m × k`) and `B[p][j] = b[p·b_rs + j·b_cs]` (`k × n`).
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    beta: f32,
    threads: Threads,
) {
    if !check_product(
        (m, n, k),
        (dst.len(), dst_rs),
        (a, a_rs, a_cs),
        (b, b_rs, b_cs),
    ) {
        if m > 0 && n > 0 && !accumulate {
            (0..m).for_each(|i| dst[i * dst_rs..i * dst_rs + n].fill(0.0));
        }
        return;
    }
    // SAFETY: `check_product` keeps every index the product touches inside the slices; dst is
    // borrowed mutably and cannot alias a or b.
    unsafe {
        product(
            (m, n, k),
            Dst(dst.as_mut_ptr(), dst_rs),
            accumulate,
            Src(a.as_ptr(), a_rs, a_cs),
            Src(b.as_ptr(), b_rs, b_cs),
            beta,
            threads,
        )
    }
}

/// The destination of [`product`]: `C[i][j]` at `ptr[i·rs + j]`.
#[derive(Clone, Copy)]
struct Dst(*mut f32, usize);

// SAFETY: the parts of one product write disjoint elements of the destination.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// A read-only operand of [`product`]: `M[i][p]` at `ptr[i·rs + p·cs]`.
#[derive(Clone, Copy)]
struct Src(*const f32, usize, usize);

// SAFETY: operands are only read.
unsafe impl Send for Src {}
unsafe impl Sync for Src {}

/// [`matmul`] on validated pointers. Over all threads, each core runs one single-threaded gemm
/// on its share of the output columns (of the rows when the output is narrow): measured faster
/// here than the gemm crate's own threading of one product, which splits finer and syncs more.
/// Columns first because the gemm crate packs the operand that runs along the output's columns
/// (the weight of `x Wᵀ`) in every call: split by rows, each core packed all of it.
///
/// # Safety
/// Every element the dimensions and strides address is inside its allocation; `dst` overlaps
/// neither operand.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: Dst,
    accumulate: bool,
    a: Src,
    b: Src,
    beta: f32,
    threads: Threads,
) {
    let parts = rayon::current_num_threads();
    if threads == Threads::All && parts > 1 && (n >= 64 * parts || m >= 64 * parts) {
        let by_columns = n >= 64 * parts;
        let len = if by_columns { n } else { m };
        // Shares in whole 16-lane vectors (columns) so each core's kernels see full tiles.
        let share = if by_columns {
            len.div_ceil(parts).next_multiple_of(16)
        } else {
            len.div_ceil(parts)
        };
        (0..parts).into_par_iter().for_each(|part| {
            let (lo, hi) = (part * share, ((part + 1) * share).min(len));
            if lo >= hi {
                return;
            }
            let (dst, a, b) = (dst, a, b);
            // SAFETY: part `part` reads a block of an operand and writes the block lo..hi of
            // the destination's columns (or rows), disjoint from every other part's.
            unsafe {
                if by_columns {
                    let b = Src(b.0.add(lo * b.2), b.1, b.2);
                    let dst = Dst(dst.0.add(lo), dst.1);
                    product((m, hi - lo, k), dst, accumulate, a, b, beta, Threads::One);
                } else {
                    let a = Src(a.0.add(lo * a.1), a.1, a.2);
                    let dst = Dst(dst.0.add(lo * dst.1), dst.1);
                    product((hi - lo, n, k), dst, accumulate, a, b, beta, Threads::One);
                }
            }
        });
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1 as isize,
            accumulate,
            a.0,
            a.2 as isize,
            a.1 as isize,
            b.0,
            b.2 as isize,
            b.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            threads.parallelism(),
        )
    }
}

/// `a + b` of two f32 CPU tensors of one shape (made contiguous), in parallel: the elements.
pub(crate) fn sum(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    if a.dims() != b.dims() {
        candle_core::bail!("residual sum: shapes {:?} and {:?}", a.dims(), b.dims());
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (ah, bh) = (Held::new(&a)?, Held::new(&b)?);
    let (xs, ys) = (ah.slice()?, bh.slice()?);
    Ok(par_filled(xs.len(), PIECE, |i, o| {
        let (x, y) = (&xs[i * PIECE..], &ys[i * PIECE..]);
        o.iter_mut()
            .zip(x.iter().zip(y))
            .for_each(|(o, (x, y))| *o = x + y)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn split_products_match_the_definition_with_strides_and_accumulation() {
        let mut rng = Rng::new(3);
        // Split by rows (narrow output), then by columns (a column count that is not a whole
        // number of vectors); a destination row stride wider than n; B transposed.
        for (m, n, k, dst_rs) in [(301, 37, 29, 40), (45, 150, 29, 157)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            let start: Vec<f32> = (0..m * dst_rs)
                .map(|_| rng.uniform(-1.0, 1.0) as f32)
                .collect();
            let beta = 0.5;
            for threads in [Threads::One, Threads::All] {
                for accumulate in [false, true] {
                    let mut dst = start.clone();
                    matmul(
                        (m, n, k),
                        (&mut dst, dst_rs),
                        accumulate,
                        (&a, k, 1),
                        (&b, 1, k),
                        beta,
                        threads,
                    );
                    for i in 0..m {
                        for j in 0..dst_rs {
                            let got = dst[i * dst_rs + j];
                            let want = if j < n {
                                let dot: f32 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                                let base = if accumulate {
                                    start[i * dst_rs + j]
                                } else {
                                    0.0
                                };
                                base + beta * dot
                            } else {
                                start[i * dst_rs + j]
                            };
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                                "{m}x{n} {threads:?} accumulate={accumulate} [{i}][{j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn new_products_and_parallel_fills_cover_every_element() {
        let mut rng = Rng::new(5);
        // Split by rows, by columns (with a ragged last share), and too small to split.
        for (m, n, k) in [(301, 37, 29), (45, 150, 29), (3, 5, 7), (4, 6, 0)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            for threads in [Threads::One, Threads::All] {
                let mut want = vec![f32::NAN; m * n];
                matmul(
                    (m, n, k),
                    (&mut want, n),
                    false,
                    (&a, k, 1),
                    (&b, 1, k),
                    0.5,
                    threads,
                );
                let got = matmul_new((m, n, k), (&a, k, 1), (&b, 1, k), 0.5, threads);
                assert_eq!(got, want, "{m}x{n}x{k} {threads:?}");
            }
        }
        let (len, piece) = (1000, 64);
        let filled = par_filled(len, piece, |i, p| {
            assert!(p.iter().all(|&x| x == 0.0));
            p.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = (i * piece + j) as f32);
        });
        assert_eq!(filled, (0..len).map(|i| i as f32).collect::<Vec<_>>());
        let (a, b) = par_filled_pair(len, piece, |i, a, b| {
            a.fill(i as f32);
            b.fill(-(i as f32));
        });
        assert!((0..len).all(|j| a[j] == (j / piece) as f32 && b[j] == -a[j]));
    }
}
