//! Folding adapters into the base weights: `W' = W + scale * B A`, as PEFT's `merge_and_unload`.

use crate::model::param::Param;
use crate::model::CausalLm;
use crate::Result;

/// Merges every LoRA layer of `model` into its base weight and removes the adapters.
/// Returns the number of merged modules.
pub fn merge_and_unload(model: &mut CausalLm) -> Result<usize> {
    let mut merged = 0;
    for lin in model.linears_mut() {
        let Some(lora) = lin.lora.take() else {
            continue;
        };
        let w = lin.weight.tensor();
        let dtype = w.dtype();
        let new_w = (w.to_dtype(candle_core::DType::F32)?
            + lora.delta_weight()?.to_dtype(candle_core::DType::F32)?)?
        .to_dtype(dtype)?;
        lin.weight = Param::new(new_w, lin.weight.var().is_some())?;
        merged += 1;
    }
    Ok(merged)
}
