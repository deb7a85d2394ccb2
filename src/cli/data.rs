//! `peft-sft data inspect`: what training will see — decoded examples with the loss tokens marked,
//! a histogram of lengths, and the counts of truncated, skipped and unusable rows.

use clap::parser::ValueSource;
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use peft_sft::config::SftConfig;
use peft_sft::data::chat_format::setup_chatml;
use peft_sft::data::{marked, prepare_dataset, ChatTokenizer, PreparedDataset};
use peft_sft::hub::resolve_model;
use std::io::IsTerminal;
use std::path::Path;

/// The `data` subcommand's definition.
pub fn command() -> Command {
    Command::new("data")
        .about("Inspect how a dataset is tokenized and masked for training")
        .subcommand_required(true)
        .subcommand(
            Command::new("inspect")
                .about("Decoded examples with loss tokens marked, length histogram, row counts")
                .arg(
                    Arg::new("model")
                        .long("model")
                        .required(true)
                        .help("Model folder or Hub id (its tokenizer and chat template)"),
                )
                .args(super::dataset_args())
                .arg(
                    Arg::new("n")
                        .long("n")
                        .default_value("3")
                        .value_parser(value_parser!(usize))
                        .help("Examples to show"),
                )
                .arg(
                    Arg::new("config")
                        .long("config")
                        .help("A training recipe (TOML, as `train --config`): its data settings apply (flags given here win) and its method is shown"),
                )
                .arg(
                    Arg::new("json")
                        .long("json")
                        .action(ArgAction::SetTrue)
                        .help("One JSON object per example: input_ids and loss_mask"),
                ),
        )
}

/// Runs `peft-sft data ...`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    match m.subcommand() {
        Some(("inspect", m)) => inspect(m),
        _ => Ok(()),
    }
}

/// The recipe of `--config` with the data flags given on this command line on top.
fn recipe(m: &ArgMatches, path: &str) -> anyhow::Result<SftConfig> {
    let mut config = SftConfig::from_toml(Path::new(path))?;
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    if given("max_length") {
        config.max_length = m.get_one::<usize>("max_length").copied().unwrap_or(1024);
    }
    if given("completion_only_loss") {
        config.completion_only_loss = m.get_one::<bool>("completion_only_loss").copied();
    }
    if given("assistant_only_loss") {
        config.assistant_only_loss = true;
    }
    if given("chat_template") {
        config.chat_template_path = m.get_one::<String>("chat_template").cloned();
    }
    if given("on_bad_row") {
        config.on_bad_row = super::text(m, "on_bad_row").to_string();
    }
    Ok(config)
}

fn inspect(m: &ArgMatches) -> anyhow::Result<()> {
    let dir = resolve_model(super::text(m, "model"), None)?;
    let (tok, opts) = match m.get_one::<String>("config") {
        Some(path) => {
            let config = recipe(m, path)?;
            let mut tok = ChatTokenizer::from_dir(&dir)?;
            if config.sets_up_chatml() {
                setup_chatml(&mut tok)?;
            } else if let Some(template) = config.chat_template()? {
                tok = tok.with_chat_template(template);
            }
            if !m.get_flag("json") {
                println!("method ({path}): {}", config.method_summary());
                if config.packing {
                    println!(
                        "packing: training packs these rows into sequences of {} tokens",
                        config.max_length
                    );
                }
            }
            (tok, config.tokenize_options())
        }
        None => (
            super::with_chat_template(ChatTokenizer::from_dir(&dir)?, m)?,
            super::tokenize_options(m),
        ),
    };
    let data = prepare_dataset(Path::new(super::text(m, "dataset")), &tok, &opts)?;
    if m.get_flag("json") {
        for (i, e) in data.examples.iter().enumerate() {
            let v = serde_json::json!({"example": i, "input_ids": e.input_ids, "loss_mask": e.loss_mask});
            println!("{v}");
        }
        return Ok(());
    }
    print_summary(&data);
    let color = std::io::stdout().is_terminal();
    let n = m.get_one::<usize>("n").copied().unwrap_or(3);
    for (i, e) in data.examples.iter().take(n).enumerate() {
        println!(
            "\n--- example {i}: {} tokens, {} loss tokens {}",
            e.len(),
            e.num_loss_tokens(),
            if color {
                "(loss tokens in green)"
            } else {
                "(loss tokens in [[ ]])"
            }
        );
        println!("{}", marked(&tok, &e, color)?);
    }
    Ok(())
}

/// Counts, token totals and a length histogram.
fn print_summary(data: &PreparedDataset) {
    let lengths: Vec<usize> = (0..data.examples.len())
        .map(|i| data.examples.example_len(i))
        .collect();
    let tokens: usize = lengths.iter().sum();
    let loss: usize = (0..data.examples.len())
        .map(|i| data.examples.example_loss_tokens(i))
        .sum();
    println!(
        "{}: {} examples; {} truncated to --max-length, {} skipped with no loss token left, {} unusable rows skipped",
        data.path.display(),
        data.examples.len(),
        data.truncated,
        data.skipped_no_loss_tokens,
        data.bad_rows.len()
    );
    for (file, line, reason) in data.bad_rows.iter().take(5) {
        println!("  unusable {}:{line}: {reason}", file.display());
    }
    println!(
        "tokens: {tokens} in all, {loss} carry loss ({:.1}%)",
        100.0 * loss as f64 / tokens.max(1) as f64
    );
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let width = longest.div_ceil(10).max(1);
    let mut bins = [0usize; 10];
    for len in &lengths {
        bins[(len.saturating_sub(1) / width).min(9)] += 1;
    }
    let most = bins.iter().copied().max().unwrap_or(1).max(1);
    println!("length histogram (tokens):");
    for (b, count) in bins.iter().enumerate() {
        let bar = "#".repeat((count * 40).div_ceil(most));
        println!(
            "  {:>6}-{:<6} {bar} {count}",
            b * width + 1,
            (b + 1) * width
        );
    }
}
