//! `peft-sft export-adapter`: a PEFT LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli --lora`).

use clap::{Arg, ArgMatches, Command};
use peft_sft::export::gguf::export_adapter;
use peft_sft::hub::resolve_model;
use peft_sft::lora::LoraConfig;
use peft_sft::model::ModelConfig;
use std::path::Path;

use super::text;

/// The `export-adapter` subcommand.
pub fn command() -> Command {
    Command::new("export-adapter")
        .about("Write a PEFT LoRA adapter in llama.cpp's LoRA GGUF format (for llama-cli --lora)")
        .arg(Arg::new("adapter").long("adapter").required(true).help("PEFT adapter folder"))
        .arg(Arg::new("output").long("output").required(true).help("Output .gguf file"))
        .arg(
            Arg::new("model")
                .long("model")
                .help("Base model (folder or Hub id) for its architecture [the adapter's base_model_name_or_path]"),
        )
}

/// Runs `peft-sft export-adapter`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let adapter = Path::new(text(m, "adapter"));
    let base = match m.get_one::<String>("model") {
        Some(b) => b.clone(),
        None => LoraConfig::from_dir(adapter)?
            .base_model_name_or_path
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: adapter_config.json names no base model; pass --model",
                    adapter.display()
                )
            })?,
    };
    let dir = resolve_model(&base, None)?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let out = Path::new(text(m, "output"));
    let n = export_adapter(&config, adapter, out)?;
    eprintln!(
        "wrote {} ({n} tensors, llama.cpp LoRA adapter)",
        out.display()
    );
    Ok(())
}
