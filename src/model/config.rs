//! The model's `config.json`, read as Hugging Face writes it, for the decoder families peft-sft
//! implements: Llama (incl. SmolLM2 and Llama 3), Mistral, Qwen2, Qwen3, SmolLM3, Gemma, Gemma 2,
//! Gemma 3 (text) and Phi-3 (incl. Phi-3.5-mini and Phi-4-mini).

use crate::ops::attention::Scores;
use crate::ops::glu::Activation;
use crate::ops::layer::steps::Layout;
use crate::ops::rope::RopeScaling;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The decoder family, which decides the few places the architectures differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM, SmolLM2, TinyLlama ...).
    Llama,
    /// `MistralForCausalLM`: Llama with an optional sliding window.
    Mistral,
    /// `Qwen2ForCausalLM`: bias on q/k/v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on queries and keys per head, explicit head_dim.
    Qwen3,
    /// `SmolLM3ForCausalLM`: layers marked 0 in `no_rope_layers` skip RoPE.
    SmolLm3,
    /// `GemmaForCausalLM`: norms scale by `1 + w`, embeddings by √hidden, GeGLU MLP.
    Gemma,
    /// `Gemma2ForCausalLM`: Gemma with norms on the attention and MLP outputs,
    /// `query_pre_attn_scalar`, soft-capped attention scores and logits, and sliding-window
    /// layers alternating with global ones.
    Gemma2,
    /// `Gemma3ForCausalLM` (the text model): Gemma 2 without soft-capping, with per-head q/k
    /// norms and a RoPE base of its own for the sliding-window layers.
    Gemma3,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5-mini, Phi-4-mini): fused `qkv_proj` and `gate_up_proj`,
    /// `partial_rotary_factor`, LongRoPE.
    Phi3,
    /// `MixtralForCausalLM`: Mistral with a mixture of experts in every layer (router softmax,
    /// top-k renormalised).
    Mixtral,
    /// `Qwen3MoeForCausalLM`: Qwen3 with a mixture of experts (`norm_topk_prob`,
    /// `decoder_sparse_step`, `mlp_only_layers`).
    Qwen3Moe,
}

impl Family {
    /// Gemma, Gemma 2 or Gemma 3.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3)
    }
}

/// A layer's mixture of experts as config.json describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Whether the top-k routing weights are renormalised to sum to 1.
    pub normalize: bool,
    /// Each expert's intermediate width.
    pub intermediate: usize,
    /// Module names under the layer: the router, the experts' list, and each expert's gate, up
    /// and down projections.
    pub names: [&'static str; 5],
}

/// The architectures (config.json `architectures`) peft-sft can load.
pub const SUPPORTED_ARCHITECTURES: &[(&str, Family)] = &[
    ("LlamaForCausalLM", Family::Llama),
    ("MistralForCausalLM", Family::Mistral),
    ("Qwen2ForCausalLM", Family::Qwen2),
    ("Qwen3ForCausalLM", Family::Qwen3),
    ("SmolLM3ForCausalLM", Family::SmolLm3),
    ("GemmaForCausalLM", Family::Gemma),
    ("Gemma2ForCausalLM", Family::Gemma2),
    ("Gemma3ForCausalLM", Family::Gemma3),
    ("Phi3ForCausalLM", Family::Phi3),
    ("MixtralForCausalLM", Family::Mixtral),
    ("Qwen3MoeForCausalLM", Family::Qwen3Moe),
];

/// The error for an architecture peft-sft does not implement, naming those it does (and, for
/// Gemma 3's multimodal wrapper, which Gemma 3 checkpoints load).
fn unsupported(name: String) -> Error {
    let mut supported = SUPPORTED_ARCHITECTURES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ");
    supported.push_str(" (and Gemma3ForConditionalGeneration's text model)");
    Error::UnsupportedArchitecture { name, supported }
}

/// Multimodal checkpoints whose text model peft-sft trains (the vision tower stays as it is).
const WRAPPERS: &[&str] = &["Gemma3ForConditionalGeneration"];

/// Gemma 3's text config inside a `Gemma3ForConditionalGeneration` config.json, with what
/// transformers' `Gemma3TextConfig` defaults to where the file leaves a field out (the Hub's
/// configs name only a few) and the special ids of the outer config: `(wrapper, text config)`.
fn wrapped_text_config(raw: &serde_json::Value) -> Option<(String, serde_json::Value)> {
    let wrapper = raw["architectures"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str())
        .find(|a| WRAPPERS.contains(a))?;
    let mut text = raw.get("text_config")?.as_object()?.clone();
    let defaults = serde_json::json!({
        "model_type": "gemma3_text", "vocab_size": 262_208, "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "tie_word_embeddings": true
    });
    for (key, value) in defaults.as_object()? {
        text.entry(key.clone()).or_insert_with(|| value.clone());
    }
    for key in [
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    ] {
        if let Some(v) = raw.get(key).filter(|v| !v.is_null()) {
            if text.get(key).is_none_or(|t| t.is_null()) {
                text.insert(key.into(), v.clone());
            }
        }
    }
    for key in ["dtype", "torch_dtype"] {
        if let Some(v) = raw.get(key) {
            text.entry(key.to_string()).or_insert_with(|| v.clone());
        }
    }
    text.remove("architectures");
    Some((wrapper.to_string(), serde_json::Value::Object(text)))
}

/// Refuses a config.json whose `architectures` (or, without them, `model_type`) names no family
/// peft-sft implements.
fn known_architecture(raw: &serde_json::Value) -> Result<()> {
    let architectures: Vec<&str> = raw["architectures"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let model_type = raw["model_type"].as_str().unwrap_or("");
    let known_arch = architectures
        .iter()
        .any(|a| SUPPORTED_ARCHITECTURES.iter().any(|(n, _)| n == a) || WRAPPERS.contains(a));
    let known_type = MODEL_TYPES.iter().any(|(t, _)| *t == model_type);
    match (architectures.first(), known_arch || known_type) {
        (_, true) => Ok(()),
        (Some(first), false) => Err(unsupported(first.to_string())),
        // Neither names anything: the strict parse says what is missing.
        (None, false) if model_type.is_empty() => Ok(()),
        (None, false) => Err(unsupported(model_type.to_string())),
    }
}

/// config.json `model_type`s of the families, for configs without `architectures`.
const MODEL_TYPES: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("smollm3", Family::SmolLm3),
    ("gemma", Family::Gemma),
    ("gemma2", Family::Gemma2),
    ("gemma3_text", Family::Gemma3),
    ("phi3", Family::Phi3),
    ("mixtral", Family::Mixtral),
    ("qwen3_moe", Family::Qwen3Moe),
];

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) as stored in config.json
/// (`rope_type`, or the older `type`).
#[derive(Debug, Clone, Deserialize)]
struct RawRopeScaling {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    /// Per-frequency divisors (`rope_type = "freq_factors"`, set from a GGUF file's `rope_freqs`).
    freq_factors: Option<Vec<f64>>,
    /// LongRoPE: per-frequency divisors within the original context.
    short_factor: Option<Vec<f64>>,
    /// LongRoPE: per-frequency divisors past it.
    long_factor: Option<Vec<f64>>,
    /// LongRoPE: the factor on cos and sin (default from `factor`).
    attention_factor: Option<f64>,
    /// transformers 5 keeps `partial_rotary_factor` here.
    partial_rotary_factor: Option<f64>,
    /// Gemma 3 (transformers 5): the parameters of the global layers.
    full_attention: Option<Box<RawRopeScaling>>,
    /// Gemma 3 (transformers 5): the parameters of the sliding-window layers.
    sliding_attention: Option<Box<RawRopeScaling>>,
}

/// config.json fields peft-sft reads; unknown fields are kept by transformers and ignored here.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    /// Architecture names, e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `model_type`, e.g. `llama`.
    #[serde(default)]
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4; transformers 5 keeps it in `rope_parameters`).
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<RawRopeScaling>,
    #[serde(default)]
    rope_parameters: Option<RawRopeScaling>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Longest context the model was trained for.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on the attention projections (Llama/SmolLM3: q, k, v and o).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral/Qwen sliding-window width.
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether the sliding window is used at all.
    pub use_sliding_window: Option<bool>,
    /// SmolLM3: 1 for layers that apply RoPE, 0 for layers that do not.
    pub no_rope_layers: Option<Vec<u8>>,
    /// Activation of the MLP (`silu`; Gemma's `gelu_pytorch_tanh` is in `hidden_activation`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Gemma: the MLP's activation (`gelu_pytorch_tanh` when absent).
    pub hidden_activation: Option<String>,
    /// Gemma 2/3: attention scores are scaled by `query_pre_attn_scalar^-½` (not `head_dim^-½`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: attention scores are soft-capped, `cap · tanh(s / cap)`.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: the final logits are soft-capped.
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3 (transformers 4): the RoPE base of the sliding-window layers.
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3 (transformers 4): every n-th layer is global, the others slide.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3 (EmbeddingGemma): attention in both directions — not a causal LM.
    #[serde(default)]
    use_bidirectional_attention: Option<bool>,
    /// Phi-3 / Phi-4-mini: the part of each head RoPE rotates (transformers 4 keeps it here).
    partial_rotary_factor: Option<f64>,
    /// Phi-3: the pre-training context (LongRoPE's threshold; transformers 4 keeps it here).
    original_max_position_embeddings: Option<f64>,
    /// Phi-3: dropout on each residual branch in training.
    resid_pdrop: Option<f64>,
    /// Phi-3: dropout on the embeddings in training.
    embd_pdrop: Option<f64>,
    /// Experts per layer (Mixtral; transformers 5 also for Qwen3-MoE).
    num_local_experts: Option<usize>,
    /// Qwen3-MoE (the Hub's configs): experts per layer.
    num_experts: Option<usize>,
    /// Experts each token is routed to.
    num_experts_per_tok: Option<usize>,
    /// Qwen3-MoE: each expert's intermediate width.
    moe_intermediate_size: Option<usize>,
    /// Qwen3-MoE: renormalise the top-k routing weights (Mixtral always does).
    #[serde(default)]
    norm_topk_prob: bool,
    /// Qwen3-MoE: every n-th layer is sparse.
    decoder_sparse_step: Option<usize>,
    /// Qwen3-MoE: layers with a dense MLP.
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    /// Mixtral: multiplicative noise on the router's input in training.
    router_jitter_noise: Option<f64>,
    /// Whether the router's load-balancing loss joins the loss (transformers' forward; TRL
    /// decides by `router_aux_loss_coef` instead).
    #[serde(default)]
    output_router_logits: bool,
    /// The load-balancing loss's weight (Mixtral and Qwen3-MoE default to 0.001).
    router_aux_loss_coef: Option<f64>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<serde_json::Value>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
    /// Whether [`ModelConfig::set_special_ids`] changed the ids (then saving also updates
    /// `generation_config.json`).
    #[serde(skip)]
    pub special_ids_changed: bool,
    /// Set when the checkpoint is a multimodal wrapper whose text model this is (Gemma 3's
    /// `Gemma3ForConditionalGeneration`): its name, which also moves the module paths under
    /// `model.language_model`.
    #[serde(skip)]
    pub wrapper: Option<String>,
    /// The dtype the weights were saved in (transformers 4).
    torch_dtype: Option<String>,
    /// The dtype the weights were saved in (transformers 5).
    dtype: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // An architecture peft-sft does not implement is named as such, before any field it
        // lacks (a multimodal wrapper has no top-level `hidden_size`).
        if let Ok(raw) = serde_json::from_str::<serde_json::Value>(&text) {
            known_architecture(&raw)?;
            if let Some((wrapper, text_config)) = wrapped_text_config(&raw) {
                let mut config = Self::from_value(text_config, path)?;
                config.wrapper = Some(wrapper);
                return Ok(config);
            }
        }
        let config: ModelConfig = serde_json::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        config.checked(path)
    }

    /// Reads a config given as JSON (e.g. derived from a GGUF file's metadata at `origin`).
    pub fn from_value(value: serde_json::Value, origin: &Path) -> Result<Self> {
        known_architecture(&value)?;
        let config: ModelConfig = serde_json::from_value(value).map_err(|e| Error::Parse {
            path: origin.to_path_buf(),
            line: None,
            message: e.to_string(),
        })?;
        config.checked(origin)
    }

    /// Rejects configs peft-sft cannot run.
    fn checked(self, path: &Path) -> Result<Self> {
        let config = self;
        config.family()?;
        for layer in 0..config.num_hidden_layers {
            config.layer_rope(layer)?;
        }
        if config.router_jitter_noise.is_some_and(|j| j > 0.0) {
            return Err(Error::Config(format!(
                "{}: router_jitter_noise > 0 is not supported (set it to 0.0, as Mixtral's \
                 released configs have it)",
                path.display()
            )));
        }
        let moe_family = matches!(config.family()?, Family::Mixtral | Family::Qwen3Moe);
        if moe_family
            && (config.num_experts_per_tok.is_none()
                || config.num_local_experts.or(config.num_experts).is_none())
        {
            return Err(Error::Config(format!(
                "{}: a mixture-of-experts config needs num_experts_per_tok and {}",
                path.display(),
                "num_local_experts (or num_experts)"
            )));
        }
        if config.use_bidirectional_attention == Some(true) {
            return Err(Error::Config(format!(
                "{}: use_bidirectional_attention is true (an embedding model such as \
                 EmbeddingGemma): peft-sft trains causal language models",
                path.display()
            )));
        }
        for (field, p) in [
            ("resid_pdrop", config.resid_pdrop),
            ("embd_pdrop", config.embd_pdrop),
        ] {
            if p.is_some_and(|p| p > 0.0) {
                return Err(Error::Config(format!(
                    "{}: {field} is {} but peft-sft applies no residual or embedding dropout: set \
                     it to 0.0 (the released Phi-3 and Phi-4-mini configs have 0.0)",
                    path.display(),
                    p.unwrap_or(0.0)
                )));
            }
        }
        if config.activation().is_none() {
            let (field, name) = config.activation_name();
            return Err(Error::Config(format!(
                "{}: {field} `{name}` is not supported (silu, gelu_pytorch_tanh)",
                path.display(),
            )));
        }
        Ok(config)
    }

    /// The decoder family named by `architectures` (or `model_type`).
    pub fn family(&self) -> Result<Family> {
        let by_arch = self.architectures.iter().find_map(|a| {
            SUPPORTED_ARCHITECTURES
                .iter()
                .find(|(n, _)| n == a)
                .map(|(_, f)| *f)
        });
        let by_type = MODEL_TYPES
            .iter()
            .find(|(t, _)| *t == self.model_type)
            .map(|(_, f)| *f);
        by_arch.or(by_type).ok_or_else(|| {
            unsupported(
                self.architectures
                    .first()
                    .cloned()
                    .unwrap_or_else(|| self.model_type.clone()),
            )
        })
    }

    /// Where the decoder's modules live: `model` (`model.layers.0.self_attn.q_proj`), or
    /// `model.language_model` in a multimodal wrapper — the paths PEFT names them by.
    pub fn module_prefix(&self) -> &'static str {
        match self.wrapper {
            Some(_) => "model.language_model",
            None => "model",
        }
    }

    /// PEFT's module path of the token embedding (`model.embed_tokens`).
    pub fn embed_module(&self) -> String {
        format!("{}.embed_tokens", self.module_prefix())
    }

    /// A wrapper checkpoint's tensor-name prefixes in transformers' original layout (what
    /// `save_pretrained` writes and the Hub holds) and the module paths peft-sft and PEFT name
    /// them by: `(stored, module)` pairs; none for other models.
    pub fn name_aliases(&self) -> &'static [(&'static str, &'static str)] {
        match self.wrapper {
            Some(_) => &[
                ("language_model.model.", "model.language_model."),
                ("language_model.lm_head.", "lm_head."),
            ],
            None => &[],
        }
    }

    /// The name `name` (a module path) is stored under in a checkpoint in the original layout.
    pub fn stored_name(&self, name: &str) -> String {
        for (stored, module) in self.name_aliases() {
            if let Some(rest) = name.strip_prefix(module) {
                return format!("{stored}{rest}");
            }
        }
        name.to_string()
    }

    /// Where the MLP's activation is named and the name: Gemma's `hidden_activation` (default
    /// `gelu_pytorch_tanh`), else `hidden_act`.
    fn activation_name(&self) -> (&'static str, &str) {
        match self.family() {
            Ok(f) if f.is_gemma() => (
                "hidden_activation",
                self.hidden_activation
                    .as_deref()
                    .unwrap_or("gelu_pytorch_tanh"),
            ),
            _ => ("hidden_act", &self.hidden_act),
        }
    }

    /// The MLP's gate activation, if peft-sft has it.
    pub fn activation(&self) -> Option<Activation> {
        Activation::from_name(self.activation_name().1)
    }

    /// What the norms add to their weight: 1 for Gemma (`x̂ · (1 + w)`), else 0.
    pub fn norm_offset(&self) -> f64 {
        match self.family() {
            Ok(f) if f.is_gemma() => 1.0,
            _ => 0.0,
        }
    }

    /// The factor on the token embeddings: √hidden for Gemma.
    pub fn embed_scale(&self) -> Option<f64> {
        match self.family() {
            Ok(f) if f.is_gemma() => Some((self.hidden_size as f64).sqrt()),
            _ => None,
        }
    }

    /// Whether each layer normalises its attention and MLP outputs (Gemma 2/3).
    pub fn output_norms(&self) -> bool {
        matches!(self.family(), Ok(Family::Gemma2 | Family::Gemma3))
    }

    /// Whether queries and keys are normalised per head (Qwen3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(
            self.family(),
            Ok(Family::Qwen3 | Family::Gemma3 | Family::Qwen3Moe)
        )
    }

    /// How attention forms its scores: `head_dim^-½`, or Gemma 2/3's
    /// `query_pre_attn_scalar^-½` and soft cap.
    pub fn attention_scores(&self) -> Scores {
        match self.family() {
            Ok(Family::Gemma2 | Family::Gemma3) => Scores {
                scale: self
                    .query_pre_attn_scalar
                    .unwrap_or(self.head_dim() as f64)
                    .powf(-0.5),
                softcap: self.attn_logit_softcapping,
            },
            _ => Scores::from((self.head_dim() as f64).powf(-0.5)),
        }
    }

    /// The soft cap on the final logits (Gemma 2).
    pub fn final_softcap(&self) -> Option<f64> {
        match self.family() {
            Ok(Family::Gemma2 | Family::Gemma3) => self.final_logit_softcapping,
            _ => None,
        }
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// How the layers store their projections: fused for Phi-3.
    pub fn layout(&self) -> Layout {
        match self.family() {
            Ok(Family::Phi3) => Layout::Fused,
            _ => Layout::Separate,
        }
    }

    /// The width RoPE rotates in each head: `head_dim · partial_rotary_factor` (all of it by
    /// default), as transformers truncates it.
    pub fn rotary_dim(&self) -> usize {
        let factor = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        (self.head_dim() as f64 * factor) as usize
    }

    /// The decoder layer's linear modules as `(name under the layer, in_features, out_features,
    /// bias)`, in the order of `DecoderLayer::linears` ([`Self::layout`]): what `CausalLm::load`
    /// builds and the memory planner counts.
    pub fn layer_linears(&self) -> Vec<(&'static str, usize, usize, bool)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.kv_heads() * self.head_dim();
        let (qkv_bias, o_bias, mlp_bias) = (self.qkv_bias(), self.o_bias(), self.mlp_bias);
        if self.layout() == Layout::Fused {
            return vec![
                ("self_attn.qkv_proj", h, q + 2 * kv, qkv_bias),
                ("self_attn.o_proj", q, h, o_bias),
                ("mlp.gate_up_proj", h, 2 * i, mlp_bias),
                ("mlp.down_proj", i, h, mlp_bias),
            ];
        }
        vec![
            ("self_attn.q_proj", h, q, qkv_bias),
            ("self_attn.k_proj", h, kv, qkv_bias),
            ("self_attn.v_proj", h, kv, qkv_bias),
            ("self_attn.o_proj", q, h, o_bias),
            ("mlp.gate_proj", h, i, mlp_bias),
            ("mlp.up_proj", h, i, mlp_bias),
            ("mlp.down_proj", i, h, mlp_bias),
        ]
    }

    /// Layer `layer`'s mixture of experts, if it has one.
    pub fn layer_moe(&self, layer: usize) -> Option<MoeSpec> {
        let family = self.family().ok()?;
        // transformers 5 writes `num_local_experts` for both; Qwen3-MoE's Hub configs say
        // `num_experts`.
        let experts = self.num_local_experts.or(self.num_experts)?;
        match family {
            Family::Mixtral => {}
            Family::Qwen3Moe => {
                let step = self.decoder_sparse_step.unwrap_or(1).max(1);
                if self.mlp_only_layers.contains(&layer) || !(layer + 1).is_multiple_of(step) {
                    return None;
                }
            }
            _ => return None,
        }
        Some(MoeSpec {
            experts,
            top_k: self.num_experts_per_tok?,
            normalize: family == Family::Mixtral || self.norm_topk_prob,
            intermediate: match family {
                Family::Qwen3Moe => self.moe_intermediate_size.unwrap_or(self.intermediate_size),
                _ => self.intermediate_size,
            },
            names: match family {
                Family::Mixtral => [
                    "block_sparse_moe.gate",
                    "block_sparse_moe.experts",
                    "w1",
                    "w3",
                    "w2",
                ],
                _ => [
                    "mlp.gate",
                    "mlp.experts",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
            },
        })
    }

    /// Whether any layer has a mixture of experts.
    pub fn is_moe(&self) -> bool {
        (0..self.num_hidden_layers).any(|l| self.layer_moe(l).is_some())
    }

    /// A mixture of experts' `router_aux_loss_coef` (0.001 where the config leaves it out, as
    /// transformers' Mixtral and Qwen3-MoE configs); None for dense models.
    pub fn router_aux_loss_coef(&self) -> Option<f64> {
        self.is_moe()
            .then(|| self.router_aux_loss_coef.unwrap_or(0.001))
    }

    /// The load-balancing loss's weight in the model's own loss: the coefficient when the config
    /// has `output_router_logits` (as transformers' forward adds it), else 0.
    pub fn default_router_aux_loss_coef(&self) -> f64 {
        match self.output_router_logits {
            true => self.router_aux_loss_coef().unwrap_or(0.0),
            false => 0.0,
        }
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        matches!(self.family(), Ok(Family::Qwen2)) || self.attention_bias
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        !matches!(self.family(), Ok(Family::Qwen2)) && self.attention_bias
    }

    /// The RoPE base frequency.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Whether layer `layer` is a sliding-window layer by `layer_types` (transformers 5) or, without
    /// it, Gemma's rule: Gemma 2 alternates (even layers slide), Gemma 3 makes every
    /// `sliding_window_pattern`-th layer (default 6) global.
    fn sliding_layer(&self, layer: usize) -> Option<bool> {
        if let Some(types) = &self.layer_types {
            return Some(types.get(layer).map(String::as_str) == Some("sliding_attention"));
        }
        match self.family() {
            Ok(Family::Gemma2) => Some(layer.is_multiple_of(2)),
            Ok(Family::Gemma3) => {
                Some(!(layer + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(6)))
            }
            _ => None,
        }
    }

    /// The sliding window of layer `layer`, if it has one: `layer_types` (or Gemma's pattern)
    /// decides where present, else the family's rule (Mistral always; Qwen with
    /// `use_sliding_window`).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        if let Some(sliding) = self.sliding_layer(layer) {
            return if sliding { self.sliding_window } else { None };
        }
        match self.family() {
            Ok(Family::Mistral | Family::Phi3 | Family::Mixtral) => self.sliding_window,
            Ok(Family::Qwen2 | Family::Qwen3 | Family::SmolLm3)
                if self.use_sliding_window == Some(true) =>
            {
                self.sliding_window
            }
            _ => None,
        }
    }

    /// Whether layer `layer` applies RoPE (SmolLM3's `no_rope_layers`; every layer elsewhere).
    pub fn layer_uses_rope(&self, layer: usize) -> bool {
        match (&self.no_rope_layers, self.family()) {
            (Some(flags), Ok(Family::SmolLm3)) => flags.get(layer).is_none_or(|&f| f != 0),
            _ => true,
        }
    }

    /// The RoPE base and frequency scaling of layer `layer`: the model's, except Gemma 3's
    /// sliding-window layers, which have their own base (`rope_local_base_freq`, or
    /// `rope_parameters.sliding_attention`; 10000 by default) and no scaling, while its global
    /// layers default to a base of 1e6.
    pub fn layer_rope(&self, layer: usize) -> Result<(f64, RopeScaling)> {
        if self.family()? != Family::Gemma3 {
            return Ok((self.rope_theta(), self.rope_scaling()?));
        }
        let per_type = self.rope_parameters.as_ref();
        if self.sliding_layer(layer) == Some(true) {
            let local = per_type.and_then(|p| p.sliding_attention.as_deref());
            let theta = local
                .and_then(|p| p.rope_theta)
                .or(self.rope_local_base_freq)
                .unwrap_or(10_000.0);
            let scaling = match local {
                Some(p) => self.scaling_of(p)?,
                None => RopeScaling::Default,
            };
            return Ok((theta, scaling));
        }
        let global = per_type.and_then(|p| p.full_attention.as_deref());
        let theta = global
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(1_000_000.0);
        let scaling = match global.or(self.rope_scaling.as_ref()) {
            Some(p) => self.scaling_of(p)?,
            None => RopeScaling::Default,
        };
        Ok((theta, scaling))
    }

    /// The RoPE frequency scaling.
    pub fn rope_scaling(&self) -> Result<RopeScaling> {
        match self.rope_scaling.as_ref().or(self.rope_parameters.as_ref()) {
            Some(raw) => self.scaling_of(raw),
            None => Ok(RopeScaling::Default),
        }
    }

    /// The frequency scaling one `rope_scaling` / `rope_parameters` entry names.
    fn scaling_of(&self, raw: &RawRopeScaling) -> Result<RopeScaling> {
        let kind = raw
            .rope_type
            .as_deref()
            .or(raw.kind.as_deref())
            .unwrap_or("default");
        let need = |v: Option<f64>, name: &str| {
            v.ok_or_else(|| Error::Config(format!("rope_scaling type `{kind}` needs `{name}`")))
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: need(raw.factor, "factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: need(raw.factor, "factor")?,
                low_freq_factor: need(raw.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(raw.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: need(
                    raw.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            }),
            "freq_factors" => Ok(RopeScaling::Factors(raw.freq_factors.clone().ok_or_else(
                || Error::Config("rope type freq_factors needs `freq_factors`".into()),
            )?)),
            // transformers' `_compute_longrope_parameters` ("su" is its older name).
            "longrope" | "su" => {
                let half = self.rotary_dim() / 2;
                let factors = |v: &Option<Vec<f64>>, name: &str| -> Result<Vec<f64>> {
                    match v {
                        Some(f) if f.len() == half => Ok(f.clone()),
                        Some(f) => Err(Error::Config(format!(
                            "rope_scaling `{name}` has {} entries, the rotary width needs {half}",
                            f.len()
                        ))),
                        None => Err(Error::Config(format!(
                            "rope_scaling type `{kind}` needs `{name}`"
                        ))),
                    }
                };
                let original = raw
                    .original_max_position_embeddings
                    .or(self.original_max_position_embeddings)
                    .ok_or_else(|| {
                        Error::Config(
                            "rope_scaling type `longrope` needs `original_max_position_embeddings`"
                                .into(),
                        )
                    })?;
                let factor = raw
                    .factor
                    .unwrap_or(self.max_position_embeddings as f64 / original);
                let attention_factor = raw.attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / original.ln()).sqrt()
                });
                Ok(RopeScaling::LongRope {
                    short_factor: factors(&raw.short_factor, "short_factor")?,
                    long_factor: factors(&raw.long_factor, "long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor,
                })
            }
            other => Err(Error::Config(format!(
                "rope_scaling type `{other}` is not supported (default, linear, llama3, longrope)"
            ))),
        }
    }

    /// The dtype the weights were saved in (`dtype`, or the older `torch_dtype`).
    pub fn saved_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    /// End-of-sequence ids named by the config (a number or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        ids_of(self.eos_token_id.as_ref())
    }

    /// Sets the special token ids (after a chat-format setup changed them); `None` leaves one as is.
    pub fn set_special_ids(&mut self, bos: Option<u32>, eos: Option<u32>, pad: Option<u32>) {
        for (slot, id) in [
            (&mut self.bos_token_id, bos),
            (&mut self.eos_token_id, eos),
            (&mut self.pad_token_id, pad),
        ] {
            if let Some(id) = id {
                *slot = Some(id.into());
                self.special_ids_changed = true;
            }
        }
    }
}

/// Reads a token id field that may be a number or a list of numbers.
pub(crate) fn ids_of(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}
