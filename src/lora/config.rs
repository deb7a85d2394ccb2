//! PEFT's `LoraConfig`, read from and written to `adapter_config.json` with PEFT's field names.

use crate::io::{read_json, write_json};
use crate::model::tokens::{short_module, unsavable};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `target_modules`: a list of module-name suffixes, or one regular expression matched against the
/// full module name (`all-linear` selects every linear layer but the LM head, as PEFT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names matched exactly or as a `.`-separated suffix.
    List(Vec<String>),
    /// A regex (full match), or `all-linear`.
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Pattern("all-linear".into())
    }
}

impl TargetModules {
    /// `--lora-target-modules` as given (comma-separated names): one `all-linear` or one regex
    /// (it has `*`, `(`, `|`, `\`, `$` or `^`) is a pattern, anything else a list of names.
    pub fn from_names(names: &[String]) -> Self {
        match names {
            [one] if one == "all-linear" || one.contains(['*', '(', '|', '\\', '$', '^']) => {
                TargetModules::Pattern(one.clone())
            }
            many => TargetModules::List(many.to_vec()),
        }
    }
}

/// PEFT's `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// One layer.
    One(usize),
    /// These layers.
    Many(Vec<usize>),
}

impl LayerIndices {
    /// Whether layer `i` is selected.
    pub fn contains(&self, i: usize) -> bool {
        match self {
            LayerIndices::One(j) => *j == i,
            LayerIndices::Many(v) => v.contains(&i),
        }
    }

    /// Whether it selects layers at all (PEFT ignores an empty list).
    pub fn is_active(&self) -> bool {
        !matches!(self, LayerIndices::Many(v) if v.is_empty())
    }
}

/// A PEFT field that takes one string or a list of them (`layers_pattern`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, in order.
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// PEFT's `trainable_token_indices`: ids for the embedding, or ids per module name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIndices {
    /// Rows of the input embedding.
    List(Vec<u32>),
    /// Rows per module (`embed_tokens`, `lm_head`).
    PerModule(BTreeMap<String, Vec<u32>>),
}

impl TokenIndices {
    /// The embedding's ids (`embed_tokens`, or the plain list), in the order of the saved rows.
    pub fn embedding(&self) -> Option<Vec<u32>> {
        let ids = match self {
            TokenIndices::List(ids) => ids.clone(),
            TokenIndices::PerModule(map) => map
                .iter()
                .find(|(k, _)| k.ends_with("embed_tokens"))
                .map(|(_, v)| v.clone())?,
        };
        Some(ids)
    }
}

/// The LoRA hyper-parameters, as PEFT's `LoraConfig` names them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// `CAUSAL_LM`.
    pub task_type: Option<String>,
    /// The base model's path or Hub id.
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch input.
    pub lora_dropout: f64,
    /// Which modules get adapters.
    pub target_modules: TargetModules,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude per output row scales the adapted weight's normalised rows.
    pub use_dora: bool,
    /// Which biases train: only `none` is supported.
    pub bias: String,
    /// Per-module rank overrides (pattern -> r).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (pattern -> alpha).
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Weights stored transposed (Conv1D models); must be false here.
    pub fan_in_fan_out: bool,
    /// Whether the adapter was saved for inference.
    pub inference_mode: bool,
    /// PEFT's init flag, kept as written.
    pub init_lora_weights: serde_json::Value,
    /// Modules trained in full and saved beside the adapter: `embed_tokens`, `lm_head`.
    pub modules_to_save: Option<Vec<String>>,
    /// Vocabulary rows trained on their own (PEFT's `trainable_token_indices`): a list of ids
    /// for the embedding, or ids per module (`embed_tokens`, `lm_head`).
    pub trainable_token_indices: Option<TokenIndices>,
    /// Only the target modules of these decoder layers get adapters (with a list of
    /// `target_modules`, as PEFT).
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the module list that holds the layers (`layers` in `model.layers.3.mlp`),
    /// which finds a module's layer index; by default the first `<name>.<number>.` in its path.
    pub layers_pattern: Option<OneOrMany>,
    /// Modules never adapted: names matched exactly or as a `.`-separated suffix, or one
    /// full-match regex.
    pub exclude_modules: Option<TargetModules>,
    /// PEFT's adapters on parameters (MoE experts stored as one 3-D tensor); refused.
    pub target_parameters: Option<Vec<String>>,
    /// PEFT version that wrote the file, or ours.
    pub revision: Option<String>,
    /// Every other key of the file, kept as written (and written back); one that changes what
    /// the adapter computes is refused by [`LoraConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// PEFT 0.21's LoRA keys that do not change what a trained adapter computes (bookkeeping, or
/// initialisation options spent when the adapter was made).
const BENIGN_KEYS: [&str; 10] = [
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_config",
    "kasa_config",
];

/// Whether a value leaves a feature off (null, false, an empty string, list or object).
fn inactive(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            use_dora: false,
            bias: "none".into(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: serde_json::Value::Bool(true),
            modules_to_save: None,
            trainable_token_indices: None,
            layers_to_transform: None,
            layers_pattern: None,
            exclude_modules: None,
            target_parameters: None,
            other: BTreeMap::new(),
            revision: None,
        }
    }
}

/// The file PEFT reads an adapter's config from.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

impl LoraConfig {
    /// Rejects settings peft-sft does not implement, naming the field.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |what: &str| Err(Error::Config(format!("{what} is not supported yet")));
        if self.peft_type != "LORA" {
            return Err(Error::Config(format!(
                "peft_type `{}`: only LORA adapters are supported",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(Error::Config("lora r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::Config(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            )));
        }
        if self.bias != "none" {
            return unsupported(&format!("bias = \"{}\" (only \"none\")", self.bias));
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out");
        }
        for name in self.modules_to_save.iter().flatten() {
            match short_module(name) {
                None => return Err(unsavable(name)),
                Some("embed_tokens") if self.trainable_token_indices.is_some() => {
                    return Err(Error::Config(
                        "modules_to_save embed_tokens trains every row of the embedding, and trainable_token_indices some of them: use one of the two".into(),
                    ))
                }
                Some(_) => {}
            }
        }
        let regex_target =
            matches!(&self.target_modules, TargetModules::Pattern(p) if p != "all-linear");
        if regex_target && (self.layers_to_transform.is_some() || self.layers_pattern.is_some()) {
            return Err(Error::Config(
                "layers_to_transform / layers_pattern cannot be used when target_modules is a regex (as PEFT); list the module names (e.g. q_proj,v_proj) or use all-linear".into(),
            ));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(Error::Config(
                "layers_pattern is set but layers_to_transform is not: the pattern only says where the layer indices are; name the layers with layers_to_transform".into(),
            ));
        }
        // PEFT options peft-sft does not implement (lora_bias, use_qalora, layer_replication,
        // alora_invocation_tokens, arrow_config, use_bdlora, ...) and keys of a newer PEFT: on,
        // they change what the adapter computes.
        if let Some((key, value)) = self
            .other
            .iter()
            .find(|(k, v)| !BENIGN_KEYS.contains(&k.as_str()) && !inactive(v))
        {
            return Err(Error::Config(format!(
                "adapter_config.json: `{key}` = {value} is not supported: peft-sft implements PEFT 0.21's LoRA (with DoRA, rsLoRA, PiSSA/OLoRA, modules_to_save, layer selection); with this option on, the adapter computes something else"
            )));
        }
        let params = self.target_parameters.as_deref().unwrap_or_default();
        // PEFT matches them as suffixes of the parameter paths (`mlp.experts.gate_up_proj`).
        let known = |p: &str| {
            ["gate_up_proj", "down_proj", "gate.weight"]
                .iter()
                .any(|k| p == *k || p.ends_with(&format!(".{k}")))
        };
        if let Some(other) = params.iter().find(|p| !known(p)) {
            return Err(Error::Config(format!(
                "target_parameters `{other}`: peft-sft adapts a mixture of experts' gate_up_proj, down_proj and gate.weight (Mixtral, Qwen3-MoE), as PEFT's all-linear selects them"
            )));
        }
        if !params.is_empty() && self.lora_dropout > 0.0 {
            return Err(Error::Config(format!(
                "lora_dropout {} with target_parameters: PEFT cannot apply dropout to a mixture of experts' stacked weights and refuses it; use lora_dropout 0",
                self.lora_dropout
            )));
        }
        Ok(())
    }

    /// PEFT's `loftq_config` as `(loftq_bits, loftq_iter)`: PEFT's LoftQConfig defaults (4, 1)
    /// for a key left out; bits other than 4 and 8, or no iteration, are refused.
    pub fn loftq_config(&self) -> Result<(usize, usize)> {
        let config = self.other.get("loftq_config");
        let field = |key: &str, default: usize| -> Result<usize> {
            match config.and_then(|c| c.get(key)) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    Error::Config(format!("loftq_config.{key} = {v}: expected a whole number"))
                }),
            }
        };
        let (bits, iters) = (field("loftq_bits", 4)?, field("loftq_iter", 1)?);
        if bits != 4 && bits != 8 {
            return Err(Error::Config(format!(
                "loftq_config.loftq_bits = {bits}: LoftQ quantizes to 4 (NF4) or 8 (int8) bits, as PEFT"
            )));
        }
        if iters == 0 {
            return Err(Error::Config(
                "loftq_config.loftq_iter = 0: LoftQ needs at least one iteration".into(),
            ));
        }
        Ok((bits, iters))
    }

    /// Reads `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config: LoraConfig = read_json(&dir.join(ADAPTER_CONFIG))?;
        config.validate()?;
        Ok(config)
    }

    /// Writes `dir/adapter_config.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(ADAPTER_CONFIG), self)
    }
}
