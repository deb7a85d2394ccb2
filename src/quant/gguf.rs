//! llama.cpp's GGUF files as a frozen base: the metadata becomes a transformers-style config, the
//! tensor names map to Hugging Face module names (so adapters trained on a GGUF base are saved
//! with PEFT's names), and the query/key rows llama.cpp permutes for its RoPE layout are restored
//! to the Hugging Face order.

use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// An open GGUF model file.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    arch: String,
    /// Hugging Face names of the tensors present.
    names: BTreeSet<String>,
}

/// The GGUF name of a Hugging Face weight name, per llama.cpp's converter.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = module.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// Every Hugging Face name [`gguf_name`] knows for a model of `layers` layers.
fn hf_names(layers: usize) -> Vec<String> {
    let mut out: Vec<String> = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..layers {
        for m in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "self_attn.q_norm",
            "self_attn.k_norm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            for kind in ["weight", "bias"] {
                out.push(format!("model.layers.{i}.{m}.{kind}"));
            }
        }
    }
    out
}

impl GgufFile {
    /// Reads the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            message: format!("not a readable GGUF file: {e}"),
        })?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: "no general.architecture in the GGUF metadata".into(),
            })?;
        let mut gguf = GgufFile {
            path: path.to_path_buf(),
            content,
            arch,
            names: BTreeSet::new(),
        };
        let layers = gguf.u64_key("block_count")? as usize;
        // Each layer has tensors in the file: a larger count is a damaged header (and would
        // make the name list as large as it claims).
        if layers > gguf.content.tensor_infos.len() {
            return Err(gguf.bad(format!(
                "block_count {layers} is more than the file's {} tensors",
                gguf.content.tensor_infos.len()
            )));
        }
        gguf.names = hf_names(layers)
            .into_iter()
            .filter(|n| gguf_name(n).is_some_and(|g| gguf.content.tensor_infos.contains_key(&g)))
            .collect();
        Ok(gguf)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hugging Face names of the tensors in the file.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    fn bad(&self, message: String) -> Error {
        Error::Parse {
            path: self.path.clone(),
            line: None,
            message,
        }
    }

    /// A metadata value by full key.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn arch_key(&self, key: &str) -> Option<&Value> {
        self.metadata(&format!("{}.{key}", self.arch))
    }

    fn u64_key(&self, key: &str) -> Result<u64> {
        self.arch_key(key)
            .and_then(|v| v.to_u64().ok())
            .ok_or_else(|| self.bad(format!("GGUF metadata lacks {}.{key}", self.arch)))
    }

    fn f64_key(&self, key: &str) -> Option<f64> {
        self.arch_key(key).and_then(|v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            other => other.to_u64().ok().map(|x| x as f64),
        })
    }

    fn token_id(&self, key: &str) -> Option<u64> {
        self.metadata(&format!("tokenizer.ggml.{key}"))
            .and_then(|v| v.to_u64().ok())
    }

    /// A transformers `config.json` equivalent of the metadata, for the architectures peft-sft
    /// implements (`llama`, `qwen2`, `qwen3`).
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let (architecture, model_type) = match self.arch.as_str() {
            "llama" => ("LlamaForCausalLM", "llama"),
            "smollm3" => ("SmolLM3ForCausalLM", "smollm3"),
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
            other => {
                return Err(Error::UnsupportedArchitecture {
                    name: format!("GGUF architecture `{other}`"),
                    supported: "llama, qwen2, qwen3, smollm3".into(),
                })
            }
        };
        let hidden = self.u64_key("embedding_length")?;
        let heads = self.u64_key("attention.head_count")?;
        let kv_heads = self.u64_key("attention.head_count_kv").unwrap_or(heads);
        let head_dim = self
            .u64_key("attention.key_length")
            .unwrap_or(hidden / heads);
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.bad("no token_embd.weight tensor".into()))?;
        let vocab = embd.shape.dims()[0];
        let mut config = json!({
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self.u64_key("feed_forward_length")?,
            "num_hidden_layers": self.u64_key("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": self.f64_key("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            "rope_theta": self.f64_key("rope.freq_base").unwrap_or(10000.0),
            "max_position_embeddings": self.u64_key("context_length").unwrap_or(4096),
            "vocab_size": vocab,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "attention_bias": self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            "dtype": "float32",
        });
        if self.arch == "smollm3" {
            // llama.cpp's smollm3: RoPE skipped on every 4th layer, hard-coded (no GGUF key).
            let layers = self.u64_key("block_count")?;
            let flags: Vec<u8> = (0..layers)
                .map(|i| u8::from(!(i + 1).is_multiple_of(4)))
                .collect();
            config["no_rope_layers"] = json!(flags);
            config["no_rope_layer_interval"] = json!(4);
        }
        for (key, field) in [
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
        ] {
            if let Some(id) = self.token_id(key) {
                config[field] = json!(id);
            }
        }
        if let Some(factor) = self.f64_key("rope.scaling.factor") {
            let kind = self
                .arch_key("rope.scaling.type")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_else(|| "linear".into());
            if kind == "linear" {
                config["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
            }
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let mut file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
            let factors = self
                .content
                .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .to_vec1::<f32>()?;
            let factors: Vec<f64> = factors.into_iter().map(f64::from).collect();
            config["rope_scaling"] = json!({"rope_type": "freq_factors", "freq_factors": factors});
        }
        Ok(config)
    }

    /// The chat template stored in the metadata.
    pub fn chat_template(&self) -> Option<String> {
        self.metadata("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    /// Reads the tensor with Hugging Face name `hf` onto `device`, in Hugging Face layout (llama's
    /// query/key rows un-permuted).
    pub fn tensor(&self, hf: &str, device: &Device) -> Result<QTensor> {
        let name = gguf_name(hf)
            .filter(|_| self.names.contains(hf))
            .ok_or_else(|| Error::Tensor {
                name: hf.into(),
                message: format!("missing from {}", self.path.display()),
            })?;
        let mut file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let t = self.content.tensor(&mut file, &name, &Device::Cpu)?;
        let heads = match hf {
            _ if !self.permutes_heads() => None,
            n if n.ends_with("self_attn.q_proj.weight") || n.ends_with("self_attn.q_proj.bias") => {
                Some(self.u64_key("attention.head_count")? as usize)
            }
            n if n.ends_with("self_attn.k_proj.weight") || n.ends_with("self_attn.k_proj.bias") => {
                Some(
                    self.u64_key("attention.head_count_kv")
                        .or_else(|_| self.u64_key("attention.head_count"))?
                        as usize,
                )
            }
            _ => None,
        };
        let t = match heads {
            Some(h) => unpermute_rows(&t, h)?,
            None => t,
        };
        if device.is_cpu() {
            return Ok(t);
        }
        let data = t.data()?;
        Ok(QTensor::new(
            QStorage::from_data(data, device, t.dtype())?,
            t.shape().clone(),
        )?)
    }
}

/// Undoes llama.cpp's query/key permutation: its row `h*d + 2j + t` is Hugging Face's row
/// `h*d + t*d/2 + j` (per head of `d` rows, the two rotation halves interleaved). Rows of a
/// quantized tensor are whole blocks, so the bytes move without dequantizing.
fn unpermute_rows(t: &QTensor, heads: usize) -> Result<QTensor> {
    let dims = t.shape().dims().to_vec();
    let rows = dims[0];
    let row_bytes = t.storage_size_in_bytes() / rows;
    let d = rows / heads;
    let data = t.data()?;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..d / 2 {
            for half in 0..2 {
                let src = h * d + 2 * j + half;
                let dst = h * d + half * (d / 2) + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(QTensor::new(
        QStorage::from_data(Cow::Owned(out), &Device::Cpu, t.dtype())?,
        dims,
    )?)
}

/// Whether a GGUF type is stored unquantized (such tensors load as plain weights).
pub fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Llama.cpp's query/key permutation of a dense `[rows, in]` weight (or `[rows]` bias): Hugging
/// Face row `h*d + t*d/2 + j` becomes row `h*d + 2j + t`.
pub(crate) fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let d = dims[0] / heads;
    let cols = t.elem_count() / dims[0];
    Ok(t.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

impl GgufFile {
    /// The number of heads whose rows llama.cpp permutes in tensor `hf`, if it does.
    /// Whether llama.cpp stores this architecture's query/key rows permuted (its `llama`
    /// converter's layout, which `smollm3` inherits).
    fn permutes_heads(&self) -> bool {
        matches!(self.arch.as_str(), "llama" | "smollm3")
    }

    fn permuted_heads(&self, hf: &str) -> Result<Option<usize>> {
        if !self.permutes_heads() {
            return Ok(None);
        }
        let heads = self.u64_key("attention.head_count")? as usize;
        Ok(if hf.contains("self_attn.q_proj.") {
            Some(heads)
        } else if hf.contains("self_attn.k_proj.") {
            Some(
                self.u64_key("attention.head_count_kv")
                    .unwrap_or(heads as u64) as usize,
            )
        } else {
            None
        })
    }

    /// Writes a copy of this file to `out` in which every tensor named in `replaced` (Hugging Face
    /// names, full-precision values in Hugging Face layout) is quantized to the type given with it,
    /// or to the type it had here; every other tensor and all metadata are copied unchanged.
    pub fn write_replacing(
        &self,
        replaced: &HashMap<String, (Tensor, Option<GgmlDType>)>,
        out: &Path,
    ) -> Result<()> {
        let hf_of: HashMap<String, &String> = self
            .names
            .iter()
            .filter_map(|hf| gguf_name(hf).map(|g| (g, hf)))
            .collect();
        let mut infos: Vec<(&String, u64)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n, i.offset))
            .collect();
        infos.sort_by_key(|(_, offset)| *offset);
        let mut file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, _) in infos {
            let original = self.content.tensor(&mut file, name, &Device::Cpu)?;
            let new = match hf_of
                .get(name)
                .and_then(|hf| replaced.get(*hf).map(|t| (hf, t)))
            {
                Some((hf, (value, dtype))) => {
                    let value = value.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                    let value = match self.permuted_heads(hf)? {
                        Some(h) => permute_rows(&value, h)?,
                        None => value,
                    };
                    QTensor::quantize(&value, dtype.unwrap_or(original.dtype()))?
                }
                None => original,
            };
            tensors.push((name.clone(), new));
        }
        let metadata: Vec<(&str, &Value)> = self
            .content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        crate::io::write_atomic(out, |tmp| {
            let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
            let mut w = std::io::BufWriter::new(file);
            candle_core::quantized::gguf_file::write(&mut w, &metadata, &refs)?;
            std::io::Write::flush(&mut w).map_err(|e| Error::io(tmp, e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuting_quantized_rows_equals_quantizing_unpermuted_rows() {
        // Rows are whole quantization blocks, so llama.cpp's Q/K permutation commutes with
        // quantization: un-permuting the bytes must give exactly the quantized HF weight.
        let w = Tensor::randn(0f32, 1.0, (16, 256), &Device::Cpu).unwrap();
        let permuted = permute_rows(&w, 2).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
            GgmlDType::F16,
        ] {
            let restored =
                unpermute_rows(&QTensor::quantize(&permuted, dtype).unwrap(), 2).unwrap();
            let direct = QTensor::quantize(&w, dtype).unwrap();
            assert_eq!(
                restored.data().unwrap(),
                direct.data().unwrap(),
                "{dtype:?}"
            );
            assert_eq!(restored.shape().dims(), &[16, 256]);
        }
    }

    #[test]
    fn names_map_both_ways_for_every_module() {
        for hf in hf_names(2) {
            let g = gguf_name(&hf).unwrap();
            assert!(!g.contains("model."), "{hf} -> {g}");
        }
        assert_eq!(
            gguf_name("model.layers.1.mlp.down_proj.weight").as_deref(),
            Some("blk.1.ffn_down.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
    }
}
