//! `peft-sft eval`: loss, token accuracy and entropy of a model (optionally with an adapter).

use clap::{Arg, ArgAction, ArgMatches, Command};
use peft_sft::data::{prepare_dataset, TokenizeOptions};
use peft_sft::lora::load_adapter;
use peft_sft::model::{load_pretrained, select_device};
use peft_sft::train::eval::evaluate;
use std::path::Path;

/// The `eval` subcommand's definition.
pub fn command() -> Command {
    Command::new("eval")
        .about("Evaluate eval_loss, eval_mean_token_accuracy, eval_entropy on a dataset")
        .arg(
            Arg::new("model")
                .long("model")
                .required(true)
                .help("Model folder or Hub id"),
        )
        .arg(
            Arg::new("adapter")
                .long("adapter")
                .help("PEFT adapter folder"),
        )
        .arg(
            Arg::new("dataset")
                .long("dataset")
                .required(true)
                .help("Dataset file"),
        )
        .arg(
            Arg::new("max_length")
                .long("max-length")
                .default_value("1024")
                .value_parser(clap::value_parser!(usize)),
        )
        .arg(
            Arg::new("batch_size")
                .long("per-device-eval-batch-size")
                .default_value("8")
                .value_parser(clap::value_parser!(usize)),
        )
        .arg(
            Arg::new("completion_only_loss")
                .long("completion-only-loss")
                .value_parser(clap::value_parser!(bool))
                .num_args(0..=1)
                .default_missing_value("true"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("Print one JSON object"),
        )
        .arg(Arg::new("device").long("device").default_value("cpu"))
}

/// Runs `peft-sft eval`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let device = select_device(m.get_one::<String>("device").map_or("cpu", String::as_str))?;
    let mut loaded = load_pretrained(
        m.get_one::<String>("model").map_or("", String::as_str),
        false,
        &device,
    )?;
    if let Some(adapter) = m.get_one::<String>("adapter") {
        load_adapter(&mut loaded.model, Path::new(adapter))?;
    }
    let opts = TokenizeOptions {
        max_length: m.get_one::<usize>("max_length").copied(),
        completion_only_loss: m.get_one::<bool>("completion_only_loss").copied(),
    };
    let dataset = Path::new(m.get_one::<String>("dataset").map_or("", String::as_str));
    let data = prepare_dataset(dataset, &loaded.tokenizer, &opts)?;
    let pad = loaded
        .tokenizer
        .pad_token_id()
        .ok_or_else(|| anyhow::anyhow!("the tokenizer has neither a pad nor an eos token"))?;
    let batch = m.get_one::<usize>("batch_size").copied().unwrap_or(8);
    let totals = evaluate(&loaded.model, &data.examples, batch, pad)?;
    let metrics = totals.eval_metrics();
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
