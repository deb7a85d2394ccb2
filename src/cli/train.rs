//! `peft-sft train`: flags named as TRL/transformers/PEFT name them (kebab-case), generated from one
//! table so the TOML recipe, the flags and `SftConfig` share their names.

use clap::{Arg, ArgAction, ArgMatches, Command};
use peft_sft::config::SftConfig;
use peft_sft::report::summary::summarize;
use peft_sft::train::{train, Reporting};
use serde_json::{Map, Value};
use std::path::Path;

/// How a flag's text becomes a config value.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Int,
    Float,
    Bool,
    List,
    Ints,
}

/// (config field, kind, help). The flag is the field in kebab-case.
const FIELDS: &[(&str, Kind, &str)] = &[
    (
        "model_name_or_path",
        Kind::Text,
        "Base model: local folder or Hub id (also --model)",
    ),
    (
        "tokenizer_name_or_path",
        Kind::Text,
        "Tokenizer folder for a .gguf model (also --tokenizer)",
    ),
    (
        "dataset_name",
        Kind::Text,
        "Training data: .jsonl/.json/.csv/.parquet file, folder, or Hub dataset id (also --dataset)",
    ),
    (
        "dataset_config",
        Kind::Text,
        "Config (subset) of a folder or Hub dataset (also --dataset-config-name)",
    ),
    (
        "dataset_train_split",
        Kind::Text,
        "Split to train on (also --dataset-split) [train]",
    ),
    (
        "dataset_test_split",
        Kind::Text,
        "Split of --eval-dataset when it is a folder or Hub dataset [test]",
    ),
    ("eval_dataset", Kind::Text, "Evaluation data: file, folder or Hub dataset id"),
    (
        "eval_split_ratio",
        Kind::Float,
        "Hold out this fraction of the training rows for evaluation",
    ),
    (
        "dataset_text_field",
        Kind::Text,
        "Column with plain text [text]",
    ),
    ("prompt_field", Kind::Text, "Column with the prompt"),
    ("completion_field", Kind::Text, "Column with the completion"),
    (
        "completion_template",
        Kind::Text,
        "Completion built from columns, e.g. \"<think>{Complex_CoT}</think>{Response}\"",
    ),
    (
        "system_prompt",
        Kind::Text,
        "System message put first in each conversation",
    ),
    (
        "max_train_samples",
        Kind::Int,
        "Train on at most N rows of the dataset",
    ),
    (
        "on_bad_row",
        Kind::Text,
        "error | skip: stop at an unusable row or skip and count it [error]",
    ),
    (
        "dataset_cache",
        Kind::Bool,
        "Cache tokenized datasets on disk and map them on later runs [true]",
    ),
    (
        "dataset_cache_dir",
        Kind::Text,
        "Folder of the tokenized-dataset cache [$PEFT_SFT_CACHE/datasets or ~/.cache/peft-sft/datasets]",
    ),
    (
        "chat_template_path",
        Kind::Text,
        "Jinja chat template file to use instead of the tokenizer's (also --chat-template)",
    ),
    ("output_dir", Kind::Text, "Output folder"),
    ("learning_rate", Kind::Float, "Peak learning rate [2e-5]"),
    (
        "per_device_train_batch_size",
        Kind::Int,
        "Sequences per micro-batch [8]",
    ),
    (
        "per_device_eval_batch_size",
        Kind::Int,
        "Sequences per eval batch [8]",
    ),
    (
        "gradient_accumulation_steps",
        Kind::Int,
        "Micro-batches per optimizer step [1]",
    ),
    ("num_train_epochs", Kind::Float, "Epochs [3]"),
    (
        "max_steps",
        Kind::Int,
        "Optimizer steps; overrides epochs when > 0 [-1]",
    ),
    (
        "lr_scheduler_type",
        Kind::Text,
        "linear | cosine | constant | constant_with_warmup [linear]",
    ),
    ("warmup_ratio", Kind::Float, "Warm-up fraction of steps [0]"),
    ("warmup_steps", Kind::Int, "Warm-up steps [0]"),
    ("weight_decay", Kind::Float, "AdamW weight decay [0]"),
    ("adam_beta1", Kind::Float, "AdamW beta1 [0.9]"),
    ("adam_beta2", Kind::Float, "AdamW beta2 [0.999]"),
    ("adam_epsilon", Kind::Float, "AdamW epsilon [1e-8]"),
    (
        "max_grad_norm",
        Kind::Float,
        "Gradient clipping norm, 0 = off [1.0]",
    ),
    ("logging_steps", Kind::Int, "Log every N steps [10]"),
    (
        "eval_steps",
        Kind::Int,
        "Evaluate every N steps [logging_steps]",
    ),
    ("save_steps", Kind::Int, "Checkpoint every N steps [500]"),
    ("save_total_limit", Kind::Int, "Keep at most N checkpoints"),
    (
        "load_best_model_at_end",
        Kind::Bool,
        "Copy the checkpoint with the lowest eval loss to the output folder at the end [false]",
    ),
    (
        "report_to",
        Kind::List,
        "jsonl, tensorboard (OUTPUT/runs/), all or none (comma-separated) [jsonl,tensorboard]",
    ),
    (
        "resume_from_checkpoint",
        Kind::Text,
        "Checkpoint folder or `latest`",
    ),
    ("seed", Kind::Int, "Random seed [42]"),
    (
        "max_length",
        Kind::Int,
        "Truncate examples to N tokens [1024]",
    ),
    (
        "completion_only_loss",
        Kind::Bool,
        "Train on completions only (prompt-completion data) [true]",
    ),
    (
        "assistant_only_loss",
        Kind::Bool,
        "Train on assistant turns only [false]",
    ),
    (
        "packing",
        Kind::Bool,
        "Pack examples into rows of --max-length [false]",
    ),
    (
        "gradient_checkpointing",
        Kind::Bool,
        "Recompute activations in backward [false]",
    ),
    (
        "bf16",
        Kind::Bool,
        "bf16 mixed precision: base and activations in bf16, LoRA weights/gradients/AdamW in f32 [f32 on CPU, the checkpoint's dtype on GPU]",
    ),
    (
        "offload_activations",
        Kind::Bool,
        "Keep saved activations in host memory until the backward (LoRA/QLoRA on a GPU) [false]",
    ),
    ("lora_r", Kind::Int, "LoRA rank [16]"),
    ("lora_alpha", Kind::Float, "LoRA alpha [32]"),
    (
        "neftune_noise_alpha",
        Kind::Float,
        "NEFTune: uniform noise of alpha / sqrt(length x hidden) on the input embeddings while training, as transformers' neftune_noise_alpha [off]",
    ),
    (
        "router_aux_loss_coef",
        Kind::Float,
        "Mixtures of experts: weight of the routers' load-balancing loss added to the training loss, logged as aux_loss (TRL's router_aux_loss_coef; 0 turns it off) [the model config's, 0.001]",
    ),
    (
        "loss_type",
        Kind::Text,
        "Token loss: nll (cross-entropy) or dft (Dynamic Fine-Tuning, as TRL's loss_type) [nll]",
    ),
    (
        "skip_nonfinite_steps",
        Kind::Int,
        "Steps with a NaN/inf loss or gradient to skip (no update, logged) before stopping [0: stop at the first]",
    ),
    (
        "loraplus_lr_ratio",
        Kind::Float,
        "LoRA+: the B matrices learn at this multiple of --learning-rate, as PEFT's create_loraplus_optimizer (the paper suggests 16); --weight-decay is its loraplus_weight_decay [off]",
    ),
    ("lora_dropout", Kind::Float, "LoRA dropout [0.05]"),
    (
        "lora_target_modules",
        Kind::List,
        "all-linear, a regex, or names (comma-separated) [all-linear]",
    ),
    (
        "use_rslora",
        Kind::Bool,
        "rsLoRA scaling alpha/sqrt(r) [false]",
    ),
    (
        "use_dora",
        Kind::Bool,
        "DoRA: a trained magnitude per output row over the normalised adapted weight, as PEFT's use_dora [false]",
    ),
    (
        "init_lora_weights",
        Kind::Text,
        "PEFT's init_lora_weights: true | gaussian | pissa | pissa_niter_N | olora | loftq (PiSSA and OLoRA start the adapter from the weight's top SVD / QR components and train over the residual; the saved adapter applies to the original base. LoftQ, with --qlora or --load-in-8bit, quantizes the base so that it plus the adapter approximates the original, and saves that base as loftq_base/ in the output folder) [true]",
    ),
    (
        "loftq_iter",
        Kind::Int,
        "LoftQ's alternating iterations (PEFT's LoftQConfig.loftq_iter) with --init-lora-weights loftq [1]",
    ),
    (
        "modules_to_save",
        Kind::List,
        "Train full copies of these beside the adapter, as PEFT's modules_to_save: embed_tokens, lm_head (comma-separated; also --lora-modules-to-save) [none]",
    ),
    (
        "loraplus_lr_embedding",
        Kind::Float,
        "LoRA+: learning rate of an embedding trained in full (--modules-to-save embed_tokens), PEFT's loraplus_lr_embedding [1e-6]",
    ),
    (
        "layers_to_transform",
        Kind::Ints,
        "Adapt only these decoder layers' target modules (comma-separated indices), as PEFT [all]",
    ),
    (
        "layers_pattern",
        Kind::List,
        "Name of the module list holding the layers, for --layers-to-transform (e.g. layers) [PEFT's default]",
    ),
    (
        "exclude_modules",
        Kind::List,
        "Modules never adapted: names (comma-separated, matched as suffixes) or one regex [none]",
    ),
    ("device", Kind::Text, "cpu | cuda | cuda:N | auto [auto]"),
    (
        "push_to_hub",
        Kind::Bool,
        "Push the adapter/model to the Hugging Face Hub (HF_TOKEN, HF_ENDPOINT) [false]",
    ),
    ("hub_model_id", Kind::Text, "Hub repository to push to, owner/name"),
    (
        "hub_strategy",
        Kind::Text,
        "end | every_save: push at the end, or also every checkpoint [end]",
    ),
    (
        "hub_private_repo",
        Kind::Bool,
        "Create the Hub repository as private [false]",
    ),
    ("hub_revision", Kind::Text, "Branch to push to [main]"),
    (
        "bnb_4bit_quant_type",
        Kind::Text,
        "4-bit code of --qlora: nf4 | fp4 [nf4]",
    ),
    (
        "bnb_4bit_use_double_quant",
        Kind::Bool,
        "Quantize the 4-bit block scales too (QLoRA) [true]",
    ),
    (
        "load_in_8bit",
        Kind::Bool,
        "LoRA over a row-wise int8 base [false]",
    ),
];

fn flag(field: &str) -> String {
    field.replace('_', "-")
}

/// The `train` subcommand's definition.
pub fn command() -> Command {
    let mut cmd = Command::new("train")
        .args_override_self(true)
        .about("Supervised fine-tuning with LoRA, QLoRA or all weights")
        .arg(
            Arg::new("lora")
                .long("lora")
                .action(ArgAction::SetTrue)
                .help("Train LoRA adapters (default)"),
        )
        .arg(
            Arg::new("qlora")
                .long("qlora")
                .action(ArgAction::SetTrue)
                .visible_alias("load-in-4bit")
                .help("LoRA on a frozen 4-bit (NF4, double-quantized) base"),
        )
        .arg(
            Arg::new("full")
                .long("full")
                .action(ArgAction::SetTrue)
                .help("Train every weight"),
        )
        .group(clap::ArgGroup::new("mode").args(["lora", "qlora", "full"]))
        .arg(
            Arg::new("sanity_check")
                .long("sanity-check")
                .action(ArgAction::SetTrue)
                .help("Run 15 steps on at most 100 rows, report whether the loss fell, show a decoded example and a generation, and exit"),
        )
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("TOML")
                .help("Recipe file with the same keys"),
        );
    for &(field, kind, help) in FIELDS {
        let mut arg = Arg::new(field)
            .long(flag(field))
            .help(help)
            .value_name("VALUE");
        arg = match field {
            "model_name_or_path" => arg.visible_alias("model"),
            "dataset_name" => arg.visible_alias("dataset"),
            "tokenizer_name_or_path" => arg.visible_alias("tokenizer"),
            "dataset_config" => arg.visible_alias("dataset-config-name"),
            "dataset_train_split" => arg.visible_alias("dataset-split"),
            "chat_template_path" => arg.visible_alias("chat-template"),
            "modules_to_save" => arg.visible_alias("lora-modules-to-save"),
            _ => arg,
        };
        match kind {
            Kind::Bool => arg = arg.num_args(0..=1).default_missing_value("true"),
            // `--learning-rate -1` reaches the range check (which names the rule) instead of
            // being refused by the parser as an unknown argument.
            Kind::Int | Kind::Float | Kind::Ints => arg = arg.allow_negative_numbers(true),
            Kind::Text | Kind::List => {}
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

fn value_of(kind: Kind, field: &str, text: &str) -> anyhow::Result<Value> {
    let bad = |what: &str| anyhow::anyhow!("--{} {text}: expected {what}", flag(field));
    Ok(match kind {
        Kind::Text => Value::from(text),
        Kind::Int => Value::from(text.parse::<i64>().map_err(|_| bad("an integer"))?),
        Kind::Float => Value::from(text.parse::<f64>().map_err(|_| bad("a number"))?),
        Kind::Bool => Value::from(match text {
            "true" | "True" | "1" => true,
            "false" | "False" | "0" => false,
            _ => return Err(bad("true or false")),
        }),
        Kind::List => Value::from(
            text.split(',')
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>(),
        ),
        Kind::Ints => Value::from(
            text.split(',')
                .map(|s| s.trim().parse::<u64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad("comma-separated non-negative integers"))?,
        ),
    })
}

/// Builds the config: defaults, then the recipe, then the flags.
pub fn config_from(matches: &ArgMatches) -> anyhow::Result<SftConfig> {
    let base = match matches.get_one::<String>("config") {
        Some(path) => SftConfig::from_toml(Path::new(path))?,
        None => SftConfig::default(),
    };
    let mut overrides = Map::new();
    for &(field, kind, _) in FIELDS {
        if let Some(text) = matches.get_one::<String>(field) {
            overrides.insert(field.to_string(), value_of(kind, field, text)?);
        }
    }
    for mode in ["lora", "qlora", "full"] {
        if matches.get_flag(mode) {
            overrides.insert("mode".into(), Value::from(mode));
        }
    }
    Ok(base.with_overrides(overrides)?)
}

/// Runs `peft-sft train`.
pub fn run(matches: &ArgMatches) -> anyhow::Result<()> {
    let config = config_from(matches)?;
    if matches.get_flag("sanity_check") {
        return sanity_check(config);
    }
    let outcome = train(&config, Reporting { progress: true })?;
    if let Some((file, line, reason)) = outcome.bad_rows.first() {
        eprintln!(
            "skipped {} unusable rows of {} (--on-bad-row skip); first at {}:{line}: {reason}",
            outcome.bad_rows.len(),
            config.dataset_name,
            file.display()
        );
    }
    if let Some((step, what)) = outcome.skipped_steps.first() {
        eprintln!(
            "skipped {} steps whose values were not finite (--skip-nonfinite-steps {}); first at step {step}: {what}",
            outcome.skipped_steps.len(),
            config.skip_nonfinite_steps
        );
    }
    if outcome.skipped_rows > 0 {
        eprintln!(
            "skipped {} training rows with no loss token after truncation to --max-length {}",
            outcome.skipped_rows, config.max_length
        );
    }
    eprintln!(
        "trained {} steps; wrote {}{}",
        outcome.global_step,
        outcome.output_dir.display(),
        tracked_files(&config)
    );
    let state = peft_sft::train::checkpoint::read_state(&outcome.output_dir)?;
    let summary = summarize(
        &outcome.log_history,
        state.best_model_checkpoint.as_deref(),
        state.best_metric,
    );
    eprint!("{summary}");
    if let (true, Some(best)) = (config.load_best_model_at_end, &summary.best_checkpoint) {
        eprintln!(
            "--load-best-model-at-end: {} holds the weights of {}",
            outcome.output_dir.display(),
            best.path
        );
    }
    Ok(())
}

/// What `--report-to` wrote beside the weights, for the closing line.
fn tracked_files(config: &SftConfig) -> String {
    let mut files = Vec::new();
    if config.reports_to("jsonl") {
        files.push("metrics.jsonl, loss_curve.png".to_string());
    }
    if config.reports_to("tensorboard") {
        files.push(format!(
            "TensorBoard events (tensorboard --logdir {})",
            Path::new(&config.output_dir)
                .join(peft_sft::report::RUNS_DIR)
                .display()
        ));
    }
    files.iter().map(|f| format!(", {f}")).collect()
}

/// `--sanity-check`: the short run's verdict, the first example and what the model now says.
fn sanity_check(config: SftConfig) -> anyhow::Result<()> {
    let report = peft_sft::train::sanity_check(&config)?;
    let (first, last, steps) = (report.first, report.last, report.losses.len());
    if report.learned() {
        println!("sanity check: the loss fell from {first:.4} to {last:.4} over {steps} steps: training works");
    } else {
        println!(
            "sanity check: WARNING the loss did not fall ({first:.4} -> {last:.4} over {steps} steps): check --learning-rate and the loss masks (peft-sft data inspect)"
        );
    }
    let Some(example) = &report.first_example else {
        return Ok(());
    };
    println!("\nfirst training example (loss tokens in [[ ]]):");
    println!("{example}");
    println!("\ngeneration after {steps} steps, from the first row's prompt (new text in [[ ]]):");
    println!("{}[[{}]]", report.prompt, report.generated);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_recipe_and_the_recipe_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        std::fs::write(
            &recipe,
            "learning_rate = 1e-4\nlora_r = 4\nmode = \"full\"\n",
        )
        .unwrap();
        let m = command().get_matches_from([
            "train",
            "--config",
            recipe.to_str().unwrap(),
            "--lora-r",
            "32",
            "--lora",
            "--lora-target-modules",
            "q_proj,v_proj",
            "--packing",
        ]);
        let c = config_from(&m).unwrap();
        assert_eq!(c.learning_rate, 1e-4);
        assert_eq!(c.lora_r, 32);
        assert_eq!(c.mode, peft_sft::config::Mode::Lora);
        assert_eq!(c.lora_target_modules, vec!["q_proj", "v_proj"]);
        assert!(c.packing);
        assert_eq!(c.seed, 42);
    }

    #[test]
    fn a_bad_number_names_the_flag() {
        let m = command().get_matches_from(["train", "--learning-rate", "fast"]);
        let err = config_from(&m).unwrap_err().to_string();
        assert!(err.contains("--learning-rate fast"), "{err}");
    }
}
