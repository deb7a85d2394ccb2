//! Hugging Face decoder models: config parsing, weights, the layers and the causal LM.

pub mod causal_lm;
pub mod config;
pub mod layers;
pub mod param;
pub mod weights;

pub use causal_lm::CausalLm;
pub use config::{Family, ModelConfig};
