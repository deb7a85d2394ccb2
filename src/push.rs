//! Pushing an adapter or model folder to the Hugging Face Hub with hf-hub's repository API
//! (`create_repository`, `create_branch`, `upload_folder`): the token comes from `HF_TOKEN` (or
//! the `huggingface-cli login` file), the server from `HF_ENDPOINT`. Local files are only read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::{HFClientBuilder, HFError, RepoTypeModel};

use crate::{Error, Result};

/// Where and how to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// The repository, `owner/name`.
    pub repo_id: String,
    /// Create the repository as private (an existing repository keeps its visibility).
    pub private: bool,
    /// The branch to commit to (created from `main` when missing); `None` is `main`.
    pub revision: Option<String>,
    /// The commit message.
    pub commit_message: Option<String>,
    /// Retries of a failed request (timeouts, 5xx, 429) after the first try; `None` is hf-hub's
    /// default (5, with exponential backoff and jitter).
    pub retries: Option<usize>,
    /// The base delay of the backoff; `None` is hf-hub's default (100 ms).
    pub retry_delay: Option<Duration>,
    /// The Hub's URL; `None` is `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// The access token; `None` is `HF_TOKEN`, else the `huggingface-cli login` file.
    pub token: Option<String>,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The repository's URL.
    pub url: String,
    /// The commit's URL, when the server returned one.
    pub commit_url: Option<String>,
    /// The files uploaded (paths relative to the folder).
    pub files: Vec<String>,
}

/// Files that never go to the Hub: optimizer state and local bookkeeping of checkpoints.
const SKIPPED: &[&str] = &["optimizer.safetensors", "rng_state.json"];

/// The files of `dir` that a push sends (recursively, sorted), relative to `dir`.
pub fn files_to_push(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Hidden files, optimizer state and (as TRL) the checkpoint folders of a run stay local.
            let checkpoint = path.is_dir() && name.starts_with("checkpoint-");
            if name.starts_with('.') || SKIPPED.contains(&name.as_str()) || checkpoint {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Explains a Hub error for a person: what failed and what to do.
fn explain(what: &str, repo_id: &str, e: HFError) -> Error {
    let hint = match &e {
        HFError::AuthRequired { .. } => {
            "the Hub refused the token: set HF_TOKEN to a token with write access (or run `huggingface-cli login`)"
        }
        HFError::Forbidden { .. } => {
            "the token may not write to this repository: check the owner and the token's permissions"
        }
        HFError::RepoNotFound { .. } => {
            "the repository does not exist or the token cannot see it: check --repo-id and HF_TOKEN"
        }
        _ => "check HF_ENDPOINT and the network; the request was retried with backoff",
    };
    Error::Hub(format!("{what} {repo_id}: {e}; {hint}"))
}

/// Pushes the files of `dir` (an adapter or model folder) to `options.repo_id` in one commit,
/// creating the repository (and branch) when missing. Optimizer state and hidden files stay local.
pub fn push_folder(dir: &Path, options: &PushOptions) -> Result<Pushed> {
    let Some((owner, name)) = options.repo_id.split_once('/') else {
        return Err(Error::Config(format!(
            "--repo-id `{}` must be owner/name",
            options.repo_id
        )));
    };
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            hint: "pass the adapter or model folder to push".into(),
        });
    }
    let files = files_to_push(dir)?;
    if files.is_empty() {
        return Err(Error::Config(format!("{}: nothing to push", dir.display())));
    }
    let mut builder = HFClientBuilder::new();
    if let Some(n) = options.retries {
        builder = builder.retry_max_attempts(n);
    }
    if let Some(d) = options.retry_delay {
        builder = builder.retry_base_delay(d);
    }
    if let Some(endpoint) = &options.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    if let Some(token) = &options.token {
        builder = builder.token(token.clone());
    }
    let client = builder
        .build_sync()
        .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
    let url = client
        .create_repository()
        .repo_id(&options.repo_id)
        .repo_type(RepoTypeModel)
        .private(options.private)
        .exist_ok(true)
        .send()
        .map_err(|e| explain("cannot create", &options.repo_id, e))?
        .url;
    let repo = client.model(owner, name);
    if let Some(branch) = options.revision.as_deref().filter(|b| *b != "main") {
        match repo.create_branch().branch(branch).send() {
            Ok(()) | Err(HFError::Conflict { .. }) => {}
            Err(e) => {
                return Err(explain(
                    &format!("cannot create branch {branch} of"),
                    &options.repo_id,
                    e,
                ))
            }
        }
    }
    let message = options
        .commit_message
        .clone()
        .unwrap_or_else(|| "Upload with peft-sft".to_string());
    // Only the listed files go: each is an escaped (literal) pattern, so a name with glob
    // characters matches itself and nothing else is picked up.
    let patterns = files.iter().map(|f| globset::escape(f)).collect();
    let info = repo
        .upload_folder()
        .folder_path(PathBuf::from(dir))
        .maybe_revision(options.revision.clone())
        .commit_message(message)
        .allow_patterns(patterns)
        .send()
        .map_err(|e| explain("cannot upload to", &options.repo_id, e))?;
    Ok(Pushed {
        url,
        commit_url: info.commit_url,
        files,
    })
}
