//! Writing a complete Hugging Face model folder (full fine-tuning, merged adapters): safetensors
//! sharded like transformers above 5 GB, config.json, and the tokenizer/template/generation files
//! copied from the base.

use super::layers::LinearWeight;
use super::param::Param;
use super::{CausalLm, ModelConfig};
use crate::io::{write_bytes, write_json, write_safetensors};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// transformers' default `max_shard_size`.
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Files copied from the base model folder when present.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

fn dtype_of(name: Option<&str>) -> Option<DType> {
    match name? {
        "float32" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        _ => None,
    }
}

/// Writes the config's bos/eos/pad ids (those it has) into a `config.json` or
/// `generation_config.json` object.
fn put_special_ids(obj: &mut serde_json::Map<String, serde_json::Value>, config: &ModelConfig) {
    for (key, id) in [
        ("bos_token_id", &config.bos_token_id),
        ("eos_token_id", &config.eos_token_id),
        ("pad_token_id", &config.pad_token_id),
    ] {
        if let Some(id) = id {
            obj.insert(key.into(), id.clone());
        }
    }
}

/// Splits tensors into shards of at most `max_bytes` (a tensor larger than that gets its own).
pub fn shard(tensors: Vec<(String, Tensor)>, max_bytes: usize) -> Vec<Vec<(String, Tensor)>> {
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if size + bytes > max_bytes && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name, t));
        }
    }
    shards
}

/// Writes `model` as a transformers model folder in `out_dir`, in the dtype of the base's
/// config (`torch_dtype`), copying the tokenizer and template files from `base_dir`.
pub fn save_pretrained(
    model: &CausalLm,
    base_dir: &Path,
    out_dir: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    let quantized = model.quantized_modules();
    if let Some(first) = quantized.first() {
        return Err(Error::Config(format!(
            "cannot save a model whose linear weights are quantized ({first} and {} more): \
             dequantize it first (merge does this)",
            quantized.len() - 1
        )));
    }
    write_folder(model, false, base_dir, out_dir, max_shard_bytes)
}

/// [`save_pretrained`] for a model whose linear weights may be quantized: they are written
/// dequantized (what a quantized base computes with, e.g. the base LoftQ leaves, which loading
/// with the same quantization gives back).
pub fn save_dequantized(
    model: &CausalLm,
    base_dir: &Path,
    out_dir: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    write_folder(model, true, base_dir, out_dir, max_shard_bytes)
}

/// Writes the folder of [`save_pretrained`]; `dequantize` writes quantized linear weights
/// dequantized (one at a time).
fn write_folder(
    model: &CausalLm,
    dequantize: bool,
    base_dir: &Path,
    out_dir: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    let dtype = dtype_of(model.config.saved_dtype()).unwrap_or(model.dtype);
    let mut tensors: Vec<(String, Tensor)> = model
        .named_weights()
        .into_iter()
        .map(|(n, p)| Ok((n, Param::tensor(p).to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    if dequantize {
        for lin in model.base_linears() {
            if let LinearWeight::Quantized(q) = &lin.weight {
                tensors.push((
                    format!("{}.weight", lin.name),
                    q.dequantize()?.to_dtype(dtype)?,
                ));
            }
        }
    }
    if model.config.wrapper.is_some() {
        // A multimodal wrapper: its text model in the checkpoint's original layout, and every
        // other tensor (vision tower, projector) copied from the base as it is.
        for (name, _) in tensors.iter_mut() {
            *name = model.config.stored_name(name);
        }
        let written: std::collections::HashSet<String> =
            tensors.iter().map(|(n, _)| n.clone()).collect();
        let base = super::weights::Weights::from_dir(base_dir)?;
        let text = |n: &str| {
            model
                .config
                .name_aliases()
                .iter()
                .any(|(stored, module)| n.starts_with(stored) || n.starts_with(module))
        };
        for name in base.names() {
            if !written.contains(name) && !text(name) {
                tensors.push((name.clone(), base.get_raw(name, &candle_core::Device::Cpu)?));
            }
        }
    }
    let total: usize = tensors
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    let shards = shard(tensors, max_shard_bytes);
    if shards.len() == 1 {
        write_safetensors(&out_dir.join("model.safetensors"), &shards[0])?;
    } else {
        let mut weight_map = serde_json::Map::new();
        let count = shards.len();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
            for (name, _) in shard {
                weight_map.insert(name.clone(), file.clone().into());
            }
            write_safetensors(&out_dir.join(&file), shard)?;
        }
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&out_dir.join("model.safetensors.index.json"), &index)?;
    }
    let config_path = base_dir.join("config.json");
    let mut config: serde_json::Value = crate::io::read_json(&config_path)?;
    if let Some(obj) = config.as_object_mut() {
        let name = match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        // transformers 5 writes `dtype`, older versions `torch_dtype`: keep the file's own key.
        let key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.into(), name.into());
        // A chat-format setup may have grown the vocabulary and changed the special tokens.
        match obj.get_mut("text_config").and_then(|t| t.as_object_mut()) {
            // A multimodal wrapper: the text model's own config.
            Some(text) if model.config.wrapper.is_some() => {
                text.insert("vocab_size".into(), model.config.vocab_size.into());
            }
            _ => {
                obj.insert("vocab_size".into(), model.config.vocab_size.into());
            }
        }
        // A merged `modules_to_save` head is the model's own, no longer the embedding.
        if !model.config.tie_word_embeddings {
            obj.insert("tie_word_embeddings".into(), false.into());
        }
        put_special_ids(obj, &model.config);
        // The saved weights are full precision: a bitsandbytes checkpoint's quantization config
        // no longer applies.
        obj.remove("quantization_config");
    }
    write_json(&out_dir.join("config.json"), &config)?;
    for file in SIDE_FILES {
        let src = base_dir.join(file);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_bytes(&out_dir.join(file), &bytes)?;
        }
    }
    let generation = out_dir.join("generation_config.json");
    if model.config.special_ids_changed && generation.exists() {
        let mut config: serde_json::Value = crate::io::read_json(&generation)?;
        if let Some(obj) = config.as_object_mut() {
            put_special_ids(obj, &model.config);
        }
        write_json(&generation, &config)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_size_limit() {
        let t = |n: usize| Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu).unwrap();
        let parts = shard(
            vec![
                ("a".into(), t(10)),
                ("b".into(), t(10)),
                ("c".into(), t(30)),
            ],
            80,
        );
        let names: Vec<Vec<&str>> = parts
            .iter()
            .map(|s| s.iter().map(|(n, _)| n.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["a", "b"], vec!["c"]]);
    }
}
