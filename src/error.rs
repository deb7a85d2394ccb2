//! The library's error type: every variant says what went wrong, where (file, line, tensor),
//! and what the user can do about it.

use std::path::PathBuf;

/// Errors raised by peft-sft's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A required file is missing.
    #[error("{path}: file not found. {hint}")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What the user can do about it.
        hint: String,
    },
    /// A file's content could not be parsed (JSON, TOML, safetensors ...).
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// The file being parsed.
        path: PathBuf,
        /// The 1-based line, when known.
        line: Option<usize>,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A dataset row does not fit any supported format or has invalid content.
    #[error("{path}:{line}: {message}")]
    BadRow {
        /// The dataset file.
        path: PathBuf,
        /// The 1-based line (JSONL) or record index (JSON) of the row.
        line: usize,
        /// What is wrong and what to do.
        message: String,
    },
    /// The model's architecture is not one peft-sft implements.
    #[error("unsupported architecture `{name}`; supported: {supported}")]
    UnsupportedArchitecture {
        /// The architecture named by config.json.
        name: String,
        /// The architectures peft-sft supports.
        supported: String,
    },
    /// A tensor is missing or has the wrong shape.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor's name as stored in the file.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The Hugging Face Hub could not be reached or refused a request.
    #[error("hub: {0}")]
    Hub(String),
    /// A merge whose written model would not answer like the adapter on its base (on the probe):
    /// nothing was written.
    #[error("{report}; above --max-merge-error {limit}: the merged model would not answer like the adapter did; nothing written (pass --force to write it anyway)")]
    MergeCheck {
        /// What was merged and how far the merged model strays, in words.
        report: String,
        /// The largest fraction allowed.
        limit: f64,
    },
    /// The device holding a file ran out of space while it was written.
    #[error("{path}: no space left on the device{}; free space there or choose another folder (what was written before is intact)", needed_mib.map(|m| format!(" (it needs about {m} MiB, as much as the previous checkpoint)")).unwrap_or_default())]
    NoSpace {
        /// The file or checkpoint folder being written.
        path: PathBuf,
        /// About how much it needs, when known (a checkpoint: the previous one's size).
        needed_mib: Option<u64>,
    },
    /// Another process holds the folder (a run or a merge writing into it).
    #[error("{path}: in use by another peft-sft process ({holder}); wait for it to finish or choose another folder")]
    Busy {
        /// The folder.
        path: PathBuf,
        /// Who holds it, as its lock file says.
        holder: String,
    },
    /// A training step produced a NaN or infinite loss or gradient: the run stopped before the
    /// optimizer applied it.
    #[error("step {step}: {what} is not finite (NaN or inf); the step was not applied and nothing of it was saved; {checkpoint}. Lower --learning-rate or --max-grad-norm, or look at the data with `peft-sft data inspect`")]
    NonFinite {
        /// The optimizer step (1-based).
        step: usize,
        /// What went non-finite: the loss, or the gradient of a named tensor.
        what: String,
        /// The last checkpoint to resume from, in words.
        checkpoint: String,
    },
    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::StorageFull {
            return Error::NoSpace {
                path: path.into(),
                needed_mib: None,
            };
        }
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
