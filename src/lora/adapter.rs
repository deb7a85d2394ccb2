//! PEFT's adapter files: `adapter_model.safetensors` (keys like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, A `[r, in]`, B `[out, r]`;
//! DoRA's magnitude `...q_proj.lora_magnitude_vector`, `[out]`) and `adapter_config.json`.

use super::config::{LoraConfig, TargetModules, TokenIndices};
use super::init::relative_to_original;
use super::layer::LoraLayer;
use super::target::{rank_and_scale, short_name};
use crate::io::{read_safetensors, write_safetensors};
use crate::model::tokens::{rows_name, short_module, SavedModules, HEAD_MODULE};
use crate::model::CausalLm;
use crate::ops::lora::MAGNITUDE;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The adapter weights' file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix for a causal LM's module paths.
const PREFIX: &str = "base_model.model.";

/// PEFT's key for one half of a module's adapter (`lora_A` or `lora_B`).
pub fn peft_key(module: &str, half: &str) -> String {
    format!("{PREFIX}{module}.{half}.weight")
}

/// PEFT's saved key of a module's DoRA magnitude (no `.weight`, unlike A and B).
pub fn magnitude_key(module: &str) -> String {
    format!("{PREFIX}{module}.{MAGNITUDE}")
}

/// The adapter tensors of `model` under PEFT's key names, including trainable vocabulary rows
/// (`...embed_tokens.token_adapter.trainable_tokens_delta`).
pub fn adapter_tensors(model: &CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for lin in model.linears() {
        if let Some(l) = &lin.lora {
            // PiSSA/OLoRA: relative to the original base (`lora::init`).
            let (a, b) = relative_to_original(l)?;
            out.push((peft_key(&lin.name, "lora_A"), a));
            out.push((peft_key(&lin.name, "lora_B"), b));
            if let Some(dora) = &l.dora {
                out.push((magnitude_key(&lin.name), dora.magnitude.as_tensor().clone()));
            }
        }
    }
    for (name, var) in model
        .layers
        .iter()
        .flat_map(|l| l.moe.iter().flat_map(|m| m.lora_vars()))
        .chain(model.trainable_token_tensors())
        .chain(model.saved_module_tensors())
    {
        out.push((format!("{PREFIX}{name}"), var.as_tensor().clone()));
    }
    Ok(out)
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` as PEFT does: an
/// `all-linear` target is saved as the list of module names it selected (for a multimodal
/// wrapper's text model, a pattern over the text model's modules).
pub fn save_adapter(model: &CausalLm, config: &LoraConfig, dir: &Path) -> Result<()> {
    let mut config = config.clone();
    if config.target_modules == TargetModules::Pattern("all-linear".into()) {
        let names: BTreeSet<String> = model
            .linears()
            .iter()
            .filter(|l| l.lora.is_some())
            .map(|l| short_name(&l.name).to_string())
            .collect();
        config.target_modules = TargetModules::List(names.into_iter().collect());
    }
    // A mixture of experts' pairs: PEFT's target_parameters, gate_up at twice the rank and alpha
    // (what PEFT's all-linear writes for them).
    let moe = model.layers.iter().find_map(|l| l.moe.as_ref());
    if let Some(moe) = moe {
        let mut params = Vec::new();
        if moe.lora.down.is_some() {
            params.push("down_proj".to_string());
        }
        if let Some(gate_up) = &moe.lora.gate_up {
            params.push("gate_up_proj".to_string());
            if gate_up.rank != config.r {
                let key = r".*\.gate_up_proj".to_string();
                let factor = gate_up.rank as f64 / config.r as f64;
                config.rank_pattern.insert(key.clone(), gate_up.rank);
                config.alpha_pattern.insert(key, config.lora_alpha * factor);
            }
        }
        if moe.lora.router.is_some() {
            params.push("gate.weight".to_string());
        }
        if !params.is_empty() {
            config.target_parameters = Some(params);
        }
    }
    if let (Some(_), TargetModules::List(names)) = (&model.config.wrapper, &config.target_modules) {
        // A multimodal wrapper: the names alone would also select its vision tower's modules
        // (PEFT matches them as suffixes); the adapter covers the text model only.
        let prefix = regex::escape(model.config.module_prefix());
        let names: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
        config.target_modules =
            TargetModules::Pattern(format!(r"{prefix}\..*\.({})", names.join("|")));
    }
    if let Some(tt) = &model.trainable_tokens {
        // PEFT keys the rows by the modules' short names; a tied head follows the embedding.
        let mut map = BTreeMap::from([("embed_tokens".to_string(), tt.indices.clone())]);
        if tt.head.is_some() {
            map.insert("lm_head".to_string(), tt.indices.clone());
        }
        config.trainable_token_indices = Some(TokenIndices::PerModule(map));
    }
    if model
        .linears()
        .iter()
        .any(|l| l.lora.as_ref().is_some_and(|l| l.initial.is_some()))
    {
        // PEFT's conversion of a PiSSA/OLoRA adapter: twice the rank, the same scale, a plain
        // LoRA adapter of the original base.
        let alpha_factor = if config.use_rslora { 2f64.sqrt() } else { 2.0 };
        config.r *= 2;
        config.lora_alpha *= alpha_factor;
        config.rank_pattern.values_mut().for_each(|r| *r *= 2);
        config
            .alpha_pattern
            .values_mut()
            .for_each(|a| *a *= alpha_factor);
        config.init_lora_weights = serde_json::Value::Bool(true);
    }
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &adapter_tensors(model)?)?;
    config.save(dir)
}

/// Splits a PEFT key into (module, part): `lora_A`, `lora_B` or DoRA's `lora_magnitude_vector`,
/// accepting PEFT's in-memory form with an adapter name (`lora_A.default.weight`) as well as the
/// saved form (`lora_A.weight`, `lora_magnitude_vector`).
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module, part) = rest.rsplit_once('.')?;
    let saved_form = match part {
        "lora_A" | "lora_B" => key.ends_with(".weight"),
        _ => part == MAGNITUDE,
    };
    saved_form.then_some((module, part))
}

/// A PEFT adapter read from disk and checked against a base model: its config, one LoRA layer
/// per adapted module (by module path) and any trained vocabulary rows.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The adapter's `adapter_config.json`.
    pub config: LoraConfig,
    /// The LoRA layer of each adapted module.
    pub layers: BTreeMap<String, LoraLayer>,
    /// Trained vocabulary rows (PEFT's `trainable_token_indices`).
    pub token_rows: Option<TokenRows>,
    /// Trained copies of the embedding and LM head (PEFT's `modules_to_save`).
    pub saved_modules: SavedModules,
    /// LoRA pairs of each mixture of experts, by its PEFT path (`model.layers.0.mlp`).
    pub experts: BTreeMap<String, crate::model::layers::MoeLora>,
}

/// Vocabulary rows an adapter replaces: ids and their embedding (and untied LM-head) rows.
#[derive(Debug, Clone)]
pub struct TokenRows {
    /// Vocabulary ids, ascending.
    pub indices: Vec<u32>,
    /// Embedding rows `[n, hidden]`.
    pub embed: Tensor,
    /// LM-head rows `[n, hidden]` (absent for tied models, or when PEFT saved only the embedding).
    pub head: Option<Tensor>,
}

impl Adapter {
    /// Reads a PEFT LoRA adapter folder and checks every tensor against `model`: a key naming no
    /// linear module, a missing half or a shape that does not fit is an error naming the tensor.
    /// `model` is not changed.
    pub fn read(dir: &Path, model: &CausalLm) -> Result<Self> {
        let config = LoraConfig::from_dir(dir)?;
        if let serde_json::Value::String(init) = &config.init_lora_weights {
            if init.starts_with("pissa") || init == "olora" || init.starts_with("corda") {
                return Err(Error::Config(format!(
                    "{}: init_lora_weights `{init}`: this adapter applies to the residual base its initialisation left (W minus its starting components), not to the original model; save it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) to get an adapter of the original base (peft-sft saves its PiSSA/OLoRA adapters that way)",
                    dir.display()
                )));
            }
        }
        if config.init_lora_weights == serde_json::json!("loftq") {
            return Err(Error::Config(format!(
                "{}: init_lora_weights `loftq`: this adapter applies to the quantized base LoftQ left, and PEFT would run LoftQ on the base again to load it; load it over that base (peft-sft saves it as loftq_base/ in the run's output folder; PEFT's LoftQ example saves it with the adapter) with init_lora_weights set to true, as PEFT's example saves the adapter",
                dir.display()
            )));
        }
        let path = dir.join(ADAPTER_WEIGHTS);
        let tensors = read_safetensors(&path, &model.device)?;
        let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        let mut rows: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut saved_modules = SavedModules::default();
        let to_save = config.modules_to_save.clone().unwrap_or_default();
        for (key, t) in tensors {
            if !all_finite(&t)? {
                return Err(Error::Tensor {
                    name: key,
                    message: format!(
                        "in {}: holds NaN or infinite values (saved from a run that diverged); retrain, e.g. with a lower --learning-rate",
                        path.display()
                    ),
                });
            }
            if let Some(module) = key
                .strip_prefix(PREFIX)
                .and_then(|k| k.strip_suffix(".token_adapter.trainable_tokens_delta"))
            {
                rows.insert(module.to_string(), t.to_dtype(model.dtype)?);
                continue;
            }
            if let Some(module) = saved_module(&key, &to_save, &model.config.embed_module()) {
                let hidden = model.config.hidden_size;
                if t.rank() != 2 || t.dim(1)? != hidden || t.dim(0)? < model.config.vocab_size {
                    return Err(Error::Tensor {
                        name: key,
                        message: format!(
                            "in {}: shape {:?} does not fit the base model (expected [{}, {hidden}] or more rows); the adapter was trained on a different base",
                            path.display(),
                            t.dims(),
                            model.config.vocab_size
                        ),
                    });
                }
                let copy = Some(candle_core::Var::from_tensor(&t.to_dtype(model.dtype)?)?);
                match module {
                    "embed_tokens" => saved_modules.embed = copy,
                    _ => saved_modules.head = copy,
                }
                continue;
            }
            let (module, half) = parse_key(&key).ok_or_else(|| Error::Tensor {
                name: key.clone(),
                message: format!(
                    "in {}: not a LoRA weight of a causal LM (expected base_model.model.<module>.lora_A/lora_B.weight or .lora_magnitude_vector); modules_to_save and other PEFT methods are not supported",
                    path.display()
                ),
            })?;
            let slot = parts.entry(module.to_string()).or_default();
            let at = match half {
                "lora_A" => 0,
                "lora_B" => 1,
                _ => 2,
            };
            slot[at] = Some(t.to_dtype(crate::lora::layer::ADAPTER_DTYPE)?);
        }
        let mut layers = BTreeMap::new();
        for lin in model.linears() {
            let Some([a, b, m]) = parts.remove(&lin.name) else {
                continue;
            };
            let missing = |key: String| Error::Tensor {
                name: key,
                message: format!("missing from {}", path.display()),
            };
            let a = a.ok_or_else(|| missing(peft_key(&lin.name, "lora_A")))?;
            let b = b.ok_or_else(|| missing(peft_key(&lin.name, "lora_B")))?;
            let m = match (m, config.use_dora) {
                (Some(m), true) => Some(m),
                (None, false) => None,
                (None, true) => {
                    return Err(Error::Tensor {
                        name: magnitude_key(&lin.name),
                        message: format!(
                            "missing from {} (adapter_config.json says use_dora: true)",
                            path.display()
                        ),
                    })
                }
                (Some(_), false) => {
                    return Err(Error::Tensor {
                        name: magnitude_key(&lin.name),
                        message: format!(
                            "in {}: a DoRA magnitude, but adapter_config.json says use_dora: false; set it to true if this is a DoRA adapter",
                            path.display()
                        ),
                    })
                }
            };
            let (r, scale) = rank_and_scale(&config, &lin.name)?;
            let expect_a = vec![r, lin.in_features()];
            let expect_b = vec![lin.out_features(), r];
            let mut checks = vec![
                (peft_key(&lin.name, "lora_A"), &a, expect_a),
                (peft_key(&lin.name, "lora_B"), &b, expect_b),
            ];
            if let Some(m) = &m {
                checks.push((magnitude_key(&lin.name), m, vec![lin.out_features()]));
            }
            for (key, t, expect) in checks {
                if t.dims() != expect {
                    return Err(Error::Tensor {
                        name: key,
                        message: format!(
                            "in {}: shape {:?} does not fit the base model (expected {:?} for r={r}); the adapter was trained on a different base",
                            path.display(),
                            t.dims(),
                            expect
                        ),
                    });
                }
            }
            let layer = LoraLayer::from_tensors(&a, &b, scale, config.lora_dropout)?;
            let layer = match &m {
                Some(m) => layer.with_magnitude(m)?,
                None => layer,
            };
            layers.insert(lin.name.clone(), layer);
        }
        let mut experts = BTreeMap::new();
        for moe in model.layers.iter().filter_map(|l| l.moe.as_ref()) {
            let p = &moe.peft_path;
            let (e, hidden) = (moe.experts.len(), model.config.hidden_size);
            let inter = moe.experts[0][0].out_features();
            let mut lora = crate::model::layers::MoeLora::default();
            // (module, parameter, experts, in, out)
            let slots = [
                (format!("{p}.gate"), "gate.weight", 1, hidden, e),
                (
                    format!("{p}.experts.base_layer"),
                    "gate_up_proj",
                    e,
                    hidden,
                    2 * inter,
                ),
                (format!("{p}.experts"), "down_proj", e, inter, hidden),
            ];
            for (k, (module, param, n, inp, out)) in slots.into_iter().enumerate() {
                let Some([a, b, _]) = parts.remove(&module) else {
                    continue;
                };
                let missing = |key: String| Error::Tensor {
                    name: key,
                    message: format!("missing from {}", path.display()),
                };
                let a = a.ok_or_else(|| missing(peft_key(&module, "lora_A")))?;
                let b = b.ok_or_else(|| missing(peft_key(&module, "lora_B")))?;
                let key = format!("{}.{param}", module.trim_end_matches(".base_layer"));
                let key = if param == "gate.weight" {
                    format!("{p}.gate.weight")
                } else {
                    key
                };
                let (r, scale) = rank_and_scale(&config, &key)?;
                for (name, t, expect) in [
                    (peft_key(&module, "lora_A"), &a, vec![r * n, inp]),
                    (peft_key(&module, "lora_B"), &b, vec![out, r * n]),
                ] {
                    if t.dims() != expect {
                        return Err(Error::Tensor {
                            name,
                            message: format!(
                                "in {}: shape {:?} does not fit the base model's mixture of experts (expected {:?} for r={r})",
                                path.display(),
                                t.dims(),
                                expect
                            ),
                        });
                    }
                }
                let pair = crate::model::layers::ExpertLora {
                    a: candle_core::Var::from_tensor(&a)?,
                    b: candle_core::Var::from_tensor(&b)?,
                    rank: r,
                    scale,
                };
                match k {
                    0 => lora.router = Some(pair),
                    1 => lora.gate_up = Some(pair),
                    _ => lora.down = Some(pair),
                }
            }
            experts.insert(p.clone(), lora);
        }
        if let Some(module) = parts.keys().next() {
            return Err(Error::Tensor {
                name: peft_key(module, "lora_A"),
                message: format!(
                    "in {}: the base model has no linear module `{module}`; was this adapter trained on another architecture?",
                    path.display()
                ),
            });
        }
        let token_rows = token_rows(&config, rows, &path, model)?;
        Ok(Adapter {
            config,
            layers,
            token_rows,
            saved_modules,
            experts,
        })
    }

    /// Puts this adapter on `model`, replacing whatever adapter it had; trained vocabulary rows
    /// are written into the (grown if needed) embedding and LM head.
    pub fn apply(&self, model: &mut CausalLm) -> Result<()> {
        if let Some(rows) = &self.token_rows {
            model.set_token_rows(&rows.indices, &rows.embed, rows.head.as_ref())?;
        }
        for lin in model.linears_mut() {
            lin.lora = self.layers.get(&lin.name).cloned();
        }
        for moe in model.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
            moe.lora = self
                .experts
                .get(&moe.peft_path)
                .cloned()
                .unwrap_or_default();
        }
        // A copy trained after new tokens were added has their rows too.
        let rows = [&self.saved_modules.embed, &self.saved_modules.head]
            .into_iter()
            .flatten()
            .map(|v| v.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if let Some(&vocab) = rows.iter().max() {
            if vocab > model.config.vocab_size {
                model.resize_token_embeddings(vocab)?;
            }
        }
        model.saved_modules = self.saved_modules.clone();
        Ok(())
    }
}

/// Removes every adapter from `model` (the base model again).
pub fn remove_adapters(model: &mut CausalLm) {
    for lin in model.linears_mut() {
        lin.lora = None;
    }
    for moe in model.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        moe.lora = Default::default();
    }
    model.saved_modules = SavedModules::default();
}

/// `embed_tokens` or `lm_head` when `key` is PEFT's saved key of a `modules_to_save` copy of one
/// of them (`base_model.model.lm_head.weight`) and `to_save` names it.
fn saved_module(key: &str, to_save: &[String], embed_module: &str) -> Option<&'static str> {
    let module = key.strip_prefix(PREFIX)?.strip_suffix(".weight")?;
    let short = short_module(module)?;
    let full = if short == "lm_head" {
        HEAD_MODULE
    } else {
        embed_module
    };
    (module == full && to_save.iter().any(|m| short_module(m) == Some(short))).then_some(short)
}

/// Whether every value of `t` is finite (a NaN or inf makes the sum of squares non-finite).
fn all_finite(t: &Tensor) -> Result<bool> {
    let sum = t
        .to_dtype(candle_core::DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(sum.is_finite())
}

/// Loads a PEFT LoRA adapter folder into `model`, replacing any adapter it has. Nothing changes
/// when the adapter does not fit (see [`Adapter::read`]).
pub fn load_adapter(model: &mut CausalLm, dir: &Path) -> Result<LoraConfig> {
    let adapter = Adapter::read(dir, model)?;
    adapter.apply(model)?;
    Ok(adapter.config)
}

/// The trained vocabulary rows of an adapter: `trainable_tokens_delta` tensors of the embedding
/// and LM head, with their ids from the config; each must be `[ids, hidden]`.
fn token_rows(
    config: &LoraConfig,
    mut rows: BTreeMap<String, Tensor>,
    path: &Path,
    model: &CausalLm,
) -> Result<Option<TokenRows>> {
    let embed_module = model.config.embed_module();
    let embed = rows.remove(&embed_module);
    let head = rows.remove(HEAD_MODULE);
    if let Some(module) = rows.keys().next() {
        return Err(Error::Tensor {
            name: format!("{PREFIX}{}", rows_name(module)),
            message: format!(
                "in {}: trainable tokens of `{module}` are not supported (only the embedding and the LM head)",
                path.display()
            ),
        });
    }
    let Some(embed) = embed else {
        return match head {
            None => Ok(None),
            Some(_) => Err(Error::Tensor {
                name: format!("{PREFIX}{}", rows_name(HEAD_MODULE)),
                message: format!(
                    "in {}: LM-head rows without embedding rows are not supported",
                    path.display()
                ),
            }),
        };
    };
    let listed = config
        .trainable_token_indices
        .as_ref()
        .and_then(TokenIndices::embedding)
        .ok_or_else(|| Error::Config(format!(
            "{}: the adapter has trainable token rows but adapter_config.json names no trainable_token_indices",
            path.display()
        )))?;
    for (module, t) in [
        (embed_module.as_str(), Some(&embed)),
        (HEAD_MODULE, head.as_ref()),
    ] {
        let Some(t) = t else { continue };
        if t.dims() != [listed.len(), model.config.hidden_size] {
            return Err(Error::Tensor {
                name: format!("{PREFIX}{}", rows_name(module)),
                message: format!(
                    "in {}: shape {:?}, expected [{}, {}] ({} token ids, the base's hidden size)",
                    path.display(),
                    t.dims(),
                    listed.len(),
                    model.config.hidden_size,
                    listed.len()
                ),
            });
        }
    }
    // Rows follow the config's order; keep them ascending by id.
    let mut order: Vec<u32> = (0..listed.len() as u32).collect();
    order.sort_by_key(|&i| listed[i as usize]);
    let order_t = Tensor::new(order.as_slice(), &model.device)?;
    let sort = |t: Tensor| t.index_select(&order_t, 0);
    Ok(Some(TokenRows {
        indices: order.iter().map(|&i| listed[i as usize]).collect(),
        embed: sort(embed)?,
        head: head.map(sort).transpose()?,
    }))
}
