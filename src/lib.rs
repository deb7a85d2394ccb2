//! peft-sft: supervised fine-tuning of causal language models with LoRA, QLoRA and full fine-tuning,
//! built on candle. The CLI (`peft-sft`) is a thin layer over this library.
//!
//! Train a LoRA adapter (the same settings as `peft-sft train --lora ...`):
//!
//! ```
//! use peft_sft::config::SftConfig;
//! use peft_sft::train::{train, Reporting};
//!
//! let out = tempfile::tempdir()?;
//! let config = SftConfig {
//!     model_name_or_path: "tests/fixtures/models/qwen2".into(),
//!     dataset_name: "tests/fixtures/data/qa_chat.jsonl".into(),
//!     output_dir: out.path().to_string_lossy().into_owned(),
//!     max_steps: 2,
//!     per_device_train_batch_size: 2,
//!     device: "cpu".into(),
//!     ..SftConfig::default()
//! };
//! let outcome = train(&config, Reporting::default())?;
//! assert_eq!(outcome.global_step, 2);
//! assert!(out.path().join("adapter_model.safetensors").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Load a base model once, put adapters on and off, generate, and merge:
//!
//! ```
//! use peft_sft::generate::{generate, GenerateOptions};
//! use peft_sft::lora::{inject, load_adapter, merge_and_unload, save_adapter, LoraConfig};
//! use peft_sft::device::select_device;
//! use peft_sft::model::load_pretrained;
//!
//! let device = select_device("cpu")?;
//! let mut base = load_pretrained("tests/fixtures/models/qwen2", false, &device)?;
//! let prompt = base.tokenizer.encode("Hello", true)?;
//! let opts = GenerateOptions { max_new_tokens: 5, ..GenerateOptions::default() };
//! let plain = generate(&base.model, &prompt, &opts)?;
//!
//! // A fresh PEFT-initialised adapter (B = 0) leaves the output unchanged; save and reload it.
//! let dir = tempfile::tempdir()?;
//! inject(&mut base.model, &LoraConfig { r: 4, ..LoraConfig::default() }, 0)?;
//! save_adapter(&base.model, &LoraConfig { r: 4, ..LoraConfig::default() }, dir.path())?;
//! load_adapter(&mut base.model, dir.path())?;
//! assert_eq!(generate(&base.model, &prompt, &opts)?, plain);
//! merge_and_unload(&mut base.model)?;
//! assert_eq!(generate(&base.model, &prompt, &opts)?, plain);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod alloc;
pub mod card;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod generate;
pub mod hub;
pub mod io;
pub mod lora;
pub mod memory;
pub mod model;
pub mod ops;
pub mod push;
pub mod quant;
pub mod report;
pub mod rng;
pub mod schedule;
pub mod serve;
pub mod train;

pub use error::{Error, Result};
