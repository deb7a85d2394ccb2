//! The training configuration: TRL's `SFTConfig`/transformers' `TrainingArguments` names and
//! defaults, plus PEFT's LoRA fields as TRL's `ModelConfig` names them (`lora_r`, `lora_alpha`, ...).
//! A TOML recipe uses the same keys; command-line flags (kebab-case) override the recipe.

use crate::data::{FieldMapping, TokenizeOptions};
use crate::lora::config::{LayerIndices, OneOrMany};
use crate::lora::init::LoraInit;
use crate::lora::{LoraConfig, TargetModules};
use crate::model::LoadOptions;
use crate::quant::{FourBitType, QuantScheme};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The names `report_to` accepts.
pub const REPORT_TO: &[&str] = &["jsonl", "tensorboard", "all", "none"];

/// Which weights train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// LoRA adapters on a frozen base.
    #[default]
    Lora,
    /// QLoRA: LoRA on a 4-bit quantized frozen base.
    Qlora,
    /// Every weight trains.
    Full,
}

/// Everything `peft-sft train` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Base model: local folder or Hub id.
    pub model_name_or_path: String,
    /// Tokenizer folder, when not the model's (a GGUF base needs one).
    pub tokenizer_name_or_path: Option<String>,
    /// Training data: a local file or Hub id.
    pub dataset_name: String,
    /// The dataset's config (subset) for a folder or Hub dataset with several, e.g.
    /// `everyday-conversations`.
    pub dataset_config: Option<String>,
    /// The split to train on, for folders and Hub datasets (TRL's `dataset_train_split`).
    pub dataset_train_split: String,
    /// The split `eval_dataset` is read from when it is a folder or Hub dataset
    /// (TRL's `dataset_test_split`).
    pub dataset_test_split: String,
    /// Evaluation data.
    pub eval_dataset: Option<String>,
    /// Hold out this fraction of the training rows for evaluation (when no `eval_dataset`).
    pub eval_split_ratio: Option<f64>,
    /// The column holding plain text (TRL's `dataset_text_field`).
    pub dataset_text_field: String,
    /// The column holding the prompt, for datasets not in TRL's formats.
    pub prompt_field: Option<String>,
    /// The column holding the completion.
    pub completion_field: Option<String>,
    /// The completion assembled from columns, e.g. `<think>{Complex_CoT}</think>{Response}`.
    pub completion_template: Option<String>,
    /// A system message put before each conversation that has none.
    pub system_prompt: Option<String>,
    /// A Jinja chat template file to use instead of the tokenizer's (TRL's `chat_template_path`).
    pub chat_template_path: Option<String>,
    /// Train on at most this many (tokenized) training rows.
    pub max_train_samples: Option<usize>,
    /// What an unusable dataset row does: `error` (stop, naming file and line) or `skip` (count
    /// and report it at the end).
    pub on_bad_row: String,
    /// Cache tokenized datasets on disk and map them on later runs.
    pub dataset_cache: bool,
    /// Where tokenized datasets are cached; `None` is [`crate::data::default_cache_dir`].
    pub dataset_cache_dir: Option<String>,
    /// Where checkpoints, metrics and the final adapter/model go.
    pub output_dir: String,
    /// Which weights train.
    pub mode: Mode,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Sequences per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Sequences per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Epochs (fractional allowed) when `max_steps` is not positive.
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides epochs when positive.
    pub max_steps: i64,
    /// `linear`, `cosine`, `constant` or `constant_with_warmup`.
    pub lr_scheduler_type: String,
    /// Fraction of steps spent warming up (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Gradient clipping threshold (0 disables).
    pub max_grad_norm: f64,
    /// Log every N steps.
    pub logging_steps: usize,
    /// Evaluate every N steps (defaults to `logging_steps`).
    pub eval_steps: Option<usize>,
    /// Checkpoint every N steps.
    pub save_steps: usize,
    /// Keep at most N checkpoints.
    pub save_total_limit: Option<usize>,
    /// At the end, copy the checkpoint with the lowest eval loss to the output folder (needs an
    /// evaluation set and `save_steps` a multiple of `eval_steps`).
    pub load_best_model_at_end: bool,
    /// Where metrics go (TRL's `report_to`): `jsonl` (`metrics.jsonl` and `loss_curve.png`),
    /// `tensorboard` (event files in `OUTPUT/runs/`), `all`, or `none`. `metrics.jsonl` is
    /// written unless `none`: resuming, `peft-sft plot` and the end-of-run summary read it.
    pub report_to: Vec<String>,
    /// Resume from a checkpoint folder, or `latest`.
    pub resume_from_checkpoint: Option<String>,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Longest tokenized example (longer ones are truncated).
    pub max_length: usize,
    /// Train on completions only (prompt-completion data); None = TRL's default.
    pub completion_only_loss: Option<bool>,
    /// Train on assistant turns only.
    pub assistant_only_loss: bool,
    /// Pack examples into rows of `max_length`.
    pub packing: bool,
    /// Recompute activations in the backward pass.
    pub gradient_checkpointing: bool,
    /// bf16 mixed precision (TRL's `bf16`): the frozen base and the activations in bf16, LoRA
    /// weights, their gradients and AdamW state in f32. `false`: f32 throughout. None: f32 on the
    /// CPU, the checkpoint's dtype on a GPU.
    pub bf16: Option<bool>,
    /// Keep each decoder layer's saved activations in host memory until its backward (LoRA and
    /// QLoRA on an accelerator; on the CPU they are there already).
    pub offload_activations: bool,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// LoRA target modules: `all-linear`, a regex, or a comma-separated list.
    pub lora_target_modules: Vec<String>,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// DoRA.
    pub use_dora: bool,
    /// PEFT's `layers_to_transform`: only the target modules of these decoder layers get
    /// adapters; empty: every layer.
    pub layers_to_transform: Vec<usize>,
    /// PEFT's `layers_pattern`: the module list holding the layers (`layers`); empty: PEFT's
    /// default (the first `<name>.<number>.` of a module's path).
    pub layers_pattern: Vec<String>,
    /// PEFT's `exclude_modules`: names (matched as suffixes) or one regex never adapted.
    pub exclude_modules: Vec<String>,
    /// PEFT's `init_lora_weights`: `true`, `gaussian`, `pissa`, `pissa_niter_N`, `olora`,
    /// `loftq`.
    pub init_lora_weights: String,
    /// LoftQ's alternating iterations (PEFT's `LoftQConfig.loftq_iter`); its bits are the base's
    /// quantization (4 with `--qlora`, 8 with `--load-in-8bit`).
    pub loftq_iter: usize,
    /// PEFT's `modules_to_save` (TRL's `lora_modules_to_save`): `embed_tokens`, `lm_head`,
    /// trained as full copies beside the adapter.
    pub modules_to_save: Vec<String>,
    /// LoRA+'s learning rate of an embedding trained in full (`modules_to_save embed_tokens`),
    /// PEFT's `loraplus_lr_embedding`.
    pub loraplus_lr_embedding: f64,
    /// NEFTune (transformers' `neftune_noise_alpha`): uniform noise of magnitude
    /// `alpha / sqrt(L · d)` on the input embeddings while training; None adds none.
    pub neftune_noise_alpha: Option<f64>,
    /// A mixture of experts' load-balancing loss weight (TRL's `router_aux_loss_coef`): None
    /// takes the model config's (0.001 for Mixtral and Qwen3-MoE), 0 turns the loss off.
    pub router_aux_loss_coef: Option<f64>,
    /// The token loss (TRL's `loss_type`): `nll` (cross-entropy) or `dft` (Dynamic Fine-Tuning:
    /// each token's loss weighed by its detached probability).
    pub loss_type: String,
    /// Steps whose loss or gradients are NaN or inf that the run may skip (no update, logged)
    /// before it stops; 0 stops at the first.
    pub skip_nonfinite_steps: usize,
    /// LoRA+ (PEFT's `create_loraplus_optimizer`): the B matrices learn at this multiple of the
    /// learning rate (the LoRA+ paper suggests 16); None trains both at the learning rate.
    pub loraplus_lr_ratio: Option<f64>,
    /// `cpu`, `cuda` or `auto`.
    pub device: String,
    /// Push the result to the Hugging Face Hub (TRL's `push_to_hub`).
    pub push_to_hub: bool,
    /// The Hub repository to push to, `owner/name` (TRL's `hub_model_id`).
    pub hub_model_id: Option<String>,
    /// When to push: `end` (the final adapter/model) or `every_save` (also each checkpoint).
    pub hub_strategy: String,
    /// Create the Hub repository as private.
    pub hub_private_repo: bool,
    /// The branch to push to (default `main`).
    pub hub_revision: Option<String>,
    /// 4-bit code of `--qlora`: `nf4` or `fp4` (transformers' `bnb_4bit_quant_type`).
    pub bnb_4bit_quant_type: String,
    /// Double-quantize the 4-bit absmax values (`bnb_4bit_use_double_quant`; the QLoRA recipe).
    pub bnb_4bit_use_double_quant: bool,
    /// LoRA over a row-wise int8 base instead of 4 bits.
    pub load_in_8bit: bool,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            model_name_or_path: String::new(),
            tokenizer_name_or_path: None,
            dataset_name: String::new(),
            dataset_config: None,
            dataset_train_split: "train".into(),
            dataset_test_split: "test".into(),
            eval_dataset: None,
            eval_split_ratio: None,
            dataset_text_field: "text".into(),
            prompt_field: None,
            completion_field: None,
            completion_template: None,
            system_prompt: None,
            chat_template_path: None,
            on_bad_row: "error".into(),
            dataset_cache: true,
            dataset_cache_dir: None,
            max_train_samples: None,
            output_dir: String::new(),
            mode: Mode::Lora,
            learning_rate: 2e-5,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: "linear".into(),
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            logging_steps: 10,
            eval_steps: None,
            save_steps: 500,
            save_total_limit: None,
            load_best_model_at_end: false,
            report_to: vec!["jsonl".into(), "tensorboard".into()],
            resume_from_checkpoint: None,
            seed: 42,
            max_length: 1024,
            completion_only_loss: None,
            assistant_only_loss: false,
            packing: false,
            gradient_checkpointing: false,
            bf16: None,
            offload_activations: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: vec!["all-linear".into()],
            use_rslora: false,
            use_dora: false,
            layers_to_transform: Vec::new(),
            layers_pattern: Vec::new(),
            exclude_modules: Vec::new(),
            modules_to_save: Vec::new(),
            init_lora_weights: "true".into(),
            loftq_iter: 1,
            loraplus_lr_embedding: 1e-6,
            loraplus_lr_ratio: None,
            skip_nonfinite_steps: 0,
            loss_type: "nll".into(),
            neftune_noise_alpha: None,
            router_aux_loss_coef: None,
            device: "auto".into(),
            push_to_hub: false,
            hub_model_id: None,
            hub_strategy: "end".into(),
            hub_private_repo: false,
            hub_revision: None,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: true,
            load_in_8bit: false,
        }
    }
}

impl SftConfig {
    /// Reads a TOML recipe (same keys as the struct), naming the file and the bad key on error.
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: e.span().map(|s| text[..s.start].matches('\n').count() + 1),
            message: e.message().to_string(),
        })
    }

    /// Overlays `overrides` (field name -> JSON value) onto this config.
    pub fn with_overrides(
        &self,
        overrides: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        let mut value = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))?;
        let object = value
            .as_object_mut()
            .ok_or_else(|| Error::Config("config is not an object".into()))?;
        let base = object.clone();
        for (k, v) in &overrides {
            object.insert(k.clone(), v.clone());
        }
        serde_json::from_value(value).map_err(|e| {
            // Name the setting: try each override alone on the base to find the one refused.
            let culprit = overrides.iter().find(|(k, v)| {
                let mut one = base.clone();
                one.insert((*k).clone(), (*v).clone());
                serde_json::from_value::<SftConfig>(serde_json::Value::Object(one)).is_err()
            });
            match culprit {
                Some((k, v)) => Error::Config(format!("--{} {v}: {e}", k.replace('_', "-"))),
                None => Error::Config(e.to_string()),
            }
        })
    }

    /// Checks required fields and value ranges.
    pub fn validate(&self) -> Result<()> {
        let need = |v: &str, flag: &str| {
            if v.is_empty() {
                Err(Error::Config(format!("{flag} is required")))
            } else {
                Ok(())
            }
        };
        need(&self.model_name_or_path, "--model")?;
        need(&self.dataset_name, "--dataset")?;
        need(&self.output_dir, "--output-dir")?;
        for (flag, value) in [
            (
                "per-device-train-batch-size",
                self.per_device_train_batch_size,
            ),
            (
                "per-device-eval-batch-size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient-accumulation-steps",
                self.gradient_accumulation_steps,
            ),
            ("logging-steps", self.logging_steps),
            ("save-steps", self.save_steps),
            ("eval-steps", self.eval_steps.unwrap_or(1)),
            (
                "lora-r",
                if self.mode == Mode::Full {
                    1
                } else {
                    self.lora_r
                },
            ),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("--{flag} 0: must be at least 1")));
            }
        }
        self.validate_ranges()?;
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return Err(Error::Config(
                "set --max-steps or a positive --num-train-epochs".into(),
            ));
        }
        crate::schedule::Schedule::parse(&self.lr_scheduler_type)?;
        self.loss_kind()?;
        self.quantization()?;
        if !matches!(self.on_bad_row.as_str(), "error" | "skip") {
            return Err(Error::Config(format!(
                "--on-bad-row `{}`: expected error or skip",
                self.on_bad_row
            )));
        }
        if let Some(r) = self.eval_split_ratio {
            if !(r > 0.0 && r < 1.0) {
                return Err(Error::Config(format!(
                    "--eval-split-ratio {r}: expected a fraction between 0 and 1"
                )));
            }
            if self.eval_dataset.is_some() {
                return Err(Error::Config(
                    "--eval-split-ratio holds out training rows for evaluation; it cannot be combined with --eval-dataset".into(),
                ));
            }
        }
        if !matches!(self.hub_strategy.as_str(), "end" | "every_save") {
            return Err(Error::Config(format!(
                "--hub-strategy `{}`: expected end or every_save",
                self.hub_strategy
            )));
        }
        if self.push_to_hub
            && !self
                .hub_model_id
                .as_deref()
                .is_some_and(|id| id.contains('/'))
        {
            return Err(Error::Config(
                "--push-to-hub needs --hub-model-id owner/name".into(),
            ));
        }
        if self.mode != Mode::Full {
            self.lora_config().validate()?;
        }
        self.validate_reporting()
    }

    /// The weight of the routers' load-balancing loss for `model`, as TRL resolves it:
    /// `--router-aux-loss-coef`, else the model config's coefficient; 0 for a dense model, for
    /// which a non-zero flag is an error.
    pub fn router_aux_loss_coef_for(&self, model: &crate::model::ModelConfig) -> Result<f64> {
        match (self.router_aux_loss_coef, model.router_aux_loss_coef()) {
            (Some(coef), None) if coef != 0.0 => Err(Error::Config(format!(
                "--router-aux-loss-coef {coef}: {} is not a mixture of experts (its routers' \
                 load-balancing loss is what the flag weighs); leave the flag out",
                model
                    .architectures
                    .first()
                    .map_or("the model", String::as_str)
            ))),
            (Some(coef), _) => Ok(coef),
            (None, from_model) => Ok(from_model.unwrap_or(0.0)),
        }
    }

    /// The token loss `loss_type` names.
    pub fn loss_kind(&self) -> Result<crate::ops::cross_entropy::LossKind> {
        use crate::ops::cross_entropy::LossKind;
        match self.loss_type.as_str() {
            "nll" => Ok(LossKind::Nll),
            "dft" => Ok(LossKind::Dft),
            other => Err(Error::Config(format!(
                "--loss-type `{other}`: expected nll (cross-entropy) or dft (Dynamic Fine-Tuning)"
            ))),
        }
    }

    /// Checks that each number is in the range where it means something, naming the flag, the
    /// value and the rule.
    fn validate_ranges(&self) -> Result<()> {
        let check = |ok: bool, flag: &str, value: &dyn std::fmt::Display, rule: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Config(format!("--{flag} {value}: {rule}")))
            }
        };
        let lr = self.learning_rate;
        check(
            lr.is_finite() && lr > 0.0,
            "learning-rate",
            &lr,
            "must be a positive number (LoRA typically 1e-4 to 2e-4, full fine-tuning 1e-5)",
        )?;
        let epochs = self.num_train_epochs;
        check(
            epochs.is_finite() && epochs >= 0.0,
            "num-train-epochs",
            &epochs,
            "must be 0 or more (fractions allowed)",
        )?;
        let ratio = self.warmup_ratio;
        check(
            (0.0..=1.0).contains(&ratio),
            "warmup-ratio",
            &ratio,
            "must be a fraction of the run between 0 and 1",
        )?;
        if self.max_steps > 0 {
            check(
                self.warmup_steps as i64 <= self.max_steps,
                "warmup-steps",
                &self.warmup_steps,
                &format!(
                    "longer than the run (--max-steps {}): the learning rate would never reach \
                     --learning-rate",
                    self.max_steps
                ),
            )?;
        }
        let decay = self.weight_decay;
        check(
            decay.is_finite() && decay >= 0.0,
            "weight-decay",
            &decay,
            "must be 0 or more",
        )?;
        for (flag, beta) in [
            ("adam-beta1", self.adam_beta1),
            ("adam-beta2", self.adam_beta2),
        ] {
            check(
                (0.0..1.0).contains(&beta),
                flag,
                &beta,
                "must be in [0, 1) (defaults 0.9 and 0.999)",
            )?;
        }
        let eps = self.adam_epsilon;
        check(
            eps.is_finite() && eps > 0.0,
            "adam-epsilon",
            &eps,
            "must be a positive number (default 1e-8)",
        )?;
        let clip = self.max_grad_norm;
        check(
            clip.is_finite() && clip >= 0.0,
            "max-grad-norm",
            &clip,
            "must be 0 (no clipping) or more",
        )?;
        check(
            self.max_length >= 2,
            "max-length",
            &self.max_length,
            "must be at least 2 tokens (an input and the token it predicts)",
        )?;
        if let Some(limit) = self.save_total_limit {
            check(
                limit >= 1,
                "save-total-limit",
                &limit,
                "keeps at least 1 checkpoint; leave it unset to keep them all",
            )?;
        }
        if let Some(rows) = self.max_train_samples {
            check(
                rows >= 1,
                "max-train-samples",
                &rows,
                "must be at least 1; leave it unset to train on every row",
            )?;
        }
        if self.mode != Mode::Full {
            let alpha = self.lora_alpha;
            check(
                alpha.is_finite() && alpha > 0.0,
                "lora-alpha",
                &alpha,
                "must be a positive number (the LoRA update is scaled by alpha / r; commonly 2 r)",
            )?;
            let dropout = self.lora_dropout;
            check(
                (0.0..1.0).contains(&dropout),
                "lora-dropout",
                &dropout,
                "must be in [0, 1)",
            )?;
        }
        if let Some(alpha) = self.neftune_noise_alpha {
            check(
                alpha.is_finite() && alpha > 0.0,
                "neftune-noise-alpha",
                &alpha,
                "must be a positive number (the NEFTune paper uses 5 to 15)",
            )?;
        }
        if let Some(coef) = self.router_aux_loss_coef {
            check(
                coef.is_finite() && coef >= 0.0,
                "router-aux-loss-coef",
                &coef,
                "must be a number >= 0 (Mixtral and Qwen3-MoE use 0.001; 0 turns the loss off)",
            )?;
        }
        check(
            LoraInit::from_config(&serde_json::Value::String(self.init_lora_weights.clone()))
                .is_ok(),
            "init-lora-weights",
            &self.init_lora_weights,
            "expected true, gaussian, pissa, pissa_niter_N (e.g. pissa_niter_16), olora or loftq",
        )?;
        if self.init_lora_weights == "loftq" {
            check(
                self.mode == Mode::Qlora || (self.mode == Mode::Lora && self.load_in_8bit),
                "init-lora-weights",
                &self.init_lora_weights,
                "LoftQ fits the adapter to the error of a quantized base: use it with --qlora (4-bit, PEFT's loftq_bits 4) or --lora --load-in-8bit (8-bit)",
            )?;
            check(
                self.loftq_iter >= 1,
                "loftq-iter",
                &self.loftq_iter,
                "must be at least 1 (PEFT's default is 1)",
            )?;
        }
        check(
            self.mode != Mode::Full || matches!(self.init_lora_weights.as_str(), "true" | "True"),
            "init-lora-weights",
            &self.init_lora_weights,
            "initialises LoRA adapters; --full trains no adapters",
        )?;
        check(
            self.modules_to_save.is_empty() || self.mode != Mode::Full,
            "modules-to-save",
            &self.modules_to_save.join(","),
            "trains copies of modules beside an adapter; --full trains every weight already",
        )?;
        check(
            self.loraplus_lr_embedding.is_finite() && self.loraplus_lr_embedding > 0.0,
            "loraplus-lr-embedding",
            &self.loraplus_lr_embedding,
            "must be a positive number (PEFT's default is 1e-6)",
        )?;
        check(
            !(self.use_dora && self.mode == Mode::Full),
            "use-dora",
            &self.use_dora,
            "DoRA rescales a LoRA adapter's weight; --full trains the weights themselves (use --lora or --qlora)",
        )?;
        if let Some(ratio) = self.loraplus_lr_ratio {
            check(
                self.mode != Mode::Full,
                "loraplus-lr-ratio",
                &ratio,
                "sets the learning rate of LoRA's B matrices; --full trains no adapters",
            )?;
            check(
                ratio.is_finite() && ratio > 0.0,
                "loraplus-lr-ratio",
                &ratio,
                "must be a positive number (the LoRA+ paper suggests 16)",
            )?;
        }
        Ok(())
    }

    /// Checks `report_to` and what `load_best_model_at_end` needs.
    fn validate_reporting(&self) -> Result<()> {
        for name in &self.report_to {
            if !REPORT_TO.contains(&name.as_str()) {
                return Err(Error::Config(format!(
                    "--report-to `{name}`: expected {} (comma-separated); peft-sft writes \
                     TensorBoard event files and metrics.jsonl, not wandb/mlflow/comet logs",
                    REPORT_TO.join(", ")
                )));
            }
        }
        if self.report_to.len() > 1 && self.report_to.iter().any(|n| n == "none") {
            return Err(Error::Config(
                "--report-to none turns every tracker off; it cannot be combined with others"
                    .into(),
            ));
        }
        if self.load_best_model_at_end {
            if self.eval_dataset.is_none() && self.eval_split_ratio.is_none() {
                return Err(Error::Config(
                    "--load-best-model-at-end picks the checkpoint with the lowest eval loss: \
                     pass --eval-dataset or --eval-split-ratio"
                        .into(),
                ));
            }
            let eval_steps = self.eval_steps.unwrap_or(self.logging_steps);
            if !self.save_steps.is_multiple_of(eval_steps) {
                return Err(Error::Config(format!(
                    "--load-best-model-at-end needs --save-steps ({}) to be a multiple of \
                     --eval-steps ({eval_steps}), so every checkpoint has an eval loss",
                    self.save_steps
                )));
            }
        }
        Ok(())
    }

    /// Whether `tracker` (`jsonl` or `tensorboard`) is on: named in `report_to`, or `all`.
    /// `jsonl` is on unless `report_to` is `none` (or empty).
    pub fn reports_to(&self, tracker: &str) -> bool {
        let none = self.report_to.is_empty() || self.report_to.iter().any(|n| n == "none");
        match tracker {
            "jsonl" => !none,
            _ => self.report_to.iter().any(|n| n == tracker || n == "all"),
        }
    }

    /// How the base's linear weights are quantized while loading: 4-bit for `--qlora`, int8 for
    /// `--load-in-8bit`, none otherwise.
    pub fn quantization(&self) -> Result<Option<QuantScheme>> {
        match (self.mode, self.load_in_8bit) {
            (Mode::Full, true) => Err(Error::Config(
                "--load-in-8bit freezes the base: use it with --lora".into(),
            )),
            (Mode::Qlora, true) => Err(Error::Config(
                "--qlora loads the base in 4 bits; --load-in-8bit asks for 8: pick one".into(),
            )),
            (Mode::Qlora, false) => Ok(Some(four_bit_scheme(
                &self.bnb_4bit_quant_type,
                self.bnb_4bit_use_double_quant,
            )?)),
            (Mode::Lora, true) => Ok(Some(QuantScheme::Int8)),
            _ => Ok(None),
        }
    }

    /// How the base model loads: trainable weights for `--full`, the quantization of `--qlora` /
    /// `--load-in-8bit`, and the tokenizer folder.
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            trainable: self.mode == Mode::Full,
            quantize: self.quantization()?,
            tokenizer: self.tokenizer_name_or_path.as_ref().map(Into::into),
            dtype: self.bf16.map(|on| {
                if on {
                    candle_core::DType::BF16
                } else {
                    candle_core::DType::F32
                }
            }),
        })
    }

    /// The `--chat-template` file's text, when given.
    pub fn chat_template(&self) -> Result<Option<String>> {
        if self.sets_up_chatml() {
            return Ok(None);
        }
        self.chat_template_path
            .as_ref()
            .map(|path| std::fs::read_to_string(path).map_err(|e| Error::io(path, e)))
            .transpose()
    }

    /// One line naming the training method these settings describe, with the options that change
    /// what trains (as the flags name them): e.g. `QLoRA (nf4, double quantization) r=16
    /// alpha=32 all-linear, DoRA, init loftq (4 iterations), loss dft`.
    pub fn method_summary(&self) -> String {
        let mut parts = Vec::new();
        let base = match (self.mode, self.load_in_8bit) {
            (Mode::Full, _) => "full fine-tuning".to_string(),
            (Mode::Qlora, _) => format!(
                "QLoRA ({}{})",
                self.bnb_4bit_quant_type,
                if self.bnb_4bit_use_double_quant {
                    ", double quantization"
                } else {
                    ""
                }
            ),
            (Mode::Lora, true) => "LoRA over an int8 base".to_string(),
            (Mode::Lora, false) => "LoRA".to_string(),
        };
        if self.mode == Mode::Full {
            parts.push(base);
        } else {
            parts.push(format!(
                "{base} r={} alpha={}{} {}{}",
                self.lora_r,
                self.lora_alpha,
                if self.use_rslora { " (rsLoRA)" } else { "" },
                self.lora_target_modules.join(","),
                if self.lora_dropout > 0.0 {
                    format!(" dropout {}", self.lora_dropout)
                } else {
                    String::new()
                }
            ));
            if self.use_dora {
                parts.push("DoRA".into());
            }
            match self.init_lora_weights.as_str() {
                "true" | "True" => {}
                "loftq" => parts.push(format!("init loftq ({} iterations)", self.loftq_iter)),
                other => parts.push(format!("init {other}")),
            }
            if !self.layers_to_transform.is_empty() {
                let layers: Vec<String> = self
                    .layers_to_transform
                    .iter()
                    .map(|l| l.to_string())
                    .collect();
                parts.push(format!("layers {}", layers.join(",")));
            }
            if !self.exclude_modules.is_empty() {
                parts.push(format!("excluding {}", self.exclude_modules.join(",")));
            }
            if !self.modules_to_save.is_empty() {
                parts.push(format!(
                    "modules_to_save {}",
                    self.modules_to_save.join(",")
                ));
            }
            if let Some(ratio) = self.loraplus_lr_ratio {
                parts.push(format!("LoRA+ ratio {ratio}"));
            }
        }
        if self.loss_type != "nll" {
            parts.push(format!("loss {}", self.loss_type));
        }
        if let Some(alpha) = self.neftune_noise_alpha {
            parts.push(format!("NEFTune alpha {alpha}"));
        }
        if let Some(coef) = self.router_aux_loss_coef {
            parts.push(format!("router aux loss coef {coef}"));
        }
        parts.join(", ")
    }

    /// Whether `--chat-template chatml` asks for TRL's chat-format setup (new ChatML tokens, their
    /// rows trained) rather than a template file.
    pub fn sets_up_chatml(&self) -> bool {
        self.chat_template_path.as_deref() == Some(crate::data::chat_format::CHATML)
    }

    /// How the datasets are tokenized. TRL neither truncates nor drops rows before packing: packing
    /// cuts each row to `max_length` itself.
    pub fn tokenize_options(&self) -> TokenizeOptions {
        TokenizeOptions {
            max_length: (!self.packing).then_some(self.max_length),
            completion_only_loss: self.completion_only_loss,
            assistant_only_loss: self.assistant_only_loss,
            fields: self.field_mapping(),
            skip_bad_rows: self.on_bad_row == "skip",
            cache_dir: if self.dataset_cache {
                self.dataset_cache_dir
                    .as_ref()
                    .map(Into::into)
                    .or_else(crate::data::default_cache_dir)
            } else {
                None
            },
        }
    }

    /// The column mapping the dataset flags describe.
    pub fn field_mapping(&self) -> FieldMapping {
        FieldMapping {
            text_field: (self.dataset_text_field != "text")
                .then(|| self.dataset_text_field.clone()),
            prompt_field: self.prompt_field.clone(),
            completion_field: self.completion_field.clone(),
            completion_template: self.completion_template.clone(),
            system_prompt: self.system_prompt.clone(),
        }
    }

    /// The PEFT LoRA config these settings describe.
    pub fn lora_config(&self) -> LoraConfig {
        let targets = TargetModules::from_names(&self.lora_target_modules);
        LoraConfig {
            base_model_name_or_path: Some(self.model_name_or_path.clone()),
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: targets,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            layers_to_transform: (!self.layers_to_transform.is_empty())
                .then(|| LayerIndices::Many(self.layers_to_transform.clone())),
            layers_pattern: (!self.layers_pattern.is_empty())
                .then(|| OneOrMany::Many(self.layers_pattern.clone())),
            exclude_modules: (!self.exclude_modules.is_empty())
                .then(|| TargetModules::from_names(&self.exclude_modules)),
            modules_to_save: (!self.modules_to_save.is_empty())
                .then(|| self.modules_to_save.clone()),
            init_lora_weights: match self.init_lora_weights.as_str() {
                "true" | "True" => serde_json::Value::Bool(true),
                other => serde_json::Value::String(other.to_string()),
            },
            other: if self.init_lora_weights == "loftq" {
                let bits = if self.load_in_8bit { 8 } else { 4 };
                let loftq = serde_json::json!({"loftq_bits": bits, "loftq_iter": self.loftq_iter});
                std::collections::BTreeMap::from([("loftq_config".to_string(), loftq)])
            } else {
                std::collections::BTreeMap::new()
            },
            ..LoraConfig::default()
        }
    }
}

/// The 4-bit scheme of `--bnb-4bit-quant-type` (blocks of 64, as bitsandbytes).
pub fn four_bit_scheme(quant_type: &str, double_quant: bool) -> Result<QuantScheme> {
    let quant_type = FourBitType::from_name(quant_type).ok_or_else(|| {
        Error::Config(format!(
            "--bnb-4bit-quant-type `{quant_type}`: expected nf4 or fp4"
        ))
    })?;
    Ok(QuantScheme::FourBit {
        quant_type,
        blocksize: 64,
        double_quant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    /// A config that passes validation, with `overrides` (field -> JSON value) on top.
    fn with(overrides: &[(&str, Value)]) -> Result<SftConfig> {
        let mut fields: Map<String, Value> = [
            ("model_name_or_path", json!("m")),
            ("dataset_name", json!("d.jsonl")),
            ("output_dir", json!("out")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        fields.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.clone())));
        SftConfig::default().with_overrides(fields)
    }

    #[test]
    fn the_method_line_names_what_trains() {
        let c = with(&[
            ("mode", json!("qlora")),
            ("use_dora", json!(true)),
            ("init_lora_weights", json!("loftq")),
            ("loftq_iter", json!(3)),
            ("loss_type", json!("dft")),
        ])
        .unwrap();
        assert_eq!(
            c.method_summary(),
            format!(
                "QLoRA (nf4, double quantization) r={} alpha={} all-linear dropout {}, DoRA, init loftq (3 iterations), loss dft",
                c.lora_r, c.lora_alpha, c.lora_dropout
            )
        );
        let full = with(&[("mode", json!("full"))]).unwrap();
        assert_eq!(full.method_summary(), "full fine-tuning");
    }

    #[test]
    fn the_defaults_with_the_required_fields_validate() {
        with(&[]).unwrap().validate().unwrap();
    }

    #[test]
    fn every_out_of_range_setting_is_refused_naming_its_flag_and_value() {
        let cases: &[(&str, Value, &str)] = &[
            (
                "learning_rate",
                json!(-1.0),
                "--learning-rate -1: must be a positive number",
            ),
            (
                "learning_rate",
                json!(0.0),
                "--learning-rate 0: must be a positive number",
            ),
            (
                "num_train_epochs",
                json!(-2.0),
                "--num-train-epochs -2: must be 0 or more",
            ),
            (
                "warmup_ratio",
                json!(1.5),
                "--warmup-ratio 1.5: must be a fraction",
            ),
            (
                "weight_decay",
                json!(-0.1),
                "--weight-decay -0.1: must be 0 or more",
            ),
            (
                "adam_beta1",
                json!(1.0),
                "--adam-beta1 1: must be in [0, 1)",
            ),
            (
                "adam_beta2",
                json!(-0.5),
                "--adam-beta2 -0.5: must be in [0, 1)",
            ),
            (
                "adam_epsilon",
                json!(0.0),
                "--adam-epsilon 0: must be a positive number",
            ),
            (
                "max_grad_norm",
                json!(-1.0),
                "--max-grad-norm -1: must be 0 (no clipping) or more",
            ),
            (
                "max_length",
                json!(1),
                "--max-length 1: must be at least 2 tokens",
            ),
            (
                "save_total_limit",
                json!(0),
                "--save-total-limit 0: keeps at least 1 checkpoint",
            ),
            (
                "max_train_samples",
                json!(0),
                "--max-train-samples 0: must be at least 1",
            ),
            (
                "lora_alpha",
                json!(0.0),
                "--lora-alpha 0: must be a positive number",
            ),
            (
                "lora_dropout",
                json!(1.0),
                "--lora-dropout 1: must be in [0, 1)",
            ),
            (
                "per_device_eval_batch_size",
                json!(0),
                "--per-device-eval-batch-size",
            ),
        ];
        for (field, value, want) in cases {
            let err = with(&[(field, value.clone())])
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{field} = {value}: {err}");
        }
        // Warm-up longer than the run.
        let err = with(&[("max_steps", json!(10)), ("warmup_steps", json!(11))])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--warmup-steps 11: longer than the run (--max-steps 10)"),
            "{err}"
        );
        let err = with(&[("mode", json!("full")), ("loraplus_lr_ratio", json!(16.0))])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--full trains no adapters"), "{err}");
        let err = with(&[("mode", json!("full")), ("use_dora", json!(true))])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--use-dora true: DoRA rescales"), "{err}");
        // Full fine-tuning has no LoRA settings to check.
        with(&[("mode", json!("full")), ("lora_alpha", json!(0.0))])
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn a_value_of_the_wrong_kind_names_its_setting() {
        let err = with(&[
            ("learning_rate", json!(1e-4)),
            ("per_device_train_batch_size", json!(-1)),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--per-device-train-batch-size -1:"), "{err}");
    }
}
