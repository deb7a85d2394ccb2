//! Hugging Face decoder models: config parsing, weights (incl. bitsandbytes 4-bit checkpoints),
//! the layers, the causal LM, loading and saving model folders.

pub mod bnb;
pub mod causal_lm;
pub mod config;
pub mod layers;
pub mod load;
pub mod param;
pub mod save;
pub mod selective;
pub mod tokens;
pub mod weights;

pub use causal_lm::CausalLm;
pub use config::{Family, ModelConfig};
pub use load::{load_pretrained, load_pretrained_with, LoadOptions, Pretrained};
