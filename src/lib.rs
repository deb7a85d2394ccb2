//! peft-sft: supervised fine-tuning of causal language models with LoRA, QLoRA and full fine-tuning,
//! built on candle. The CLI (`peft-sft`) is a thin layer over this library.

pub mod data;
pub mod error;

pub use error::{Error, Result};
