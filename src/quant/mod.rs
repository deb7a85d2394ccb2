//! Frozen quantized base weights for QLoRA: bitsandbytes' NF4/FP4 (with double quantization of the
//! statistics), row-wise int8, and GGUF tensors. A [`QuantizedWeight`] is only ever dequantized one
//! layer at a time, inside the frozen linear op's forward and backward.

pub mod blockwise;
pub mod codebook;
pub mod gguf;

use crate::Result;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Storage, Tensor};
use std::sync::Arc;

/// Which 4-bit code table a weight uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBitType {
    /// NormalFloat-4, the QLoRA default.
    Nf4,
    /// bitsandbytes' 4-bit float.
    Fp4,
}

impl FourBitType {
    /// The 16 code values.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBitType::Nf4 => &codebook::NF4,
            FourBitType::Fp4 => &codebook::FP4,
        }
    }

    /// bitsandbytes' name (`nf4` / `fp4`).
    pub fn name(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }

    /// Parses bitsandbytes' name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(FourBitType::Nf4),
            "fp4" => Some(FourBitType::Fp4),
            _ => None,
        }
    }
}

/// How to quantize a full-precision weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantScheme {
    /// 4-bit codes in blocks of `blocksize` (bitsandbytes: 64), optionally double-quantizing the
    /// absmax values (8-bit, blocks of 256, as bitsandbytes' `compress_statistics`).
    FourBit {
        /// Code table.
        quant_type: FourBitType,
        /// Values per absmax.
        blocksize: usize,
        /// Quantize the absmax values too.
        double_quant: bool,
    },
    /// Row-wise absmax int8.
    Int8,
}

impl QuantScheme {
    /// The QLoRA recipe: NF4, blocks of 64, double quantization.
    pub fn qlora() -> Self {
        QuantScheme::FourBit {
            quant_type: FourBitType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// Double-quantized absmax values: 8-bit codes of `absmax - offset` in blocks of `blocksize`.
#[derive(Debug, Clone)]
pub struct NestedAbsmax {
    /// One code per 4-bit block, U8.
    pub codes: Tensor,
    /// The 256-value map the codes index, F32.
    pub code: Tensor,
    /// Absmax per nested block, F32.
    pub absmax: Tensor,
    /// Codes per nested absmax (256).
    pub blocksize: usize,
    /// Mean of the absmax values, added back after dequantizing.
    pub offset: f32,
}

/// The per-block absmax of a 4-bit weight.
#[derive(Debug, Clone)]
pub enum Absmax {
    /// Plain f32 values.
    Plain(Tensor),
    /// Double-quantized.
    Nested(NestedAbsmax),
}

/// A 4-bit weight in bitsandbytes' layout.
#[derive(Debug, Clone)]
pub struct FourBit {
    /// Code table's name.
    pub quant_type: FourBitType,
    /// The 16 code values (`quant_map` in checkpoints).
    pub code: [f32; 16],
    /// The dtype of the weight that was quantized: dequantization rounds through it, as
    /// bitsandbytes dequantizes to the quant state's dtype.
    pub source_dtype: DType,
    /// Values per absmax.
    pub blocksize: usize,
    /// Codes, two per byte, first value in the high nibble: U8 `[ceil(n / 2)]`.
    pub packed: Tensor,
    /// Scale of each block.
    pub absmax: Absmax,
}

/// A row-wise int8 weight as bitsandbytes stores it (`Int8Params`, transformers'
/// `load_in_8bit`): `w[r, c] ≈ (q[r, c] - 128) · scb[r] / 127`.
#[derive(Debug, Clone)]
pub struct Int8 {
    /// Codes offset by 128, U8 `[out, in]`.
    pub codes: Tensor,
    /// Each row's absmax of the f16 weight (bitsandbytes' `SCB`), F32 `[out]`.
    pub scale: Tensor,
}

/// bitsandbytes' 1/127 of `int8_vectorwise_dequant`, as it multiplies (an f32 after the
/// absmax).
const INV_127: f64 = 7.874015718698502e-3;

/// The stored form of a quantized weight.
#[derive(Debug, Clone)]
pub enum QuantizedData {
    /// NF4 / FP4.
    FourBit(FourBit),
    /// Row-wise int8.
    Int8(Int8),
    /// A GGUF tensor (any of candle's quantized types).
    Gguf(Arc<QTensor>),
}

/// A frozen 2-D weight `[out, in]` kept quantized; `dtype` is what it dequantizes to.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    /// `[out, in]`.
    pub shape: (usize, usize),
    /// The codes and statistics.
    pub data: QuantizedData,
    /// The dtype dequantized values take (the model's compute dtype).
    pub dtype: DType,
}

/// The contents of a CPU tensor as a slice (after making it contiguous).
fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("internal: expected a CPU tensor".into()).into());
    };
    let all = cpu.as_slice::<T>()?;
    f(&all[layout.start_offset()..layout.start_offset() + t.elem_count()])
}

/// Splits `out` into chunks that are whole multiples of `align` and runs `f(start, chunk)` on each
/// in parallel over candle's thread count.
fn par_chunks(out: &mut [f32], align: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = candle_core::utils::get_num_threads().max(1);
    let per = out.len().div_ceil(threads).div_ceil(align).max(1) * align;
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// Repeats each of `stats` (one per block) `blocksize` times and keeps the first `n`: `[n]`.
fn per_value(stats: &Tensor, blocksize: usize, n: usize) -> Result<Tensor> {
    let blocks = stats.dim(0)?;
    Ok(stats
        .reshape((blocks, 1))?
        .broadcast_as((blocks, blocksize))?
        .flatten_all()?
        .narrow(0, 0, n)?)
}

impl NestedAbsmax {
    /// The f32 absmax values: `code[c] * absmax[block] + offset`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let n = self.codes.dim(0)?;
        // candle's index_select misreads U8 ids above 127: index with U32.
        let values = self
            .code
            .index_select(&self.codes.to_dtype(DType::U32)?, 0)?;
        let scale = per_value(&self.absmax, self.blocksize, n)?;
        Ok(((values * scale)? + self.offset as f64)?)
    }
}

impl Absmax {
    /// The f32 absmax per block.
    pub fn values(&self) -> Result<Tensor> {
        match self {
            Absmax::Plain(t) => Ok(t.clone()),
            Absmax::Nested(n) => n.dequantize(),
        }
    }
}

impl FourBit {
    /// Quantizes `values` (host f32, from a weight of `source_dtype`) onto `device`.
    pub fn quantize(
        values: &[f32],
        source_dtype: DType,
        quant_type: FourBitType,
        blocksize: usize,
        double_quant: bool,
        device: &Device,
    ) -> Result<Self> {
        let (packed, absmax) = blockwise::quantize_4bit(values, blocksize, quant_type.code());
        let absmax = if double_quant {
            const NESTED: usize = 256;
            // torch's f32 mean here equals the f64 mean rounded once.
            let offset =
                (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
            let centred: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
            let map = codebook::dynamic_map();
            let (codes, nested) = blockwise::quantize_8bit(&centred, NESTED, &map);
            Absmax::Nested(NestedAbsmax {
                codes: Tensor::new(codes.as_slice(), device)?,
                code: Tensor::new(&map, device)?,
                absmax: Tensor::new(nested.as_slice(), device)?,
                blocksize: NESTED,
                offset,
            })
        } else {
            Absmax::Plain(Tensor::new(absmax.as_slice(), device)?)
        };
        Ok(FourBit {
            quant_type,
            code: *quant_type.code(),
            source_dtype,
            blocksize,
            packed: Tensor::new(packed.as_slice(), device)?,
            absmax,
        })
    }

    /// The first `n` values, dequantized (`code * absmax` in f32, then rounded to the source
    /// dtype, as bitsandbytes does).
    pub fn dequantize(&self, n: usize) -> Result<Tensor> {
        let device = self.packed.device();
        if !device.is_cpu() {
            return self.dequantize_composed(n);
        }
        let (dtype, code) = (self.source_dtype, self.code);
        let absmax = self.absmax.values()?;
        let absmax = absmax.to_vec1::<f32>()?;
        let mut out = vec![0f32; n];
        with_cpu_slice::<u8, _>(&self.packed, |packed| {
            let bs = self.blocksize;
            par_chunks(&mut out, 2 * bs, |start, chunk| {
                blockwise::dequantize_4bit(
                    &packed[start / 2..],
                    &absmax[start / bs..],
                    bs,
                    &code,
                    chunk,
                )
            });
            Ok(())
        })?;
        Ok(Tensor::from_vec(out, n, device)?.to_dtype(dtype)?)
    }

    /// [`FourBit::dequantize`] composed of candle ops, so every device computes the same function:
    /// a 256-entry table maps each byte to its two values.
    pub fn dequantize_composed(&self, n: usize) -> Result<Tensor> {
        let (dtype, code) = (self.source_dtype, self.code);
        let absmax = self.absmax.values()?;
        let device = self.packed.device();
        let pairs: Vec<f32> = (0..256usize)
            .flat_map(|b| [code[b >> 4], code[b & 0x0f]])
            .collect();
        let table = Tensor::from_vec(pairs, (256, 2), device)?;
        let values = table
            .index_select(&self.packed.to_dtype(DType::U32)?, 0)?
            .flatten_all()?
            .narrow(0, 0, n)?;
        Ok((values * per_value(&absmax, self.blocksize, n)?)?.to_dtype(dtype)?)
    }

    /// Bytes held (codes and statistics).
    pub fn bytes(&self) -> usize {
        let stats = match &self.absmax {
            Absmax::Plain(t) => t.elem_count() * 4,
            Absmax::Nested(n) => n.codes.elem_count() + n.absmax.elem_count() * 4 + 256 * 4 + 4,
        };
        self.packed.elem_count() + stats
    }
}

impl Int8 {
    /// Quantizes `w: [out, in]` row-wise as bitsandbytes' `Int8Params` does: the weight in f16,
    /// `scb` = each row's max |w|, codes `round(w · (127 / scb))` (ties to even, as torch, whose
    /// scalar-by-tensor division is `127 · (1 / scb)`), stored + 128.
    pub fn quantize(values: &[f32], cols: usize, device: &Device) -> Result<Self> {
        let rows = values.len() / cols;
        let half: Vec<f32> = Tensor::from_slice(values, values.len(), &Device::Cpu)?
            .to_dtype(DType::F16)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let mut codes = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(rows);
        for row in half.chunks(cols) {
            let scb = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            // torch's `127.0 / t` is `t.reciprocal() * 127.0`.
            let factor = if scb > 0.0 { (1.0 / scb) * 127.0 } else { 0.0 };
            scales.push(scb);
            codes.extend(
                row.iter()
                    .map(|v| ((v * factor).round_ties_even().clamp(-127.0, 127.0) + 128.0) as u8),
            );
        }
        Ok(Int8 {
            codes: Tensor::from_vec(codes, (rows, cols), device)?,
            scale: Tensor::from_vec(scales, rows, device)?,
        })
    }

    /// Dequantized `[out, in]` in `dtype`: `q · scb · (1/127)` in f32, as bitsandbytes'
    /// `int8_vectorwise_dequant`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let q = (self.codes.to_dtype(DType::F32)? - 128.0)?;
        Ok(q.broadcast_mul(&self.scale.unsqueeze(1)?)?
            .affine(INV_127, 0.0)?
            .to_dtype(dtype)?)
    }
}

impl QuantizedWeight {
    /// Quantizes a full-precision `[out, in]` weight with `scheme` onto `device`; it will
    /// dequantize to `dtype`.
    pub fn quantize(
        w: &Tensor,
        scheme: QuantScheme,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (out_f, in_f) = w.dims2()?;
        let values = w
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let data = match scheme {
            QuantScheme::FourBit {
                quant_type,
                blocksize,
                double_quant,
            } => QuantizedData::FourBit(FourBit::quantize(
                &values,
                w.dtype(),
                quant_type,
                blocksize,
                double_quant,
                device,
            )?),
            QuantScheme::Int8 => QuantizedData::Int8(Int8::quantize(&values, in_f, device)?),
        };
        Ok(QuantizedWeight {
            shape: (out_f, in_f),
            data,
            dtype,
        })
    }

    /// The full-precision `[out, in]` weight in `self.dtype` (a temporary: one layer at a time).
    pub fn dequantize(&self) -> Result<Tensor> {
        let (o, i) = self.shape;
        let t = match &self.data {
            QuantizedData::FourBit(f) => {
                f.dequantize(o * i)?.reshape((o, i))?.to_dtype(self.dtype)?
            }
            QuantizedData::Int8(q) => q.dequantize(self.dtype)?,
            QuantizedData::Gguf(q) => {
                let d = q.dequantize(&q.device())?;
                d.reshape((o, i))?.to_dtype(self.dtype)?
            }
        };
        Ok(t)
    }

    /// Bytes held by the quantized form.
    pub fn bytes(&self) -> usize {
        match &self.data {
            QuantizedData::FourBit(f) => f.bytes(),
            QuantizedData::Int8(q) => q.codes.elem_count() + q.scale.elem_count() * 4,
            QuantizedData::Gguf(q) => q.storage_size_in_bytes(),
        }
    }

    /// The scheme that quantizes a weight into this one's format; None for GGUF types.
    pub fn scheme(&self) -> Option<QuantScheme> {
        match &self.data {
            QuantizedData::FourBit(f) => Some(QuantScheme::FourBit {
                quant_type: f.quant_type,
                blocksize: f.blocksize,
                double_quant: matches!(f.absmax, Absmax::Nested(_)),
            }),
            QuantizedData::Int8(_) => Some(QuantScheme::Int8),
            QuantizedData::Gguf(_) => None,
        }
    }

    /// A short name of the format for messages (`nf4`, `int8`, `q4k`, ...).
    pub fn format_name(&self) -> String {
        match &self.data {
            QuantizedData::FourBit(f) => f.quant_type.name().to_string(),
            QuantizedData::Int8(_) => "int8".into(),
            QuantizedData::Gguf(q) => format!("{:?}", q.dtype()).to_lowercase(),
        }
    }
}
