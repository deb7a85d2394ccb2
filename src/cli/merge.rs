//! `peft-sft merge`: adapter + base -> a complete transformers model folder, verified on a probe.

use super::{load_model, model_args, text};
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use peft_sft::export::merge::{merge, MergeOptions};
use std::path::PathBuf;

/// The `merge` subcommand's definition.
pub fn command() -> Command {
    Command::new("merge")
        .about("Merge a PEFT LoRA adapter into its base: a transformers model folder, or a GGUF file for a GGUF base (--output x.gguf)")
        .args(model_args(false))
        .arg(
            Arg::new("output")
                .long("output")
                .required(true)
                .help("Output model folder"),
        )
        .arg(
            Arg::new("base_full_precision")
                .long("base-full-precision")
                .value_name("MODEL")
                .help("For a quantized base: merge into these full-precision weights instead of the dequantized base"),
        )
        .arg(
            Arg::new("max_merge_error")
                .long("max-merge-error")
                .default_value("0.1")
                .value_parser(value_parser!(f64))
                .help("Refuse to write when, on the probe, the merged model strays from the adapter by more than this fraction of what the adapter changes in the base's logits"),
        )
        .arg(
            Arg::new("quantize")
                .long("quantize")
                .help("Weight type of a GGUF --output: f32 | f16 | q8_0 | q4_0 | q4_k_m [f16 from a safetensors base; from a GGUF base, the merged tensors keep their types unless given]"),
        )
        .arg(
            Arg::new("force")
                .long("force")
                .action(ArgAction::SetTrue)
                .help("Write the merged model even when it fails the probe check"),
        )
}

/// Runs `peft-sft merge`: the merged model must answer like the adapter on its (possibly
/// quantized) base, measured on a probe, or nothing is written (`export::merge`).
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let loaded = load_model(m)?;
    let options = MergeOptions {
        adapter: m.get_one::<String>("adapter").map(PathBuf::from),
        base_full_precision: m.get_one::<String>("base_full_precision").cloned(),
        max_merge_error: m.get_one::<f64>("max_merge_error").copied().unwrap_or(0.1),
        gguf_type: m
            .get_one::<String>("quantize")
            .map(|q| q.parse())
            .transpose()?,
        force: m.get_flag("force"),
        ..MergeOptions::new(text(m, "model"), text(m, "output"))
    };
    let report = merge(loaded, &options)?;
    eprintln!("{}; wrote {}", report.summary, report.output.display());
    if let Some(pre) = report.pre_tokenizer {
        eprintln!("tokenizer.ggml.pre = {pre}");
    }
    Ok(())
}
