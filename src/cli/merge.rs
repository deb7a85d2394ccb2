//! `peft-sft merge`: adapter + base -> a complete transformers model folder.

use clap::{Arg, ArgMatches, Command};
use peft_sft::lora::{load_adapter, merge_and_unload};
use peft_sft::model::save::{save_pretrained, MAX_SHARD_BYTES};
use peft_sft::model::{load_pretrained, select_device};
use std::path::Path;

/// The `merge` subcommand's definition.
pub fn command() -> Command {
    Command::new("merge")
        .about("Merge a PEFT LoRA adapter into its base and write a transformers model folder")
        .arg(
            Arg::new("model")
                .long("model")
                .required(true)
                .help("Base model folder or Hub id"),
        )
        .arg(
            Arg::new("adapter")
                .long("adapter")
                .required(true)
                .help("PEFT adapter folder"),
        )
        .arg(
            Arg::new("output")
                .long("output")
                .required(true)
                .help("Output model folder"),
        )
        .arg(
            Arg::new("device")
                .long("device")
                .default_value("cpu")
                .help("cpu | cuda | auto"),
        )
}

/// Runs `peft-sft merge`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let device = select_device(m.get_one::<String>("device").map_or("cpu", String::as_str))?;
    let mut loaded = load_pretrained(
        &m.get_one::<String>("model").cloned().unwrap_or_default(),
        false,
        &device,
    )?;
    let adapter = Path::new(m.get_one::<String>("adapter").map_or("", String::as_str));
    load_adapter(&mut loaded.model, adapter)?;
    let probe = loaded
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog.", true)?;
    let probe = candle_core::Tensor::new(probe.as_slice(), &device)?.unsqueeze(0)?;
    let before = loaded.model.forward(&probe)?;
    let merged = merge_and_unload(&mut loaded.model)?;
    let after = loaded.model.forward(&probe)?;
    let diff = (before - after)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let out = Path::new(m.get_one::<String>("output").map_or("", String::as_str));
    save_pretrained(&loaded.model, &loaded.dir, out, MAX_SHARD_BYTES)?;
    eprintln!(
        "merged {merged} LoRA modules into {}; largest logit difference between adapter and merged model on a probe: {diff:.2e}",
        out.display()
    );
    Ok(())
}
