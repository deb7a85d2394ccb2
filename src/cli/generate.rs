//! `peft-sft generate`: text from a base model, optionally with an adapter.

use clap::{Arg, ArgAction, ArgMatches, Command};
use peft_sft::generate::{generate, GenerateOptions};
use peft_sft::lora::load_adapter;
use peft_sft::model::{load_pretrained, select_device};
use std::path::Path;

/// The `generate` subcommand's definition.
pub fn command() -> Command {
    Command::new("generate")
        .about("Generate text from a model, optionally with a LoRA adapter")
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
            Arg::new("prompt")
                .long("prompt")
                .required(true)
                .help("Prompt text (the user turn with --chat)"),
        )
        .arg(
            Arg::new("chat")
                .long("chat")
                .action(ArgAction::SetTrue)
                .help("Apply the chat template"),
        )
        .arg(
            Arg::new("max_new_tokens")
                .long("max-new-tokens")
                .default_value("128")
                .value_parser(clap::value_parser!(usize)),
        )
        .arg(
            Arg::new("temperature")
                .long("temperature")
                .default_value("0")
                .value_parser(clap::value_parser!(f64)),
        )
        .arg(
            Arg::new("top_p")
                .long("top-p")
                .default_value("1.0")
                .value_parser(clap::value_parser!(f64)),
        )
        .arg(
            Arg::new("seed")
                .long("seed")
                .default_value("42")
                .value_parser(clap::value_parser!(u64)),
        )
        .arg(Arg::new("device").long("device").default_value("cpu"))
}

/// Runs `peft-sft generate`, printing only the new text.
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
    let prompt = m.get_one::<String>("prompt").cloned().unwrap_or_default();
    let tok = &loaded.tokenizer;
    let ids = if m.get_flag("chat") {
        let messages = [serde_json::json!({"role": "user", "content": prompt})];
        tok.encode(&tok.apply_chat_template(&messages, true)?, false)?
    } else {
        tok.encode(&prompt, true)?
    };
    let stop_ids = loaded.stop_ids();
    let opts = GenerateOptions {
        max_new_tokens: m.get_one::<usize>("max_new_tokens").copied().unwrap_or(128),
        temperature: m.get_one::<f64>("temperature").copied().unwrap_or(0.0),
        top_p: m.get_one::<f64>("top_p").copied().unwrap_or(1.0),
        seed: m.get_one::<u64>("seed").copied().unwrap_or(42),
        stop_ids,
    };
    let new = generate(&loaded.model, &ids, &opts)?;
    println!("{}", tok.decode(&new, true)?);
    Ok(())
}
