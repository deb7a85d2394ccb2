//! Folding adapters into the base weights: `W' = W + scale * B A` (DoRA: each row of that rescaled
//! to its magnitude), as PEFT's `merge_and_unload`.

use crate::model::layers::LinearWeight;
use crate::model::param::Param;
use crate::model::CausalLm;
use crate::Result;

/// Merges every LoRA layer of `model` into its base weight and removes the adapters; trained
/// copies of the embedding and LM head (`modules_to_save`) replace the base's. A quantized base
/// weight is dequantized first (the merged weight is full precision).
/// Returns the number of merged modules.
pub fn merge_and_unload(model: &mut CausalLm) -> Result<usize> {
    let saved = std::mem::take(&mut model.saved_modules);
    if !saved.is_empty() {
        // PEFT's merge puts the trained copies in place of the modules. A tied head no longer
        // equals the embedding once either trained: the merged model is untied.
        if model.config.tie_word_embeddings {
            model.lm_head = Some(Param::new(model.embed_tokens.tensor().clone(), false)?);
            model.config.tie_word_embeddings = false;
        }
        if let Some(embed) = saved.embed {
            model.embed_tokens = Param::new(embed.as_tensor().detach(), false)?;
        }
        if let Some(head) = saved.head {
            model.lm_head = Some(Param::new(head.as_tensor().detach(), false)?);
        }
    }
    let mut merged = 0;
    for moe in model.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        let lora = std::mem::take(&mut moe.lora);
        let experts = moe.experts.len();
        if let Some(l) = &lora.router {
            let w = moe.router.tensor();
            let new_w = (w + l.weight_delta(0, 1)?.to_dtype(w.dtype())?)?;
            moe.router = Param::new(new_w, false)?;
            merged += 1;
        }
        for (e, [gate, up, down]) in moe.experts.iter_mut().enumerate() {
            let mut updates: Vec<(&mut crate::model::layers::Linear, candle_core::Tensor)> =
                Vec::new();
            if let Some(l) = &lora.gate_up {
                let delta = l.weight_delta(e, experts)?;
                let i = gate.out_features();
                updates.push((gate, delta.narrow(0, 0, i)?));
                updates.push((up, delta.narrow(0, i, i)?));
            }
            if let Some(l) = &lora.down {
                updates.push((down, l.weight_delta(e, experts)?));
            }
            for (lin, delta) in updates {
                let w = lin.weight.dense()?;
                let new_w = (&w + delta.to_dtype(w.dtype())?)?;
                lin.weight = LinearWeight::Dense(Param::new(new_w, false)?);
            }
        }
        merged += usize::from(lora.gate_up.is_some()) + usize::from(lora.down.is_some());
    }
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
