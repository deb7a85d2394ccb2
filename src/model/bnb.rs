//! Reading bitsandbytes 4-bit checkpoints as transformers saves them (the `*-bnb-4bit` repos): each
//! quantized linear stores `weight` (packed U8), `weight.absmax`, `weight.quant_map`, and with
//! double quantization `weight.nested_absmax` and `weight.nested_quant_map`, plus a JSON quant
//! state in the U8 tensor `weight.quant_state.bitsandbytes__nf4` (or `__fp4`).

use super::weights::{json_dims, Weights};
use crate::quant::{Absmax, FourBit, FourBitType, NestedAbsmax, QuantizedData, QuantizedWeight};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The quant-state tensor of a 4-bit weight, if `weight` (e.g. `...q_proj.weight`) is one.
fn quant_state_name(weights: &Weights, weight: &str) -> Option<(String, FourBitType)> {
    [FourBitType::Nf4, FourBitType::Fp4]
        .into_iter()
        .map(|t| {
            (
                format!("{weight}.quant_state.bitsandbytes__{}", t.name()),
                t,
            )
        })
        .find(|(n, _)| weights.contains(n))
}

/// Whether `weight` is stored as a bitsandbytes 4-bit weight.
pub fn is_four_bit(weights: &Weights, weight: &str) -> bool {
    quant_state_name(weights, weight).is_some()
}

/// Parses a dtype name as bitsandbytes writes it (`float32`, `bfloat16`, `float16`).
fn dtype_named(name: &str) -> Option<DType> {
    match name {
        "float32" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        _ => None,
    }
}

/// Reads the stored 4-bit weight `weight` of shape `(out, in)`; it dequantizes to `dtype`.
pub fn read_four_bit(
    weights: &Weights,
    weight: &str,
    shape: (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<QuantizedWeight> {
    let (state_name, quant_type) =
        quant_state_name(weights, weight).ok_or_else(|| Error::Tensor {
            name: weight.into(),
            message: "not a bitsandbytes 4-bit weight (no quant_state entry)".into(),
        })?;
    let bad = |message: String| Error::Tensor {
        name: state_name.clone(),
        message,
    };
    let state_bytes = weights
        .get_raw(&state_name, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let state: serde_json::Value = serde_json::from_slice(&state_bytes)
        .map_err(|e| bad(format!("quant state is not JSON: {e}")))?;
    let stored_shape = json_dims(&state["shape"]);
    if stored_shape != [shape.0, shape.1] {
        return Err(bad(format!(
            "quantized shape {stored_shape:?}, the config implies [{}, {}]",
            shape.0, shape.1
        )));
    }
    let blocksize = state["blocksize"]
        .as_u64()
        .ok_or_else(|| bad("quant state has no blocksize".into()))? as usize;
    let source_dtype = state["dtype"]
        .as_str()
        .and_then(dtype_named)
        .ok_or_else(|| bad(format!("unsupported dtype {}", state["dtype"])))?;
    let n = shape.0 * shape.1;
    let packed = weights.get_raw(weight, device)?.flatten_all()?;
    if packed.dtype() != DType::U8 || packed.elem_count() != n.div_ceil(2) {
        return Err(Error::Tensor {
            name: weight.into(),
            message: format!(
                "expected {} packed U8 values, found {} {:?}",
                n.div_ceil(2),
                packed.elem_count(),
                packed.dtype()
            ),
        });
    }
    let code = read_f32::<16>(weights, &format!("{weight}.quant_map"))?;
    let absmax_name = format!("{weight}.absmax");
    let blocks = n.div_ceil(blocksize);
    let stored_absmax = weights.get_raw(&absmax_name, device)?.flatten_all()?;
    if stored_absmax.elem_count() != blocks {
        return Err(Error::Tensor {
            name: absmax_name,
            message: format!("{} values for {blocks} blocks", stored_absmax.elem_count()),
        });
    }
    let absmax = if weights.contains(&format!("{weight}.nested_absmax")) {
        let offset = state["nested_offset"]
            .as_f64()
            .ok_or_else(|| bad("quant state has nested_absmax but no nested_offset".into()))?;
        let nested_blocksize = state["nested_blocksize"].as_u64().unwrap_or(256) as usize;
        let nested_code = read_f32::<256>(weights, &format!("{weight}.nested_quant_map"))?;
        Absmax::Nested(NestedAbsmax {
            codes: stored_absmax,
            code: Tensor::new(&nested_code, device)?,
            absmax: weights
                .get_raw(&format!("{weight}.nested_absmax"), device)?
                .to_dtype(DType::F32)?,
            blocksize: nested_blocksize,
            offset: offset as f32,
        })
    } else {
        Absmax::Plain(stored_absmax.to_dtype(DType::F32)?)
    };
    Ok(QuantizedWeight {
        shape,
        data: QuantizedData::FourBit(FourBit {
            quant_type,
            code,
            source_dtype,
            blocksize,
            packed,
            absmax,
        }),
        dtype,
    })
}

/// Reads a small f32 table of exactly `N` values.
fn read_f32<const N: usize>(weights: &Weights, name: &str) -> Result<[f32; N]> {
    let v = weights
        .get_raw(name, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = [0f32; N];
    if v.len() != N {
        return Err(Error::Tensor {
            name: name.into(),
            message: format!("expected {N} values, found {}", v.len()),
        });
    }
    out.copy_from_slice(&v);
    Ok(out)
}
