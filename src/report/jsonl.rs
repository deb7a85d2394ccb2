//! `OUTPUT/metrics.jsonl`: every log entry of a run, one JSON object a line (what `--report-to
//! jsonl` writes and `plot`, the summary and a resumed run read back).

use crate::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends log entries to `metrics.jsonl`.
pub struct MetricsFile {
    path: PathBuf,
}

impl MetricsFile {
    /// Starts `dir/metrics.jsonl` with `history` (the entries up to a resumed checkpoint, or none).
    pub fn create(dir: &Path, history: &[Value]) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let mut text = String::new();
        for entry in history {
            text.push_str(&entry.to_string());
            text.push('\n');
        }
        crate::io::write_bytes(&path, text.as_bytes())?;
        Ok(MetricsFile { path })
    }

    /// Appends one entry.
    pub fn append(&self, entry: &Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        writeln!(f, "{entry}").map_err(|e| Error::io(&self.path, e))
    }
}
