//! `peft-sft merge`: adapter + base -> a complete transformers model folder, verified on a probe.

use super::{load_model, model_args, text};
use candle_core::Tensor;
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use peft_sft::lora::{load_adapter, merge_and_unload};
use peft_sft::model::save::{save_pretrained, MAX_SHARD_BYTES};
use peft_sft::model::{load_pretrained, load_pretrained_with, CausalLm, LoadOptions, Pretrained};
use peft_sft::quant::gguf::GgufFile;
use peft_sft::quant::gguf_export::{export_model, ExportType};
use std::collections::HashMap;
use std::path::Path;

/// The `merge` subcommand's definition.
pub fn command() -> Command {
    Command::new("merge")
        .about("Merge a PEFT LoRA adapter into its base: a transformers model folder, or a GGUF file for a GGUF base (--output x.gguf)")
        .args(model_args(false))
        .arg(
            Arg::new("output")
                .long("output")
                .required(true)
                .help("Output model folder"),
        )
        .arg(
            Arg::new("base_full_precision")
                .long("base-full-precision")
                .value_name("MODEL")
                .help("For a quantized base: merge into these full-precision weights instead of the dequantized base"),
        )
        .arg(
            Arg::new("max_merge_error")
                .long("max-merge-error")
                .default_value("0.1")
                .value_parser(value_parser!(f64))
                .help("Refuse to write when, on the probe, the merged model strays from the adapter by more than this fraction of what the adapter changes in the base's logits"),
        )
        .arg(
            Arg::new("quantize")
                .long("quantize")
                .default_value("f16")
                .help("Weight type of a GGUF --output from a safetensors base: f32 | f16 | q8_0 | q4_0 | q4_k_m"),
        )
        .arg(
            Arg::new("force")
                .long("force")
                .action(ArgAction::SetTrue)
                .help("Write the merged model even when it fails the probe check"),
        )
}

/// Logits of the probe text.
fn probe_logits(model: &CausalLm, ids: &[u32]) -> anyhow::Result<Tensor> {
    let probe = Tensor::new(ids, &model.device)?.unsqueeze(0)?;
    Ok(model.forward(&probe)?)
}

/// Logits of the probe on the base alone, with the adapter, and what the adapter changes.
struct Probe {
    ids: Vec<u32>,
    adapted: Tensor,
    /// Largest change the adapter makes to the base's logits (the largest logit when there is
    /// no adapter: a plain conversion).
    effect: f64,
    /// Whether there is no adapter (a plain conversion).
    conversion: bool,
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64)
}

impl Probe {
    /// Runs the probe text through `model` with and without its adapters.
    fn new(model: &mut CausalLm, ids: Vec<u32>) -> anyhow::Result<Self> {
        let adapted = probe_logits(model, &ids)?;
        let loras: Vec<_> = model
            .linears_mut()
            .into_iter()
            .map(|l| l.lora.take())
            .collect();
        let base = probe_logits(model, &ids);
        for (lin, lora) in model.linears_mut().into_iter().zip(loras) {
            lin.lora = lora;
        }
        // Without an adapter (a plain conversion), the written model is measured against the
        // logits' own scale instead.
        let effect = max_abs_diff(&adapted, &base?)?;
        let conversion = effect == 0.0;
        let effect = if conversion {
            adapted.abs()?.max_all()?.to_scalar::<f32>()? as f64
        } else {
            effect
        };
        Ok(Probe {
            ids,
            adapted,
            effect,
            conversion,
        })
    }

    /// Compares the merged model's logits with the adapter's: a report line, and whether the
    /// difference stays within `limit` of the adapter's effect (always, when it is at float noise).
    fn check(&self, merged: &Tensor, limit: f64) -> anyhow::Result<(String, bool)> {
        let diff = max_abs_diff(&self.adapted, merged)?;
        let scale = self.adapted.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let fraction = diff / self.effect.max(f64::MIN_POSITIVE);
        let report = if self.conversion {
            format!(
                "largest logit difference on a probe between the model and the written file: {diff:.2e}, {:.1}% of the largest logit ({:.2e})",
                100.0 * fraction,
                self.effect
            )
        } else {
            format!(
                "largest logit difference on a probe between the adapter on its base and the merged model: {diff:.2e}, {:.1}% of the largest change the adapter makes ({:.2e})",
                100.0 * fraction,
                self.effect
            )
        };
        Ok((report, diff <= 1e-5 * scale.max(1.0) || fraction <= limit))
    }
}

/// Refuses (unless `--force`) a merge that failed the probe check.
fn check_probe(m: &ArgMatches, report: &str, within: bool, limit: f64) -> anyhow::Result<()> {
    if !within && !m.get_flag("force") {
        anyhow::bail!(
            "{report}; above --max-merge-error {limit}: the merged model would not answer like the adapter did; nothing written (pass --force to write it anyway)"
        );
    }
    Ok(())
}

/// GGUF base + adapter -> a GGUF file: the adapted linears are merged and re-quantized to the
/// base's type per tensor, everything else is copied; the written file is loaded back and checked
/// on the probe before it replaces `--output`.
fn merge_to_gguf(
    m: &ArgMatches,
    mut loaded: Pretrained,
    probe: &Probe,
    limit: f64,
) -> anyhow::Result<()> {
    let base = text(m, "model");
    let gguf = GgufFile::open(Path::new(base))?;
    let adapted: Vec<String> = loaded
        .model
        .linears()
        .into_iter()
        .filter(|l| l.lora.is_some())
        .map(|l| l.name.clone())
        .collect();
    let merged = merge_and_unload(&mut loaded.model)?;
    let mut replaced = HashMap::new();
    for lin in loaded.model.linears() {
        if adapted.contains(&lin.name) {
            replaced.insert(format!("{}.weight", lin.name), lin.weight.dense()?);
        }
    }
    let report = format!(
        "merged {merged} LoRA modules into {base} and re-quantized them to their GGUF types"
    );
    publish_gguf(m, &loaded, probe, limit, &report, |partial| {
        Ok(gguf.write_replacing(&replaced, partial)?)
    })
}

/// Writes a GGUF through `write` to a partial file, reloads it with peft-sft's GGUF loader and
/// runs the probe: the file replaces `--output` only when it answers like the adapter did
/// (within `--max-merge-error`, or `--force`); otherwise it is removed and nothing changes.
fn publish_gguf(
    m: &ArgMatches,
    loaded: &Pretrained,
    probe: &Probe,
    limit: f64,
    what: &str,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let out = Path::new(text(m, "output"));
    let partial = out.with_extension("partial.gguf");
    if let Err(e) = write(&partial) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    let options = LoadOptions {
        tokenizer: Some(loaded.dir.clone()),
        ..LoadOptions::default()
    };
    let check = load_pretrained_with(
        partial.to_str().unwrap_or_default(),
        options,
        &loaded.model.device,
    );
    let after = match check {
        Ok(written) => probe_logits(&written.model, &probe.ids),
        Err(e) => Err(e.into()),
    };
    let after = match after {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let (check, within) = probe.check(&after, limit)?;
    let report = format!("{what}; {check}");
    if let Err(e) = check_probe(m, &report, within, limit) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    eprintln!("{report}; wrote {}", out.display());
    Ok(())
}

/// Merges into a safetensors base and writes the result as a llama.cpp GGUF (`--quantize`),
/// verified like every merge.
fn export_gguf(
    m: &ArgMatches,
    mut loaded: Pretrained,
    probe: &Probe,
    limit: f64,
) -> anyhow::Result<()> {
    let ty: ExportType = text(m, "quantize").parse()?;
    if !loaded.model.quantized_modules().is_empty() {
        loaded.model.dequantize()?;
    }
    let merged = merge_and_unload(&mut loaded.model)?;
    let name = Path::new(text(m, "output"))
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut pre = String::new();
    publish_gguf(
        m,
        &loaded,
        probe,
        limit,
        &if merged == 0 {
            format!("converted to GGUF ({})", text(m, "quantize"))
        } else {
            format!(
                "merged {merged} LoRA modules and exported to GGUF ({})",
                text(m, "quantize")
            )
        },
        |partial| {
            let report = export_model(&loaded.model, &loaded.tokenizer, &name, ty, partial)?;
            pre = report.pre_tokenizer;
            Ok(())
        },
    )?;
    eprintln!("tokenizer.ggml.pre = {pre}");
    Ok(())
}

/// Runs `peft-sft merge`: the merged model must answer like the adapter on its (possibly
/// quantized) base, measured on a probe, or nothing is written.
pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let mut loaded = load_model(m)?;
    let ids = loaded.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. Question: what is 12 + 30? Answer: 42.",
        true,
    )?;
    let probe = Probe::new(&mut loaded.model, ids)?;
    let limit = m.get_one::<f64>("max_merge_error").copied().unwrap_or(0.1);
    let adapter = Path::new(text(m, "adapter"));
    let gguf_base = text(m, "model").ends_with(".gguf");
    if m.get_one::<String>("adapter").is_none() {
        // No adapter: a conversion (a full fine-tune, or any base) to llama.cpp's format.
        anyhow::ensure!(
            text(m, "output").ends_with(".gguf") && !gguf_base,
            "--adapter is required, except to convert a safetensors model to GGUF (--output x.gguf)"
        );
        return export_gguf(m, loaded, &probe, limit);
    }
    let new_tokens = peft_sft::lora::LoraConfig::from_dir(adapter)?
        .trainable_token_indices
        .is_some();
    if text(m, "output").ends_with(".gguf") && gguf_base {
        anyhow::ensure!(
            !new_tokens,
            "{}: the adapter trains vocabulary rows (new tokens); merging those into an existing GGUF file is not supported: merge into a folder or export from the safetensors base",
            adapter.display()
        );
        return merge_to_gguf(m, loaded, &probe, limit);
    }
    if text(m, "output").ends_with(".gguf") {
        return export_gguf(m, loaded, &probe, limit);
    }
    let quantized = loaded.model.quantized_modules().len();
    let (mut model, source_dir, how) = match (quantized, m.get_one::<String>("base_full_precision"))
    {
        (0, Some(_)) => anyhow::bail!(
            "--base-full-precision applies to a quantized base (--qlora, --load-in-8bit or a bnb-4bit checkpoint); this base is full precision"
        ),
        (0, None) => (loaded.model, loaded.dir, "merged into the base".to_string()),
        (n, Some(full)) => {
            let mut target = load_pretrained(full, false, &loaded.model.device)?;
            load_adapter(&mut target.model, Path::new(text(m, "adapter")))?;
            let how = format!("merged into the full-precision weights of {full} (the training base had {n} quantized modules)");
            (target.model, target.dir, how)
        }
        (n, None) => {
            loaded.model.dequantize()?;
            let how = format!("dequantized {n} quantized modules of the base and merged into them (pass --base-full-precision to merge into original weights)");
            (loaded.model, loaded.dir, how)
        }
    };
    let merged = merge_and_unload(&mut model)?;
    let after = probe_logits(&model, &probe.ids)?;
    let (check, within) = probe.check(&after, limit)?;
    let report = format!("{how}: {merged} LoRA modules; {check}");
    check_probe(m, &report, within, limit)?;
    let out = Path::new(text(m, "output"));
    // A tokenizer saved with the adapter has the tokens its rows belong to, and their ids.
    let adapter_tokenizer = adapter
        .join("tokenizer.json")
        .exists()
        .then(|| peft_sft::data::ChatTokenizer::from_dir(adapter))
        .transpose()?;
    if let Some(tok) = &adapter_tokenizer {
        model
            .config
            .set_special_ids(tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id());
    }
    save_pretrained(&model, &source_dir, out, MAX_SHARD_BYTES)?;
    if let Some(tok) = &adapter_tokenizer {
        peft_sft::data::chat_format::save_tokenizer(tok, out)?;
    }
    peft_sft::card::write(
        out,
        &peft_sft::card::CardInfo {
            base_model: text(m, "model"),
            repo_id: None,
            kind: peft_sft::card::CardKind::Model { merged: true },
            config: None,
            log_history: &[],
            loss_curve: false,
        },
    )?;
    eprintln!("{report}; wrote {}", out.display());
    Ok(())
}
