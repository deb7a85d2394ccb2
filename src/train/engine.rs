//! The SFT training loop, top to bottom: load the model and data, inject adapters (or make every
//! weight trainable), then for each optimizer step run its micro-batches forward and backward,
//! clip, update, log, evaluate and checkpoint. `--full`, `--lora` and `--qlora` differ only in
//! which tensors train and what is saved.

use super::batches::StepBatches;
use super::checkpoint::{self, ScheduleAt, TrainerState};
use super::eval::{evaluate, LossTotals};
use super::metrics::{StepMetrics, Window};
use super::optimizer::{clip_grad_norm, AdamW, AdamWParams};
use crate::card::{CardInfo, CardKind};
use crate::config::{Mode, SftConfig};
use crate::data::chat_format::{save_tokenizer, setup_chatml};
use crate::data::{collate, prepare_dataset_split, Example, PreparedDataset};
use crate::device::select_device;
use crate::hub::resolve_dataset;
use crate::io::write_json;
use crate::lora::{self, LoraConfig};
use crate::model::save::{save_pretrained, MAX_SHARD_BYTES};
use crate::model::{load_pretrained_with, CausalLm, Pretrained};
use crate::report::Tracking;
use crate::rng::{hash_str, key, Rng};
use crate::schedule::{warmup_steps, Schedule};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimizer steps done in total.
    pub global_step: usize,
    /// Every log entry (train and eval), as in `metrics.jsonl`.
    pub log_history: Vec<Value>,
    /// Where the final adapter or model was written.
    pub output_dir: PathBuf,
    /// Training rows skipped because no loss token survived truncation.
    pub skipped_rows: usize,
    /// Training rows skipped as unusable (`--on-bad-row skip`): (file, line, reason).
    pub bad_rows: Vec<(PathBuf, usize, String)>,
    /// Steps skipped for non-finite values (`--skip-nonfinite-steps`): (step, what).
    pub skipped_steps: Vec<(usize, String)>,
}

/// Options that affect only how a run reports, not what it computes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reporting {
    /// Show a progress bar and print log lines to stderr.
    pub progress: bool,
}

/// `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn loss_tokens(example: &Example) -> f64 {
    example.loss_targets() as f64
}

/// Tokenizes `spec` (a file, a folder, or a Hub dataset id) for `split`. A Hub repo whose own
/// files hold no readable data for the config and split is read from the Hub's parquet
/// conversion (`refs/convert/parquet`).
fn load_data(
    path: &str,
    split: &str,
    tokenizer: &crate::data::ChatTokenizer,
    config: &SftConfig,
) -> Result<PreparedDataset> {
    let opts = config.tokenize_options();
    let subset = config.dataset_config.as_deref();
    let local = resolve_dataset(path, false)?;
    let data = match prepare_dataset_split(&local, subset, split, tokenizer, &opts) {
        Err(Error::MissingFile { .. }) if !Path::new(path).exists() => {
            let converted = resolve_dataset(path, true)?;
            prepare_dataset_split(&converted, subset, split, tokenizer, &opts)?
        }
        other => other?,
    };
    if data.examples.is_empty() {
        return Err(Error::Config(format!(
            "{path}: no example has a loss token after truncation to --max-length {} ({} rows skipped)",
            config.max_length, data.skipped_no_loss_tokens
        )));
    }
    Ok(data)
}

/// Holds out `ratio` of `n` examples (at least one, chosen by `seed`) for evaluation; both parts
/// keep file order. Returns the indices of (train, eval).
fn split_eval(n: usize, ratio: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let held = ((n as f64 * ratio).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    let mut order = Rng::new(key(&[seed, hash_str("eval-split")])).permutation(n);
    order.truncate(held);
    let mut is_eval = vec![false; n];
    for i in order {
        is_eval[i] = true;
    }
    (0..n).partition(|&i| !is_eval[i])
}

/// What of the tokenizer is saved with the weights.
enum TokenizerFiles {
    /// Nothing: the base's tokenizer applies.
    None,
    /// The chat template trained with (`--chat-template FILE`), as `chat_template.jinja`, which
    /// `generate`/`eval` with `--adapter` and transformers then use.
    Template(String),
    /// The whole tokenizer (`--chat-template chatml` added tokens to it), as transformers'
    /// `Trainer.save_model` writes it; PEFT's `AutoPeftModelForCausalLM` resizes the base from it.
    All(Box<crate::data::ChatTokenizer>),
}

/// Saves the trainable weights into `dir`: the PEFT adapter, or a full model folder, with the
/// tokenizer files `tokenizer` asks for.
fn save_weights(
    model: &CausalLm,
    lora: Option<&LoraConfig>,
    base_dir: &Path,
    dir: &Path,
    tokenizer: &TokenizerFiles,
) -> Result<()> {
    match lora {
        Some(config) => lora::save_adapter(model, config, dir)?,
        None => save_pretrained(model, base_dir, dir, MAX_SHARD_BYTES)?,
    }
    match tokenizer {
        TokenizerFiles::None => {}
        TokenizerFiles::Template(template) => {
            crate::io::write_bytes(&dir.join("chat_template.jinja"), template.as_bytes())?
        }
        TokenizerFiles::All(tok) => save_tokenizer(tok, dir)?,
    }
    Ok(())
}

/// Pushes `dir` to `--hub-model-id`; on failure the error says the local files are intact.
fn push(config: &SftConfig, dir: &Path, message: String) -> Result<()> {
    let options = crate::push::PushOptions {
        repo_id: config.hub_model_id.clone().unwrap_or_default(),
        private: config.hub_private_repo,
        revision: config.hub_revision.clone(),
        commit_message: Some(message),
        ..Default::default()
    };
    let pushed = crate::push::push_folder(dir, &options).map_err(|e| {
        Error::Hub(format!(
            "{e} (nothing local was changed: the run's files in {} are intact; push them later with `peft-sft push --path {} --repo-id {}`)",
            dir.display(),
            dir.display(),
            options.repo_id
        ))
    })?;
    eprintln!("pushed {} files to {}", pushed.files.len(), pushed.url);
    Ok(())
}

/// Writes the model card (`README.md`) of a finished run into `dir`.
fn write_card(
    config: &SftConfig,
    lora: Option<&LoraConfig>,
    dir: &Path,
    log_history: &[Value],
) -> Result<()> {
    let kind = match lora {
        Some(lora) => CardKind::Adapter {
            lora,
            qlora: config.mode == Mode::Qlora,
        },
        None => CardKind::Model { merged: false },
    };
    crate::card::write(
        dir,
        &CardInfo {
            base_model: &config.model_name_or_path,
            repo_id: config.hub_model_id.as_deref(),
            kind,
            config: Some(config),
            log_history,
            loss_curve: dir.join("loss_curve.png").exists(),
        },
    )
}

/// Runs supervised fine-tuning as `config` describes: `prepare` (model, data, adapters,
/// optimizer, resumed state), the steps, then `finish` (weights, card, push).
pub fn train(config: &SftConfig, reporting: Reporting) -> Result<TrainOutcome> {
    config.validate()?;
    let mut run = prepare(config)?;
    write_json(&run.output_dir.join("training_config.json"), config)?;
    if reporting.progress {
        let (trainable, all) = run.model.parameter_counts();
        // PEFT's print_trainable_parameters line (stdout, as PEFT prints it; stderr keeps to the
        // progress and, on failure, the one error line).
        println!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(trainable),
            thousands(all),
            100.0 * trainable as f64 / all.max(1) as f64
        );
    }
    let resumed_at = run.resumed.then_some(run.state.global_step);
    let log = Log {
        tracking: Tracking::open(config, &run.output_dir, &run.state.log_history, resumed_at)?,
        bar: reporting
            .progress
            .then(|| progress_bar(run.total, run.state.global_step)),
    };
    let mut window = Window::default();
    for step in run.state.global_step..run.total {
        let done = step + 1;
        match run.step(config, step) {
            Ok(metrics) => {
                window.add(&metrics);
                log.progress(&metrics, run.lr_at(config, step), &window);
            }
            Err(Error::NonFinite { what, .. })
                if run.skipped_steps.len() < config.skip_nonfinite_steps =>
            {
                let entry = run.skip_step(done, what);
                log.write(entry, &mut run.state)?;
            }
            Err(e) => return Err(e),
        }
        let window_due = done % config.logging_steps == 0 || done == run.total;
        if window_due && !window.is_empty() {
            // transformers logs the scheduler's rate after its step, i.e. the next step's rate.
            let lr = run.lr_at(config, done);
            let entry = window.flush(lr, run.state.epoch, run.state.num_input_tokens_seen, done);
            log.write(entry, &mut run.state)?;
        }
        if run.eval_set.is_some() && (done % run.eval_steps == 0 || done == run.total) {
            run.evaluate(config, done, &log)?;
        }
        if done % config.save_steps == 0 {
            run.save_checkpoint(config, done)?;
        }
    }
    finish(run, config, log)
}

/// Everything a run holds from one step to the next.
struct Run {
    device: candle_core::Device,
    output_dir: PathBuf,
    /// The base model's folder (a full fine-tune saves beside its files).
    base_dir: PathBuf,
    model: CausalLm,
    tokenizer_files: TokenizerFiles,
    train_set: PreparedDataset,
    eval_set: Option<PreparedDataset>,
    pad_id: u32,
    /// The adapter's config; None for full fine-tuning.
    lora_config: Option<LoraConfig>,
    batches: StepBatches,
    schedule: Schedule,
    warmup: usize,
    total: usize,
    eval_steps: usize,
    optimizer: AdamW,
    state: TrainerState,
    resumed: bool,
    /// Steps skipped for non-finite values: (step, what).
    skipped_steps: Vec<(usize, String)>,
    /// The output folder, held for this run ([`crate::io::lock_dir`]) until the run is dropped.
    _lock: crate::io::DirLock,
}

/// Loads the model and tokenizer (from the checkpoint when resuming a full fine-tune), sets up
/// ChatML when asked, tokenizes (and splits, packs) the data, injects or reloads the adapter,
/// and builds the step batches, schedule, optimizer and trainer state (restored when resuming).
fn prepare(config: &SftConfig) -> Result<Run> {
    let device = select_device(&config.device)?;
    let output_dir = PathBuf::from(&config.output_dir);
    // Created and held first: a second run on the same folder stops here, before reading anything.
    let lock = crate::io::lock_dir(&output_dir, "peft-sft train")?;
    let resume_dir = config
        .resume_from_checkpoint
        .as_deref()
        .map(|spec| checkpoint::resolve(spec, &output_dir))
        .transpose()?;
    let full = config.mode == Mode::Full;
    // A full fine-tune resumes from the checkpoint's weights; LoRA reloads the base plus the adapter.
    let model_spec = match (&resume_dir, full) {
        (Some(dir), true) => dir.to_string_lossy().into_owned(),
        _ => config.model_name_or_path.clone(),
    };
    let Pretrained {
        mut model,
        mut tokenizer,
        dir: base_dir,
        ..
    } = load_pretrained_with(&model_spec, config.load_options()?, &device)?;
    model.gradient_checkpointing = config.gradient_checkpointing;
    model.loss_kind = config.loss_kind()?;
    model.neftune_noise_alpha = config.neftune_noise_alpha;
    model.router_aux_loss_coef = config.router_aux_loss_coef_for(&model.config)?;
    // On the CPU activations live in host memory already: the flag would only cost time.
    model.offload_activations = config.offload_activations && !model.device.is_cpu();
    let custom_template = config.chat_template()?;
    if let Some(template) = &custom_template {
        tokenizer = tokenizer.with_chat_template(template.clone());
    }
    // `--chat-template chatml` on a base model: new special tokens get new rows, which train.
    let chat_setup = if config.sets_up_chatml() {
        let setup = setup_chatml(&mut tokenizer)?;
        let vocab = setup.vocab_size.max(model.config.vocab_size);
        model.resize_token_embeddings(vocab)?;
        model.config.set_special_ids(
            tokenizer.bos_token_id(),
            tokenizer.eos_token_id(),
            tokenizer.pad_token_id(),
        );
        Some(setup)
    } else {
        None
    };
    let (train_set, eval_set) = prepare_data(config, &tokenizer)?;
    let pad_id = tokenizer.pad_token_id().ok_or_else(|| {
        Error::Config(format!(
            "{}: the tokenizer has neither a pad nor an eos token",
            base_dir.display()
        ))
    })?;
    let mut lora_config = (!full).then(|| config.lora_config());
    if let Some(lc) = &mut lora_config {
        let init = lora::init::LoraInit::from_config(&lc.init_lora_weights)?;
        // LoftQ starts from the checkpoint's full-precision weights (the model holds them
        // quantized already); a resumed run computes the same quantized base again.
        if init == lora::init::LoraInit::Loftq && model_spec.ends_with(".gguf") {
            return Err(Error::Config(format!(
                "{model_spec}: LoftQ starts from the full-precision weights, and a GGUF file's are quantized already; use the original safetensors model with --qlora"
            )));
        }
        let checkpoint = (init == lora::init::LoraInit::Loftq)
            .then(|| {
                crate::model::weights::Weights::from_dir(&base_dir)
                    .map(|w| w.with_aliases(model.config.name_aliases()))
            })
            .transpose()?;
        let originals = checkpoint.as_ref().map(lora::init::checkpoint_originals);
        let originals = originals
            .as_ref()
            .map(|f| f as &dyn Fn(&str) -> Result<candle_core::Tensor>);
        match &resume_dir {
            Some(dir) => {
                if originals.is_some() {
                    lora::inject_with(&mut model, lc, config.seed, originals)?;
                    lora::remove_adapters(&mut model);
                }
                lora::load_adapter(&mut model, dir)?;
                // PiSSA/OLoRA checkpoints are saved relative to the original base.
                if init.moves_base() {
                    lora::init::restore_residual(&mut model, init, |name| {
                        Ok(lora::target::rank_and_scale(lc, name)?.0)
                    })?;
                }
            }
            None => {
                lora::inject_with(&mut model, lc, config.seed, originals)?;
                model.train_modules(&config.modules_to_save)?;
            }
        }
        if init == lora::init::LoraInit::Loftq {
            // The adapter applies to the quantized base LoftQ left: it is saved (dequantized) in
            // the output folder, and the adapter names it as its base with init_lora_weights
            // true, as PEFT's LoftQ example saves them (loading does not run LoftQ again).
            let loftq_base = output_dir.join(lora::init::LOFTQ_BASE);
            if resume_dir.is_none() || !loftq_base.join("config.json").exists() {
                std::fs::create_dir_all(&loftq_base).map_err(|e| Error::io(&loftq_base, e))?;
                crate::model::save::save_dequantized(
                    &model,
                    &base_dir,
                    &loftq_base,
                    MAX_SHARD_BYTES,
                )?;
            }
            let absolute =
                std::path::absolute(&loftq_base).map_err(|e| Error::io(&loftq_base, e))?;
            lc.base_model_name_or_path = Some(absolute.to_string_lossy().into_owned());
            lc.init_lora_weights = serde_json::Value::Bool(true);
            lc.other.remove("loftq_config");
        }
        // PEFT's `trainable_token_indices`: the new tokens' rows train beside the LoRA weights,
        // unless full copies of the matrices train (`modules_to_save`).
        if let Some(setup) = chat_setup.as_ref().filter(|s| !s.new_token_ids.is_empty()) {
            model.train_new_token_rows(setup.new_token_ids.clone())?;
        }
    }
    let tokenizer_files = match (&chat_setup, custom_template) {
        (Some(_), _) => TokenizerFiles::All(Box::new(tokenizer)),
        (None, Some(template)) => TokenizerFiles::Template(template),
        (None, None) => TokenizerFiles::None,
    };

    let batches = StepBatches::new(
        train_set.examples.len(),
        config.per_device_train_batch_size,
        config.gradient_accumulation_steps,
        config.num_train_epochs,
        config.max_steps,
        config.seed,
    );
    let total = batches.total_steps();
    let mut optimizer = AdamW::new(
        model.trainable(),
        AdamWParams {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
    )?;
    if let Some(ratio) = config.loraplus_lr_ratio {
        optimizer.set_loraplus_ratio(ratio);
        optimizer.set_lr_scale(
            &format!("{}.weight", model.config.embed_module()),
            config.loraplus_lr_embedding / config.learning_rate,
        );
    }
    let eval_steps = config.eval_steps.unwrap_or(config.logging_steps);
    let mut state = TrainerState {
        max_steps: total,
        logging_steps: config.logging_steps,
        eval_steps,
        save_steps: config.save_steps,
        train_batch_size: config.per_device_train_batch_size,
        ..TrainerState::default()
    };
    if let Some(dir) = &resume_dir {
        optimizer.load(dir)?;
        let saved = checkpoint::read_state(dir)?;
        state.global_step = saved.global_step;
        state.num_input_tokens_seen = saved.num_input_tokens_seen;
        state.log_history = saved.log_history;
        state.best_metric = saved.best_metric;
        state.best_model_checkpoint = saved.best_model_checkpoint;
    }
    // Steps skipped before a resume count against --skip-nonfinite-steps too.
    let skipped_steps: Vec<(usize, String)> = state
        .log_history
        .iter()
        .filter_map(|e| {
            let what = e.get("skipped_nonfinite")?.as_str()?.to_string();
            Some((e.get("step")?.as_u64()? as usize, what))
        })
        .collect();
    Ok(Run {
        device,
        output_dir,
        base_dir,
        model,
        tokenizer_files,
        train_set,
        eval_set,
        pad_id,
        lora_config,
        batches,
        schedule: Schedule::parse(&config.lr_scheduler_type)?,
        warmup: warmup_steps(config.warmup_steps, config.warmup_ratio, total),
        total,
        eval_steps,
        optimizer,
        state,
        resumed: resume_dir.is_some(),
        skipped_steps,
        _lock: lock,
    })
}

/// The training set and the evaluation set (`--eval-dataset`, or `--eval-split-ratio` of the
/// training rows), truncated to `--max-train-samples` and packed with `--packing`.
fn prepare_data(
    config: &SftConfig,
    tokenizer: &crate::data::ChatTokenizer,
) -> Result<(PreparedDataset, Option<PreparedDataset>)> {
    let mut train_set = load_data(
        &config.dataset_name,
        &config.dataset_train_split,
        tokenizer,
        config,
    )?;
    let mut eval_set = config
        .eval_dataset
        .as_deref()
        .map(|p| load_data(p, &config.dataset_test_split, tokenizer, config))
        .transpose()?;
    if let Some(n) = config.max_train_samples {
        train_set.examples.truncate(n);
    }
    if let (Some(ratio), None) = (config.eval_split_ratio, &eval_set) {
        let (train, held_out) = split_eval(train_set.examples.len(), ratio, config.seed);
        eval_set = Some(PreparedDataset {
            examples: train_set.examples.select(&held_out),
            skipped_no_loss_tokens: 0,
            truncated: 0,
            bad_rows: Vec::new(),
            ..train_set.clone()
        });
        train_set.examples = train_set.examples.select(&train);
    }
    if config.packing {
        // TRL packs the evaluation set too (`eval_packing` defaults to `packing`).
        for set in std::iter::once(&mut train_set).chain(eval_set.as_mut()) {
            set.examples = set.examples.pack(config.max_length);
        }
    }
    Ok((train_set, eval_set))
}

impl Run {
    /// The learning rate at `step`.
    fn lr_at(&self, config: &SftConfig, step: usize) -> f64 {
        config.learning_rate * self.schedule.factor(step, self.warmup, self.total)
    }

    /// One optimizer step: each micro-batch forward and backward (the loss normalised by the
    /// loss tokens of the whole step, as transformers does), gradients summed, clipped, AdamW.
    fn step(&mut self, config: &SftConfig, step: usize) -> Result<StepMetrics> {
        let micro_batches: Vec<Vec<Example>> = self
            .batches
            .step(step)
            .iter()
            .map(|ids| {
                ids.iter()
                    .map(|&i| self.train_set.examples.get(i))
                    .collect()
            })
            .collect();
        let step_loss_tokens: f64 = micro_batches.iter().flatten().map(loss_tokens).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.optimizer.params().len()];
        let mut totals = LossTotals::default();
        let mut tokens = 0;
        for (micro, examples) in micro_batches.iter().enumerate() {
            let batch = collate(
                &examples.iter().collect::<Vec<_>>(),
                self.pad_id,
                &self.device,
            )?;
            let dropout_key = key(&[config.seed, step as u64, micro as u64]);
            let out = self.model.batch_loss(&batch, Some(dropout_key))?;
            // As TRL: the load-balancing loss of each micro-batch, averaged over the step's.
            let aux_scale = 1.0 / micro_batches.len() as f64;
            let store = out
                .objective(1.0 / step_loss_tokens.max(1.0), aux_scale)?
                .backward()?;
            for (slot, (_, var)) in grads.iter_mut().zip(self.optimizer.params()) {
                if let Some(g) = store.get(var) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
            totals.add(&LossTotals::of(&out)?);
            tokens += batch.num_tokens;
        }
        // A trainable tensor the loss did not reach would silently stop training: an error.
        let grads = grads
            .into_iter()
            .zip(self.optimizer.params())
            .map(|(g, (name, _))| {
                g.ok_or_else(|| Error::Tensor {
                    name: name.clone(),
                    message: "received no gradient from the loss (a bug: please report it with the command line)".into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (grad_norm, grads) = clip_grad_norm(grads, config.max_grad_norm)?;
        let loss = totals.loss();
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(self.non_finite(step + 1, loss, &grads));
        }
        let lr = self.lr_at(config, step);
        self.optimizer.step(&grads, lr)?;
        let done = step + 1;
        self.state.global_step = done;
        self.state.epoch = self.batches.epoch_at(done);
        self.state.num_input_tokens_seen += tokens;
        Ok(StepMetrics {
            loss: totals.loss(),
            aux_loss: totals.aux_loss(),
            grad_norm,
            accuracy: totals.accuracy(),
            entropy: totals.entropy(),
            tokens,
        })
    }

    /// Counts step `done` as taken without its update (`--skip-nonfinite-steps`): its batch is
    /// consumed, nothing is applied; the log entry says what was not finite.
    fn skip_step(&mut self, done: usize, what: String) -> serde_json::Map<String, Value> {
        self.state.global_step = done;
        self.state.epoch = self.batches.epoch_at(done);
        let mut entry = serde_json::Map::new();
        entry.insert("skipped_nonfinite".into(), Value::from(what.clone()));
        entry.insert("epoch".into(), Value::from(self.state.epoch));
        entry.insert("step".into(), Value::from(done));
        self.skipped_steps.push((done, what));
        entry
    }

    /// The error for step `step` whose loss or gradients are not finite: names the loss or the
    /// first tensor whose gradient is not, and the checkpoint to resume from.
    fn non_finite(&self, step: usize, loss: f64, grads: &[Tensor]) -> Error {
        let finite = |g: &Tensor| {
            g.sqr()
                .and_then(|s| s.sum_all())
                .and_then(|s| s.to_dtype(DType::F64))
                .and_then(|s| s.to_scalar::<f64>())
                .is_ok_and(f64::is_finite)
        };
        let what = if !loss.is_finite() {
            format!("the loss ({loss})")
        } else {
            grads
                .iter()
                .zip(self.optimizer.params())
                .find(|(g, _)| !finite(g))
                .map_or("the gradient norm".to_string(), |(_, (name, _))| {
                    format!("the gradient of `{name}`")
                })
        };
        let checkpoint = match checkpoint::list(&self.output_dir).last() {
            Some((_, dir)) => format!(
                "the last checkpoint, {}, resumes with --resume-from-checkpoint latest",
                dir.display()
            ),
            None => "no checkpoint was saved before it".to_string(),
        };
        Error::NonFinite {
            step,
            what,
            checkpoint,
        }
    }

    /// Evaluates after step `done`, logs the `eval_*` entry and redraws the loss curve. As
    /// transformers: the best is the checkpoint with the lowest eval loss, so only evaluations at
    /// a save step compete (an unsaved step cannot be loaded back).
    fn evaluate(&mut self, config: &SftConfig, done: usize, log: &Log) -> Result<()> {
        let Some(eval_set) = &self.eval_set else {
            return Ok(());
        };
        let totals = evaluate(
            &self.model,
            &eval_set.examples,
            config.per_device_eval_batch_size,
            self.pad_id,
        )?;
        let mut entry = totals.eval_metrics();
        entry.insert("epoch".into(), self.state.epoch.into());
        entry.insert("step".into(), done.into());
        let saving = done.is_multiple_of(config.save_steps);
        if saving && self.state.best_metric.is_none_or(|b| totals.loss() < b) {
            self.state.best_metric = Some(totals.loss());
            let dir = checkpoint::checkpoint_dir(&self.output_dir, done);
            self.state.best_model_checkpoint = Some(dir.to_string_lossy().into_owned());
        }
        log.write(entry, &mut self.state)?;
        log.tracking.draw(&self.state.log_history)
    }

    /// Writes `checkpoint-<done>` whole or not at all (weights, optimizer, scheduler, RNG scheme,
    /// config, trainer state), pushes it with `--hub-strategy every_save`, and rotates old ones.
    fn save_checkpoint(&self, config: &SftConfig, done: usize) -> Result<()> {
        let schedule = ScheduleAt {
            step: done,
            warmup_steps: self.warmup,
            total_steps: self.total,
        };
        let saved = checkpoint::save(&self.output_dir, done, |dir| {
            self.save_weights(dir)?;
            self.optimizer.save(dir)?;
            checkpoint::write_run_files(dir, config, schedule, &self.state)
        })?;
        if config.push_to_hub && config.hub_strategy == "every_save" {
            push(config, &saved, format!("Training in progress, step {done}"))?;
        }
        if let Some(limit) = config.save_total_limit {
            checkpoint::rotate(
                &self.output_dir,
                limit,
                self.state.best_model_checkpoint.as_deref(),
            )?;
        }
        Ok(())
    }

    /// The adapter (or full model) and its tokenizer files into `dir`.
    fn save_weights(&self, dir: &Path) -> Result<()> {
        save_weights(
            &self.model,
            self.lora_config.as_ref(),
            &self.base_dir,
            dir,
            &self.tokenizer_files,
        )
    }
}

/// Saves the final weights (or the best checkpoint's with `--load-best-model-at-end`), redraws
/// the loss curve, writes the model card and trainer state, and pushes with `--push-to-hub`.
fn finish(run: Run, config: &SftConfig, log: Log) -> Result<TrainOutcome> {
    if let Some(bar) = &log.bar {
        bar.finish_and_clear();
    }
    run.save_weights(&run.output_dir)?;
    if let (true, Some(best)) = (
        config.load_best_model_at_end,
        &run.state.best_model_checkpoint,
    ) {
        crate::report::summary::load_best_model(Path::new(best), &run.output_dir)?;
    }
    log.tracking.draw(&run.state.log_history)?;
    write_card(
        config,
        run.lora_config.as_ref(),
        &run.output_dir,
        &run.state.log_history,
    )?;
    checkpoint::write_state(&run.output_dir, &run.state)?;
    if config.push_to_hub {
        push(config, &run.output_dir, "End of training".to_string())?;
    }
    Ok(TrainOutcome {
        global_step: run.state.global_step,
        log_history: run.state.log_history,
        output_dir: run.output_dir,
        skipped_rows: run.train_set.skipped_no_loss_tokens,
        bad_rows: run.train_set.bad_rows,
        skipped_steps: run.skipped_steps,
    })
}

/// Where log entries go: the tracking files and the progress bar (or stderr).
struct Log {
    tracking: Tracking,
    bar: Option<indicatif::ProgressBar>,
}

impl Log {
    /// Writes `entry` to the tracking files, prints it, and adds it to the run's history.
    fn write(&self, entry: serde_json::Map<String, Value>, state: &mut TrainerState) -> Result<()> {
        let entry = Value::Object(entry);
        self.tracking.log(&entry)?;
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(entry.to_string()),
            Some(_) => eprintln!("{entry}"),
            None => {}
        }
        state.log_history.push(entry);
        Ok(())
    }

    /// Advances the progress bar by one step.
    fn progress(&self, metrics: &StepMetrics, lr: f64, window: &Window) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                metrics.loss,
                lr,
                window.tokens_per_second()
            ));
            bar.inc(1);
        }
    }
}

fn progress_bar(total: usize, done: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_position(done as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    #[test]
    fn eval_split_holds_out_the_ratio_deterministically() {
        let (train, eval) = super::split_eval(20, 0.25, 7);
        assert_eq!((train.len(), eval.len()), (15, 5));
        let (train2, eval2) = super::split_eval(20, 0.25, 7);
        assert_eq!((&train, &eval), (&train2, &eval2));
        assert!(eval.windows(2).all(|w| w[0] < w[1]), "file order");
        let mut all = [train, eval].concat();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }
}
