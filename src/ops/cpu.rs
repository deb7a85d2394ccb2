//! Host-memory access for the CPU kernels: reading a tensor's f32 elements in place, matrix
//! products on slices (the `gemm` crate candle itself uses), and the test for when a kernel applies.

use candle_core::{DType, Layout, Result, Storage, Tensor};

/// Whether the native CPU kernels apply: f32 on the CPU.
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

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
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() > last(m, dst_rs, n, 1), "matmul: dst too short");
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * dst_rs..i * dst_rs + n].fill(0.0));
        }
        return;
    }
    assert!(a.len() > last(m, a_rs, k, a_cs), "matmul: lhs too short");
    assert!(b.len() > last(k, b_rs, n, b_cs), "matmul: rhs too short");
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
            threads.parallelism(),
        )
    }
}
