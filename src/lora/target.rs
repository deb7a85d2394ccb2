//! Which modules get adapters: PEFT's `target_modules` matching, `rank_pattern`/`alpha_pattern`
//! lookups, and injection of fresh LoRA layers into a model.

use super::config::{LoraConfig, TargetModules};
use super::layer::{lora_scale, LoraLayer};
use crate::model::CausalLm;
use crate::{Error, Result};
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

/// Adds freshly initialised LoRA layers (PEFT's init, seeded) to the modules `config` targets.
/// Returns the adapted module names.
pub fn inject(model: &mut CausalLm, config: &LoraConfig, seed: u64) -> Result<Vec<String>> {
    config.validate()?;
    let names: Vec<String> = model.linears().iter().map(|l| l.name.clone()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let chosen: BTreeSet<String> = select(&config.target_modules, &refs)?
        .into_iter()
        .map(String::from)
        .collect();
    let device = model.device.clone();
    for lin in model.linears_mut() {
        if !chosen.contains(&lin.name) {
            continue;
        }
        let (r, scale) = rank_and_scale(config, &lin.name)?;
        let layer = LoraLayer::init(
            &lin.name,
            lin.in_features(),
            lin.out_features(),
            r,
            scale,
            config.lora_dropout,
            seed,
            crate::lora::layer::ADAPTER_DTYPE,
            &device,
        )?;
        lin.lora = Some(layer);
    }
    Ok(chosen.into_iter().collect())
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
