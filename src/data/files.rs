//! Which data files of a folder make up one config and split of a dataset, for folders laid out as
//! Hub dataset repos: `data/{split}-00000-of-00001.parquet` (the `default` config of
//! `push_to_hub`), `{config}/{split}-*.parquet` (named configs), `{config}/{split}/0000.parquet`
//! (the `refs/convert/parquet` branch), and plain `{split}.jsonl` / `{split}/...` files.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// File types the loader reads.
const EXTENSIONS: &[&str] = &["jsonl", "ndjson", "json", "csv", "parquet"];

/// Every data file below `dir`, sorted.
fn data_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let path = entry.map_err(|e| Error::io(&d, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `file` (relative to the dataset root) belongs to `split`: a path component named
/// `split`, or a file name that is `split` or starts with `split-` / `split_` / `split.`, or
/// contains `-split-` / `-split.` (the converter's `{dataset}-{split}.parquet`).
fn in_split(rel: &Path, split: &str) -> bool {
    let parents = rel.parent().into_iter().flat_map(|p| p.components());
    if parents.into_iter().any(|c| c.as_os_str() == split) {
        return true;
    }
    let stem = rel
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let s = split.to_ascii_lowercase();
    stem.split('.').next() == Some(s.as_str())
        || [format!("{s}-"), format!("{s}_"), format!("{s}.")]
            .iter()
            .any(|p| stem.starts_with(p.as_str()))
        || [format!("-{s}-"), format!("-{s}.")]
            .iter()
            .any(|p| stem.contains(p.as_str()))
}

/// The files of `config` (default: the `data/` folder when there is one, else everything) and
/// `split` below `dir`. When no file names a split at all and `split` is `train`, every file is
/// training data (a folder of plain files).
pub fn dataset_files(dir: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    let all = data_files(dir)?;
    let rel = |p: &PathBuf| {
        p.strip_prefix(dir)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let first_dir = |p: &PathBuf| {
        rel(p)
            .components()
            .next()
            .filter(|_| rel(p).components().count() > 1)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
    };
    let scoped: Vec<PathBuf> = match config {
        Some(c) => all
            .iter()
            .filter(|p| first_dir(p).as_deref() == Some(c))
            .cloned()
            .collect(),
        None if all.iter().any(|p| first_dir(p).as_deref() == Some("data")) => all
            .iter()
            .filter(|p| first_dir(p).as_deref() == Some("data"))
            .cloned()
            .collect(),
        None => all.clone(),
    };
    if scoped.is_empty() {
        let configs: std::collections::BTreeSet<String> =
            all.iter().filter_map(first_dir).collect();
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            hint: format!(
                "no data files for config `{}`; configs here: {}",
                config.unwrap_or("default"),
                configs.into_iter().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let in_scope = |p: &PathBuf, s: &str| {
        let r = rel(p);
        let r = match config.or_else(|| first_dir(p).filter(|d| d == "data").map(|_| "data")) {
            Some(c) => r.strip_prefix(c).map(Path::to_path_buf).unwrap_or(r),
            None => r,
        };
        in_split(&r, s)
    };
    let matching: Vec<PathBuf> = scoped
        .iter()
        .filter(|p| in_scope(p, split))
        .cloned()
        .collect();
    if !matching.is_empty() {
        return Ok(matching);
    }
    let named_splits = ["train", "test", "validation", "valid", "dev", "eval"]
        .iter()
        .any(|s| scoped.iter().any(|p| in_scope(p, s)));
    if split == "train" && !named_splits {
        return Ok(scoped);
    }
    Err(Error::MissingFile {
        path: dir.to_path_buf(),
        hint: format!(
            "no data files for split `{split}` (config `{}`)",
            config.unwrap_or("default")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "{}").unwrap();
        }
        dir
    }

    fn names(dir: &Path, files: Vec<PathBuf>) -> Vec<String> {
        files
            .iter()
            .map(|p| {
                p.strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/")
            })
            .collect()
    }

    #[test]
    fn hub_layouts_resolve_per_config_and_split() {
        let d = layout(&[
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "everyday/train-00000-of-00001.parquet",
            "everyday/test-00000-of-00001.parquet",
        ]);
        let p = d.path();
        assert_eq!(
            names(p, dataset_files(p, None, "train").unwrap()),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            names(p, dataset_files(p, Some("everyday"), "test").unwrap()),
            ["everyday/test-00000-of-00001.parquet"]
        );
        let err = dataset_files(p, Some("nope"), "train")
            .unwrap_err()
            .to_string();
        assert!(err.contains("configs here: data, everyday"), "{err}");
        assert!(dataset_files(p, None, "validation").is_err());
    }

    #[test]
    fn converted_parquet_and_plain_folders() {
        let d = layout(&[
            "default/train/0000.parquet",
            "default/train/0001.parquet",
            "default/test/0000.parquet",
        ]);
        let p = d.path();
        assert_eq!(
            names(p, dataset_files(p, Some("default"), "train").unwrap()),
            ["default/train/0000.parquet", "default/train/0001.parquet"]
        );
        let plain = layout(&["a.jsonl", "b.csv", "notes.txt"]);
        assert_eq!(
            names(
                plain.path(),
                dataset_files(plain.path(), None, "train").unwrap()
            ),
            ["a.jsonl", "b.csv"]
        );
        let splits = layout(&["train.jsonl", "validation.jsonl"]);
        assert_eq!(
            names(
                splits.path(),
                dataset_files(splits.path(), None, "validation").unwrap()
            ),
            ["validation.jsonl"]
        );
    }
}
