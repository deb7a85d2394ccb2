//! Loading a model by folder or Hub id onto a device, with its tokenizer.

use super::{weights::Weights, CausalLm, ModelConfig};
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
    let dir = match tokenizer {
        Some(t) => t.to_path_buf(),
        None => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    if !dir.join("tokenizer.json").exists() {
        return Err(Error::MissingFile {
            path: dir.join("tokenizer.json"),
            hint: format!(
                "a GGUF base needs the model's Hugging Face tokenizer: pass --tokenizer FOLDER (the original model's folder or Hub download) for {}",
                path.display()
            ),
        });
    }
    let tokenizer =
        ChatTokenizer::from_dir(&dir)?.with_chat_template_if_missing(gguf.chat_template());
    Ok((config, tokenizer, Weights::from_gguf(gguf), dir))
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
        let weights = Weights::from_dir(&dir)?;
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
