//! `peft-sft generate`: text from a base model, optionally with an adapter.

use super::{load_model, model_args, text};
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use peft_sft::generate::{generate, GenerateOptions};

/// The `generate` subcommand's definition.
pub fn command() -> Command {
    let number = |name: &'static str, flag: &'static str, default: &'static str| {
        Arg::new(name).long(flag).default_value(default)
    };
    Command::new("generate")
        .about("Generate text from a model, optionally with a LoRA adapter")
        .args(model_args(false))
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
        .arg(number("max_new_tokens", "max-new-tokens", "128").value_parser(value_parser!(usize)))
        .arg(number("temperature", "temperature", "0").value_parser(value_parser!(f64)))
        .arg(number("top_p", "top-p", "1.0").value_parser(value_parser!(f64)))
        .arg(number("seed", "seed", "42").value_parser(value_parser!(u64)))
}

/// Runs `peft-sft generate`, printing only the new text.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let loaded = load_model(m)?;
    let prompt = text(m, "prompt");
    let tok = &loaded.tokenizer;
    let ids = if m.get_flag("chat") {
        let messages = [serde_json::json!({"role": "user", "content": prompt})];
        tok.encode(&tok.apply_chat_template(&messages, true)?, false)?
    } else {
        tok.encode(prompt, true)?
    };
    let opts = GenerateOptions {
        max_new_tokens: m.get_one::<usize>("max_new_tokens").copied().unwrap_or(128),
        temperature: m.get_one::<f64>("temperature").copied().unwrap_or(0.0),
        top_p: m.get_one::<f64>("top_p").copied().unwrap_or(1.0),
        seed: m.get_one::<u64>("seed").copied().unwrap_or(42),
        stop_ids: loaded.stop_ids(),
    };
    let new = generate(&loaded.model, &ids, &opts)?;
    println!("{}", tok.decode(&new, true)?);
    Ok(())
}
