//! `peft-sft merge`: adapter + base -> a complete transformers model folder.

use super::{load_model, model_args, text};
use clap::{Arg, ArgMatches, Command};
use peft_sft::lora::merge_and_unload;
use peft_sft::model::save::{save_pretrained, MAX_SHARD_BYTES};
use std::path::Path;

/// The `merge` subcommand's definition.
pub fn command() -> Command {
    Command::new("merge")
        .about("Merge a PEFT LoRA adapter into its base and write a transformers model folder")
        .args(model_args(true))
        .arg(
            Arg::new("output")
                .long("output")
                .required(true)
                .help("Output model folder"),
        )
}

/// Runs `peft-sft merge`, reporting the largest logit difference between the adapter and the
/// merged model on a probe sentence.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let mut loaded = load_model(m)?;
    let probe = loaded
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog.", true)?;
    let probe = candle_core::Tensor::new(probe.as_slice(), &loaded.model.device)?.unsqueeze(0)?;
    let before = loaded.model.forward(&probe)?;
    let merged = merge_and_unload(&mut loaded.model)?;
    let after = loaded.model.forward(&probe)?;
    let diff = (before - after)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let out = Path::new(text(m, "output"));
    save_pretrained(&loaded.model, &loaded.dir, out, MAX_SHARD_BYTES)?;
    eprintln!(
        "merged {merged} LoRA modules into {}; largest logit difference between adapter and merged model on a probe: {diff:.2e}",
        out.display()
    );
    Ok(())
}
