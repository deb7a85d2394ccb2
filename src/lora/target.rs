//! Which modules get adapters: PEFT's `target_modules` matching narrowed by `layers_to_transform`
//! and `exclude_modules`, `rank_pattern`/`alpha_pattern` lookups, and injection of fresh LoRA
//! layers into a model.

use super::config::{LayerIndices, LoraConfig, TargetModules};
use super::init::{gaussian, init_loftq, init_moving_base, LoraInit};
use super::layer::{lora_scale, LoraLayer};
use crate::model::CausalLm;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use regex::Regex;
use std::collections::BTreeSet;

/// The last component of a module path (`q_proj` for `model.layers.0.self_attn.q_proj`).
pub fn short_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

fn full_match(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| Error::Config(format!("target_modules regex `{pattern}`: {e}")))
}

/// The modules of `names` that `targets` selects, as PEFT selects them (a list matches a module
/// whose name equals an entry or ends with `.entry`; a string is a full-match regex; `all-linear`
/// is every linear but the LM head). A list entry matching no module is an error that lists the
/// model's linear modules.
pub fn select<'a>(targets: &TargetModules, names: &[&'a str]) -> Result<Vec<&'a str>> {
    match targets {
        TargetModules::Pattern(p) if p == "all-linear" => Ok(names.to_vec()),
        TargetModules::Pattern(p) => {
            let re = full_match(p)?;
            let hits: Vec<&str> = names.iter().copied().filter(|n| re.is_match(n)).collect();
            if hits.is_empty() {
                return Err(unknown_target(p, names));
            }
            Ok(hits)
        }
        TargetModules::List(keys) => {
            for key in keys {
                if !names.iter().any(|n| suffix_match(n, key)) {
                    return Err(unknown_target(key, names));
                }
            }
            Ok(names
                .iter()
                .copied()
                .filter(|n| keys.iter().any(|k| suffix_match(n, k)))
                .collect())
        }
    }
}

fn suffix_match(name: &str, key: &str) -> bool {
    name == key || name.ends_with(&format!(".{key}"))
}

fn unknown_target(key: &str, names: &[&str]) -> Error {
    let kinds: BTreeSet<&str> = names.iter().map(|n| short_name(n)).collect();
    Error::Config(format!(
        "target module `{key}` matches no linear layer of this model; its linear modules are: {} (or use all-linear)",
        kinds.into_iter().collect::<Vec<_>>().join(", ")
    ))
}

/// The modules of `names` that get adapters under `config`, as PEFT's
/// `check_target_module_exists` decides: `target_modules` ([`select`]), then only those in
/// `layers_to_transform` (the layer index found by `layers_pattern`), less `exclude_modules`.
/// An index naming no layer, an exclusion naming no module, or a selection left empty is an
/// error that says what the model has.
pub fn targeted<'a>(config: &LoraConfig, names: &[&'a str]) -> Result<Vec<&'a str>> {
    config.validate()?;
    let mut chosen = select(&config.target_modules, names)?;
    if let Some(layers) = config
        .layers_to_transform
        .as_ref()
        .filter(|l| l.is_active())
    {
        let patterns: Vec<&str> = config
            .layers_pattern
            .as_ref()
            .map(|p| p.items())
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        let index_of = layer_index_finder(&patterns)?;
        let present: BTreeSet<usize> = chosen.iter().filter_map(|n| index_of(n)).collect();
        let wanted = match layers {
            LayerIndices::One(i) => vec![*i],
            LayerIndices::Many(v) => v.clone(),
        };
        if let Some(missing) = wanted.iter().find(|i| !present.contains(i)) {
            return Err(Error::Config(format!(
                "layers_to_transform {missing}: none of the target modules is in a layer with that index{}; the model's layers are {}",
                if patterns.is_empty() { String::new() } else { format!(" (layers_pattern {})", patterns.join(", ")) },
                describe_layers(&present)
            )));
        }
        chosen.retain(|n| index_of(n).is_some_and(|i| layers.contains(i)));
    }
    if let Some(exclude) = &config.exclude_modules {
        let excluded = |n: &str| match exclude {
            TargetModules::List(keys) => keys.iter().any(|k| suffix_match(n, k)),
            TargetModules::Pattern(p) => full_match(p).is_ok_and(|re| re.is_match(n)),
        };
        match exclude {
            TargetModules::Pattern(p) => {
                full_match(p)?;
            }
            TargetModules::List(keys) => {
                // The LM head and the embedding are never adapted: excluding them is harmless.
                let unknown = keys.iter().find(|k| {
                    !["lm_head", "embed_tokens"].contains(&short_name(k))
                        && !names.iter().any(|n| suffix_match(n, k))
                });
                if let Some(key) = unknown {
                    let kinds: BTreeSet<&str> = names.iter().map(|n| short_name(n)).collect();
                    return Err(Error::Config(format!(
                        "exclude module `{key}` matches no linear layer of this model; its linear modules are: {}",
                        kinds.into_iter().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
        let before = chosen.len();
        chosen.retain(|n| !excluded(n));
        if before > 0 && chosen.is_empty() {
            return Err(Error::Config(
                "every target module is excluded by exclude_modules: nothing would train; check target_modules and exclude_modules".into(),
            ));
        }
    }
    Ok(chosen)
}

/// A module path's layer index as PEFT finds it: the number after the first `<name>.` of
/// `patterns` (`layers` in `model.layers.3.mlp.up_proj`), or with no pattern after the first
/// `<segment>.` that follows another segment.
fn layer_index_finder(patterns: &[&str]) -> Result<impl Fn(&str) -> Option<usize>> {
    let regexes = if patterns.is_empty() {
        vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("a valid regex")]
    } else {
        patterns
            .iter()
            .map(|p| {
                Regex::new(&format!(r"^(?:.*?\.)?{p}\.(\d+)\."))
                    .map_err(|e| Error::Config(format!("layers_pattern `{p}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?
    };
    Ok(move |name: &str| {
        regexes
            .iter()
            .find_map(|re| re.captures(name))
            .and_then(|c| c[1].parse().ok())
    })
}

/// `0–11` for a contiguous set of layer indices, else the list.
fn describe_layers(present: &BTreeSet<usize>) -> String {
    match (present.first(), present.last()) {
        (Some(a), Some(b)) if b - a + 1 == present.len() => format!("{a}–{b}"),
        (Some(_), Some(_)) => present
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        _ => "none (no module path has a layer index)".into(),
    }
}

/// PEFT's pattern lookup for `rank_pattern`/`alpha_pattern`: the first key `k` for which
/// `(.*\.)?k$` matches the module name.
pub fn pattern_value<T: Copy>(
    patterns: &std::collections::BTreeMap<String, T>,
    module: &str,
) -> Result<Option<T>> {
    for (k, v) in patterns {
        if Regex::new(&format!("^(?:.*\\.)?(?:{k})$"))
            .map_err(|e| Error::Config(format!("pattern `{k}`: {e}")))?
            .is_match(module)
        {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// Rank and scale of the adapter on `module`.
pub fn rank_and_scale(config: &LoraConfig, module: &str) -> Result<(usize, f64)> {
    let r = pattern_value(&config.rank_pattern, module)?.unwrap_or(config.r);
    let alpha = pattern_value(&config.alpha_pattern, module)?.unwrap_or(config.lora_alpha);
    Ok((r, lora_scale(alpha, r, config.use_rslora)))
}

/// The full-precision weight of a linear module by name (`model.layers.0.self_attn.q_proj`), read
/// from the base's checkpoint: what LoftQ starts from when the model holds the quantized form.
pub type Originals<'a> = &'a dyn Fn(&str) -> Result<Tensor>;

/// Adds freshly initialised LoRA layers (PEFT's init, seeded) to the modules `config` targets.
/// Returns the adapted module names. LoftQ needs the full-precision weights: [`inject_with`].
pub fn inject(model: &mut CausalLm, config: &LoraConfig, seed: u64) -> Result<Vec<String>> {
    inject_with(model, config, seed, None)
}

/// [`inject`], with the base's full-precision weights for an initialisation that starts from them
/// while the model holds them quantized (LoftQ).
pub fn inject_with(
    model: &mut CausalLm,
    config: &LoraConfig,
    seed: u64,
    originals: Option<Originals>,
) -> Result<Vec<String>> {
    config.validate()?;
    // PEFT's all-linear on a mixture of experts (transformers 5): q/k/v/o of every layer, and
    // the router and the experts through target_parameters.
    let moe_all_linear = model.config.is_moe()
        && config.target_modules == TargetModules::Pattern("all-linear".into());
    let names: Vec<String> = model.linears().iter().map(|l| l.name.clone()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let chosen: BTreeSet<String> = match moe_all_linear {
        true => refs
            .iter()
            .filter(|n| ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&short_name(n)))
            .map(|n| n.to_string())
            .collect(),
        false => targeted(config, &refs)?
            .into_iter()
            .map(String::from)
            .collect(),
    };
    let device = model.device.clone();
    let init = LoraInit::from_config(&config.init_lora_weights)?;
    let loftq = if init == LoraInit::Loftq {
        let Some(originals) = originals else {
            return Err(Error::Config(
                "init_lora_weights loftq starts from the base's full-precision weights while the model holds them quantized: pass the checkpoint's weights (lora::target::inject_with)".into(),
            ));
        };
        Some((originals, config.loftq_config()?))
    } else {
        None
    };
    for lin in model.linears_mut() {
        if !chosen.contains(&lin.name) {
            continue;
        }
        let (r, scale) = rank_and_scale(config, &lin.name)?;
        let side = lin.in_features().min(lin.out_features());
        if r > side {
            return Err(Error::Config(format!(
                "lora r {r} is larger than {} ({} × {}): a rank above the smaller side adds parameters but no capacity; use --lora-r {side} or less (or rank_pattern for this module)",
                lin.name,
                lin.out_features(),
                lin.in_features()
            )));
        }
        let layer = match init {
            LoraInit::Default => LoraLayer::init(
                &lin.name,
                lin.in_features(),
                lin.out_features(),
                r,
                scale,
                config.lora_dropout,
                seed,
                crate::lora::layer::ADAPTER_DTYPE,
                &device,
            )?,
            LoraInit::Gaussian => {
                let a = gaussian(&lin.name, r, lin.in_features(), seed, &device)?;
                let b = Tensor::zeros((lin.out_features(), r), DType::F32, &device)?;
                LoraLayer::from_tensors(&a, &b, scale, config.lora_dropout)?
            }
            LoraInit::Loftq => {
                let (originals, bits_iters) = loftq.as_ref().expect("set for LoftQ above");
                let original = originals(&lin.name)?;
                init_loftq(
                    &mut lin.weight,
                    &lin.name,
                    &original,
                    *bits_iters,
                    (r, scale, config.lora_dropout),
                    &device,
                )?
            }
            moving => init_moving_base(
                &mut lin.weight,
                &lin.name,
                moving,
                (r, scale, config.lora_dropout),
                seed,
            )?,
        };
        let layer = match lin.weight.frozen() {
            Some(w) if config.use_dora => layer.with_initial_magnitude(&w)?,
            _ => layer,
        };
        lin.lora = Some(layer);
    }
    if moe_all_linear {
        inject_experts(model, config, seed)?;
    }
    Ok(chosen.into_iter().collect())
}

/// PEFT's LoRA pairs on every mixture of experts of `model` (its `all-linear` there): the router
/// at rank r, the experts' gate-up weights at 2r with alpha 2·alpha (PEFT's own rank and alpha
/// patterns), their down weights at r; A Kaiming-uniform over the stacked rows, B zero.
fn inject_experts(model: &mut CausalLm, config: &LoraConfig, seed: u64) -> Result<()> {
    if config.lora_dropout > 0.0 {
        return Err(Error::Config(format!(
            "lora_dropout {}: PEFT's all-linear on a mixture of experts adapts its stacked expert weights, where it cannot apply dropout (and refuses it); use --lora-dropout 0, or adapt the attention alone with --lora-target-modules q_proj,k_proj,v_proj,o_proj",
            config.lora_dropout
        )));
    }
    match LoraInit::from_config(&config.init_lora_weights)? {
        LoraInit::Default => {}
        other => {
            return Err(Error::Config(format!(
                "init_lora_weights {other:?} on a mixture of experts' stacked weights is not supported (the default initialisation is)"
            )))
        }
    }
    if config.use_dora {
        return Err(Error::Config(
            "DoRA on a mixture of experts' stacked weights: PEFT does not support it either; adapt the attention alone with --lora-target-modules q_proj,k_proj,v_proj,o_proj".into(),
        ));
    }
    let (hidden, device) = (model.config.hidden_size, model.device.clone());
    let (r, alpha) = (config.r, config.lora_alpha);
    for moe in model.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        let experts = moe.experts.len();
        let inter = moe.experts[0][0].out_features();
        let pair = |module: &str, n: usize, inp: usize, out: usize, rank: usize, alpha: f64| {
            let scale = lora_scale(alpha, rank, config.use_rslora);
            let layer = LoraLayer::init(
                module,
                inp,
                out,
                rank * n,
                scale,
                0.0,
                seed,
                crate::lora::layer::ADAPTER_DTYPE,
                &device,
            )?;
            Ok::<_, crate::Error>(crate::model::layers::ExpertLora {
                a: layer.a,
                b: layer.b,
                rank,
                scale,
            })
        };
        let p = moe.peft_path.clone();
        moe.lora = crate::model::layers::MoeLora {
            router: Some(pair(&format!("{p}.gate"), 1, hidden, experts, r, alpha)?),
            gate_up: Some(pair(
                &format!("{p}.experts.base_layer"),
                experts,
                hidden,
                2 * inter,
                2 * r,
                2.0 * alpha,
            )?),
            down: Some(pair(
                &format!("{p}.experts"),
                experts,
                inter,
                hidden,
                r,
                alpha,
            )?),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &[
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ];

    #[test]
    fn list_matches_suffixes() {
        let t = TargetModules::List(vec!["q_proj".into()]);
        assert_eq!(select(&t, NAMES).unwrap(), vec![NAMES[0], NAMES[3]]);
    }

    #[test]
    fn regex_is_a_full_match() {
        let t = TargetModules::Pattern(r".*\.1\..*q_proj".into());
        assert_eq!(select(&t, NAMES).unwrap(), vec![NAMES[3]]);
        let t = TargetModules::Pattern("q_proj".into());
        assert!(
            select(&t, NAMES).is_err(),
            "a bare name is not a full match of a path"
        );
    }

    #[test]
    fn unknown_module_lists_the_linear_names() {
        let t = TargetModules::List(vec!["qkv".into()]);
        let msg = select(&t, NAMES).unwrap_err().to_string();
        assert!(
            msg.contains("`qkv`") && msg.contains("down_proj, q_proj, v_proj"),
            "{msg}"
        );
    }

    #[test]
    fn layers_to_transform_and_exclude_modules_narrow_the_targets() {
        let c = |json: serde_json::Value| -> LoraConfig { serde_json::from_value(json).unwrap() };
        let picked = |json| targeted(&c(json), NAMES).map_err(|e| e.to_string());
        assert_eq!(
            picked(serde_json::json!({"target_modules": ["q_proj"], "layers_to_transform": [1]})),
            Ok(vec![NAMES[3]])
        );
        assert_eq!(
            picked(
                serde_json::json!({"target_modules": "all-linear", "layers_to_transform": 0,
                "layers_pattern": "layers"})
            ),
            Ok(NAMES[..3].to_vec())
        );
        assert_eq!(
            picked(serde_json::json!({"exclude_modules": ["v_proj", "lm_head"]})),
            Ok(vec![NAMES[0], NAMES[2], NAMES[3]])
        );
        assert_eq!(
            picked(serde_json::json!({"exclude_modules": ".*\\.0\\..*"})),
            Ok(vec![NAMES[3]])
        );
        // What PEFT refuses, and what would silently adapt nothing or something else.
        for (json, says) in [
            (
                serde_json::json!({"target_modules": ["q_proj"], "layers_to_transform": [2]}),
                "layers_to_transform 2: none of the target modules is in a layer with that index; the model's layers are 0–1",
            ),
            (
                serde_json::json!({"target_modules": ".*q_proj", "layers_to_transform": [0]}),
                "cannot be used when target_modules is a regex",
            ),
            (
                serde_json::json!({"layers_pattern": "layers"}),
                "layers_pattern is set but layers_to_transform is not",
            ),
            (
                serde_json::json!({"target_modules": ["q_proj"], "layers_to_transform": [0],
                    "layers_pattern": "blocks"}),
                "(layers_pattern blocks); the model's layers are none",
            ),
            (
                serde_json::json!({"exclude_modules": ["qkv"]}),
                "exclude module `qkv` matches no linear layer",
            ),
            (
                serde_json::json!({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}),
                "every target module is excluded",
            ),
            (
                serde_json::json!({"target_parameters": ["feed_forward.experts.w13"]}),
                "target_parameters `feed_forward.experts.w13`: peft-sft adapts",
            ),
        ] {
            let err = picked(json.clone()).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn rank_pattern_overrides_by_suffix() {
        let mut c = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            ..Default::default()
        };
        c.rank_pattern.insert("v_proj".into(), 4);
        assert_eq!(rank_and_scale(&c, NAMES[1]).unwrap(), (4, 4.0));
        assert_eq!(rank_and_scale(&c, NAMES[0]).unwrap(), (8, 2.0));
    }
}
