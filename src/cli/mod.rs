//! The command-line interface: one file per command, each a thin layer over the library.

pub mod eval;
pub mod generate;
pub mod merge;
pub mod train;

use clap::{Arg, ArgMatches};
use peft_sft::lora::load_adapter;
use peft_sft::model::{load_pretrained, select_device, Pretrained};
use std::path::Path;

/// The `--model`, `--adapter` and `--device` flags shared by the inference commands.
pub fn model_args(adapter_required: bool) -> [Arg; 3] {
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
            .default_value("cpu")
            .help("cpu | cuda | cuda:N | auto"),
    ]
}

/// A string flag's value ("" when absent; clap enforces the required ones).
pub fn text<'a>(m: &'a ArgMatches, name: &str) -> &'a str {
    m.get_one::<String>(name).map_or("", String::as_str)
}

/// Loads `--model` on `--device` (frozen) and puts `--adapter` on it when given.
pub fn load_model(m: &ArgMatches) -> anyhow::Result<Pretrained> {
    let device = select_device(text(m, "device"))?;
    let mut loaded = load_pretrained(text(m, "model"), false, &device)?;
    if let Some(adapter) = m.get_one::<String>("adapter") {
        load_adapter(&mut loaded.model, Path::new(adapter))?;
    }
    Ok(loaded)
}
