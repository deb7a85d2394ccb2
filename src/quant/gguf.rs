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

/// Where llama.cpp stores a Hugging Face weight: a tensor of its own, or one expert's slice of
/// the tensor that stacks a mixture's experts (`blk.N.ffn_{gate,up,down}_exps.weight`, the
/// expert the outermost dimension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The GGUF tensor name.
    pub name: String,
    /// The expert's index in a stacked tensor.
    pub expert: Option<usize>,
}

/// The GGUF name of a Hugging Face weight name (`model.*` paths), per llama.cpp's converter for
/// the `llama` architecture and its kin (Qwen2/3, SmolLM3).
pub fn gguf_name(hf: &str) -> Option<String> {
    llama_cpp_tensor("llama", hf)
        .filter(|s| s.expert.is_none())
        .map(|s| s.name)
}

/// Where llama.cpp's architecture `arch` stores Hugging Face weight `hf` (a `model.*` path or
/// `lm_head.weight`), per its converter: Gemma 2/3's norms around the attention and MLP, Phi-3's
/// fused `attn_qkv` and `ffn_up` (gate rows first), a mixture's router (`ffn_gate_inp`) and its
/// experts stacked per projection (Mixtral's `w1`/`w3`/`w2` are gate/up/down).
pub fn llama_cpp_tensor(arch: &str, hf: &str) -> Option<Stored> {
    let plain = |name: &str| {
        Some(Stored {
            name: name.to_string(),
            expert: None,
        })
    };
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = module.rsplit_once('.')?;
    // One expert of a mixture: `mlp.experts.E.gate_proj` (Qwen3-MoE) or
    // `block_sparse_moe.experts.E.w1` (Mixtral).
    let expert = module
        .strip_prefix("mlp.experts.")
        .or_else(|| module.strip_prefix("block_sparse_moe.experts."))
        .and_then(|r| r.split_once('.'))
        .and_then(|(e, proj)| Some((e.parse::<usize>().ok()?, proj)));
    if let Some((e, proj)) = expert {
        let stacked = match proj {
            "gate_proj" | "w1" => "ffn_gate_exps",
            "up_proj" | "w3" => "ffn_up_exps",
            "down_proj" | "w2" => "ffn_down_exps",
            _ => return None,
        };
        return (kind == "weight").then(|| Stored {
            name: format!("blk.{layer}.{stacked}.weight"),
            expert: Some(e),
        });
    }
    let gemma = matches!(arch, "gemma2" | "gemma3");
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        _ => return None,
    };
    plain(&format!("blk.{layer}.{short}.{kind}"))
}

/// The Hugging Face names a model of llama.cpp architecture `arch` with `layers` layers (and
/// `experts` experts per mixture) can have, for [`llama_cpp_tensor`] to place.
fn hf_names(arch: &str, layers: usize, experts: usize) -> Vec<String> {
    let mut out: Vec<String> = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    .map(String::from)
    .to_vec();
    let mut modules = vec![
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "mlp.down_proj",
    ];
    if arch == "phi3" {
        modules.extend(["self_attn.qkv_proj", "mlp.gate_up_proj"]);
    } else {
        modules.extend([
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ]);
    }
    if matches!(arch, "gemma2" | "gemma3") {
        modules.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
    }
    // Qwen3-MoE's module names, or Mixtral's (llama with experts).
    let (router, experts_at, projections) = match arch {
        "qwen3moe" => (
            "mlp.gate",
            "mlp.experts",
            ["gate_proj", "up_proj", "down_proj"],
        ),
        _ => (
            "block_sparse_moe.gate",
            "block_sparse_moe.experts",
            ["w1", "w3", "w2"],
        ),
    };
    if experts > 0 {
        modules.push(router);
    }
    for i in 0..layers {
        for m in &modules {
            for kind in ["weight", "bias"] {
                out.push(format!("model.layers.{i}.{m}.{kind}"));
            }
        }
        for e in 0..experts {
            for p in projections {
                out.push(format!("model.layers.{i}.{experts_at}.{e}.{p}.weight"));
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
        let experts = gguf.u64_key("expert_count").unwrap_or(0) as usize;
        if experts > gguf.content.tensor_infos.len() * 1024 {
            return Err(gguf.bad(format!("expert_count {experts} is not a plausible count")));
        }
        let names: BTreeSet<String> = hf_names(&gguf.arch, layers, experts)
            .into_iter()
            .filter(|n| {
                llama_cpp_tensor(&gguf.arch, n).is_some_and(|s| {
                    gguf.content.tensor_infos.get(&s.name).is_some_and(|info| {
                        // An expert's slice exists when the stack has that many experts.
                        s.expert.is_none_or(|e| {
                            info.shape.dims().len() == 3 && e < info.shape.dims()[0]
                        })
                    })
                })
            })
            .collect();
        gguf.names = names;
        Ok(gguf)
    }

    /// llama.cpp's architecture of the file (`general.architecture`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Experts per mixture-of-experts layer (0 for dense models).
    pub fn experts(&self) -> usize {
        self.u64_key("expert_count").unwrap_or(0) as usize
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

    /// A float array metadata value.
    fn f64_array(&self, key: &str) -> Option<Vec<f64>> {
        match self.arch_key(key)? {
            Value::Array(values) => values
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Some(*x as f64),
                    Value::F64(x) => Some(*x),
                    other => other.to_u64().ok().map(|x| x as f64),
                })
                .collect(),
            _ => None,
        }
    }

    /// Reads a small f32 tensor (RoPE factors) whole.
    fn vector(&self, name: &str) -> Result<Vec<f64>> {
        let mut file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self
            .content
            .tensor(&mut file, name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// Which layers slide (Gemma 2/3): `attention.sliding_window_pattern` as a per-layer flag
    /// array or a period, else llama.cpp's default period (`period - 1` sliding layers, then a
    /// global one).
    fn sliding_layers(&self, layers: usize, period: usize) -> Vec<bool> {
        if let Some(flags) = self.f64_array("attention.sliding_window_pattern") {
            return flags.into_iter().map(|f| f != 0.0).collect();
        }
        let flags: Option<Vec<bool>> = match self.arch_key("attention.sliding_window_pattern") {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Some(*b),
                    _ => None,
                })
                .collect(),
            _ => None,
        };
        if let Some(flags) = flags {
            return flags;
        }
        let period = self
            .u64_key("attention.sliding_window_pattern")
            .map_or(period, |p| p as usize)
            .max(1);
        (0..layers).map(|i| i % period < period - 1).collect()
    }

    /// A transformers `config.json` equivalent of the metadata, for the architectures peft-sft
    /// implements, computing what llama.cpp computes from the file (Gemma's attention scale by
    /// head size as llama.cpp hard-codes it, its default sliding patterns and soft caps).
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let experts = self.u64_key("expert_count").unwrap_or(0);
        let (architecture, model_type) = match self.arch.as_str() {
            "llama" if experts > 0 => ("MixtralForCausalLM", "mixtral"),
            "llama" => ("LlamaForCausalLM", "llama"),
            "smollm3" => ("SmolLM3ForCausalLM", "smollm3"),
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
            "qwen3moe" => ("Qwen3MoeForCausalLM", "qwen3_moe"),
            "gemma" => ("GemmaForCausalLM", "gemma"),
            "gemma2" => ("Gemma2ForCausalLM", "gemma2"),
            "gemma3" => ("Gemma3ForCausalLM", "gemma3_text"),
            "phi3" => ("Phi3ForCausalLM", "phi3"),
            other => {
                return Err(Error::UnsupportedArchitecture {
                    name: format!("GGUF architecture `{other}`"),
                    supported:
                        "llama (incl. Mixtral's experts), qwen2, qwen3, qwen3moe, smollm3, gemma, gemma2, gemma3, phi3"
                            .into(),
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
        let layers = self.u64_key("block_count")? as usize;
        match self.arch.as_str() {
            "gemma" | "gemma2" | "gemma3" => {
                config["hidden_activation"] = json!("gelu_pytorch_tanh");
                config["tie_word_embeddings"] = json!(true);
                // llama.cpp scales scores by 1/sqrt(head size), but by 1/sqrt(hidden / heads)
                // for the 46-layer Gemma 2 (27B) and the 62-layer Gemma 3 (27B), by layer count.
                let big = (self.arch == "gemma2" && layers == 46)
                    || (self.arch == "gemma3" && layers == 62);
                let scalar = if big { hidden / heads } else { head_dim };
                config["query_pre_attn_scalar"] = json!(scalar);
            }
            _ => {}
        }
        if matches!(self.arch.as_str(), "gemma2" | "gemma3") {
            let (period, window) = if self.arch == "gemma2" {
                (2, 4096)
            } else {
                (6, 0)
            };
            let window = self.u64_key("attention.sliding_window").unwrap_or(window);
            let sliding = self.sliding_layers(layers, period);
            let types: Vec<&str> = (0..layers)
                .map(
                    |i| match window > 0 && sliding.get(i).copied().unwrap_or(false) {
                        true => "sliding_attention",
                        false => "full_attention",
                    },
                )
                .collect();
            config["layer_types"] = json!(types);
            config["sliding_window"] = json!(window.max(1));
            if self.arch == "gemma2" {
                config["attn_logit_softcapping"] =
                    json!(self.f64_key("attn_logit_softcapping").unwrap_or(50.0));
                config["final_logit_softcapping"] =
                    json!(self.f64_key("final_logit_softcapping").unwrap_or(30.0));
            } else {
                config["final_logit_softcapping"] = json!(self.f64_key("final_logit_softcapping"));
                config["rope_local_base_freq"] =
                    json!(self.f64_key("rope.freq_base_swa").unwrap_or(10_000.0));
            }
        }
        if experts > 0 {
            let used = self.u64_key("expert_used_count")?;
            config["num_experts_per_tok"] = json!(used);
            config["num_local_experts"] = json!(experts);
            if self.arch == "qwen3moe" {
                // llama.cpp's qwen3moe renormalises the top k and routes every layer.
                let ff = self
                    .u64_key("expert_feed_forward_length")
                    .unwrap_or(self.u64_key("feed_forward_length")? / used.max(1));
                config["moe_intermediate_size"] = json!(ff);
                config["norm_topk_prob"] = json!(true);
                config["decoder_sparse_step"] = json!(1);
            }
        }
        if self.arch == "phi3" {
            let rotary = self.u64_key("rope.dimension_count").unwrap_or(head_dim);
            config["partial_rotary_factor"] = json!(rotary as f64 / head_dim as f64);
            // llama.cpp's phi3 attends without a sliding window.
            config["sliding_window"] = serde_json::Value::Null;
            let has = |n: &str| self.content.tensor_infos.contains_key(n);
            if has("rope_factors_long.weight") && has("rope_factors_short.weight") {
                let original = self
                    .u64_key("rope.scaling.original_context_length")
                    .map_err(|_| {
                        self.bad(
                            "LongRoPE factors without rope.scaling.original_context_length".into(),
                        )
                    })?;
                config["rope_scaling"] = json!({
                    "rope_type": "longrope",
                    "short_factor": self.vector("rope_factors_short.weight")?,
                    "long_factor": self.vector("rope_factors_long.weight")?,
                    "original_max_position_embeddings": original,
                    "attention_factor": self.f64_key("rope.scaling.attn_factor").unwrap_or(1.0),
                });
                config["original_max_position_embeddings"] = json!(original);
            }
        }
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

    /// Whether llama.cpp stores this architecture's norm weights as `1 + w` (Gemma's).
    fn offsets_norms(&self) -> bool {
        matches!(self.arch.as_str(), "gemma" | "gemma2" | "gemma3")
    }

    /// Reads one expert's slice of a stacked `[experts, out, in]` tensor: its bytes only.
    fn expert_slice(&self, name: &str, expert: usize) -> Result<QTensor> {
        use std::io::{Read, Seek, SeekFrom};
        let info = &self.content.tensor_infos[name];
        let dims = info.shape.dims();
        let per_expert = dims[1] * dims[2];
        let dtype = info.ggml_dtype;
        let bytes = per_expert / dtype.block_size() * dtype.type_size();
        let mut file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let start = self.content.tensor_data_offset + info.offset + (expert * bytes) as u64;
        let mut data = vec![0u8; bytes];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(QTensor::new(
            QStorage::from_data(Cow::Owned(data), &Device::Cpu, dtype)?,
            (dims[1], dims[2]),
        )?)
    }

    /// Reads the tensor with Hugging Face name `hf` onto `device`, in Hugging Face layout (llama's
    /// query/key rows un-permuted, Gemma's norms without llama.cpp's `+1`, one expert of a stack).
    pub fn tensor(&self, hf: &str, device: &Device) -> Result<QTensor> {
        let stored = llama_cpp_tensor(&self.arch, hf)
            .filter(|_| self.names.contains(hf))
            .ok_or_else(|| Error::Tensor {
                name: hf.into(),
                message: format!("missing from {}", self.path.display()),
            })?;
        let name = stored.name;
        let t = match stored.expert {
            Some(e) => self.expert_slice(&name, e)?,
            None => {
                let mut file =
                    std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
                self.content.tensor(&mut file, &name, &Device::Cpu)?
            }
        };
        let t = if self.offsets_norms() && hf.ends_with("norm.weight") {
            let w = t.dequantize(&Device::Cpu)?.affine(1.0, -1.0)?;
            QTensor::quantize(&w, GgmlDType::F32)?
        } else {
            t
        };
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
            .filter_map(|hf| {
                llama_cpp_tensor(&self.arch, hf)
                    .filter(|s| s.expert.is_none())
                    .map(|s| (s.name, hf))
            })
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
        for hf in hf_names("llama", 2, 0) {
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
