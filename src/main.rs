//! `peft-sft`: supervised fine-tuning with LoRA, QLoRA and full fine-tuning.

mod cli;

use clap::Command;

fn main() {
    peft_sft::alloc::retain_freed_memory();
    let matches = Command::new("peft-sft")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Fine-tune causal language models with LoRA, QLoRA or all weights (TRL/PEFT compatible)")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(cli::train::command())
        .subcommand(cli::merge::command())
        .subcommand(cli::eval::command())
        .subcommand(cli::generate::command())
        .subcommand(cli::data::command())
        .subcommand(cli::plot::command())
        .subcommand(cli::push::command())
        .subcommand(cli::export::command())
        .subcommand(cli::plan::command())
        .get_matches();
    let result = match matches.subcommand() {
        Some(("train", m)) => cli::train::run(m),
        Some(("merge", m)) => cli::merge::run(m),
        Some(("eval", m)) => cli::eval::run(m),
        Some(("generate", m)) => cli::generate::run(m),
        Some(("data", m)) => cli::data::run(m),
        Some(("plot", m)) => cli::plot::run(m),
        Some(("push", m)) => cli::push::run(m),
        Some(("export-adapter", m)) => cli::export::run(m),
        Some(("plan", m)) => cli::plan::run(m),
        _ => Ok(()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
