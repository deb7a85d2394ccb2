//! Whole datasets to tokenized examples, as TRL's `SFTTrainer._prepare_dataset` does: rows are read a
//! chunk at a time, mapped, parsed and tokenized on all cores, truncated, filtered, and appended to a
//! column store — in memory, or in a cache folder keyed by everything that decides the result
//! (dataset bytes, tokenizer, chat template, options), which a second run maps instead of
//! re-tokenizing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::format::parse_sample;
use super::load::{for_each_row_chunk, missing_data, Row};
use super::store::{Examples, StoreWriter, TokenStore};
use super::tokenize::{Example, SampleTokenizer, TokenizeOptions};
use super::tokenizer::ChatTokenizer;
use crate::error::{Error, Result};

/// Rows read, tokenized and appended at a time: bounds memory on large files while giving every
/// core thousands of rows.
const CHUNK_ROWS: usize = 16_384;

/// Bumped whenever tokenization or the cache layout changes, so old caches are not reused.
const CACHE_FORMAT: u32 = 1;

/// The cache folder's summary file.
const INFO_FILE: &str = "dataset_info.json";

/// A tokenized dataset.
#[derive(Debug, Clone)]
pub struct PreparedDataset {
    /// The examples kept, in file order.
    pub examples: Examples,
    /// Rows dropped because truncation left them without loss tokens (TRL drops them too).
    pub skipped_no_loss_tokens: usize,
    /// Rows longer than `max_length` that were truncated (including skipped ones).
    pub truncated: usize,
    /// Rows skipped as unusable with `skip_bad_rows`: (file, line, reason).
    pub bad_rows: Vec<(PathBuf, usize, String)>,
    /// The dataset file or folder.
    pub path: PathBuf,
    /// The cache folder the examples are mapped from, if cached.
    pub cache: Option<PathBuf>,
    /// Whether the examples were found in the cache rather than tokenized now.
    pub from_cache: bool,
}

/// What a cache folder records besides the token columns.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheInfo {
    format: u32,
    files: Vec<PathBuf>,
    rows: usize,
    tokens: u64,
    skipped_no_loss_tokens: usize,
    truncated: usize,
    bad_rows: Vec<(PathBuf, usize, String)>,
}

/// load_rows + parse_sample + tokenize_sample; rows with no loss tokens after truncation are skipped and counted.
///
/// As in TRL, the filter of fully masked rows runs only when `max_length` is set (it is part of
/// TRL's truncation step), and may leave no example at all; the caller decides whether that is an
/// error. Errors while tokenizing a row name the file and line.
pub fn prepare_dataset(
    path: &Path,
    tok: &ChatTokenizer,
    opts: &TokenizeOptions,
) -> Result<PreparedDataset> {
    prepare_dataset_split(path, None, "train", tok, opts)
}

/// [`prepare_dataset`] of a file, or of the files of one `config` and `split` of a folder laid
/// out like a Hub dataset repo (see [`super::files::dataset_files`]), in file order.
///
/// With `opts.cache_dir`, the result is stored there under a key of the files' bytes, the
/// tokenizer, its chat template and the options, and later calls with the same inputs map it
/// instead of tokenizing again. The cache entry appears atomically (written to a temporary folder
/// and renamed), so an interrupted run never leaves a half-written entry that a later run trusts.
pub fn prepare_dataset_split(
    path: &Path,
    config: Option<&str>,
    split: &str,
    tok: &ChatTokenizer,
    opts: &TokenizeOptions,
) -> Result<PreparedDataset> {
    let files = if path.is_dir() {
        super::files::dataset_files(path, config, split)?
    } else {
        vec![path.to_path_buf()]
    };
    let Some(cache_root) = &opts.cache_dir else {
        let mut writer = StoreWriter::in_memory();
        let info = tokenize_files(&files, tok, opts, &mut writer)?;
        return Ok(prepared(path, info, writer.finish()?, None, false));
    };
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(missing_data(missing));
    }
    let entry = cache_root.join(cache_key(&files, tok, opts)?);
    if let Some(info) = read_info(&entry) {
        if let Ok(store) = TokenStore::open(&entry) {
            if store.rows() == info.rows {
                return Ok(prepared(path, info, store, Some(entry), true));
            }
        }
    }
    let partial = cache_root.join(format!(
        ".{}.partial-{}",
        entry.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let guard = RemoveOnDrop(partial.clone());
    let mut writer = StoreWriter::to_dir(&partial)?;
    let info = tokenize_files(&files, tok, opts, &mut writer)?;
    writer.finish()?;
    crate::io::write_json(&partial.join(INFO_FILE), &info)?;
    if entry.exists() {
        // A damaged or concurrent entry: replace it with ours.
        let _ = std::fs::remove_dir_all(&entry);
    }
    match std::fs::rename(&partial, &entry) {
        Ok(()) => std::mem::forget(guard),
        // Another process published the same key first; its entry is as good as ours.
        Err(_) if read_info(&entry).is_some() => {}
        Err(e) => return Err(Error::io(&entry, e)),
    }
    let store = TokenStore::open(&entry)?;
    Ok(prepared(path, info, store, Some(entry), false))
}

/// The default cache folder for tokenized datasets: `$PEFT_SFT_CACHE/datasets`, else
/// `$XDG_CACHE_HOME/peft-sft/datasets`, else `~/.cache/peft-sft/datasets`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("PEFT_SFT_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("peft-sft")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("peft-sft")))
        .map(|d| d.join("datasets"))
}

fn prepared(
    path: &Path,
    info: CacheInfo,
    store: TokenStore,
    cache: Option<PathBuf>,
    from_cache: bool,
) -> PreparedDataset {
    PreparedDataset {
        examples: Examples::all(Arc::new(store)),
        skipped_no_loss_tokens: info.skipped_no_loss_tokens,
        truncated: info.truncated,
        bad_rows: info.bad_rows,
        path: path.to_path_buf(),
        cache,
        from_cache,
    }
}

fn read_info(entry: &Path) -> Option<CacheInfo> {
    let text = std::fs::read_to_string(entry.join(INFO_FILE)).ok()?;
    let info: CacheInfo = serde_json::from_str(&text).ok()?;
    (info.format == CACHE_FORMAT).then_some(info)
}

/// Removes a folder when dropped (a partial cache entry after an error).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cache key: SHA-256 over the format version, each file's name and bytes, the tokenizer
/// (its full JSON and special tokens), the chat template and the options.
fn cache_key(files: &[PathBuf], tok: &ChatTokenizer, opts: &TokenizeOptions) -> Result<String> {
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    field(&CACHE_FORMAT.to_le_bytes());
    field(env!("CARGO_PKG_VERSION").as_bytes());
    let tokenizer = tok
        .inner
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
    field(tokenizer.as_bytes());
    field(format!("{tok:?}").as_bytes());
    field(tok.chat_template.as_deref().unwrap_or("").as_bytes());
    let mut options = opts.clone();
    options.cache_dir = None;
    field(format!("{options:?}").as_bytes());
    for file in files {
        field(file.file_name().unwrap_or_default().as_encoded_bytes());
        let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        let mut file_hash = Sha256::new();
        std::io::copy(&mut f, &mut file_hash).map_err(|e| Error::io(file, e))?;
        field(&file_hash.finalize());
    }
    let digest = hash.finalize();
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Tokenizes `files` in order into `writer`, returning the counts.
fn tokenize_files(
    files: &[PathBuf],
    tok: &ChatTokenizer,
    opts: &TokenizeOptions,
    writer: &mut StoreWriter,
) -> Result<CacheInfo> {
    let mut info = CacheInfo {
        format: CACHE_FORMAT,
        files: files.to_vec(),
        rows: 0,
        tokens: 0,
        skipped_no_loss_tokens: 0,
        truncated: 0,
        bad_rows: Vec::new(),
    };
    for path in files {
        let mut rows_read = 0;
        for_each_row_chunk(path, CHUNK_ROWS, |rows| {
            rows_read += rows.len();
            for example in tokenize_rows(&rows, path, tok, opts) {
                let mut example = match example {
                    Ok(example) => example,
                    Err(Error::BadRow { line, message, .. }) if opts.skip_bad_rows => {
                        info.bad_rows.push((path.clone(), line, message));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Some(max_length) = opts.max_length {
                    if example.truncate(max_length) {
                        info.truncated += 1;
                    }
                    if example.num_loss_tokens() == 0 {
                        info.skipped_no_loss_tokens += 1;
                        continue;
                    }
                }
                info.tokens += example.len() as u64;
                writer.push(&example)?;
            }
            Ok(())
        })?;
        if rows_read == 0 {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: "the dataset has no rows".to_string(),
            });
        }
    }
    info.rows = writer.rows();
    Ok(info)
}

/// Maps, parses and tokenizes `rows` in parallel (contiguous chunks, one tokenizer copy and
/// compiled template per thread), keeping row order; errors name the file and the row's line.
fn tokenize_rows(
    rows: &[Row],
    path: &Path,
    tok: &ChatTokenizer,
    opts: &TokenizeOptions,
) -> Vec<Result<Example>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = rows.len().div_ceil(threads).max(256);
    std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    // A copy per thread: the tokenizer's regexes keep their search caches in a
                    // pool that threads sharing one regex contend for.
                    let own = tok.clone();
                    let mut tokenizer = SampleTokenizer::new(&own, opts).with_fast_path();
                    part.iter()
                        .map(|row| {
                            opts.fields
                                .apply(row, path)
                                .and_then(|row| parse_sample(&row, path))
                                .and_then(|sample| tokenizer.tokenize(&sample))
                                .map_err(|e| match e {
                                    Error::BadRow { .. } => e,
                                    other => Error::BadRow {
                                        path: path.to_path_buf(),
                                        line: row.line,
                                        message: other.to_string(),
                                    },
                                })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Err(Error::Tokenizer("a tokenizing thread panicked".into()))]
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::super::tokenizer::test_support::chatml_tokenizer;
    use super::*;
    use serde_json::json;

    fn write_dataset(lines: &[serde_json::Value]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train.jsonl");
        let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        std::fs::write(&path, text.join("\n")).expect("write");
        (dir, path)
    }

    #[test]
    fn prepare_dataset_skips_rows_left_without_loss_tokens() {
        let tok = chatml_tokenizer();
        let (_dir, path) = write_dataset(&[
            json!({"prompt": "a long prompt", "completion": "x"}),
            json!({"prompt": "p", "completion": "x"}),
        ]);
        let opts = TokenizeOptions {
            max_length: Some(4),
            completion_only_loss: None,
            ..TokenizeOptions::default()
        };
        let prepared = prepare_dataset(&path, &tok, &opts).expect("prepare");
        assert_eq!(prepared.examples.len(), 1);
        assert_eq!(prepared.skipped_no_loss_tokens, 1);
        assert_eq!(prepared.truncated, 1);
        assert_eq!(
            prepared.examples.get(0).input_ids,
            vec!['p' as u32, 'x' as u32, 257]
        );
    }

    #[test]
    fn prepare_dataset_names_the_row_of_a_template_error() {
        let mut tok = chatml_tokenizer();
        tok.chat_template = Some("{{ raise_exception('only user messages') }}".into());
        let (_dir, path) = write_dataset(&[
            json!({"text": "ok"}),
            json!({"messages": [{"role": "user", "content": "x"}]}),
        ]);
        let err = prepare_dataset(&path, &tok, &TokenizeOptions::default()).expect_err("must fail");
        let message = err.to_string();
        assert!(message.contains("train.jsonl:2:"), "{message}");
        assert!(message.contains("only user messages"), "{message}");
    }

    #[test]
    fn prepare_dataset_rejects_empty_files() {
        let tok = chatml_tokenizer();
        let (_dir, path) = write_dataset(&[]);
        assert!(prepare_dataset(&path, &tok, &TokenizeOptions::default()).is_err());
    }

    fn write_rows(path: &Path, n: usize) {
        let lines: Vec<String> = (0..n)
            .map(|i| {
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("question {i}")},
                    {"role": "assistant", "content": format!("answer {i}")}
                ]})
                .to_string()
            })
            .collect();
        std::fs::write(path, lines.join("\n")).unwrap();
    }

    #[test]
    fn a_second_run_maps_the_cache_and_a_changed_input_misses_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        write_rows(&data, 40);
        let tok = chatml_tokenizer();
        let plain = prepare_dataset(&data, &tok, &TokenizeOptions::default()).unwrap();
        let opts = TokenizeOptions {
            cache_dir: Some(dir.path().join("cache")),
            ..TokenizeOptions::default()
        };
        let first = prepare_dataset(&data, &tok, &opts).unwrap();
        assert!(!first.from_cache);
        assert!(first.examples.store().is_mapped());
        let second = prepare_dataset(&data, &tok, &opts).unwrap();
        assert!(second.from_cache);
        assert_eq!(second.cache, first.cache);
        assert_eq!(second.examples.to_vec(), plain.examples.to_vec());
        assert_eq!(plain.examples.len(), 40);

        // Other options, or other bytes, make another entry.
        let shorter = TokenizeOptions {
            max_length: Some(8),
            ..opts.clone()
        };
        let third = prepare_dataset(&data, &tok, &shorter).unwrap();
        assert!(!third.from_cache);
        assert_ne!(third.cache, first.cache);
        write_rows(&data, 41);
        let fourth = prepare_dataset(&data, &tok, &opts).unwrap();
        assert!(!fourth.from_cache);
        assert_eq!(fourth.examples.len(), 41);
        let entries = std::fs::read_dir(dir.path().join("cache")).unwrap().count();
        assert_eq!(entries, 3, "no partial folders are left behind");
    }

    #[test]
    fn a_failed_run_leaves_no_cache_entry() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        write_rows(&data, 3);
        let mut text = std::fs::read_to_string(&data).unwrap();
        text.push_str("\n{\"messages\": [{\"role\": \"user\", \"content\": [\"part\"]}]}\n");
        std::fs::write(&data, text).unwrap();
        let opts = TokenizeOptions {
            cache_dir: Some(dir.path().join("cache")),
            ..TokenizeOptions::default()
        };
        let err = prepare_dataset(&data, &chatml_tokenizer(), &opts).unwrap_err();
        assert!(err.to_string().contains("d.jsonl:4"), "{err}");
        let entries = std::fs::read_dir(dir.path().join("cache")).unwrap().count();
        assert_eq!(entries, 0);
    }
}
