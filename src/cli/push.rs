//! `peft-sft push`: uploads an adapter or model folder to the Hugging Face Hub.

use clap::{Arg, ArgAction, ArgMatches, Command};
use peft_sft::push::{push_folder, PushOptions};
use std::path::Path;

use super::text;

/// The `push` subcommand.
pub fn command() -> Command {
    Command::new("push")
        .about("Upload an adapter or model folder to the Hugging Face Hub (HF_TOKEN, HF_ENDPOINT)")
        .arg(
            Arg::new("path")
                .long("path")
                .required(true)
                .help("Folder to upload"),
        )
        .arg(
            Arg::new("repo_id")
                .long("repo-id")
                .required(true)
                .help("Hub repository, owner/name (created when missing)"),
        )
        .arg(
            Arg::new("private")
                .long("private")
                .action(ArgAction::SetTrue)
                .help("Create the repository as private"),
        )
        .arg(
            Arg::new("revision")
                .long("revision")
                .help("Branch to push to [main]"),
        )
        .arg(
            Arg::new("commit_message")
                .long("commit-message")
                .help("Commit message"),
        )
}

/// Runs `peft-sft push`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let options = PushOptions {
        repo_id: text(m, "repo_id").to_string(),
        private: m.get_flag("private"),
        revision: m.get_one::<String>("revision").cloned(),
        commit_message: m.get_one::<String>("commit_message").cloned(),
        ..Default::default()
    };
    let pushed = push_folder(Path::new(text(m, "path")), &options)?;
    println!(
        "pushed {} files to {}{}",
        pushed.files.len(),
        pushed.url,
        pushed
            .commit_url
            .map(|u| format!(" ({u})"))
            .unwrap_or_default()
    );
    Ok(())
}
