//! The LoRA layer (PEFT's `LoraLayer`): its weights and math live with the ops that run them
//! (`ops::lora`), since the model's linears hold one; named here as PEFT's split names it.

pub use crate::ops::lora::{lora_scale, LoraLayer, ADAPTER_DTYPE};
