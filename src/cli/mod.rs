//! The command-line interface: one file per command, each a thin layer over the library.

pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod merge;
pub mod plan;
pub mod plot;
pub mod push;
pub mod train;

use clap::{value_parser, Arg, ArgAction, ArgMatches};
use peft_sft::config::four_bit_scheme;
use peft_sft::data::{ChatTokenizer, TokenizeOptions};
use peft_sft::device::select_device;
use peft_sft::lora::load_adapter;
use peft_sft::model::{load_pretrained_with, LoadOptions, Pretrained};
use peft_sft::quant::QuantScheme;
use std::path::Path;

/// The `--model`, `--adapter`, `--device` and base-quantization flags shared by the inference
/// commands (so an adapter is measured on the base it was trained on).
pub fn model_args(adapter_required: bool) -> [Arg; 7] {
    [
        Arg::new("model")
            .long("model")
            .required(true)
            .help("Base model folder or Hub id"),
        Arg::new("adapter")
            .long("adapter")
            .required(adapter_required)
            .help("PEFT adapter folder"),
        Arg::new("device")
            .long("device")
            .default_value("auto")
            .help(
                "cpu | cuda | cuda:N | auto (a GPU when this is a CUDA build and one is present)",
            ),
        Arg::new("tokenizer")
            .long("tokenizer")
            .help("Tokenizer folder (for a .gguf --model; default: the model's folder)"),
        Arg::new("qlora")
            .long("qlora")
            .visible_alias("load-in-4bit")
            .action(ArgAction::SetTrue)
            .help("Load the base's linear layers in 4 bits, as --qlora training did"),
        Arg::new("bnb_4bit_quant_type")
            .long("bnb-4bit-quant-type")
            .default_value("nf4")
            .help("nf4 | fp4"),
        Arg::new("load_in_8bit")
            .long("load-in-8bit")
            .action(ArgAction::SetTrue)
            .conflicts_with("qlora")
            .help("Load the base's linear layers as row-wise int8"),
    ]
}

/// The dataset and tokenization flags shared by `eval` and `data inspect`: `--dataset`,
/// `--max-length`, `--completion-only-loss`, `--assistant-only-loss`, `--chat-template`,
/// `--on-bad-row`.
pub fn dataset_args() -> [Arg; 6] {
    [
        Arg::new("dataset")
            .long("dataset")
            .required(true)
            .help("Dataset file or folder"),
        Arg::new("max_length")
            .long("max-length")
            .default_value("1024")
            .value_parser(value_parser!(usize)),
        Arg::new("completion_only_loss")
            .long("completion-only-loss")
            .value_parser(value_parser!(bool))
            .num_args(0..=1)
            .default_missing_value("true"),
        Arg::new("assistant_only_loss")
            .long("assistant-only-loss")
            .action(ArgAction::SetTrue)
            .help("Assistant turns only"),
        Arg::new("chat_template")
            .long("chat-template")
            .help("Jinja chat template file to use instead of the tokenizer's"),
        Arg::new("on_bad_row")
            .long("on-bad-row")
            .value_parser(["error", "skip"])
            .default_value("error"),
    ]
}

/// The tokenization the shared dataset flags ask for.
pub fn tokenize_options(m: &ArgMatches) -> TokenizeOptions {
    TokenizeOptions {
        max_length: m.get_one::<usize>("max_length").copied(),
        completion_only_loss: m.get_one::<bool>("completion_only_loss").copied(),
        assistant_only_loss: m.get_flag("assistant_only_loss"),
        skip_bad_rows: text(m, "on_bad_row") == "skip",
        cache_dir: peft_sft::data::default_cache_dir(),
        ..TokenizeOptions::default()
    }
}

/// `tok` with the `--chat-template` file, when given.
pub fn with_chat_template(tok: ChatTokenizer, m: &ArgMatches) -> anyhow::Result<ChatTokenizer> {
    Ok(match m.get_one::<String>("chat_template") {
        Some(path) => tok.with_chat_template(
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?,
        ),
        None => tok,
    })
}

/// The base quantization the shared flags ask for.
pub fn quantization(m: &ArgMatches) -> anyhow::Result<Option<QuantScheme>> {
    Ok(if m.get_flag("qlora") {
        Some(four_bit_scheme(text(m, "bnb_4bit_quant_type"), true)?)
    } else if m.get_flag("load_in_8bit") {
        Some(QuantScheme::Int8)
    } else {
        None
    })
}

/// A string flag's value ("" when absent; clap enforces the required ones).
pub fn text<'a>(m: &'a ArgMatches, name: &str) -> &'a str {
    m.get_one::<String>(name).map_or("", String::as_str)
}

/// Loads `--model` on `--device` (frozen) and puts `--adapter` on it when given.
pub fn load_model(m: &ArgMatches) -> anyhow::Result<Pretrained> {
    let device = select_device(text(m, "device"))?;
    let options = LoadOptions {
        trainable: false,
        quantize: quantization(m)?,
        tokenizer: m.get_one::<String>("tokenizer").map(Into::into),
        dtype: None,
    };
    let mut loaded = load_pretrained_with(text(m, "model"), options, &device)?;
    if let Some(adapter) = m.get_one::<String>("adapter") {
        load_adapter(&mut loaded.model, Path::new(adapter))?;
        // A tokenizer saved with the adapter (`--chat-template chatml` added tokens) replaces the
        // base's; a template trained with --chat-template FILE travels with the adapter.
        let template = Path::new(adapter).join("chat_template.jinja");
        if Path::new(adapter).join("tokenizer.json").exists() {
            loaded.tokenizer = ChatTokenizer::from_dir(Path::new(adapter))?;
        } else if template.exists() {
            loaded.tokenizer = loaded
                .tokenizer
                .with_chat_template(std::fs::read_to_string(&template)?);
        }
    }
    Ok(loaded)
}
