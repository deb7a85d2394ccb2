//! `peft-sft plot OUTPUT_DIR [--output FILE]`: redraws `loss_curve.png` from a run's
//! `metrics.jsonl` (e.g. while the run is going, or after copying the log elsewhere).

use clap::{Arg, ArgMatches, Command};
use peft_sft::report::{plot::draw_loss_curve, read_metrics, LOSS_CURVE};
use std::path::{Path, PathBuf};

/// The `plot` subcommand's definition.
pub fn command() -> Command {
    Command::new("plot")
        .about("Draw loss_curve.png (train/eval loss, learning rate) from OUTPUT_DIR/metrics.jsonl")
        .arg(
            Arg::new("output_dir")
                .required(true)
                .value_name("OUTPUT_DIR")
                .help("A training run's --output-dir"),
        )
        .arg(
            Arg::new("output")
                .long("output")
                .value_name("FILE")
                .help("Where to write the PNG [OUTPUT_DIR/loss_curve.png]"),
        )
}

/// Runs `peft-sft plot`.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let dir = Path::new(super::text(m, "output_dir"));
    let records = read_metrics(&dir.join("metrics.jsonl"))?;
    let out = m
        .get_one::<String>("output")
        .map_or_else(|| dir.join(LOSS_CURVE), PathBuf::from);
    draw_loss_curve(&records, &out)?;
    println!("wrote {} ({} records)", out.display(), records.len());
    Ok(())
}
