//! `peft-sft eval`: loss, token accuracy and entropy of a model (optionally with an adapter).

use super::{dataset_args, load_model, model_args, text, tokenize_options, with_chat_template};
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use peft_sft::data::prepare_dataset;
use peft_sft::train::eval::evaluate;
use std::path::Path;

/// The `eval` subcommand's definition.
pub fn command() -> Command {
    Command::new("eval")
        .about("Evaluate eval_loss, eval_mean_token_accuracy, eval_entropy on a dataset")
        .args(model_args(false))
        .args(dataset_args())
        .arg(
            Arg::new("batch_size")
                .long("per-device-eval-batch-size")
                .default_value("8")
                .value_parser(value_parser!(usize)),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("Print one JSON object"),
        )
}

/// Runs `peft-sft eval`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let mut loaded = load_model(m)?;
    loaded.tokenizer = with_chat_template(loaded.tokenizer, m)?;
    let opts = tokenize_options(m);
    let data = prepare_dataset(Path::new(text(m, "dataset")), &loaded.tokenizer, &opts)?;
    let pad = loaded
        .tokenizer
        .pad_token_id()
        .ok_or_else(|| anyhow::anyhow!("the tokenizer has neither a pad nor an eos token"))?;
    let batch = m.get_one::<usize>("batch_size").copied().unwrap_or(8);
    let metrics = evaluate(&loaded.model, &data.examples, batch, pad)?.eval_metrics();
    if m.get_flag("json") {
        println!("{}", serde_json::Value::Object(metrics));
    } else {
        for (k, v) in metrics {
            println!("{k}: {v}");
        }
        if data.skipped_no_loss_tokens > 0 {
            eprintln!(
                "skipped {} rows with no loss token",
                data.skipped_no_loss_tokens
            );
        }
    }
    Ok(())
}
