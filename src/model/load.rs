//! Loading a model by folder or Hub id onto a device, with its tokenizer.

use super::{weights::Weights, CausalLm, ModelConfig};
use crate::data::gguf_vocab::GgufVocab;
use crate::data::ChatTokenizer;
use crate::quant::gguf::GgufFile;
use crate::quant::QuantScheme;
use crate::{hub, Error, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// A model with its tokenizer and the folder it came from.
pub struct Pretrained {
    /// The model.
    pub model: CausalLm,
    /// Its tokenizer and chat template.
    pub tokenizer: ChatTokenizer,
    /// The resolved model folder.
    pub dir: PathBuf,
    /// End-of-sequence ids from `generation_config.json` (empty when absent).
    pub generation_eos: Vec<u32>,
}

impl Pretrained {
    /// Every id that ends generation: generation_config.json's, config.json's and the tokenizer's eos.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.generation_eos.clone();
        ids.extend(self.model.config.eos_ids());
        ids.extend(self.tokenizer.eos_token_id());
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// A GGUF base: config from its metadata, tokenizer from `tokenizer` (or the file's folder) with
/// the GGUF's chat template when the folder has none. The returned folder is the tokenizer's.
fn open_gguf(
    path: &Path,
    tokenizer: Option<&Path>,
) -> Result<(ModelConfig, ChatTokenizer, Weights, PathBuf)> {
    if !path.is_file() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint: "--model names a .gguf file that does not exist".into(),
        });
    }
    let gguf = GgufFile::open(path)?;
    let config = ModelConfig::from_value(gguf.config_json()?, path)?;
    let folder = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let vocab = gguf_vocab(&gguf)?;
    // The tokenizer: --tokenizer's folder; else the one the file's metadata describes (as
    // transformers' `gguf_file=`); else a tokenizer.json beside the file.
    let (tokenizer, dir) = match (tokenizer, vocab) {
        (Some(t), _) => (ChatTokenizer::from_dir(t)?, t.to_path_buf()),
        (None, Some(vocab)) => (ChatTokenizer::from_gguf(&vocab)?, folder),
        (None, None) if folder.join("tokenizer.json").exists() => {
            (ChatTokenizer::from_dir(&folder)?, folder)
        }
        (None, None) => {
            return Err(Error::MissingFile {
                path: folder.join("tokenizer.json"),
                hint: format!(
                    "{} has no tokenizer in its metadata (tokenizer.ggml.tokens): pass --tokenizer FOLDER (the original model's folder or Hub download)",
                    path.display()
                ),
            })
        }
    };
    let tokenizer = tokenizer.with_chat_template_if_missing(gguf.chat_template());
    Ok((config, tokenizer, Weights::from_gguf(gguf), dir))
}

/// The tokenizer metadata of a GGUF file (`tokenizer.ggml.*`), if it has a vocabulary.
fn gguf_vocab(gguf: &GgufFile) -> Result<Option<GgufVocab>> {
    use candle_core::quantized::gguf_file::Value;
    let bad = |key: &str, what: &str| Error::Parse {
        path: gguf.path().to_path_buf(),
        line: None,
        message: format!("GGUF metadata {key}: {what}"),
    };
    let key = |name: &str| format!("tokenizer.ggml.{name}");
    let strings = |name: &str| -> Result<Option<Vec<String>>> {
        let Some(value) = gguf.metadata(&key(name)) else {
            return Ok(None);
        };
        let items = value
            .to_vec()
            .map_err(|_| bad(&key(name), "not an array"))?;
        items
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| bad(&key(name), "not strings"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    };
    let Some(tokens) = strings("tokens")? else {
        return Ok(None);
    };
    let token_types = match gguf.metadata(&key("token_type")) {
        None => Vec::new(),
        Some(value) => value
            .to_vec()
            .map_err(|_| bad(&key("token_type"), "not an array"))?
            .iter()
            .map(|v| match v {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                _ => Err(bad(&key("token_type"), "not integers")),
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let scores = match gguf.metadata(&key("scores")) {
        None => Vec::new(),
        Some(value) => value
            .to_vec()
            .map_err(|_| bad(&key("scores"), "not an array"))?
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                _ => Err(bad(&key("scores"), "not numbers")),
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let id = |name: &str| -> Option<u32> {
        gguf.metadata(&key(name))
            .and_then(|v| v.to_u64().ok())
            .and_then(|x| u32::try_from(x).ok())
            .filter(|&x| (x as usize) < tokens.len())
    };
    let flag = |name: &str| gguf.metadata(&key(name)).and_then(|v| v.to_bool().ok());
    let text = |name: &str| {
        gguf.metadata(&key(name))
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    Ok(Some(GgufVocab {
        model: text("model").unwrap_or_default(),
        pre: text("pre"),
        merges: strings("merges")?.unwrap_or_default(),
        scores,
        bos_id: id("bos_token_id"),
        eos_id: id("eos_token_id"),
        unk_id: id("unknown_token_id"),
        pad_id: id("padding_token_id"),
        add_bos: flag("add_bos_token"),
        add_eos: flag("add_eos_token"),
        chat_template: gguf.chat_template(),
        token_types,
        tokens,
    }))
}

/// The compute dtype: f32 on CPU; the checkpoint's dtype (bf16/f16) on accelerators.
pub fn compute_dtype(config: &ModelConfig, device: &Device) -> DType {
    default_dtype(config, !device.is_cpu())
}

/// [`compute_dtype`] for a device known only by kind (the memory planner's `--device`).
pub fn default_dtype(config: &ModelConfig, accelerator: bool) -> DType {
    if !accelerator {
        return DType::F32;
    }
    match config.saved_dtype() {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    }
}

/// How the base weights load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Tokenizer folder for a GGUF base (default: the GGUF file's folder).
    pub tokenizer: Option<PathBuf>,
    /// Every base weight becomes a variable (full fine-tuning).
    pub trainable: bool,
    /// Quantize the decoder's linear weights while loading (`--qlora` / `--load-in-4bit`,
    /// `--load-in-8bit`).
    pub quantize: Option<QuantScheme>,
    /// The frozen base's and the activations' dtype (`--bf16 true` gives bf16 on any device,
    /// `false` f32); None: [`compute_dtype`]. LoRA weights stay f32 either way.
    pub dtype: Option<DType>,
}

/// Loads `spec` (folder or Hub id). `trainable` makes every base weight a variable.
pub fn load_pretrained(spec: &str, trainable: bool, device: &Device) -> Result<Pretrained> {
    let options = LoadOptions {
        trainable,
        ..LoadOptions::default()
    };
    load_pretrained_with(spec, options, device)
}

/// Loads `spec` (folder or Hub id) as `options` say.
pub fn load_pretrained_with(
    spec: &str,
    options: LoadOptions,
    device: &Device,
) -> Result<Pretrained> {
    let (config, tokenizer, weights, dir) = if spec.ends_with(".gguf") {
        open_gguf(Path::new(spec), options.tokenizer.as_deref())?
    } else {
        let dir = hub::resolve_model(spec, None)?;
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(Error::MissingFile {
                path: config_path,
                hint: "a model folder needs the config.json transformers writes".into(),
            });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let tokenizer = ChatTokenizer::from_dir(options.tokenizer.as_deref().unwrap_or(&dir))?;
        let weights = Weights::from_dir(&dir)?.with_aliases(config.name_aliases());
        (config, tokenizer, weights, dir)
    };
    let dtype = options
        .dtype
        .unwrap_or_else(|| compute_dtype(&config, device));
    let model = CausalLm::load_quantized(
        config,
        &weights,
        options.trainable,
        options.quantize,
        dtype,
        device,
    )?;
    let generation_path = dir.join("generation_config.json");
    let generation_eos = if generation_path.exists() {
        let value: serde_json::Value = crate::io::read_json(&generation_path)?;
        super::config::ids_of(value.get("eos_token_id"))
    } else {
        Vec::new()
    };
    Ok(Pretrained {
        model,
        tokenizer,
        dir,
        generation_eos,
    })
}
