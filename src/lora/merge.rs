//! Folding adapters into the base weights: `W' = W + scale * B A` (DoRA: each row of that rescaled
//! to its magnitude), as PEFT's `merge_and_unload`.

use crate::model::layers::LinearWeight;
use crate::model::param::Param;
use crate::model::CausalLm;
use crate::Result;

/// Merges every LoRA layer of `model` into its base weight and removes the adapters. A quantized
/// base weight is dequantized first (the merged weight is full precision).
/// Returns the number of merged modules.
pub fn merge_and_unload(model: &mut CausalLm) -> Result<usize> {
    let mut merged = 0;
    for lin in model.linears_mut() {
        let Some(lora) = lin.lora.take() else {
            continue;
        };
        let w = lin.weight.dense()?;
        let trainable = lin.weight.param().is_some_and(|p| p.var().is_some());
        let new_w = lora.merged_weight(&w)?.to_dtype(w.dtype())?;
        lin.weight = LinearWeight::Dense(Param::new(new_w, trainable)?);
        merged += 1;
    }
    Ok(merged)
}
