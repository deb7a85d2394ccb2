//! Resolving a model or adapter given as a local folder or a Hugging Face Hub id, through hf-hub
//! (which honours `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` and `HF_ENDPOINT`); `HF_HUB_OFFLINE=1`
//! resolves from the local cache only.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Files of a model repo peft-sft needs (weights, configs, tokenizer, template).
const MODEL_FILES: &[&str] = &["*.json", "*.safetensors", "*.jinja", "tokenizer.model"];

/// Whether `HF_HUB_OFFLINE` asks for cache-only resolution (as huggingface_hub reads it).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes"))
        .unwrap_or(false)
}

/// Splits `owner/name` (a Hub id); None for anything else.
pub(crate) fn hub_id(spec: &str) -> Option<(&str, &str)> {
    let (owner, name) = spec.split_once('/')?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (valid(owner) && valid(name) && !spec.starts_with('.')).then_some((owner, name))
}

/// The config.json that `spec` names: a file as is, a folder's, or a Hub model repo's (only
/// config.json is downloaded), for what needs no weights (`peft-sft plan`).
pub fn resolve_config(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let config = if path.is_dir() {
        path.join("config.json")
    } else {
        let Some((owner, name)) = hub_id(spec) else {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "give config.json, a model folder or a Hugging Face Hub id like HuggingFaceTB/SmolLM2-135M".into(),
            });
        };
        let client = hf_hub::HFClientSync::new()
            .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
        client
            .model(owner, name)
            .snapshot_download()
            .allow_patterns(vec!["config.json".to_string()])
            .local_files_only(offline())
            .send()
            .map_err(|e| Error::Hub(format!("cannot fetch config.json of `{spec}` from the Hub ({e}); check the id, your network and HF_TOKEN, or pass a local config.json")))?
            .join("config.json")
    };
    if !config.exists() {
        return Err(Error::MissingFile {
            path: config,
            hint: "a model folder needs its config.json".into(),
        });
    }
    Ok(config)
}

/// A local folder as is, or the snapshot folder of a Hub model repo (downloaded if needed).
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some((owner, name)) = hub_id(spec) else {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint:
                "give a local model folder or a Hugging Face Hub id like HuggingFaceTB/SmolLM2-135M"
                    .into(),
        });
    };
    let offline = offline();
    let client = hf_hub::HFClientSync::new()
        .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
    client
        .model(owner, name)
        .snapshot_download()
        .maybe_revision(revision.map(String::from))
        .allow_patterns(MODEL_FILES.iter().map(|s| s.to_string()).collect())
        .local_files_only(offline)
        .send()
        .map_err(|e| {
            if offline {
                Error::Hub(format!(
                    "HF_HUB_OFFLINE is set and `{spec}` is not in the local Hugging Face cache ({e}); unset HF_HUB_OFFLINE or pass a local folder"
                ))
            } else {
                Error::Hub(format!(
                    "cannot download `{spec}` from the Hugging Face Hub ({e}); check the id, your network and HF_TOKEN, or pass a local folder"
                ))
            }
        })
}

/// Data files of a dataset repo (the `refs/convert/parquet` branch holds parquet only).
/// The dataset card comes too: its `configs:` say which files make each config and split.
const DATASET_FILES: &[&str] = &[
    "*.parquet",
    "*.jsonl",
    "*.json",
    "*.csv",
    "*.ndjson",
    "README.md",
];

/// A local file or folder as is, or the snapshot folder of a Hub dataset repo (downloaded if
/// needed). With `parquet_branch`, the Hub's automatic parquet conversion (`refs/convert/parquet`)
/// is fetched instead of the repo's own files.
pub fn resolve_dataset(spec: &str, parquet_branch: bool) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some((owner, name)) = hub_id(spec) else {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint: "give a local .jsonl/.json/.csv/.parquet file, a folder of them, or a Hugging Face Hub dataset id like HuggingFaceTB/smoltalk".into(),
        });
    };
    let offline = offline();
    let client = hf_hub::HFClientSync::new()
        .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
    client
        .dataset(owner, name)
        .snapshot_download()
        .maybe_revision(parquet_branch.then(|| "refs/convert/parquet".to_string()))
        .allow_patterns(DATASET_FILES.iter().map(|s| s.to_string()).collect())
        .local_files_only(offline)
        .send()
        .map_err(|e| {
            Error::Hub(format!(
                "cannot get dataset `{spec}` from the Hugging Face Hub{} ({e}); check the id, your network and HF_TOKEN, or pass a local file",
                if offline { " cache (HF_HUB_OFFLINE is set)" } else { "" }
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_apart_from_paths() {
        assert_eq!(
            hub_id("HuggingFaceTB/SmolLM2-135M"),
            Some(("HuggingFaceTB", "SmolLM2-135M"))
        );
        assert_eq!(hub_id("./model"), None);
        assert_eq!(hub_id("a/b/c"), None);
        assert_eq!(hub_id("model"), None);
    }

    #[test]
    fn a_missing_path_that_is_no_hub_id_says_what_to_give() {
        let err = resolve_model("no/such/dir", None).unwrap_err().to_string();
        assert!(
            err.contains("no/such/dir") && err.contains("Hub id"),
            "{err}"
        );
    }
}
