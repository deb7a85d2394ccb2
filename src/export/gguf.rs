//! Writing llama.cpp GGUF files from Hugging Face weights, following llama.cpp's converters
//! (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`): a whole model with its architecture
//! metadata and byte-level BPE tokenizer (`tokenizer.ggml.*`, the pre-tokenizer named as llama.cpp
//! names it, the chat template), quantized through `candle_core::quantized`; and a LoRA adapter in
//! llama.cpp's adapter format for `llama-cli --lora`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::data::ChatTokenizer;
use crate::model::{CausalLm, Family, ModelConfig};
use crate::ops::rope::{RopeScaling, RotaryEmbedding};
use crate::quant::gguf::{llama_cpp_tensor, permute_rows};
use crate::{Error, Result};

/// The text llama.cpp's converter encodes to recognise a tokenizer's pre-tokenization
/// (`get_vocab_base_pre`'s `chktxt`).
const PRE_TOKENIZER_CHECK: &str = include_str!("../../assets/gguf_pretokenizer_check.txt");

/// SHA-256 of the check text's ids (Python's `str(list)`) → llama.cpp's pre-tokenizer name, for
/// the families peft-sft supports.
const KNOWN_PRE_TOKENIZERS: &[(&str, &str)] = &[
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ),
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ),
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
    ),
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
    ),
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ),
];

/// The split patterns of llama.cpp's pre-tokenizers (its `llm_tokenizer_bpe` regexes), as
/// `tokenizer.json` writes them, for vocabularies its hash list does not know.
const KNOWN_SPLITS: &[(&str, &str)] = &[
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "llama-bpe",
    ),
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2",
    ),
];

/// The weight types `--quantize` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    /// Everything in f32.
    F32,
    /// 2-D weights in f16 (norms and biases f32), as `convert_hf_to_gguf --outtype f16`.
    F16,
    /// 2-D weights in Q8_0.
    Q8_0,
    /// 2-D weights in Q4_0.
    Q4_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for `attn_v`/`ffn_down` of some layers and for the
    /// output matrix.
    Q4KM,
}

impl std::fmt::Display for ExportType {
    /// The name `--quantize` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExportType::F32 => "f32",
            ExportType::F16 => "f16",
            ExportType::Q8_0 => "q8_0",
            ExportType::Q4_0 => "q4_0",
            ExportType::Q4KM => "q4_k_m",
        })
    }
}

impl std::str::FromStr for ExportType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportType::F32,
            "f16" => ExportType::F16,
            "q8_0" => ExportType::Q8_0,
            "q4_0" => ExportType::Q4_0,
            "q4_k_m" => ExportType::Q4KM,
            other => {
                return Err(Error::Config(format!(
                    "--quantize `{other}`: expected f32, f16, q8_0, q4_0 or q4_k_m"
                )))
            }
        })
    }
}

impl ExportType {
    /// llama.cpp's `general.file_type` (`LlamaFileType`).
    fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q8_0 => 7,
            ExportType::Q4KM => 15,
        }
    }
}

/// llama.cpp's `general.architecture` for a family, and whether its query/key rows are permuted;
/// an error naming what llama.cpp cannot compute for models it could otherwise hold.
fn architecture(config: &ModelConfig) -> Result<(&'static str, bool)> {
    let refuse = |what: String| Err(Error::Config(what));
    match config.family()? {
        Family::Llama | Family::Mistral | Family::Mixtral => Ok(("llama", true)),
        Family::Qwen2 => Ok(("qwen2", false)),
        Family::Qwen3 => Ok(("qwen3", false)),
        Family::SmolLm3 => {
            // llama.cpp's `smollm3` skips RoPE on every 4th layer, hard-coded
            // (`n_no_rope_layer_step = 4`, no GGUF key): a model with other NoPE layers would
            // compute something else there.
            let layers = config.num_hidden_layers;
            if let Some(i) =
                (0..layers).find(|&i| config.layer_uses_rope(i) != smollm3_uses_rope(i))
            {
                return refuse(format!(
                    "layer {i} {} RoPE, but llama.cpp's smollm3 architecture skips RoPE exactly on every 4th layer (3, 7, 11, ...; hard-coded, no GGUF key): this model's no_rope_layers cannot be written to GGUF",
                    if config.layer_uses_rope(i) { "uses" } else { "skips" }
                ));
            }
            Ok(("smollm3", true))
        }
        Family::Gemma => Ok(("gemma", false)),
        Family::Gemma2 => Ok(("gemma2", false)),
        Family::Gemma3 => {
            if config.attention_scores().softcap.is_some() {
                return refuse(
                    "llama.cpp's gemma3 has no attention soft-capping: this model's attn_logit_softcapping cannot be written to GGUF".into(),
                );
            }
            Ok(("gemma3", false))
        }
        Family::Phi3 => {
            if config.num_attention_heads * config.head_dim() != config.hidden_size {
                return refuse(format!(
                    "llama.cpp's phi3 needs heads x head_dim = hidden_size ({} x {} != {})",
                    config.num_attention_heads,
                    config.head_dim(),
                    config.hidden_size
                ));
            }
            Ok(("phi3", false))
        }
        Family::Qwen3Moe => {
            // llama.cpp's qwen3moe routes every layer and always renormalises the top k.
            if let Some(i) = (0..config.num_hidden_layers).find(|&i| config.layer_moe(i).is_none())
            {
                return refuse(format!(
                    "layer {i} has a dense MLP (mlp_only_layers / decoder_sparse_step), which llama.cpp's qwen3moe architecture cannot hold (every layer is a mixture there)"
                ));
            }
            if config.layer_moe(0).is_some_and(|m| !m.normalize) {
                return refuse(
                    "norm_topk_prob is false, but llama.cpp's qwen3moe always renormalises the top-k routing weights: the file would compute another model".into(),
                );
            }
            Ok(("qwen3moe", false))
        }
    }
}

/// The factor that makes llama.cpp's attention scale (1/sqrt(head size), for the 27B Gemmas
/// 1/sqrt(hidden / heads), picked by layer count) the model's own: Gemma 2/3's
/// `query_pre_attn_scalar`. 1 elsewhere.
fn query_factor(config: &ModelConfig, arch: &str) -> f64 {
    let layers = config.num_hidden_layers;
    let big = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
    let llama_cpp = match big {
        true => ((config.hidden_size / config.num_attention_heads) as f64).powf(-0.5),
        false => (config.head_dim() as f64).powf(-0.5),
    };
    match arch {
        "gemma2" | "gemma3" => config.attention_scores().scale / llama_cpp,
        _ => 1.0,
    }
}

/// The sliding-window metadata of Gemma 2/3: the window and which layers slide, per layer (the
/// converter leaves the pattern to llama.cpp's default; writing it keeps `layer_types` exact).
fn sliding_metadata(
    config: &ModelConfig,
    key: &dyn Fn(&str) -> String,
) -> Result<Vec<(String, Value)>> {
    let windows: Vec<Option<usize>> = (0..config.num_hidden_layers)
        .map(|i| config.layer_window(i))
        .collect();
    let sizes: std::collections::BTreeSet<usize> = windows.iter().flatten().copied().collect();
    if sizes.len() > 1 {
        return Err(Error::Config(format!(
            "the layers slide windows of different sizes ({sizes:?}); llama.cpp has one sliding_window"
        )));
    }
    let Some(&window) = sizes.first() else {
        return Ok(Vec::new());
    };
    let pattern = windows.iter().map(|w| Value::Bool(w.is_some())).collect();
    Ok(vec![
        (key("attention.sliding_window"), Value::U32(window as u32)),
        (
            key("attention.sliding_window_pattern"),
            Value::Array(pattern),
        ),
    ])
}

/// llama.cpp's layers without RoPE in its `smollm3` architecture: every 4th (`n_no_rope_layer_step`).
pub fn smollm3_uses_rope(layer: usize) -> bool {
    !(layer + 1).is_multiple_of(4)
}

/// llama.cpp's `use_more_bits`: the layers Q4_K_M gives more bits.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// The GGML type a tensor gets: f32 for vectors; else the export type, llama.cpp's Q4_K_M mix,
/// and llama.cpp's fallbacks when the row length is not a multiple of the block size.
pub(crate) fn tensor_type(
    name: &str,
    dims: &[usize],
    ty: ExportType,
    layers: usize,
    tied: bool,
    experts: usize,
) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok());
    let wanted = match ty {
        ExportType::F32 => GgmlDType::F32,
        ExportType::F16 => GgmlDType::F16,
        ExportType::Q8_0 => GgmlDType::Q8_0,
        ExportType::Q4_0 => GgmlDType::Q4_0,
        ExportType::Q4KM => {
            let output = name == "output.weight" || (tied && name == "token_embd.weight");
            // llama.cpp's categories: attn_v-like (attn_v, fused attn_qkv), attn_k, and every
            // ffn_down (the experts' stack included).
            let attn_v = name.ends_with("attn_v.weight") || name.ends_with("attn_qkv.weight");
            let attn_k = name.ends_with("attn_k.weight");
            let more = layer.is_some_and(|l| use_more_bits(l, layers))
                && (attn_v || name.contains("ffn_down"));
            if experts == 8 && (attn_v || attn_k) {
                // Its 8-expert rule (Mixtral): the attention's values and keys in Q8_0.
                GgmlDType::Q8_0
            } else if output || more {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    let row = dims[dims.len() - 1];
    let fits = |t: GgmlDType| row.is_multiple_of(t.block_size());
    let fallback = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    [wanted, fallback, GgmlDType::F16]
        .into_iter()
        .find(|&t| fits(t))
        .unwrap_or(GgmlDType::F32)
}

/// Heads whose rows llama.cpp permutes in Hugging Face tensor `hf` (q and k of llama), if any.
fn permuted_heads(hf: &str, config: &ModelConfig, permutes: bool) -> Option<usize> {
    if !permutes {
        return None;
    }
    if hf.contains("self_attn.q_proj.") {
        Some(config.num_attention_heads)
    } else if hf.contains("self_attn.k_proj.") {
        Some(config.kv_heads())
    } else {
        None
    }
}

/// The tokenizer's `tokenizer.json` as a JSON value.
fn tokenizer_json(tok: &ChatTokenizer) -> Result<serde_json::Value> {
    let text = tok
        .inner
        .to_string(false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// llama.cpp's name for the tokenizer's pre-tokenization: by the hash of the check text's ids, as
/// its converter does; for tokenizers it does not list (fine-tunes with their own vocabulary), by
/// the `tokenizer.json` pre-tokenizer itself when that is GPT-2's byte-level split. Anything else
/// has no llama.cpp equivalent and is an error that says so.
pub fn pre_tokenizer(tok: &ChatTokenizer) -> Result<String> {
    let ids = tok.encode(PRE_TOKENIZER_CHECK, true)?;
    let listed = format!(
        "[{}]",
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let hash: String = Sha256::digest(listed.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some((_, name)) = KNOWN_PRE_TOKENIZERS.iter().find(|(h, _)| *h == hash) {
        return Ok(name.to_string());
    }
    let json = tokenizer_json(tok)?;
    let pre = &json["pre_tokenizer"];
    let gpt2 = pre["type"] == "ByteLevel" && pre["use_regex"] != false;
    if gpt2 {
        return Ok("gpt-2".into());
    }
    // A split by Llama 3's or Qwen2's pattern, then bytes: llama.cpp's `llama-bpe` or `qwen2`
    // pre-tokenizer is that split (a vocabulary of their own, e.g. a trimmed one).
    let steps = pre["pretokenizers"].as_array();
    if let Some([split, bytes]) = steps.map(Vec::as_slice) {
        let pattern = split["pattern"]["Regex"].as_str();
        let plain_bytes = bytes["type"] == "ByteLevel" && bytes["use_regex"] == false;
        let named = KNOWN_SPLITS
            .iter()
            .find(|(p, _)| Some(*p) == pattern)
            .map(|(_, n)| n);
        if let (true, "Split", Some(name)) =
            (plain_bytes, split["type"].as_str().unwrap_or(""), named)
        {
            return Ok(name.to_string());
        }
    }
    Err(Error::Config(format!(
        "the tokenizer's pre-tokenization (check hash {hash}, pre_tokenizer {}) has no llama.cpp equivalent; llama.cpp would tokenize text differently",
        pre
    )))
}

/// The `tokenizer.ggml.*` metadata of a tokenizer, for `vocab` embedding rows: byte-level BPE
/// (`gpt2`), or SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3-mini)
/// as llama.cpp's `llama` vocabulary.
fn tokenizer_metadata(tok: &ChatTokenizer, vocab: usize) -> Result<Vec<(String, Value)>> {
    let json = tokenizer_json(tok)?;
    if json["model"]["type"] != "BPE" {
        return Err(Error::Config(
            "GGUF export supports BPE tokenizers (byte-level as Llama 3, Qwen2, SmolLM; SentencePiece-style with byte fallback as Llama 2, Mistral, Gemma); this tokenizer is neither".into(),
        ));
    }
    let sentencepiece = json["model"]["byte_fallback"] == true;
    let by_id: HashMap<u32, String> = tok
        .inner
        .get_vocab(true)
        .into_iter()
        .map(|(t, i)| (i, t))
        .collect();
    let added: HashMap<u32, bool> = json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t["id"].as_u64()? as u32, t["special"].as_bool()?)))
                .collect()
        })
        .unwrap_or_default();
    // The merges as pairs: `"a b"` strings (transformers 4) or `["a", "b"]` (transformers 5).
    let merges: Vec<(String, String)> = json["model"]["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|merge| match merge {
                    serde_json::Value::String(s) => s
                        .split_once(' ')
                        .map(|(l, r)| (l.to_string(), r.to_string())),
                    serde_json::Value::Array(pair) => {
                        let part = |i: usize| pair.get(i)?.as_str().map(str::to_string);
                        Some((part(0)?, part(1)?))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if sentencepiece {
        return sentencepiece_metadata(tok, &json, vocab, &by_id, &added, &merges);
    }
    let mut tokens = Vec::with_capacity(vocab);
    let mut types = Vec::with_capacity(vocab);
    for id in 0..vocab as u32 {
        let (token, kind) = match (by_id.get(&id), added.get(&id)) {
            (None, _) => (format!("[PAD{id}]"), 5),
            (Some(t), Some(&special)) => {
                let looks_special = t.starts_with("<|") && t.ends_with("|>");
                (t.clone(), if special || looks_special { 3 } else { 4 })
            }
            (Some(t), None) => (t.clone(), 1),
        };
        tokens.push(Value::String(token));
        types.push(Value::I32(kind));
    }
    // llama.cpp's merges are `"a b"`: a space inside a piece is written as GPT-2's `Ġ`.
    let merges: Vec<Value> = merges
        .iter()
        .map(|(l, r)| {
            let part = |p: &str| p.replace(' ', "\u{120}");
            Value::String(format!("{} {}", part(l), part(r)))
        })
        .collect();
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String(pre_tokenizer(tok)?),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    meta.extend(special_metadata(tok)?);
    Ok(meta)
}

/// A SentencePiece-style vocabulary as llama.cpp's `llama` model: the pieces, a score per piece
/// that orders llama.cpp's pair merging as the BPE merges rank them (the piece made by the
/// `k`-th merge scores `-k`; pieces no merge makes, below all), token types (unknown, control
/// for special tokens, user-defined, byte `<0xNN>`, normal), `add_space_prefix` from the
/// normalizer or Metaspace pre-tokenizer.
fn sentencepiece_metadata(
    tok: &ChatTokenizer,
    json: &serde_json::Value,
    vocab: usize,
    by_id: &HashMap<u32, String>,
    added: &HashMap<u32, bool>,
    merges: &[(String, String)],
) -> Result<Vec<(String, Value)>> {
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (k, (l, r)) in merges.iter().enumerate() {
        rank.entry(format!("{l}{r}")).or_insert(k);
    }
    let unk = json["model"]["unk_token"]
        .as_str()
        .and_then(|u| tok.inner.token_to_id(u));
    let is_byte = |t: &str| {
        t.len() == 6
            && t.starts_with("<0x")
            && t.ends_with('>')
            && u8::from_str_radix(&t[3..5], 16).is_ok()
    };
    let unmade = -(merges.len() as f32) - 1.0;
    let mut tokens = Vec::with_capacity(vocab);
    let mut scores = Vec::with_capacity(vocab);
    let mut types = Vec::with_capacity(vocab);
    for id in 0..vocab as u32 {
        let (token, kind, score) = match (by_id.get(&id), added.get(&id)) {
            (None, _) => (format!("[PAD{id}]"), 5, unmade),
            (Some(t), _) if Some(id) == unk => (t.clone(), 2, 0.0),
            (Some(t), Some(&special)) => (t.clone(), if special { 3 } else { 4 }, 0.0),
            (Some(t), None) if is_byte(t) => (t.clone(), 6, 0.0),
            (Some(t), None) => {
                let score = match (rank.get(t), t.chars().count()) {
                    (Some(&k), _) => -(k as f32),
                    (None, 1) => 0.0,
                    (None, _) => unmade,
                };
                (t.clone(), 1, score)
            }
        };
        tokens.push(Value::String(token));
        scores.push(Value::F32(score));
        types.push(Value::I32(kind));
    }
    // A `▁` before the first word: a Prepend normalizer or a Metaspace pre-tokenizer that
    // prepends.
    let prepends = |v: &serde_json::Value| -> bool {
        let one = |n: &serde_json::Value| {
            n["type"] == "Prepend"
                || (n["type"] == "Metaspace"
                    && n["prepend_scheme"] != "never"
                    && n["add_prefix_space"] != false)
        };
        one(v)
            || v["normalizers"]
                .as_array()
                .is_some_and(|a| a.iter().any(one))
            || v["pretokenizers"]
                .as_array()
                .is_some_and(|a| a.iter().any(one))
    };
    let space_prefix = prepends(&json["normalizer"]) || prepends(&json["pre_tokenizer"]);
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("default".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.scores".to_string(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        (
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(space_prefix),
        ),
    ];
    if let Some(unk) = unk {
        meta.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
    }
    meta.extend(special_metadata(tok)?);
    Ok(meta)
}

/// BOS/EOS/padding ids, llama.cpp's add_bos/add_eos flags from what the tokenizer does, and the
/// chat template.
fn special_metadata(tok: &ChatTokenizer) -> Result<Vec<(String, Value)>> {
    let mut meta = Vec::new();
    for (key, id) in [
        ("bos_token_id", tok.bos_token_id()),
        ("eos_token_id", tok.eos_token_id()),
        ("padding_token_id", tok.pad_token_id()),
    ] {
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    // What the tokenizer itself does with special tokens decides llama.cpp's add_bos/add_eos.
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    let add_bos = with.len() > without.len() && with.first() != without.first();
    let add_eos = with.len() > without.len() && with.last() != without.last();
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(template) = &tok.chat_template {
        meta.push((
            "tokenizer.chat_template".into(),
            Value::String(template.clone()),
        ));
    }
    Ok(meta)
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// GGUF tensor name → type, in file order.
    pub tensors: Vec<(String, GgmlDType)>,
    /// The pre-tokenizer name written.
    pub pre_tokenizer: String,
}

fn write_gguf(out: &Path, meta: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::io::write_atomic(out, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        candle_core::quantized::gguf_file::write(&mut w, &meta, &refs)?;
        std::io::Write::flush(&mut w).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `model` (full precision: merged, or dequantized) with `tok` as a llama.cpp GGUF model.
pub fn export_model(
    model: &CausalLm,
    tok: &ChatTokenizer,
    name: &str,
    ty: ExportType,
    out: &Path,
) -> Result<ExportReport> {
    let config = &model.config;
    let (arch, permutes) = architecture(config)?;
    let quantized = model.quantized_modules();
    if let Some(first) = quantized.first() {
        return Err(Error::Config(format!(
            "cannot export quantized linear weights ({first}, ...): dequantize the model first"
        )));
    }
    let layers = config.num_hidden_layers;
    let tied = model.lm_head.is_none();
    let gemma = matches!(arch, "gemma" | "gemma2" | "gemma3");
    if arch == "gemma2" && !tied {
        return Err(Error::Config(
            "llama.cpp's gemma2 ties the LM head to the embeddings: a separate lm_head.weight cannot be written".into(),
        ));
    }
    let moe = (0..layers).find_map(|i| config.layer_moe(i));
    let experts = moe.as_ref().map_or(0, |m| m.experts);
    let key = |k: &str| format!("{arch}.{k}");
    // Phi-3's partial rotary width and Gemma 3's global layers' RoPE (its local layers' base is a
    // key of its own).
    let global = (0..layers)
        .find(|&i| config.layer_window(i).is_none())
        .unwrap_or(0);
    let (theta, scaling) = config.layer_rope(global)?;
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.name".to_string(), Value::String(name.into())),
        (key("block_count"), Value::U32(layers as u32)),
        (
            key("context_length"),
            Value::U32(config.max_position_embeddings as u32),
        ),
        (
            key("embedding_length"),
            Value::U32(config.hidden_size as u32),
        ),
        (
            key("feed_forward_length"),
            Value::U32(config.intermediate_size as u32),
        ),
        (
            key("attention.head_count"),
            Value::U32(config.num_attention_heads as u32),
        ),
        (
            key("attention.head_count_kv"),
            Value::U32(config.kv_heads() as u32),
        ),
        (key("rope.freq_base"), Value::F32(theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        ("general.file_type".to_string(), Value::U32(ty.file_type())),
    ];
    if config.head_dim.is_some() || gemma {
        meta.push((
            key("attention.key_length"),
            Value::U32(config.head_dim() as u32),
        ));
        meta.push((
            key("attention.value_length"),
            Value::U32(config.head_dim() as u32),
        ));
    }
    // llama.cpp's LlamaModel converter (SmolLM3's too) writes these two.
    if arch == "llama" || arch == "smollm3" {
        meta.push((key("vocab_size"), Value::U32(config.vocab_size as u32)));
        meta.push((
            key("rope.dimension_count"),
            Value::U32(config.head_dim() as u32),
        ));
    }
    if let Some(moe) = &moe {
        meta.push((key("expert_count"), Value::U32(moe.experts as u32)));
        meta.push((key("expert_used_count"), Value::U32(moe.top_k as u32)));
        if arch == "qwen3moe" {
            meta.push((
                key("expert_feed_forward_length"),
                Value::U32(moe.intermediate as u32),
            ));
        }
    }
    if matches!(arch, "gemma2" | "gemma3") {
        meta.extend(sliding_metadata(config, &key)?);
    }
    if arch == "gemma2" {
        // llama.cpp always caps (defaults 50 and 30): an uncapped model gets a cap far above its
        // scores and logits, where tanh is the identity to float precision.
        let cap = |c: Option<f64>| Value::F32(c.unwrap_or(1e6) as f32);
        meta.push((
            key("attn_logit_softcapping"),
            cap(config.attention_scores().softcap),
        ));
        meta.push((key("final_logit_softcapping"), cap(config.final_softcap())));
    }
    if arch == "gemma3" {
        if let Some(cap) = config.final_softcap() {
            meta.push((key("final_logit_softcapping"), Value::F32(cap as f32)));
        }
        if let Some(local) = (0..layers).find(|&i| config.layer_window(i).is_some()) {
            let (base, local_scaling) = config.layer_rope(local)?;
            if !matches!(local_scaling, RopeScaling::Default) {
                return Err(Error::Config(
                    "the sliding layers' RoPE is scaled, which llama.cpp's gemma3 does not do (it scales the global layers only)".into(),
                ));
            }
            meta.push((key("rope.freq_base_swa"), Value::F32(base as f32)));
        }
    }
    let mut extra: Vec<(String, Tensor)> = Vec::new();
    match scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            meta.push((key("rope.scaling.type"), Value::String("linear".into())));
            meta.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } if arch == "phi3" => {
            // Phi-3: the factors as tensors, cos/sin scaled by the attention factor.
            meta.push((
                key("rope.scaling.original_context_length"),
                Value::U32(original_max_position_embeddings as u32),
            ));
            meta.push((
                key("rope.scaling.attn_factor"),
                Value::F32(attention_factor as f32),
            ));
            for (name, factors) in [
                ("rope_factors_short.weight", short_factor),
                ("rope_factors_long.weight", long_factor),
            ] {
                let f: Vec<f32> = factors.iter().map(|&x| x as f32).collect();
                let n = f.len();
                extra.push((name.into(), Tensor::from_vec(f, n, &Device::Cpu)?));
            }
        }
        RopeScaling::LongRope { .. } => {
            return Err(Error::Config(format!(
                "LongRoPE on a {arch} model has no llama.cpp form"
            )))
        }
        scaling => {
            // Llama 3.1: llama.cpp divides each frequency by a stored factor (`rope_freqs`).
            let base = RotaryEmbedding::new(config.head_dim(), theta, &RopeScaling::Default);
            let scaled = RotaryEmbedding::new(config.head_dim(), theta, &scaling);
            let factors: Vec<f32> = base
                .inv_freq()
                .iter()
                .zip(scaled.inv_freq())
                .map(|(b, s)| (b / s) as f32)
                .collect();
            let n = factors.len();
            extra.push((
                "rope_freqs.weight".into(),
                Tensor::from_vec(factors, n, &Device::Cpu)?,
            ));
        }
    }
    if arch == "phi3" {
        meta.push((
            key("rope.dimension_count"),
            Value::U32(config.rotary_dim() as u32),
        ));
        // Written as llama.cpp's converter does; llama.cpp's phi3 attends without it.
        meta.push((
            key("attention.sliding_window"),
            Value::U32(config.sliding_window.unwrap_or(0) as u32),
        ));
    }
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    meta.extend(tokenizer_metadata(tok, config.vocab_size)?);
    if arch == "smollm3" {
        // llama.cpp's converter drops SmolLM3's `[:]` slices, which its template engine lacks.
        for (k, v) in meta.iter_mut() {
            if k == "tokenizer.chat_template" {
                if let Ok(t) = v.to_string() {
                    *v = Value::String(t.replace("[:]", ""));
                }
            }
        }
    }

    let mut tensors = Vec::new();
    let mut report = Vec::new();
    let mut add = |name: String, value: Tensor| -> Result<()> {
        let value = value.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let dtype = tensor_type(&name, value.dims(), ty, layers, tied, experts);
        report.push((name.clone(), dtype));
        tensors.push((name, QTensor::quantize(&value, dtype)?));
        Ok(())
    };
    let q_factor = query_factor(config, arch);
    // A multimodal wrapper's text model is written as the text model (`model.*`).
    let prefix = format!("{}.", config.module_prefix());
    // The experts of each mixture, stacked per projection below.
    let mut stacks: BTreeMap<String, Vec<Option<Tensor>>> = BTreeMap::new();
    for (hf, param) in model.named_weights() {
        let hf = match hf.strip_prefix(&prefix) {
            Some(rest) => format!("model.{rest}"),
            None => hf,
        };
        let stored = llama_cpp_tensor(arch, &hf).ok_or_else(|| Error::Tensor {
            name: hf.clone(),
            message: format!("has no llama.cpp name in its {arch} architecture"),
        })?;
        let mut value = param.tensor().clone();
        if let Some(e) = stored.expert {
            let slots = stacks.entry(stored.name).or_default();
            if slots.len() <= e {
                slots.resize(e + 1, None);
            }
            slots[e] = Some(value);
            continue;
        }
        if let Some(heads) = permuted_heads(&hf, config, permutes) {
            value = permute_rows(&value, heads)?;
        }
        if gemma && hf.ends_with("norm.weight") {
            // llama.cpp's Gemma norms multiply by the stored weight: `1 + w`.
            value = value.to_dtype(DType::F32)?.affine(1.0, 1.0)?;
        }
        // The model's attention scale where llama.cpp hard-codes another: on the queries
        // (Gemma 2), or on the query norm that follows them (Gemma 3).
        let scaled = match arch {
            "gemma3" => stored.name.ends_with("attn_q_norm.weight"),
            _ => stored.name.ends_with("attn_q.weight"),
        };
        if scaled && q_factor != 1.0 {
            value = value.to_dtype(DType::F32)?.affine(q_factor, 0.0)?;
        }
        add(stored.name, value)?;
    }
    for (name, slots) in stacks {
        let experts = slots
            .into_iter()
            .enumerate()
            .map(|(e, t)| {
                t.ok_or_else(|| Error::Tensor {
                    name: format!("{name} (expert {e})"),
                    message: "an expert's weight is missing".into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        add(name, Tensor::stack(&experts, 0)?)?;
    }
    for (name, value) in extra {
        add(name, value)?;
    }
    write_gguf(out, &meta, &tensors)?;
    let pre = meta
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.pre")
        .and_then(|(_, v)| v.to_string().ok().cloned())
        .unwrap_or_default();
    Ok(ExportReport {
        tensors: report,
        pre_tokenizer: pre,
    })
}

/// Writes a PEFT LoRA adapter (read from `adapter_dir`, trained on a base with `config`) in
/// llama.cpp's adapter format: `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`,
/// tensors `blk.N.<module>.weight.lora_a` (PEFT's A, `[r, in]`) and `.lora_b` (B, `[out, r]`,
/// with llama's query/key row permutation), f32; a mixture of experts' stacked pairs per expert
/// (`blk.N.ffn_{gate,up,down}_exps.weight.lora_a` `[E, r, in]`, `.lora_b` `[E, out, r]`, the
/// gate-up pair split into its gate and up rows over a shared A) and its router's pair
/// (`ffn_gate_inp`). llama.cpp scales by one alpha over each pair's rank: rsLoRA's alpha /
/// sqrt(r) is written as alpha * sqrt(r), and a module whose scale differs (rank_pattern,
/// alpha_pattern) has the difference folded into its B. DoRA, which the format cannot express,
/// is refused.
pub fn export_adapter(config: &ModelConfig, adapter_dir: &Path, out: &Path) -> Result<usize> {
    let (arch, permutes) = architecture(config)?;
    let lora = crate::lora::LoraConfig::from_dir(adapter_dir)?;
    if lora.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(Error::Config(format!(
            "{}: the adapter trains full copies of modules (modules_to_save), which llama.cpp's adapter format cannot carry; merge it into the model instead",
            adapter_dir.display()
        )));
    }
    if lora.use_dora {
        return Err(Error::Config(format!(
            "{}: a DoRA adapter rescales each output row of the merged weight, which llama.cpp's adapter format cannot express; merge it into the model instead (peft-sft merge --output x.gguf)",
            adapter_dir.display()
        )));
    }
    if lora.trainable_token_indices.is_some() {
        return Err(Error::Config(format!(
            "{}: the adapter trains vocabulary rows (new tokens), which llama.cpp adapters cannot carry; merge it into the model instead",
            adapter_dir.display()
        )));
    }
    let path = adapter_dir.join(crate::lora::adapter::ADAPTER_WEIGHTS);
    let tensors = crate::io::read_safetensors(&path, &Device::Cpu)?;
    let prefix = format!("{}.", config.module_prefix());
    // llama.cpp scales every pair by one alpha over the pair's rank; a module whose PEFT scale
    // differs (rank_pattern / alpha_pattern, a mixture's gate-up pair at twice the rank) gets the
    // difference folded into its B.
    let alpha = if lora.use_rslora {
        lora.lora_alpha * (lora.r as f64).sqrt()
    } else {
        lora.lora_alpha
    };
    // module → (A, B), as PEFT stores them.
    let mut modules: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
    for (key, t) in tensors {
        let rest = key
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".weight"))
            .ok_or_else(|| Error::Tensor {
                name: key.clone(),
                message: format!("in {}: not a PEFT LoRA weight", path.display()),
            })?;
        let (module, half) = rest.rsplit_once('.').ok_or_else(|| Error::Tensor {
            name: key.clone(),
            message: "not a PEFT LoRA weight".into(),
        })?;
        let slot = match half {
            "lora_A" => 0,
            "lora_B" => 1,
            _ => {
                return Err(Error::Tensor {
                    name: key.clone(),
                    message: format!(
                        "in {}: only lora_A/lora_B weights can be exported",
                        path.display()
                    ),
                })
            }
        };
        // A multimodal wrapper's text model is written as the text model (`model.*`).
        let module = match module.strip_prefix(&prefix) {
            Some(rest) => format!("model.{rest}"),
            None => module.to_string(),
        };
        modules.entry(module).or_default()[slot] = Some(t.to_dtype(DType::F32)?);
    }
    let q_factor = query_factor(config, arch);
    let mut pairs: BTreeMap<String, Tensor> = BTreeMap::new();
    for (module, [a, b]) in modules {
        let missing = |half: &str| Error::Tensor {
            name: format!("base_model.model.{module}.{half}.weight"),
            message: format!("missing from {}", path.display()),
        };
        let (a, b) = (
            a.ok_or_else(|| missing("lora_A"))?,
            b.ok_or_else(|| missing("lora_B"))?,
        );
        // PEFT's target_parameters on a mixture of experts: the stacked pairs of every expert
        // (expert e: rows e·r.. of A, columns e, E+e, … of B).
        let layer = module
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, _)| l.parse::<usize>().ok());
        let moe = layer.and_then(|l| config.layer_moe(l).map(|m| (l, m)));
        let stacked = match &moe {
            Some((l, m)) if module.ends_with(".mlp.experts.base_layer") => {
                Some((*l, m.experts, "gate_up_proj"))
            }
            Some((l, m)) if module.ends_with(".mlp.experts") => Some((*l, m.experts, "down_proj")),
            _ => None,
        };
        if let Some((l, experts, param)) = stacked {
            let base = module.trim_end_matches(".base_layer");
            let key = format!("{base}.{param}");
            let (_, scale) = crate::lora::target::rank_and_scale(&lora, &key)?;
            let (ra, inp) = a.dims2()?;
            let (out, rb) = b.dims2()?;
            let r = ra / experts;
            if ra != r * experts || rb != ra {
                return Err(Error::Tensor {
                    name: format!("base_model.model.{module}.lora_A.weight"),
                    message: format!(
                        "shapes {:?} and {:?} are not {experts} experts' stacked pairs",
                        a.dims(),
                        b.dims()
                    ),
                });
            }
            // [E, r, in] and [E, out, r], B scaled to llama.cpp's alpha / r.
            let a3 = a.reshape((experts, r, inp))?;
            let b3 = b
                .reshape((out, r, experts))?
                .permute((2, 0, 1))?
                .contiguous()?
                .affine(scale * r as f64 / alpha, 0.0)?;
            let name = |stack: &str| format!("blk.{l}.{stack}.weight");
            if param == "gate_up_proj" {
                // Gate rows, then up rows: each half its own pair over the shared A.
                let half = out / 2;
                for (stack, from) in [("ffn_gate_exps", 0), ("ffn_up_exps", half)] {
                    pairs.insert(format!("{}.lora_a", name(stack)), a3.clone());
                    pairs.insert(
                        format!("{}.lora_b", name(stack)),
                        b3.narrow(1, from, half)?.contiguous()?,
                    );
                }
            } else {
                pairs.insert(format!("{}.lora_a", name("ffn_down_exps")), a3);
                pairs.insert(format!("{}.lora_b", name("ffn_down_exps")), b3);
            }
            continue;
        }
        let hf = format!("{module}.weight");
        let gguf = llama_cpp_tensor(arch, &hf)
            .filter(|s| s.expert.is_none())
            .ok_or_else(|| Error::Tensor {
                name: format!("base_model.model.{module}.lora_A.weight"),
                message: format!("the module has no llama.cpp {arch} adapter tensor"),
            })?
            .name;
        // The router's pair is PEFT's `gate.weight` parameter.
        let scale_key = match moe {
            Some(_) if module.ends_with(".mlp.gate") => format!("{module}.weight"),
            _ => module.clone(),
        };
        let (_, scale) = crate::lora::target::rank_and_scale(&lora, &scale_key)?;
        let r = a.dim(0)?;
        let mut b = b.affine(scale * r as f64 / alpha, 0.0)?;
        if let Some(heads) = permuted_heads(&hf, config, permutes) {
            b = permute_rows(&b, heads)?;
        }
        // Gemma 2's query rows carry the model's attention scale in the exported base: so does
        // the update to them.
        if arch == "gemma2" && gguf.ends_with("attn_q.weight") && q_factor != 1.0 {
            b = b.affine(q_factor, 0.0)?;
        }
        pairs.insert(format!("{gguf}.lora_a"), a);
        pairs.insert(format!("{gguf}.lora_b"), b);
    }
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
        ("general.quantization_version".to_string(), Value::U32(2)),
    ];
    let tensors = pairs
        .into_iter()
        .map(|(n, t)| Ok((n, QTensor::quantize(&t, GgmlDType::F32)?)))
        .collect::<Result<Vec<_>>>()?;
    write_gguf(out, &meta, &tensors)?;
    Ok(tensors.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_mixes_types_like_llama_cpp_and_falls_back_on_short_rows() {
        let t = |n: &str, dims: &[usize]| tensor_type(n, dims, ExportType::Q4KM, 16, false, 0);
        assert_eq!(t("blk.0.attn_v.weight", &[256, 512]), GgmlDType::Q6K);
        assert_eq!(t("blk.3.attn_v.weight", &[256, 512]), GgmlDType::Q4K);
        assert_eq!(t("blk.4.ffn_down.weight", &[256, 512]), GgmlDType::Q6K);
        assert_eq!(t("output.weight", &[256, 512]), GgmlDType::Q6K);
        assert_eq!(t("blk.3.attn_q.weight", &[256, 576]), GgmlDType::Q5_0);
        assert_eq!(t("output.weight", &[256, 576]), GgmlDType::Q8_0);
        assert_eq!(t("blk.3.attn_norm.weight", &[512]), GgmlDType::F32);
        assert_eq!(t("blk.3.attn_q.weight", &[64, 63]), GgmlDType::F16);
        let q8 = tensor_type(
            "blk.0.attn_q.weight",
            &[64, 64],
            ExportType::Q8_0,
            2,
            false,
            0,
        );
        assert_eq!(q8, GgmlDType::Q8_0);
    }

    #[test]
    fn fixture_tokenizers_are_named_by_their_pre_tokenizer() {
        for dir in [
            "tests/fixtures/tokenizers/llama3",
            "tests/fixtures/tokenizers/chatml",
        ] {
            let tok = ChatTokenizer::from_dir(Path::new(dir)).unwrap();
            assert_eq!(pre_tokenizer(&tok).unwrap(), "gpt-2", "{dir}");
        }
    }
}
