//! Reading local dataset files into JSON rows: `.jsonl` (one object a line) and `.json` (an array of
//! objects, or records-by-column `{"col": [..]}`), each row tagged with where it came from so that
//! later errors can point the user at `file:line`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// One dataset record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The 1-based line of the record in a `.jsonl` file, or its 1-based index in a `.json` file.
    pub line: usize,
    /// The record, always a JSON object.
    pub value: Value,
}

/// The error for a dataset file that is not there.
pub(crate) fn missing_data(path: &Path) -> Error {
    Error::MissingFile {
        path: path.to_path_buf(),
        hint: "Pass a local .jsonl, .json, .csv or .parquet file, a folder of them, or a Hub dataset id.".to_string(),
    }
}

/// Reads a local dataset file into rows: `.jsonl` / `.ndjson`, `.json`, `.csv` (a header row, every
/// value a string, rows keep their line) or `.parquet` (rows keep their 1-based index).
///
/// JSON Lines: one object a line, blank lines ignored, rows keep their 1-based line number.
/// JSON: an array of objects, or an object of equally long columns (`{"text": ["a", "b"]}`); rows keep
/// their 1-based record index. A `.json` file that is really JSON Lines (as the Hub's `datasets` loader
/// accepts) is read as JSON Lines.
pub fn load_rows(path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for_each_row_chunk(path, usize::MAX, |chunk| {
        rows.extend(chunk);
        Ok(())
    })?;
    Ok(rows)
}

/// [`load_rows`] a chunk of at most `chunk` rows at a time, in file order: `f` sees each chunk
/// once. JSON Lines, CSV and parquet files are streamed, so memory stays bounded by the chunk;
/// a whole-file `.json` is parsed at once.
pub fn for_each_row_chunk(
    path: &Path,
    chunk: usize,
    mut f: impl FnMut(Vec<Row>) -> Result<()>,
) -> Result<()> {
    if !path.exists() {
        return Err(missing_data(path));
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let chunk = chunk.max(1);
    let mut pending = Vec::new();
    let mut sink = |row: Row| -> Result<()> {
        pending.push(row);
        if pending.len() >= chunk {
            f(std::mem::take(&mut pending))?;
        }
        Ok(())
    };
    match extension.as_deref() {
        Some("csv") => read_csv(path, &mut sink)?,
        Some("parquet") => read_parquet(path, &mut sink)?,
        Some("jsonl") | Some("ndjson") => read_json_lines(path, &mut sink)?,
        Some("json") => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            for row in parse_json(text, path)? {
                sink(row)?;
            }
        }
        _ => {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: "unsupported dataset file type; use .jsonl (one JSON object a line), .json, .csv or .parquet"
                    .to_string(),
            })
        }
    }
    if !pending.is_empty() {
        f(pending)?;
    }
    Ok(())
}

/// The longest JSON Lines row read: far above any training row (a million tokens of text is
/// a few MiB), far below what would exhaust memory on a file that has no line breaks.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Streams a JSON Lines file line by line (a leading byte-order mark is ignored); a line longer
/// than [`MAX_LINE_BYTES`] is an error, read no further than that.
fn read_json_lines(path: &Path, sink: &mut impl FnMut(Row) -> Result<()>) -> Result<()> {
    use std::io::{BufRead, Read};
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut bytes = Vec::new();
    for index in 0.. {
        bytes.clear();
        let read = reader
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        if bytes.len() > MAX_LINE_BYTES {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: Some(index + 1),
                message: format!(
                    "the line is longer than {} MiB; a JSON Lines file holds one row per line (a .json file holds one JSON array)",
                    MAX_LINE_BYTES >> 20
                ),
            });
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        let line = std::str::from_utf8(&bytes).map_err(|_| Error::Parse {
            path: path.to_path_buf(),
            line: Some(index + 1),
            message: "not valid UTF-8: save the file as UTF-8".into(),
        })?;
        let line = if index == 0 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        if let Some(row) = json_line_row(line, index + 1, path)? {
            sink(row)?;
        }
    }
    Ok(())
}

/// Reads a CSV file with a header row: each record becomes an object of strings, keeping its line.
fn read_csv(path: &Path, sink: &mut impl FnMut(Row) -> Result<()>) -> Result<()> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read CSV: {e}"),
    })?;
    let headers = reader
        .headers()
        .map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: Some(1),
            message: format!("cannot read the CSV header row: {e}"),
        })?
        .clone();
    for (index, record) in reader.records().enumerate() {
        let record = record.map_err(|e| Error::BadRow {
            path: path.to_path_buf(),
            line: e.position().map_or(0, |p| p.line() as usize),
            message: format!("invalid CSV record: {e}"),
        })?;
        let line = record.position().map_or(index + 2, |p| p.line() as usize);
        let value: serde_json::Map<String, Value> = headers
            .iter()
            .zip(record.iter())
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        sink(Row {
            line,
            value: Value::Object(value),
        })?;
    }
    Ok(())
}

/// Reads a parquet file (as `datasets` and the Hub write them) row by row into JSON objects; nested
/// lists and structs (e.g. `messages`) become arrays and objects.
fn read_parquet(path: &Path, sink: &mut impl FnMut(Row) -> Result<()>) -> Result<()> {
    use parquet::file::reader::SerializedFileReader;
    let bad = |e: parquet::errors::ParquetError| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read parquet: {e}"),
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    for (index, row) in reader.into_iter().enumerate() {
        let row = row.map_err(|e| Error::BadRow {
            path: path.to_path_buf(),
            line: index + 1,
            message: format!("cannot decode parquet row: {e}"),
        })?;
        sink(Row {
            line: index + 1,
            value: row.to_json_value(),
        })?;
    }
    Ok(())
}

/// Parses JSON Lines text: one object a line, blank lines skipped.
fn parse_json_lines(text: &str, path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        rows.extend(json_line_row(line, index + 1, path)?);
    }
    Ok(rows)
}

/// One JSON Lines line as a row (`None` for a blank line); anything but an object is an error
/// naming the line.
fn json_line_row(line: &str, line_number: usize, path: &Path) -> Result<Option<Row>> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(line).map_err(|e| Error::BadRow {
        path: path.to_path_buf(),
        line: line_number,
        message: format!(
            "invalid JSON at column {}: {e}; each line must hold one complete JSON object",
            e.column()
        ),
    })?;
    if !value.is_object() {
        return Err(Error::BadRow {
            path: path.to_path_buf(),
            line: line_number,
            message: format!(
                "expected a JSON object, found {}; each line must hold one record like {{\"text\": \"...\"}}",
                json_kind(&value)
            ),
        });
    }
    Ok(Some(Row {
        line: line_number,
        value,
    }))
}

/// Parses a whole-file JSON dataset: an array of records or records-by-column.
fn parse_json(text: &str, path: &Path) -> Result<Vec<Row>> {
    let document: Value = match serde_json::from_str(text) {
        Ok(document) => document,
        Err(whole_file_error) => {
            // The Hub's `json` loader also accepts JSON Lines under a .json name.
            if looks_like_json_lines(text) {
                return parse_json_lines(text, path);
            }
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: Some(whole_file_error.line()),
                message: format!("invalid JSON: {whole_file_error}"),
            });
        }
    };
    match document {
        Value::Array(records) => records
            .into_iter()
            .enumerate()
            .map(|(index, value)| {
                if value.is_object() {
                    Ok(Row {
                        line: index + 1,
                        value,
                    })
                } else {
                    Err(Error::BadRow {
                        path: path.to_path_buf(),
                        line: index + 1,
                        message: format!(
                            "record {} is {}, expected a JSON object",
                            index + 1,
                            json_kind(&value)
                        ),
                    })
                }
            })
            .collect(),
        Value::Object(columns) => records_from_columns(columns, path),
        other => Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            message: format!(
                "expected an array of records or an object of columns, found {}",
                json_kind(&other)
            ),
        }),
    }
}

/// Turns `{"a": [1, 2], "b": [3, 4]}` into the rows `{"a": 1, "b": 3}` and `{"a": 2, "b": 4}`.
fn records_from_columns(columns: serde_json::Map<String, Value>, path: &Path) -> Result<Vec<Row>> {
    let mut row_count = None;
    for (name, column) in &columns {
        let Value::Array(values) = column else {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: format!(
                    "column `{name}` is {}, expected a list; a JSON dataset is either a list of records or an object of equally long lists",
                    json_kind(column)
                ),
            });
        };
        match row_count {
            None => row_count = Some(values.len()),
            Some(count) if count != values.len() => {
                return Err(Error::Parse {
                    path: path.to_path_buf(),
                    line: None,
                    message: format!(
                        "column `{name}` has {} values but earlier columns have {count}; all columns must have the same length",
                        values.len()
                    ),
                });
            }
            Some(_) => {}
        }
    }
    let row_count = row_count.unwrap_or(0);
    let mut rows: Vec<serde_json::Map<String, Value>> =
        (0..row_count).map(|_| serde_json::Map::new()).collect();
    for (name, column) in columns {
        if let Value::Array(values) = column {
            for (row, value) in rows.iter_mut().zip(values) {
                row.insert(name.clone(), value);
            }
        }
    }
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(index, record)| Row {
            line: index + 1,
            value: Value::Object(record),
        })
        .collect())
}

/// Whether the first non-blank line of `text` is a complete JSON object on its own.
fn looks_like_json_lines(text: &str) -> bool {
    text.lines()
        .find(|line| !line.trim().is_empty())
        .and_then(|line| serde_json::from_str::<Value>(line).ok())
        .is_some_and(|value| value.is_object())
}

/// A short name for the kind of a JSON value, for error messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        let mut file = std::fs::File::create(&path).expect("create test file");
        file.write_all(content.as_bytes()).expect("write test file");
        path
    }

    #[test]
    fn jsonl_rows_keep_their_line_and_skip_blank_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "d.jsonl",
            "{\"text\": \"a\"}\n\n  \n{\"text\": \"b\"}\r\n",
        );
        let rows = load_rows(&path).expect("load");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 1);
        assert_eq!(rows[1].line, 4);
        assert_eq!(rows[1].value["text"], "b");
    }

    #[test]
    fn malformed_jsonl_names_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "bad.jsonl", "{\"text\": \"a\"}\n{\"text\": \n");
        let err = load_rows(&path).expect_err("must fail");
        assert!(matches!(err, Error::BadRow { line: 2, .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("bad.jsonl:2:"), "{message}");
    }

    #[test]
    fn jsonl_line_that_is_not_an_object_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "d.jsonl", "[1, 2]\n");
        let err = load_rows(&path).expect_err("must fail");
        assert!(err
            .to_string()
            .contains("d.jsonl:1: expected a JSON object, found a list"));
    }

    #[test]
    fn json_array_rows_are_numbered_by_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "d.json",
            "[\n {\"text\": \"a\"},\n {\"text\": \"b\"}\n]",
        );
        let rows = load_rows(&path).expect("load");
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn json_columns_become_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "d.json",
            r#"{"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}"#,
        );
        let rows = load_rows(&path).expect("load");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].value["prompt"], "p2");
        assert_eq!(rows[1].value["completion"], "c2");
        assert_eq!(rows[1].line, 2);
    }

    #[test]
    fn json_columns_of_unequal_length_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "d.json",
            r#"{"prompt": ["p1", "p2"], "completion": ["c1"]}"#,
        );
        let err = load_rows(&path).expect_err("must fail");
        assert!(err.to_string().contains("same length"), "{err}");
    }

    #[test]
    fn json_file_holding_json_lines_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "d.json", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
        assert_eq!(load_rows(&path).expect("load").len(), 2);
    }

    #[test]
    fn malformed_json_names_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "d.json",
            "[\n {\"text\": \"a\"},\n {\"text\" \"b\"}\n]",
        );
        let err = load_rows(&path).expect_err("must fail");
        assert!(err.to_string().contains("d.json:3:"), "{err}");
    }

    #[test]
    fn missing_file_gives_a_hint() {
        let err = load_rows(Path::new("/nonexistent/data.jsonl")).expect_err("must fail");
        assert!(matches!(err, Error::MissingFile { .. }));
        assert!(err.to_string().contains(".jsonl, .json, .csv or .parquet"));
    }

    #[test]
    fn unknown_extension_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "d.tsv", "text\na\n");
        let err = load_rows(&path).expect_err("must fail").to_string();
        assert!(err.contains("unsupported dataset file type"), "{err}");
    }
}
