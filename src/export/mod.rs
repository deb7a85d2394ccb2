//! What leaves peft-sft for other tools: the verified merge ([`merge`]: a transformers model
//! folder or a GGUF file) and llama.cpp's GGUF formats ([`gguf`]: a whole model, a LoRA adapter).

pub mod gguf;
pub mod merge;
