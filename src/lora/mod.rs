//! LoRA as PEFT defines it: the adapter's config, the layer math, injection into a model's target
//! modules, PEFT's adapter files, and merging into the base weights.

pub mod adapter;
pub mod config;
pub mod layer;
pub mod merge;
pub mod target;

pub use adapter::{load_adapter, save_adapter};
pub use config::{LoraConfig, TargetModules};
pub use merge::merge_and_unload;
pub use target::inject;
