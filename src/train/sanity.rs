//! `--sanity-check`: a short run on a few rows, then what a user should look at before a long
//! run — did the loss fall, what the model is trained on, what it now says.

use super::engine::{train, Reporting};
use crate::config::{Mode, SftConfig};
use crate::data::{
    load_rows, marked, parse_sample, prepare_dataset, ChatTokenizer, Example, Sample,
};
use crate::device::select_device;
use crate::generate::{generate, GenerateOptions};
use crate::lora::load_adapter;
use crate::model::{load_pretrained_with, LoadOptions};
use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Steps of the short run.
pub const SANITY_STEPS: i64 = 15;

/// What the short run showed.
#[derive(Debug, Clone)]
pub struct SanityReport {
    /// Where the short run wrote (`OUTPUT/sanity-check`).
    pub output_dir: PathBuf,
    /// The logged loss of every step.
    pub losses: Vec<f64>,
    /// Mean loss of the first third of the steps.
    pub first: f64,
    /// Mean loss of the last third.
    pub last: f64,
    /// The first training example decoded, its loss tokens in `[[ ]]` (None: no example).
    pub first_example: Option<String>,
    /// The first row's prompt as the model sees it at inference, decoded.
    pub prompt: String,
    /// What the trained model generates from it (greedy, at most 32 tokens).
    pub generated: String,
}

impl SanityReport {
    /// Whether the loss fell by at least 5% from the first third of the run to the last.
    pub fn learned(&self) -> bool {
        self.last < 0.95 * self.first
    }
}

/// Trains `config` for [`SANITY_STEPS`] steps on at most 100 rows (no evaluation, no
/// checkpoints, metrics only) into `OUTPUT/sanity-check`, then loads the result and generates
/// from the first row's prompt.
pub fn sanity_check(config: &SftConfig) -> Result<SanityReport> {
    // The user's settings as given (the short run below changes some of them).
    config.validate()?;
    let mut config = config.clone();
    config.max_steps = SANITY_STEPS;
    // A warm-up as long as the real run's would keep the short run's learning rate low.
    config.warmup_steps = config.warmup_steps.min(SANITY_STEPS as usize / 3);
    config.logging_steps = 1;
    config.save_steps = usize::MAX;
    config.eval_dataset = None;
    config.eval_split_ratio = None;
    config.load_best_model_at_end = false;
    config.report_to = vec!["jsonl".into()];
    config.max_train_samples = Some(config.max_train_samples.unwrap_or(100).min(100));
    config.output_dir = Path::new(&config.output_dir)
        .join("sanity-check")
        .to_string_lossy()
        .into_owned();
    let outcome = train(&config, Reporting { progress: false })?;
    let metrics = outcome.output_dir.join("metrics.jsonl");
    let losses: Vec<f64> = std::fs::read_to_string(&metrics)
        .map_err(|e| Error::io(&metrics, e))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let k = (losses.len() / 3).max(1);
    let (first, last) = (
        mean(&losses[..k.min(losses.len())]),
        mean(&losses[losses.len().saturating_sub(k)..]),
    );

    let device = select_device(&config.device)?;
    let options = LoadOptions {
        trainable: false,
        ..config.load_options()?
    };
    // A full fine-tune wrote a model folder; LoRA/QLoRA an adapter over the base.
    let full = config.mode == Mode::Full;
    let trained = outcome.output_dir.to_string_lossy().into_owned();
    let spec = if full {
        &trained
    } else {
        &config.model_name_or_path
    };
    let mut loaded = load_pretrained_with(spec, options, &device)?;
    if let Some(template) = config.chat_template()? {
        loaded.tokenizer = loaded.tokenizer.with_chat_template(template);
    }
    if !full {
        load_adapter(&mut loaded.model, &outcome.output_dir)?;
    }
    let data = prepare_dataset(
        Path::new(&config.dataset_name),
        &loaded.tokenizer,
        &config.tokenize_options(),
    )?;
    let mut report = SanityReport {
        output_dir: outcome.output_dir.clone(),
        losses,
        first,
        last,
        first_example: None,
        prompt: String::new(),
        generated: String::new(),
    };
    if data.examples.is_empty() {
        return Ok(report);
    }
    let example = data.examples.get(0);
    report.first_example = Some(marked(&loaded.tokenizer, &example, false)?);
    let prompt = first_prompt(&config, &loaded.tokenizer, &example)?;
    let opts = GenerateOptions {
        max_new_tokens: 32,
        stop_ids: loaded.stop_ids(),
        ..Default::default()
    };
    let new = generate(&loaded.model, &prompt, &opts)?;
    report.prompt = loaded.tokenizer.decode(&prompt, false)?;
    report.generated = loaded.tokenizer.decode(&new, false)?;
    Ok(report)
}

/// The first dataset row's prompt as the model would see it at inference: a conversation up to its
/// last assistant turn with the generation prompt, a prompt column, or (plain text) the tokens
/// before the example's first loss token.
fn first_prompt(config: &SftConfig, tok: &ChatTokenizer, example: &Example) -> Result<Vec<u32>> {
    let path = Path::new(&config.dataset_name);
    let rows = load_rows(path)?;
    let first_row = rows
        .first()
        .ok_or_else(|| Error::Config(format!("{}: no rows", path.display())))?;
    let row = config.field_mapping().apply(first_row, path)?;
    Ok(match parse_sample(&row, path)? {
        Sample::Messages(messages, vars) => {
            let last_assistant = messages
                .iter()
                .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
                .unwrap_or(messages.len());
            let context = &messages[..last_assistant.max(1)];
            tok.encode(&tok.apply_chat_template_with(context, true, &vars)?, false)?
        }
        Sample::ConversationalPromptCompletion { prompt, vars, .. } => {
            tok.encode(&tok.apply_chat_template_with(&prompt, true, &vars)?, false)?
        }
        Sample::PromptCompletion { prompt, .. } => tok.encode(&prompt, true)?,
        Sample::Text(_) => {
            let n = example
                .loss_mask
                .iter()
                .position(|&b| b == 1)
                .unwrap_or(0)
                .max(1);
            example.input_ids[..n.clamp(1, 8)].to_vec()
        }
    })
}
