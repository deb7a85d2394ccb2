//! LoRA as PEFT defines it: the adapter's config, the layer math, injection into a model's target
//! modules, PEFT's adapter files, and merging into the base weights.

pub mod adapter;
pub mod bank;
pub mod config;
pub mod init;
pub mod layer;
pub mod merge;
pub mod target;

pub use adapter::{load_adapter, remove_adapters, save_adapter, Adapter};
pub use bank::AdapterBank;
pub use config::{LoraConfig, TargetModules};
pub use merge::merge_and_unload;
pub use target::{inject, inject_with};
