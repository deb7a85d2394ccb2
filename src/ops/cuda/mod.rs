//! The CUDA kernels (`kernels.cu`, compiled to PTX by `build.rs` and loaded once per device
//! through candle's custom-module cache), each a candle custom op whose `cuda_fwd` launches it:
//! RMSNorm forward and input gradient, SwiGLU forward and backward, RoPE and its inverse on the
//! token-major layout, for f32 and bf16; the loss's fused pass over a chunk's f32 logits; and
//! 4-bit (NF4/FP4) dequantization.
//! [`super::kernel::Kernel`] picks them for contiguous-able CUDA operands of those dtypes; each
//! op's dispatch point calls the functions here. Arithmetic is in f32 (as the composed path's).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
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

/// RoPE on token-major rows `x: [b, t, heads, d]`, or its inverse (the backward) when `inverse`.
/// cos/sin: `[t', d / 2]` or `[b, t', d / 2]` with `t' ≥ t`.
pub(crate) fn rope_tokens(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Rope { inverse })
}

/// The loss's pass over one chunk's f32 `logits: [n, vocab]` against per-row target `ids` (u32),
/// loss weights and entropy weights (f32, `[n]` each, on the logits' device): per row the weighted
/// cross-entropy, the weighted argmax hit and the weighted entropy (`[n, 3]`), and with `grad`
/// the gradient of the weighted loss sum, `(softmax - onehot) * loss_weight` (`[n, vocab]`); with
/// `dft` the loss and gradient weights are multiplied by the target's probability (TRL's DFT).
pub(crate) fn cross_entropy_rows(
    logits: &Tensor,
    ids: &Tensor,
    weights: (&Tensor, &Tensor),
    (grad, dft): (bool, bool),
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, vocab) = logits.dims2()?;
    let (loss_w, ent_w) = weights;
    let packed = Tensor::stack(&[loss_w, ent_w], 0)?;
    let out = logits.contiguous()?.apply_op3_no_bwd(
        &ids.contiguous()?,
        &packed,
        &CrossEntropyRows { grad, dft },
    )?;
    let grad_len = if grad { n * vocab } else { 0 };
    let stats = out.narrow(0, grad_len, 3 * n)?.reshape((n, 3))?;
    let gradient = grad
        .then(|| out.narrow(0, 0, n * vocab)?.reshape((n, vocab)))
        .transpose()?;
    Ok((stats, gradient))
}

/// The first `n` values of a 4-bit weight (`packed` U8 codes, two per byte; `absmax` f32 per block
/// of `blocksize`; `code` the 16 f32 values), dequantized into `dtype` (f32 or bf16): bitsandbytes'
/// `code * absmax`, bit for bit the CPU path's.
pub(crate) fn dequantize_4bit(
    packed: &Tensor,
    absmax: &Tensor,
    code: &[f32; 16],
    (n, blocksize): (usize, usize),
    dtype: DType,
) -> Result<Tensor> {
    let code = Tensor::new(code, packed.device())?;
    let absmax = absmax.to_dtype(DType::F32)?.contiguous()?;
    packed.contiguous()?.apply_op3_no_bwd(
        &absmax,
        &code,
        &Dequantize4Bit {
            n,
            blocksize,
            dtype,
        },
    )
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
    /// RoPE's sizes: tokens per row, heads, head width, table rows, whether the tables are per
    /// batch row, the rotation's sign and the number of element pairs.
    Rope {
        t: i64,
        heads: i64,
        d: i64,
        rows: i64,
        batched: i32,
        sign: f32,
        pairs: i64,
    },
}

/// Launches `{root}_f32` or `{root}_bf16` for operands of `dtype` over `blocks` blocks, with the
/// operands' views, one fresh output of `len` values and `scalars`: the output's storage.
fn launch(
    device: &CudaDevice,
    root: &str,
    dtype: DType,
    inputs: &[(&CudaStorage, &Layout)],
    sizes: (usize, usize),
    scalars: Scalars,
) -> Result<CudaStorage> {
    let name = format!("{root}_{}", suffix(dtype, root)?);
    let dev = device.clone();
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(
            launch_as::<f32>(device, &name, inputs, sizes, scalars)?,
            dev,
        ),
        _ => CudaStorage::wrap_cuda_slice(
            launch_as::<bf16>(device, &name, inputs, sizes, scalars)?,
            dev,
        ),
    })
}

/// [`launch`] of the kernel `name`, typed `T`.
fn launch_as<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
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
        Scalars::Rope {
            t,
            heads,
            d,
            rows,
            batched,
            sign,
            pairs,
        } => {
            builder.arg(t);
            builder.arg(heads);
            builder.arg(d);
            builder.arg(rows);
            builder.arg(batched);
            builder.arg(sign);
            builder.arg(pairs);
        }
    }
    // SAFETY: the argument list matches the kernel's signature in kernels.cu.
    unsafe { builder.launch(config(blocks)) }.map_err(driver)?;
    Ok(out)
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
        let (dev, rows) = (x.device(), n / d.max(1));
        let inputs = [(x, xl), (w, wl)];
        let scalars = Scalars::Rows {
            d: d as i64,
            eps: self.eps,
        };
        let out = launch(dev, "rms_norm_fwd", dtype, &inputs, (n, rows), scalars)?;
        Ok((out, xl.shape().clone()))
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
        let (dev, rows) = (x.device(), n / d.max(1));
        let inputs = [(x, xl), (w, wl), (g, gl)];
        let scalars = Scalars::Rows {
            d: d as i64,
            eps: self.eps,
        };
        let out = launch(dev, "rms_norm_bwd", dtype, &inputs, (n, rows), scalars)?;
        Ok((out, xl.shape().clone()))
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
        let (dev, blocks) = (g.device(), elementwise_blocks(n));
        let inputs = [(g, gl), (u, ul)];
        let scalars = Scalars::Len(n as i64);
        let out = launch(dev, "swiglu_fwd", dtype, &inputs, (n, blocks), scalars)?;
        Ok((out, gl.shape().clone()))
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
        let (dev, blocks) = (g.device(), elementwise_blocks(n));
        let inputs = [(g, gl), (u, ul), (d, dl)];
        // d_gate in the first n values, d_up in the next n.
        let out = launch(
            dev,
            "swiglu_bwd",
            dtype,
            &inputs,
            (2 * n, blocks),
            Scalars::Len(n as i64),
        )?;
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((out, Shape::from(dims)))
    }
}

struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "cuda-rope"
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
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, t, heads, d) = xl.shape().dims4()?;
        let half = d / 2;
        let table = cl.dims();
        let fits = d == 2 * half
            && table.last() == Some(&half)
            && match table.len() {
                2 => table[0] >= t,
                3 => table[0] == b && table[1] >= t,
                _ => false,
            };
        if !fits || sl.dims() != table {
            candle_core::bail!(
                "rope: tables {:?} and {:?} do not fit x {:?}",
                table,
                sl.dims(),
                xl.dims()
            );
        }
        let n = xl.shape().elem_count();
        let dtype = same_dtype(&[x, cos, sin], self.name())?;
        let pairs = n / 2;
        let scalars = Scalars::Rope {
            t: t as i64,
            heads: heads as i64,
            d: d as i64,
            rows: table[table.len() - 2] as i64,
            batched: i32::from(table.len() == 3),
            sign: if self.inverse { -1.0 } else { 1.0 },
            pairs: pairs as i64,
        };
        let (dev, blocks) = (x.device(), elementwise_blocks(pairs));
        let inputs = [(x, xl), (cos, cl), (sin, sl)];
        let out = launch(dev, "rope_tokens", dtype, &inputs, (n, blocks), scalars)?;
        Ok((out, xl.shape().clone()))
    }
}

struct CrossEntropyRows {
    grad: bool,
    /// TRL's DFT: each row's loss and gradient weighed by the target's probability.
    dft: bool,
}

impl CustomOp3 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cuda-cross-entropy-rows"
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
        logits: &CudaStorage,
        ll: &Layout,
        ids: &CudaStorage,
        il: &Layout,
        weights: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, vocab) = ll.shape().dims2()?;
        if il.dims() != [n] || wl.dims() != [2, n] {
            candle_core::bail!(
                "cross-entropy rows: logits {:?}, ids {:?}, weights {:?} do not fit",
                ll.dims(),
                il.dims(),
                wl.dims()
            );
        }
        let op = self.name();
        let dev = logits.device();
        let func = dev.get_or_load_custom_func("ce_rows_f32", MODULE, PTX)?;
        let logits = view(logits.as_cuda_slice::<f32>()?, ll, op)?;
        let ids = view(ids.as_cuda_slice::<u32>()?, il, op)?;
        let weights = view(weights.as_cuda_slice::<f32>()?, wl, op)?;
        let (loss_w, ent_w) = (weights.slice(..n), weights.slice(n..));
        let len = if self.grad { n * vocab + 3 * n } else { 3 * n };
        // SAFETY: the kernel writes every row's stats and, with `grad`, every gradient value.
        let mut out = unsafe { dev.alloc::<f32>(len)? };
        let (vocab_arg, rows_arg) = (vocab as i64, n as i64);
        let (grad_arg, dft_arg) = (i32::from(self.grad), i32::from(self.dft));
        let mut builder = func.builder();
        builder.arg(&logits);
        builder.arg(&ids);
        builder.arg(&loss_w);
        builder.arg(&ent_w);
        builder.arg(&mut out);
        builder.arg(&vocab_arg);
        builder.arg(&rows_arg);
        builder.arg(&grad_arg);
        builder.arg(&dft_arg);
        // SAFETY: the argument list matches `ce_rows_f32` in kernels.cu.
        unsafe { builder.launch(config(n)) }.map_err(driver)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(len),
        ))
    }
}

struct Dequantize4Bit {
    n: usize,
    blocksize: usize,
    dtype: DType,
}

impl CustomOp3 for Dequantize4Bit {
    fn name(&self) -> &'static str {
        "cuda-dequantize-4bit"
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
        packed: &CudaStorage,
        pl: &Layout,
        absmax: &CudaStorage,
        al: &Layout,
        code: &CudaStorage,
        cl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, bs) = (self.n, self.blocksize.max(1));
        if pl.shape().elem_count() < n.div_ceil(2)
            || al.shape().elem_count() < n.div_ceil(bs)
            || cl.shape().elem_count() != 16
        {
            candle_core::bail!(
                "4-bit dequantize: {} codes, {} absmax values for {n} values in blocks of {bs}",
                pl.shape().elem_count(),
                al.shape().elem_count()
            );
        }
        let op = self.name();
        let dev = packed.device();
        let name = format!("dequant_4bit_{}", suffix(self.dtype, op)?);
        let operands = (
            view(packed.as_cuda_slice::<u8>()?, pl, op)?,
            view(absmax.as_cuda_slice::<f32>()?, al, op)?,
            view(code.as_cuda_slice::<f32>()?, cl, op)?,
        );
        let out = match self.dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(
                dequantize_launch::<f32>(dev, &name, &operands, (n, bs))?,
                dev.clone(),
            ),
            _ => CudaStorage::wrap_cuda_slice(
                dequantize_launch::<bf16>(dev, &name, &operands, (n, bs))?,
                dev.clone(),
            ),
        };
        Ok((out, Shape::from(n)))
    }
}

/// Launches `dequant_4bit_*` over `(packed, absmax, code)` into a fresh buffer of `n` values.
fn dequantize_launch<T: DeviceRepr>(
    device: &CudaDevice,
    name: &str,
    (packed, absmax, code): &(
        candle_core::cuda_backend::cudarc::driver::CudaView<'_, u8>,
        candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
        candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
    ),
    (n, blocksize): (usize, usize),
) -> Result<CudaSlice<T>> {
    let func = device.get_or_load_custom_func(name, MODULE, PTX)?;
    // SAFETY: the kernel writes all n values before anything reads them.
    let mut out = unsafe { device.alloc::<T>(n)? };
    let (n_arg, bs_arg) = (n as i64, blocksize as i64);
    let mut builder = func.builder();
    builder.arg(packed);
    builder.arg(absmax);
    builder.arg(code);
    builder.arg(&mut out);
    builder.arg(&n_arg);
    builder.arg(&bs_arg);
    // SAFETY: the argument list matches `dequant_4bit_*` in kernels.cu.
    unsafe { builder.launch(config(elementwise_blocks(n))) }.map_err(driver)?;
    Ok(out)
}
