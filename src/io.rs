//! Writing files safely: every output goes to a temporary file in the same folder and is renamed
//! into place, so an interrupted or failed write never damages what was already there.

use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The temporary sibling of `path` used while writing it.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes through `write` into a temporary file, then renames it to `path`.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = temp_path(path);
    let result =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    // Name the file being written, not its temporary.
    result.map_err(|e| match e {
        Error::NoSpace { needed_mib, .. } => Error::NoSpace {
            path: path.to_path_buf(),
            needed_mib,
        },
        e => e,
    })
}

/// Writes bytes atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes a value as pretty JSON atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message: e.to_string(),
    })?;
    write_bytes(path, text.as_bytes())
}

/// Reads a JSON file, naming the file and line on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            hint: "check the path".into(),
        },
        _ => Error::io(path, e),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: Some(e.line()),
        message: e.to_string(),
    })
}

/// Writes tensors as safetensors with `{"format": "pt"}` metadata (as transformers and PEFT expect).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(path, |tmp| {
        safetensors::serialize_to_file(
            contiguous.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            tmp,
        )
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => Error::io(tmp, io),
            e => Error::Parse {
                path: tmp.to_path_buf(),
                line: None,
                message: format!("cannot write safetensors: {e}"),
            },
        })
    })
}

/// Reads every tensor of a safetensors file onto `device`.
pub fn read_safetensors(
    path: &Path,
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint: "check the path".into(),
        });
    }
    // The header checked first: an untrusted file's claims (sizes, names) before any allocation.
    safetensors_header(path)?;
    candle_core::safetensors::load(path, device).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read safetensors: {e}"),
    })
}

/// The largest safetensors header read (the format's own limit).
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// The header of the safetensors file `path`, checked before anything is allocated for its
/// tensors: its length within [`MAX_SAFETENSORS_HEADER`] and the file, each name once, each byte
/// range ordered and inside the file. Returns `(name, entry, data start)` in file order, the
/// entries as written (`__metadata__` left out); the data starts after the header.
pub fn safetensors_header(path: &Path) -> Result<(Vec<(String, serde_json::Value)>, u64)> {
    use std::io::Read;
    let bad = |message: String| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| {
        bad("not a safetensors file (shorter than its 8-byte header length)".into())
    })?;
    let len = u64::from_le_bytes(len);
    if len > MAX_SAFETENSORS_HEADER || 8 + len > file_len {
        return Err(bad(format!(
            "not a safetensors file: its header claims {len} bytes (the file has {file_len}; the format allows {MAX_SAFETENSORS_HEADER})"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let Entries(entries) =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad safetensors header: {e}")))?;
    let data_len = file_len - 8 - len;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if !seen.insert(name.clone()) {
            return Err(bad(format!(
                "tensor `{name}` is listed twice in the header; the file is damaged or was written by a faulty tool"
            )));
        }
        if name == "__metadata__" {
            continue;
        }
        let offsets: Vec<u64> = entry["data_offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        match offsets[..] {
            [start, end] if start <= end && end <= data_len => {}
            [start, end] => {
                return Err(bad(format!(
                    "tensor `{name}`: bytes {start}..{end} are not inside the file's {data_len} data bytes; the file is truncated or damaged"
                )))
            }
            _ => return Err(bad(format!("tensor `{name}` has no data_offsets"))),
        }
        out.push((name, entry));
    }
    Ok((out, 8 + len))
}

/// A JSON object's entries in order, repeated keys kept (serde_json's map keeps one of them).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The lock file a run or a merge holds in the folder it writes ([`lock_dir`]).
pub const LOCK_FILE: &str = ".peft-sft.lock";

/// An exclusive hold on a folder for as long as it lives ([`lock_dir`]).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Takes `dir` (created if missing) for one process: an exclusive advisory lock (`flock`) on
/// `dir/.peft-sft.lock`, which names the holder (`what`, its pid). Another process asking for the
/// same folder gets [`Error::Busy`] at once. The operating system drops the lock when the process
/// ends, however it ends, so a killed run never leaves the folder stuck. A no-op hold where
/// `flock` does not exist (not Unix).
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock> {
    use std::io::Write;
    if dir.exists() && !dir.is_dir() {
        let kind = std::io::ErrorKind::AlreadyExists;
        let message = "exists and is not a folder: choose another output folder";
        return Err(Error::io(dir, std::io::Error::new(kind, message)));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Busy {
                path: dir.to_path_buf(),
                holder: holder.trim().to_string(),
            });
        }
    }
    file.set_len(0).map_err(|e| Error::io(&path, e))?;
    write!(file, "{what}, pid {}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    Ok(DirLock { _file: file })
}
