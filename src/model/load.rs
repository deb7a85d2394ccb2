//! Loading a model by folder or Hub id onto a device, with its tokenizer.

use super::{weights::Weights, CausalLm, ModelConfig};
use crate::data::ChatTokenizer;
use crate::{hub, Error, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;

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

/// Picks the device: `cpu`, `cuda` (or `cuda:N`), or `auto` (CUDA when built with it and present).
pub fn select_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        cuda if cuda.starts_with("cuda") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse)
                .map_err(|_| {
                    Error::Config(format!(
                        "--device `{name}`: expected cpu, cuda, cuda:N or auto"
                    ))
                })?;
            Device::new_cuda(ordinal).map_err(|e| {
                Error::Config(format!(
                    "--device {name}: {e} (build with --features cuda on a machine with a GPU)"
                ))
            })
        }
        other => Err(Error::Config(format!(
            "--device `{other}`: expected cpu, cuda, cuda:N or auto"
        ))),
    }
}

/// The compute dtype: f32 on CPU; the checkpoint's dtype (bf16/f16) on accelerators.
pub fn compute_dtype(config: &ModelConfig, device: &Device) -> DType {
    if device.is_cpu() {
        return DType::F32;
    }
    match config.saved_dtype() {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    }
}

/// Loads `spec` (folder or Hub id). `trainable` makes every base weight a variable.
pub fn load_pretrained(spec: &str, trainable: bool, device: &Device) -> Result<Pretrained> {
    let dir = hub::resolve_model(spec, None)?;
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::MissingFile {
            path: config_path,
            hint: "a model folder needs the config.json transformers writes".into(),
        });
    }
    let config = ModelConfig::from_file(&config_path)?;
    let tokenizer = ChatTokenizer::from_dir(&dir)?;
    let weights = Weights::from_dir(&dir)?;
    let dtype = compute_dtype(&config, device);
    let model = CausalLm::load(config, &weights, trainable, dtype, device)?;
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
