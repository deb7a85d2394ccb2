//! Which implementation runs an op: decided in one place, from the operands' device and dtype.
//!
//! Every op in [`crate::ops`] has one dispatch function (named `kernel`, or the op's own entry
//! point where it has only one) that asks [`Kernel::of`] and runs, in this order of preference:
//!
//! 1. [`Kernel::Cpu`]: a native kernel in [`super::cpu`], for f32 tensors on the CPU;
//! 2. `Kernel::Cuda` (the `cuda` feature): a CUDA kernel under `ops/cuda/`, for f32 or bf16 on a
//!    GPU — RMSNorm and SwiGLU so far; the other dispatch points run candle's ops for it;
//! 3. [`Kernel::Composed`]: candle ops, which every device and dtype runs (and which compute the
//!    same function as the native kernels, checked by the tests).
//!
//! An op may add conditions of its own to the first choice (the flash kernel reads document ids
//! for each batch row, the narrow products take at most a LoRA rank's width); it states them at
//! its dispatch point. Model code never checks a device or dtype to choose a kernel: it asks the
//! op (for example [`super::attention::prefers_token_layout`]).

use candle_core::{DType, Device, Tensor};

/// The implementation an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// A native CPU kernel ([`super::cpu`]): f32 on the CPU.
    Cpu,
    /// A CUDA kernel (`ops/cuda/`, the `cuda` feature): f32 or bf16 on one GPU. Ops without one
    /// run [`Kernel::Composed`] for it.
    #[cfg(feature = "cuda")]
    Cuda,
    /// candle ops: any device, any dtype.
    Composed,
}

impl Kernel {
    /// The kernel for an op whose operands are `operands`: the kernel for their device and dtype
    /// ([`Kernel::on`]) when they share both, else candle's ops.
    pub fn of(operands: &[&Tensor]) -> Kernel {
        let Some(first) = operands.first() else {
            return Kernel::Composed;
        };
        let (device, dtype) = (first.device(), first.dtype());
        if operands
            .iter()
            .all(|t| t.dtype() == dtype && t.device().same_device(device))
        {
            Kernel::on(device, dtype)
        } else {
            Kernel::Composed
        }
    }

    /// The kernel for tensors of `dtype` on `device`: native for f32 on the CPU; CUDA (with the
    /// `cuda` feature) for a dtype the CUDA kernels take on a GPU; else candle's ops.
    pub fn on(device: &Device, dtype: DType) -> Kernel {
        #[cfg(feature = "cuda")]
        if device.is_cuda() && super::cuda::supports(dtype) {
            return Kernel::Cuda;
        }
        Kernel::for_run(device.is_cpu(), dtype)
    }

    /// The kernel for tensors of `dtype` on the CPU (`cpu`) or an accelerator, as the memory
    /// planner counts it (the CUDA kernels' workspace is counted as candle's, an upper bound).
    pub fn for_run(cpu: bool, dtype: DType) -> Kernel {
        if cpu && dtype == DType::F32 {
            Kernel::Cpu
        } else {
            Kernel::Composed
        }
    }

    /// Whether this is the native CPU kernel.
    pub fn is_cpu(self) -> bool {
        self == Kernel::Cpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_only_when_every_operand_is_f32_on_the_cpu() -> candle_core::Result<()> {
        let f32_cpu = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        let bf16_cpu = Tensor::zeros(2, DType::BF16, &Device::Cpu)?;
        assert_eq!(Kernel::of(&[&f32_cpu, &f32_cpu]), Kernel::Cpu);
        assert_eq!(Kernel::of(&[&f32_cpu, &bf16_cpu]), Kernel::Composed);
        assert_eq!(Kernel::for_run(false, DType::F32), Kernel::Composed);
        assert_eq!(Kernel::for_run(true, DType::F16), Kernel::Composed);
        Ok(())
    }
}
