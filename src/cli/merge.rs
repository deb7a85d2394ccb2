//! `peft-sft merge`: adapter + base -> a complete transformers model folder, verified on a probe.

use super::{load_model, model_args, text};
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use peft_sft::lora::{load_adapter, merge_and_unload};
use peft_sft::model::save::{save_pretrained, MAX_SHARD_BYTES};
use peft_sft::model::{load_pretrained, CausalLm};
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
        .arg(
            Arg::new("base_full_precision")
                .long("base-full-precision")
                .value_name("MODEL")
                .help("For a quantized base: merge into these full-precision weights instead of the dequantized base"),
        )
        .arg(
            Arg::new("max_logit_diff")
                .long("max-logit-diff")
                .default_value("1e-3")
                .value_parser(value_parser!(f64))
                .help("Refuse to write when adapter and merged model differ by more than this on the probe (relative to the largest logit)"),
        )
        .arg(
            Arg::new("force")
                .long("force")
                .action(ArgAction::SetTrue)
                .help("Write the merged model even when it fails the probe check"),
        )
}

/// Logits of the probe text.
fn probe_logits(model: &CausalLm, ids: &[u32]) -> anyhow::Result<candle_core::Tensor> {
    let probe = candle_core::Tensor::new(ids, &model.device)?.unsqueeze(0)?;
    Ok(model.forward(&probe)?)
}

/// Runs `peft-sft merge`: the merged model must answer like the adapter on its (possibly
/// quantized) base, measured on a probe, or nothing is written.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let mut loaded = load_model(m)?;
    let ids = loaded.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. Question: what is 12 + 30? Answer: 42.",
        true,
    )?;
    let before = probe_logits(&loaded.model, &ids)?;
    let quantized = loaded.model.quantized_modules().len();
    let (mut model, source_dir, how) = match (quantized, m.get_one::<String>("base_full_precision"))
    {
        (0, Some(_)) => anyhow::bail!(
            "--base-full-precision applies to a quantized base (--qlora, --load-in-8bit or a bnb-4bit checkpoint); this base is full precision"
        ),
        (0, None) => (loaded.model, loaded.dir, "merged into the base".to_string()),
        (n, Some(full)) => {
            let mut target = load_pretrained(full, false, &loaded.model.device)?;
            load_adapter(&mut target.model, Path::new(text(m, "adapter")))?;
            let how = format!("merged into the full-precision weights of {full} (the training base had {n} quantized modules)");
            (target.model, target.dir, how)
        }
        (n, None) => {
            loaded.model.dequantize()?;
            let how = format!("dequantized {n} quantized modules of the base and merged into them (pass --base-full-precision to merge into original weights)");
            (loaded.model, loaded.dir, how)
        }
    };
    let merged = merge_and_unload(&mut model)?;
    let after = probe_logits(&model, &ids)?;
    let diff = (&before - &after)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let scale = before.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6) as f64;
    let limit = m.get_one::<f64>("max_logit_diff").copied().unwrap_or(1e-3);
    let report = format!(
        "{how}: {merged} LoRA modules; largest logit difference between the adapter on its training base and the merged model on a probe: {diff:.2e} ({:.2e} of the largest logit)",
        diff / scale
    );
    if diff / scale > limit && !m.get_flag("force") {
        anyhow::bail!(
            "{report}, above --max-logit-diff {limit:e}: the merged model would not answer like the adapter did; nothing written (pass --force to write it anyway)"
        );
    }
    let out = Path::new(text(m, "output"));
    save_pretrained(&model, &source_dir, out, MAX_SHARD_BYTES)?;
    eprintln!("{report}; wrote {}", out.display());
    Ok(())
}
