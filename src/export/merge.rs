//! The verified merge: an adapter folded into its base and written as a transformers model folder
//! or a llama.cpp GGUF file — only when the written model answers like the adapter on its
//! (possibly quantized) training base, measured on a probe text; otherwise nothing is written.
//!
//! ```
//! use peft_sft::export::merge::{merge, MergeOptions};
//! use peft_sft::lora::{inject, save_adapter, LoraConfig};
//! use peft_sft::model::load_pretrained;
//!
//! // An adapter to merge (a fresh one changes nothing; a conversion is verified the same way).
//! let dir = tempfile::tempdir()?;
//! let adapter = dir.path().join("adapter");
//! let mut base = load_pretrained("tests/fixtures/models/qwen2", false, &candle_core::Device::Cpu)?;
//! let lora = LoraConfig { r: 4, ..LoraConfig::default() };
//! inject(&mut base.model, &lora, 0)?;
//! save_adapter(&base.model, &lora, &adapter)?;
//!
//! let report = merge(
//!     base,
//!     &MergeOptions {
//!         adapter: Some(adapter),
//!         ..MergeOptions::new("tests/fixtures/models/qwen2", dir.path().join("merged"))
//!     },
//! )?;
//! assert!(dir.path().join("merged/model.safetensors").exists());
//! println!("{}", report.summary);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::gguf::{export_model, tensor_type, ExportType};
use crate::card::{write as write_card, CardInfo, CardKind};
use crate::data::chat_format::save_tokenizer;
use crate::data::ChatTokenizer;
use crate::lora::{load_adapter, merge_and_unload, LoraConfig};
use crate::model::save::{save_pretrained, MAX_SHARD_BYTES};
use crate::model::{load_pretrained, load_pretrained_with, CausalLm, LoadOptions, Pretrained};
use crate::quant::gguf::{llama_cpp_tensor, GgufFile};
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The text whose logits decide whether a merge is written.
pub const PROBE_TEXT: &str =
    "The quick brown fox jumps over the lazy dog. Question: what is 12 + 30? Answer: 42.";

/// What to merge and where (`peft-sft merge`'s flags).
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The base as loaded (`--model`: folder, Hub id or `.gguf` file): the model card names it
    /// and a GGUF base is rewritten from it.
    pub base: String,
    /// The adapter folder already loaded onto the model (`--adapter`); None converts the model
    /// alone to GGUF.
    pub adapter: Option<PathBuf>,
    /// A model folder, or a `.gguf` file (`--output`).
    pub output: PathBuf,
    /// For a quantized base: merge into these full-precision weights instead of the dequantized
    /// base (`--base-full-precision`).
    pub base_full_precision: Option<String>,
    /// Largest fraction of the adapter's effect on the probe's logits by which the merged model
    /// may differ from the adapter on its base (`--max-merge-error`, default 0.1).
    pub max_merge_error: f64,
    /// Weight type of a GGUF written from a safetensors base (`--quantize`, default f16).
    pub gguf_type: Option<ExportType>,
    /// Write even when the probe check fails (`--force`).
    pub force: bool,
}

impl MergeOptions {
    /// The defaults `peft-sft merge` has, for `base` merged into `output`.
    pub fn new(base: impl Into<String>, output: impl Into<PathBuf>) -> Self {
        MergeOptions {
            base: base.into(),
            adapter: None,
            output: output.into(),
            base_full_precision: None,
            max_merge_error: 0.1,
            gguf_type: None,
            force: false,
        }
    }
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// What was merged and how far the written model is from the adapter on the probe.
    pub summary: String,
    /// The file or folder written.
    pub output: PathBuf,
    /// The `tokenizer.ggml.pre` name written, for a GGUF exported from a safetensors base.
    pub pre_tokenizer: Option<String>,
}

/// Merges the adapter `loaded` carries (loaded from `options.adapter`) into its base and writes
/// `options.output`, verified on [`PROBE_TEXT`]: a safetensors base gives a model folder (or a
/// GGUF file when the output ends in `.gguf`), a GGUF base a GGUF file of the same tensor types.
/// A quantized base is dequantized and merged into, or `base_full_precision` is merged into
/// instead. Refuses ([`Error::MergeCheck`]) when the written model strays from the adapter by
/// more than `max_merge_error` of the adapter's effect, unless `force`; a GGUF is written to a
/// partial file and replaces the output only once it passed.
pub fn merge(mut loaded: Pretrained, options: &MergeOptions) -> Result<MergeReport> {
    let ids = loaded.tokenizer.encode(PROBE_TEXT, true)?;
    let probe = Probe::new(&mut loaded.model, ids)?;
    let to_gguf = options.output.extension().is_some_and(|e| e == "gguf");
    let gguf_base = options.base.ends_with(".gguf");
    let Some(adapter) = &options.adapter else {
        // No adapter: a conversion (a full fine-tune, or any base) to llama.cpp's format.
        if !to_gguf || gguf_base {
            return Err(Error::Config(
                "--adapter is required, except to convert a safetensors model to GGUF (--output x.gguf)"
                    .into(),
            ));
        }
        return export_gguf(loaded, &probe, options);
    };
    let new_tokens = LoraConfig::from_dir(adapter)?
        .trainable_token_indices
        .is_some();
    if to_gguf && gguf_base {
        if new_tokens {
            return Err(Error::Config(format!(
                "{}: the adapter trains vocabulary rows (new tokens); merging those into an existing GGUF file is not supported: merge into a folder or export from the safetensors base",
                adapter.display()
            )));
        }
        return merge_to_gguf(loaded, &probe, options);
    }
    if to_gguf {
        return export_gguf(loaded, &probe, options);
    }
    merge_to_folder(loaded, &probe, adapter, options)
}

/// Merges into the (dequantized or full-precision) base and writes a transformers folder.
fn merge_to_folder(
    mut loaded: Pretrained,
    probe: &Probe,
    adapter: &Path,
    options: &MergeOptions,
) -> Result<MergeReport> {
    let quantized = loaded.model.quantized_modules().len();
    let (mut model, source_dir, how) = match (quantized, &options.base_full_precision) {
        (0, Some(_)) => {
            return Err(Error::Config(
                "--base-full-precision applies to a quantized base (--qlora, --load-in-8bit or a bnb-4bit checkpoint); this base is full precision".into(),
            ))
        }
        (0, None) => (loaded.model, loaded.dir, "merged into the base".to_string()),
        (n, Some(full)) => {
            let mut target = load_pretrained(full, false, &loaded.model.device)?;
            load_adapter(&mut target.model, adapter)?;
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
    let (check, within) = probe.check(&after, options.max_merge_error)?;
    let summary = format!("{how}: {merged} LoRA modules; {check}");
    refuse_unless_within(&summary, within, options)?;
    let out = &options.output;
    // A tokenizer saved with the adapter has the tokens its rows belong to, and their ids.
    let adapter_tokenizer = adapter
        .join("tokenizer.json")
        .exists()
        .then(|| ChatTokenizer::from_dir(adapter))
        .transpose()?;
    if let Some(tok) = &adapter_tokenizer {
        model
            .config
            .set_special_ids(tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id());
    }
    // Held while the folder is written: a run or another merge writing it stops at once.
    let _lock = crate::io::lock_dir(out, "peft-sft merge")?;
    save_pretrained(&model, &source_dir, out, MAX_SHARD_BYTES)?;
    if let Some(tok) = &adapter_tokenizer {
        save_tokenizer(tok, out)?;
    }
    write_card(
        out,
        &CardInfo {
            base_model: &options.base,
            repo_id: None,
            kind: CardKind::Model { merged: true },
            config: None,
            log_history: &[],
            loss_curve: false,
        },
    )?;
    Ok(MergeReport {
        summary,
        output: out.clone(),
        pre_tokenizer: None,
    })
}

/// GGUF base + adapter -> a GGUF file: the adapted linears are merged and re-quantized to the
/// base's type per tensor, everything else is copied.
fn merge_to_gguf(
    mut loaded: Pretrained,
    probe: &Probe,
    options: &MergeOptions,
) -> Result<MergeReport> {
    if !loaded.model.saved_modules.is_empty() {
        return Err(Error::Config(format!(
            "{}: the adapter trains full copies of the embedding or LM head (modules_to_save), which a merge into the base's GGUF file does not write yet; merge into a model folder instead (--output DIR), then convert it",
            options
                .adapter
                .as_deref()
                .map_or("the adapter".into(), |a| a.display().to_string())
        )));
    }
    let gguf = GgufFile::open(Path::new(&options.base))?;
    if let Some(moe) = loaded
        .model
        .layers
        .iter()
        .filter_map(|l| l.moe.as_ref())
        .find(|m| !m.lora_vars().is_empty())
    {
        return Err(Error::Config(format!(
            "{}: the adapter trains the router or the experts ({}), which a merge into the base's GGUF file does not rewrite yet; merge into a model folder instead (--output DIR), or convert a safetensors base with --output x.gguf",
            options
                .adapter
                .as_deref()
                .map_or("the adapter".into(), |a| a.display().to_string()),
            moe.peft_path
        )));
    }
    let adapted: Vec<String> = loaded
        .model
        .linears()
        .into_iter()
        .filter(|l| l.lora.is_some())
        .map(|l| l.name.clone())
        .collect();
    let merged = merge_and_unload(&mut loaded.model)?;
    let (layers, tied) = (
        loaded.model.config.num_hidden_layers,
        loaded.model.config.tie_word_embeddings,
    );
    let mut replaced = HashMap::new();
    for lin in loaded.model.linears() {
        if adapted.contains(&lin.name) {
            let name = format!("{}.weight", lin.name);
            let dense = lin.weight.dense()?;
            let stored = llama_cpp_tensor(gguf.arch(), &name);
            let dtype = match (options.gguf_type, stored) {
                (Some(ty), Some(s)) => Some(tensor_type(
                    &s.name,
                    dense.dims(),
                    ty,
                    layers,
                    tied,
                    gguf.experts(),
                )),
                _ => None,
            };
            replaced.insert(name, (dense, dtype));
        }
    }
    let what = match options.gguf_type {
        None => format!(
            "merged {merged} LoRA modules into {} and re-quantized them to their GGUF types",
            options.base
        ),
        Some(ty) => format!(
            "merged {merged} LoRA modules into {} and quantized them as --quantize {ty}",
            options.base
        ),
    };
    publish_gguf(&loaded, probe, options, &what, |partial| {
        gguf.write_replacing(&replaced, partial)
    })
    .map_err(|e| match e {
        // The usual cause: 4-bit types round away an adapter's small change.
        Error::MergeCheck { report, limit } if options.gguf_type.is_none() => Error::MergeCheck {
            report: format!(
                "{report} — re-quantizing to the file's own types lost it: --quantize f16 writes the merged tensors with the bits to keep it (q8_0 keeps most)"
            ),
            limit,
        },
        e => e,
    })
}

/// Merges into a safetensors base (dequantized when quantized) and writes llama.cpp's GGUF of it.
fn export_gguf(
    mut loaded: Pretrained,
    probe: &Probe,
    options: &MergeOptions,
) -> Result<MergeReport> {
    if !loaded.model.quantized_modules().is_empty() {
        loaded.model.dequantize()?;
    }
    let merged = merge_and_unload(&mut loaded.model)?;
    let name = options
        .output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ty = options.gguf_type.unwrap_or(ExportType::F16);
    let what = if merged == 0 {
        format!("converted to GGUF ({ty})")
    } else {
        format!("merged {merged} LoRA modules and exported to GGUF ({ty})")
    };
    let mut pre = String::new();
    let mut report = publish_gguf(&loaded, probe, options, &what, |partial| {
        pre = export_model(&loaded.model, &loaded.tokenizer, &name, ty, partial)?.pre_tokenizer;
        Ok(())
    })?;
    report.pre_tokenizer = Some(pre);
    Ok(report)
}

/// Writes a GGUF through `write` to a partial file, reloads it with the GGUF loader and runs the
/// probe: the file replaces the output only when it answers like the adapter did; otherwise it is
/// removed and nothing changes.
fn publish_gguf(
    loaded: &Pretrained,
    probe: &Probe,
    options: &MergeOptions,
    what: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<MergeReport> {
    let out = &options.output;
    let partial = out.with_extension("partial.gguf");
    let checked = write(&partial).and_then(|()| {
        // The base's tokenizer folder, if it has one (a GGUF base alone has its tokenizer in
        // the metadata, which the written file keeps).
        let load = LoadOptions {
            tokenizer: loaded
                .dir
                .join("tokenizer.json")
                .exists()
                .then(|| loaded.dir.clone()),
            ..LoadOptions::default()
        };
        let written = load_pretrained_with(
            partial.to_str().unwrap_or_default(),
            load,
            &loaded.model.device,
        )?;
        let after = probe_logits(&written.model, &probe.ids)?;
        let (check, within) = probe.check(&after, options.max_merge_error)?;
        let summary = format!("{what}; {check}");
        refuse_unless_within(&summary, within, options)?;
        Ok(summary)
    });
    let summary = match checked {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
    Ok(MergeReport {
        summary,
        output: out.clone(),
        pre_tokenizer: None,
    })
}

/// [`Error::MergeCheck`] when the probe check failed and `force` is off.
fn refuse_unless_within(summary: &str, within: bool, options: &MergeOptions) -> Result<()> {
    if within || options.force {
        return Ok(());
    }
    Err(Error::MergeCheck {
        report: summary.to_string(),
        limit: options.max_merge_error,
    })
}

/// Logits of the probe text. ids -> [1, n, vocab]
fn probe_logits(model: &CausalLm, ids: &[u32]) -> Result<Tensor> {
    let probe = Tensor::new(ids, &model.device)?.unsqueeze(0)?;
    model.forward(&probe)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64)
}

/// Logits of the probe with the adapter, and what the adapter changes in the base's.
struct Probe {
    ids: Vec<u32>,
    adapted: Tensor,
    /// Largest change the adapter makes to the base's logits (the largest logit when there is
    /// no adapter: a plain conversion).
    effect: f64,
    /// Whether there is no adapter (a plain conversion).
    conversion: bool,
}

impl Probe {
    /// Runs the probe text through `model` with and without its adapters.
    fn new(model: &mut CausalLm, ids: Vec<u32>) -> Result<Self> {
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

    /// Compares the merged model's logits with the adapter's: a report, and whether the
    /// difference stays within `limit` of the adapter's effect (always, when it is at float noise).
    fn check(&self, merged: &Tensor, limit: f64) -> Result<(String, bool)> {
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
