//! Model cards: the `README.md` that PEFT and TRL write next to an adapter or a model, with YAML
//! front matter the Hub reads (`base_model`, `library_name`, `tags`, `pipeline_tag`, `datasets`),
//! usage snippets for PEFT/transformers and peft-sft, the training hyperparameters, the final
//! metrics and the loss curve.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::config::SftConfig;
use crate::lora::LoraConfig;
use crate::Result;

/// The card's file name.
pub const CARD_FILE: &str = "README.md";

/// What the folder holds.
#[derive(Debug, Clone, Copy)]
pub enum CardKind<'a> {
    /// A PEFT LoRA adapter (`qlora`: trained over a 4-bit base).
    Adapter {
        /// The adapter's config.
        lora: &'a LoraConfig,
        /// Trained over a 4-bit quantized base.
        qlora: bool,
    },
    /// A full model: fine-tuned in full, or an adapter merged into its base.
    Model {
        /// Whether it is a merged adapter (else a full fine-tune).
        merged: bool,
    },
}

/// Everything a card says.
#[derive(Debug, Clone)]
pub struct CardInfo<'a> {
    /// The base model (Hub id or local folder).
    pub base_model: &'a str,
    /// The folder's name on the Hub, when known (used in the snippets), else a placeholder.
    pub repo_id: Option<&'a str>,
    /// What the folder holds.
    pub kind: CardKind<'a>,
    /// The training run's settings, when the folder came from `peft-sft train`.
    pub config: Option<&'a SftConfig>,
    /// The run's log records (`metrics.jsonl`), for the final metrics.
    pub log_history: &'a [Value],
    /// Whether `loss_curve.png` is in the folder.
    pub loss_curve: bool,
}

/// Whether `spec` names a Hub repository rather than a local path.
fn is_hub_id(spec: &str) -> bool {
    !Path::new(spec).exists() && crate::hub::hub_id(spec).is_some()
}

/// YAML's double-quoted form of `s` (JSON strings are valid YAML).
fn yaml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The last value of `key` in the log.
fn last(log: &[Value], key: &str) -> Option<f64> {
    log.iter().rev().find_map(|r| r.get(key)?.as_f64())
}

/// Renders the card, titled by the repository's name (or `fallback_name`, e.g. the folder's).
pub fn render(info: &CardInfo, fallback_name: &str) -> String {
    let mut s = String::new();
    let adapter = matches!(info.kind, CardKind::Adapter { .. });
    let qlora = matches!(info.kind, CardKind::Adapter { qlora: true, .. });
    let dora = matches!(info.kind, CardKind::Adapter { lora, .. } if lora.use_dora);
    let repo = info.repo_id.unwrap_or("<your-repo-id>");
    s.push_str("---\n");
    let _ = writeln!(s, "base_model: {}", yaml_str(info.base_model));
    let _ = writeln!(
        s,
        "library_name: {}",
        if adapter { "peft" } else { "transformers" }
    );
    if let Some(dataset) = info
        .config
        .map(|c| c.dataset_name.as_str())
        .filter(|d| is_hub_id(d))
    {
        let _ = writeln!(s, "datasets:\n- {}", yaml_str(dataset));
    }
    s.push_str("pipeline_tag: text-generation\ntags:\n");
    if adapter {
        let _ = writeln!(
            s,
            "- {}",
            yaml_str(&format!("base_model:adapter:{}", info.base_model))
        );
    }
    let method = match info.kind {
        CardKind::Adapter { qlora: true, .. } => "qlora",
        CardKind::Adapter { .. } => "lora",
        CardKind::Model { merged: true } => "lora",
        CardKind::Model { merged: false } => "full-fine-tuning",
    };
    for tag in ["sft", method, "peft-sft", "transformers", "text-generation"] {
        let _ = writeln!(s, "- {tag}");
    }
    if qlora {
        s.push_str("- 4-bit\n");
    }
    if dora {
        s.push_str("- dora\n");
    }
    s.push_str("---\n\n");

    let name = info
        .repo_id
        .and_then(|r| r.rsplit('/').next())
        .unwrap_or(fallback_name);
    let _ = writeln!(s, "# {name}\n");
    let what = match info.kind {
        CardKind::Adapter { qlora: true, .. } => {
            "a QLoRA adapter (LoRA over the 4-bit NF4 quantized base)"
        }
        CardKind::Adapter { .. } if dora => {
            "a DoRA adapter (LoRA with a trained magnitude per output row)"
        }
        CardKind::Adapter { .. } => "a LoRA adapter",
        CardKind::Model { merged: true } => "a LoRA fine-tune merged into its base model",
        CardKind::Model { merged: false } => "a full fine-tune",
    };
    let _ = writeln!(
        s,
        "This is {what} of `{}`, trained with supervised fine-tuning (SFT) by [peft-sft](https://github.com/peft-sft/peft-sft){}.\n",
        info.base_model,
        info.config
            .map(|c| format!(" on `{}`", c.dataset_name))
            .unwrap_or_default()
    );

    s.push_str("## Quick start\n\n");
    if adapter {
        let _ = writeln!(
            s,
            "With PEFT and transformers:\n\n```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")\ntokenizer = AutoTokenizer.from_pretrained(\"{repo}\")  # or the base model's\nmessages = [{{\"role\": \"user\", \"content\": \"Hello!\"}}]\ninputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")\nprint(tokenizer.decode(model.generate(inputs, max_new_tokens=64)[0]))\n```\n"
        );
        let _ = writeln!(
            s,
            "With peft-sft:\n\n```bash\npeft-sft generate --model {} --adapter {repo}{} --chat \"Hello!\"\n```\n",
            info.base_model,
            if qlora { " --qlora" } else { "" }
        );
    } else {
        let _ = writeln!(
            s,
            "With transformers:\n\n```python\nfrom transformers import pipeline\n\ngenerator = pipeline(\"text-generation\", model=\"{repo}\")\nprint(generator([{{\"role\": \"user\", \"content\": \"Hello!\"}}], max_new_tokens=64, return_full_text=False)[0][\"generated_text\"])\n```\n"
        );
        let _ = writeln!(
            s,
            "With peft-sft:\n\n```bash\npeft-sft generate --model {repo} --chat \"Hello!\"\n```\n"
        );
    }

    if let Some(c) = info.config {
        s.push_str("## Training hyperparameters\n\n| setting | value |\n|---|---|\n");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        row("learning_rate", c.learning_rate.to_string());
        row(
            "per_device_train_batch_size",
            c.per_device_train_batch_size.to_string(),
        );
        row(
            "gradient_accumulation_steps",
            c.gradient_accumulation_steps.to_string(),
        );
        if c.max_steps > 0 {
            row("max_steps", c.max_steps.to_string());
        } else {
            row("num_train_epochs", c.num_train_epochs.to_string());
        }
        row("lr_scheduler_type", c.lr_scheduler_type.clone());
        row("warmup_ratio", c.warmup_ratio.to_string());
        row(
            "optimizer",
            format!(
                "AdamW (betas {}, {}; eps {}; weight decay {})",
                c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.weight_decay
            ),
        );
        row("max_grad_norm", c.max_grad_norm.to_string());
        row("max_length", c.max_length.to_string());
        row("packing", c.packing.to_string());
        row("assistant_only_loss", c.assistant_only_loss.to_string());
        row(
            "gradient_checkpointing",
            c.gradient_checkpointing.to_string(),
        );
        row("seed", c.seed.to_string());
        if let CardKind::Adapter { lora, .. } = info.kind {
            row("lora_r", lora.r.to_string());
            row("lora_alpha", lora.lora_alpha.to_string());
            row("lora_dropout", lora.lora_dropout.to_string());
            row(
                "target_modules",
                serde_json::to_string(&lora.target_modules).unwrap_or_default(),
            );
            if lora.use_rslora {
                row("use_rslora", "true".into());
            }
            if lora.use_dora {
                row("use_dora", "true".into());
            }
            if let Some(m) = lora.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
                row("modules_to_save", m.join(", "));
            }
            if let Some(layers) = &lora.layers_to_transform {
                row(
                    "layers_to_transform",
                    serde_json::to_string(layers).unwrap_or_default(),
                );
            }
            if c.init_lora_weights != "true" {
                row("init_lora_weights", c.init_lora_weights.clone());
            }
            if c.init_lora_weights == "loftq" {
                row("loftq_iter", c.loftq_iter.to_string());
                row(
                    "adapter base",
                    format!(
                        "`{}/` in this folder: the quantized base LoftQ left, saved dequantized",
                        crate::lora::init::LOFTQ_BASE
                    ),
                );
            }
            if let Some(ratio) = c.loraplus_lr_ratio {
                row("loraplus_lr_ratio", ratio.to_string());
            }
            if c.loss_type != "nll" {
                row("loss_type", c.loss_type.clone());
            }
            if let Some(alpha) = c.neftune_noise_alpha {
                row("neftune_noise_alpha", alpha.to_string());
            }
            if let Some(coef) = c.router_aux_loss_coef {
                row("router_aux_loss_coef", coef.to_string());
            }
            if qlora {
                row(
                    "quantization",
                    format!(
                        "4-bit {} (double quantization {})",
                        c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant
                    ),
                );
            }
        }
        s.push('\n');
    }

    let log = info.log_history;
    let metrics: Vec<(&str, Option<f64>)> = vec![
        ("train loss", last(log, "loss")),
        ("eval loss", last(log, "eval_loss")),
        ("train token accuracy", last(log, "mean_token_accuracy")),
        ("eval token accuracy", last(log, "eval_mean_token_accuracy")),
        ("steps", last(log, "step")),
        ("tokens seen", last(log, "num_tokens")),
    ];
    if metrics.iter().any(|(_, v)| v.is_some()) {
        s.push_str("## Results\n\nFinal values of the run's log (`metrics.jsonl`):\n\n| metric | value |\n|---|---|\n");
        for (k, v) in metrics {
            if let Some(v) = v {
                let v = if v.fract() == 0.0 && v.abs() < 1e15 {
                    format!("{}", v as i64)
                } else {
                    format!("{v:.4}")
                };
                let _ = writeln!(s, "| {k} | {v} |");
            }
        }
        s.push('\n');
    }
    if info.loss_curve {
        s.push_str("![Training and evaluation loss, learning rate](loss_curve.png)\n\n");
    }
    s.push_str("## Framework versions\n\n");
    let _ = writeln!(s, "- peft-sft {}", env!("CARGO_PKG_VERSION"));
    s.push_str("- candle 0.11\n");
    s
}

/// Writes the card into `dir` (atomically), titled by the repository or the folder's name.
pub fn write(dir: &Path, info: &CardInfo) -> Result<()> {
    let folder = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    crate::io::write_bytes(&dir.join(CARD_FILE), render(info, &folder).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn front_matter(card: &str) -> Vec<&str> {
        let body = card.strip_prefix("---\n").unwrap();
        body[..body.find("---\n").unwrap()].lines().collect()
    }

    #[test]
    fn adapter_card_has_peft_front_matter_snippets_hyperparameters_and_results() {
        let lora = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            use_dora: true,
            modules_to_save: Some(vec!["lm_head".into()]),
            ..LoraConfig::default()
        };
        let config = SftConfig {
            model_name_or_path: "HuggingFaceTB/SmolLM2-135M".into(),
            dataset_name: "HuggingFaceTB/smoltalk".into(),
            learning_rate: 2e-4,
            init_lora_weights: "pissa".into(),
            loss_type: "dft".into(),
            ..SftConfig::default()
        };
        let log = vec![
            serde_json::json!({"loss": 2.5, "step": 10, "num_tokens": 1000.0}),
            serde_json::json!({"eval_loss": 2.25, "step": 10}),
        ];
        let card = render(
            &CardInfo {
                base_model: "HuggingFaceTB/SmolLM2-135M",
                repo_id: Some("me/smol-sft"),
                kind: CardKind::Adapter {
                    lora: &lora,
                    qlora: true,
                },
                config: Some(&config),
                log_history: &log,
                loss_curve: true,
            },
            "unused",
        );
        let yaml = front_matter(&card);
        for line in [
            "base_model: \"HuggingFaceTB/SmolLM2-135M\"",
            "library_name: peft",
            "datasets:",
            "- \"HuggingFaceTB/smoltalk\"",
            "pipeline_tag: text-generation",
            "- \"base_model:adapter:HuggingFaceTB/SmolLM2-135M\"",
            "- sft",
            "- qlora",
            "- peft-sft",
        ] {
            assert!(yaml.contains(&line), "missing `{line}` in {yaml:?}");
        }
        assert!(card.contains("# smol-sft"));
        assert!(card.contains("AutoPeftModelForCausalLM.from_pretrained(\"me/smol-sft\")"));
        assert!(card.contains("--adapter me/smol-sft --qlora"));
        assert!(card.contains("| learning_rate | 0.0002 |"));
        assert!(card.contains("| lora_r | 16 |"));
        assert!(card.contains("| use_dora | true |") && card.contains("\n- dora\n"));
        for row in [
            "| modules_to_save | lm_head |",
            "| init_lora_weights | pissa |",
            "| loss_type | dft |",
        ] {
            assert!(card.contains(row), "missing {row}");
        }
        assert!(card.contains("| train loss | 2.5000 |"));
        assert!(card.contains("| eval loss | 2.2500 |"));
        assert!(card.contains("| tokens seen | 1000 |"));
        assert!(card.contains("(loss_curve.png)"));
    }

    #[test]
    fn merged_card_is_a_transformers_model_and_local_data_is_not_a_hub_dataset() {
        let config = SftConfig {
            dataset_name: "Cargo.toml".into(),
            ..SftConfig::default()
        };
        let card = render(
            &CardInfo {
                base_model: "org/base",
                repo_id: None,
                kind: CardKind::Model { merged: true },
                config: Some(&config),
                log_history: &[],
                loss_curve: false,
            },
            "out-dir",
        );
        let yaml = front_matter(&card);
        assert!(yaml.contains(&"library_name: transformers"));
        assert!(!yaml.iter().any(|l| l.starts_with("datasets")));
        assert!(!yaml.iter().any(|l| l.contains("base_model:adapter")));
        assert!(!card.contains("## Results"));
        assert!(!card.contains("loss_curve.png"));
        assert!(card.contains("pipeline(\"text-generation\", model=\"<your-repo-id>\")"));
        assert!(card.contains("# out-dir\n"));
    }
}
