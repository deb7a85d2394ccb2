//! peft-sft: supervised fine-tuning of causal language models with LoRA, QLoRA and full fine-tuning,
//! built on candle. The CLI (`peft-sft`) is a thin layer over this library.

pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod hub;
pub mod io;
pub mod lora;
pub mod model;
pub mod ops;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
