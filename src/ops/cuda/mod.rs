//! The CUDA kernels (`kernels.cu`, compiled to PTX by `build.rs` and loaded once per device
//! through candle's custom-module cache), each a candle custom op whose `cuda_fwd` launches it:
//! RMSNorm forward and input gradient, SwiGLU forward and backward, for f32 and bf16.
//! [`super::kernel::Kernel`] picks them for contiguous-able CUDA operands of those dtypes; each
//! op's dispatch point calls the functions here. Arithmetic is in f32 (as the composed path's).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;

/// The kernels' PTX, built for `CUDA_COMPUTE_CAP`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
/// The module's name in candle's per-device cache.
const MODULE: &str = "peft_sft_kernels";
/// Threads per block.
const THREADS: u32 = 256;

/// Whether the kernels here take tensors of `dtype`.
pub(crate) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// `w * x / sqrt(mean(x²) + eps)` over the last dimension. x: [.., d], w: [d] -> [.., d]
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &RmsNorm { eps: eps as f32 })
}

/// RMSNorm's input gradient for the output gradient `g` (like x).
pub(crate) fn rms_norm_grad_x(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &g.contiguous()?,
        &RmsNormGradX { eps: eps as f32 },
    )
}

/// `silu(gate) * up`. gate, up: [.., i] -> [.., i]
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &Swiglu)
}

/// `(d_gate, d_up)` of `silu(gate) * up` for the output gradient `g`: one launch writing both
/// into one `[2, ..]` buffer, split into two views.
pub(crate) fn swiglu_backward(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &g.contiguous()?,
        &SwigluBackward,
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The elements of a contiguous operand, or an error naming the op.
fn view<'a, T: DeviceRepr>(
    slice: &'a CudaSlice<T>,
    layout: &Layout,
    op: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("{op}: a non-contiguous operand reached the CUDA kernel"),
    }
}

fn driver<E: std::fmt::Display>(e: E) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA kernel: {e}"))
}

/// A launch over `blocks` blocks of [`THREADS`] threads.
fn config(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks for an elementwise kernel over `n` values (grid-stride loops cover the rest).
fn elementwise_blocks(n: usize) -> usize {
    n.div_ceil(THREADS as usize).min(65_535)
}

fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{op}: no CUDA kernel for {other:?}"),
    }
}

fn same_dtype(storages: &[&CudaStorage], op: &str) -> Result<DType> {
    let dtype = storages[0].dtype();
    if storages.iter().any(|s| s.dtype() != dtype) {
        candle_core::bail!("{op}: operands of different dtypes");
    }
    Ok(dtype)
}

fn no_cpu(op: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{op}: a CUDA kernel was given CPU tensors")
}

/// The scalar arguments after a kernel's buffers.
#[derive(Clone, Copy)]
enum Scalars {
    /// A row kernel's row width and epsilon.
    Rows { d: i64, eps: f32 },
    /// An elementwise kernel's element count.
    Len(i64),
}

/// Launches `name` (typed `T`) over `blocks` blocks with the operands' views, one fresh output of
/// `len` values, and `scalars`.
fn launch<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
    device: &CudaDevice,
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    (len, blocks): (usize, usize),
    scalars: Scalars,
) -> Result<CudaSlice<T>> {
    let func = device.get_or_load_custom_func(name, MODULE, PTX)?;
    let views = inputs
        .iter()
        .map(|(s, l)| view(s.as_cuda_slice::<T>()?, l, name))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: every kernel writes each element of its output before anything reads it.
    let mut out = unsafe { device.alloc::<T>(len)? };
    let mut builder = func.builder();
    for v in &views {
        builder.arg(v);
    }
    builder.arg(&mut out);
    match &scalars {
        Scalars::Rows { d, eps } => {
            builder.arg(d);
            builder.arg(eps);
        }
        Scalars::Len(n) => {
            builder.arg(n);
        }
    }
    // SAFETY: the argument list matches the kernel's signature in kernels.cu.
    unsafe { builder.launch(config(blocks)) }.map_err(driver)?;
    Ok(out)
}

fn wrap(slice: CudaStorageSlice, device: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: device.clone(),
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "cuda-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = wl.shape().elem_count();
        let n = xl.shape().elem_count();
        if xl.dims().last() != Some(&d) {
            candle_core::bail!(
                "rms-norm: x {:?} and weight {:?} do not fit",
                xl.dims(),
                wl.dims()
            );
        }
        let dtype = same_dtype(&[x, w], self.name())?;
        let name = format!("rms_norm_fwd_{}", suffix(dtype, self.name())?);
        let (dev, rows) = (x.device(), n / d.max(1));
        let inputs = [(x, xl), (w, wl)];
        let scalars = Scalars::Rows {
            d: d as i64,
            eps: self.eps,
        };
        let slice = match dtype {
            DType::F32 => {
                CudaStorageSlice::F32(launch::<f32>(dev, &name, &inputs, (n, rows), scalars)?)
            }
            _ => CudaStorageSlice::BF16(launch::<bf16>(dev, &name, &inputs, (n, rows), scalars)?),
        };
        Ok((wrap(slice, dev), xl.shape().clone()))
    }
}

struct RmsNormGradX {
    eps: f32,
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "cuda-rms-norm-grad-x"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = wl.shape().elem_count();
        let n = xl.shape().elem_count();
        if xl.dims().last() != Some(&d) || gl.dims() != xl.dims() {
            candle_core::bail!(
                "rms-norm backward: x {:?}, weight {:?}, gradient {:?} do not fit",
                xl.dims(),
                wl.dims(),
                gl.dims()
            );
        }
        let dtype = same_dtype(&[x, w, g], self.name())?;
        let name = format!("rms_norm_bwd_{}", suffix(dtype, self.name())?);
        let (dev, rows) = (x.device(), n / d.max(1));
        let inputs = [(x, xl), (w, wl), (g, gl)];
        let scalars = Scalars::Rows {
            d: d as i64,
            eps: self.eps,
        };
        let slice = match dtype {
            DType::F32 => {
                CudaStorageSlice::F32(launch::<f32>(dev, &name, &inputs, (n, rows), scalars)?)
            }
            _ => CudaStorageSlice::BF16(launch::<bf16>(dev, &name, &inputs, (n, rows), scalars)?),
        };
        Ok((wrap(slice, dev), xl.shape().clone()))
    }
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "cuda-swiglu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if gl.dims() != ul.dims() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        let n = gl.shape().elem_count();
        let dtype = same_dtype(&[g, u], self.name())?;
        let name = format!("swiglu_fwd_{}", suffix(dtype, self.name())?);
        let (dev, blocks) = (g.device(), elementwise_blocks(n));
        let inputs = [(g, gl), (u, ul)];
        let scalars = Scalars::Len(n as i64);
        let slice = match dtype {
            DType::F32 => {
                CudaStorageSlice::F32(launch::<f32>(dev, &name, &inputs, (n, blocks), scalars)?)
            }
            _ => CudaStorageSlice::BF16(launch::<bf16>(dev, &name, &inputs, (n, blocks), scalars)?),
        };
        Ok((wrap(slice, dev), gl.shape().clone()))
    }
}

struct SwigluBackward;

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "cuda-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
        d: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if gl.dims() != ul.dims() || dl.dims() != gl.dims() {
            candle_core::bail!(
                "swiglu backward: gate {:?}, up {:?}, gradient {:?} differ",
                gl.dims(),
                ul.dims(),
                dl.dims()
            );
        }
        let n = gl.shape().elem_count();
        let dtype = same_dtype(&[g, u, d], self.name())?;
        let name = format!("swiglu_bwd_{}", suffix(dtype, self.name())?);
        let dev = g.device();
        let slice = match dtype {
            DType::F32 => CudaStorageSlice::F32(swiglu_backward_launch::<f32>(
                dev,
                &name,
                [(g, gl), (u, ul), (d, dl)],
                n,
            )?),
            _ => CudaStorageSlice::BF16(swiglu_backward_launch::<bf16>(
                dev,
                &name,
                [(g, gl), (u, ul), (d, dl)],
                n,
            )?),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((wrap(slice, dev), Shape::from(dims)))
    }
}

/// SwiGLU's backward writes two outputs: `d_gate` into the first half of one `2n` buffer and
/// `d_up` into the second.
fn swiglu_backward_launch<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
    device: &CudaDevice,
    name: &str,
    inputs: [(&CudaStorage, &Layout); 3],
    n: usize,
) -> Result<CudaSlice<T>> {
    let func = device.get_or_load_custom_func(name, MODULE, PTX)?;
    let views = inputs
        .iter()
        .map(|(s, l)| view(s.as_cuda_slice::<T>()?, l, name))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: the kernel writes all 2n elements (both halves) before anything reads them.
    let mut out = unsafe { device.alloc::<T>(2 * n)? };
    {
        let (mut d_gate, mut d_up) = out.split_at_mut(n);
        let len = n as i64;
        let mut builder = func.builder();
        for v in &views {
            builder.arg(v);
        }
        builder.arg(&mut d_gate);
        builder.arg(&mut d_up);
        builder.arg(&len);
        // SAFETY: the argument list matches `swiglu_bwd_*` in kernels.cu.
        unsafe { builder.launch(config(elementwise_blocks(n))) }.map_err(driver)?;
    }
    Ok(out)
}
