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

/// One entry of a dataset card's `configs:` list (the Hub's manual configuration).
#[derive(Debug, serde::Deserialize)]
struct CardConfig {
    config_name: String,
    #[serde(default)]
    default: bool,
    data_files: serde_yaml::Value,
}

/// The `configs:` of the dataset card (`README.md` YAML front matter), if it has any.
fn card_configs(dir: &Path) -> Result<Option<Vec<CardConfig>>> {
    let path = dir.join("README.md");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let Some(rest) = text.strip_prefix("---") else {
        return Ok(None);
    };
    let Some(end) = rest.find("\n---") else {
        return Ok(None);
    };
    #[derive(serde::Deserialize)]
    struct Card {
        configs: Option<Vec<CardConfig>>,
    }
    let card: Card = serde_yaml::from_str(&rest[..end]).map_err(|e| Error::Parse {
        path: path.clone(),
        line: e.location().map(|l| l.line() + 1),
        message: format!("invalid dataset card front matter: {e}"),
    })?;
    Ok(card.configs)
}

/// A config's `data_files` as (split, path patterns): a pattern or list of patterns is the train
/// split; a list of `{split, path}` or a map split → pattern(s) names splits.
fn card_splits(data_files: &serde_yaml::Value) -> Vec<(String, Vec<String>)> {
    use serde_yaml::Value as Y;
    let patterns = |v: &Y| -> Vec<String> {
        match v {
            Y::String(s) => vec![s.clone()],
            Y::Sequence(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    match data_files {
        Y::String(_) => vec![("train".into(), patterns(data_files))],
        Y::Sequence(items) if items.iter().all(Y::is_string) => {
            vec![("train".into(), patterns(data_files))]
        }
        Y::Sequence(items) => items
            .iter()
            .filter_map(|i| {
                let split = i.get("split").and_then(Y::as_str).unwrap_or("train");
                Some((split.to_string(), patterns(i.get("path")?)))
            })
            .collect(),
        Y::Mapping(map) => map
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), patterns(v))))
            .collect(),
        _ => Vec::new(),
    }
}

/// The files the dataset card's `configs:` give `config` (its `default: true` one, `default`, or
/// the only one when unnamed) and `split`, matched as the Hub matches `data_files` globs.
fn card_files(
    dir: &Path,
    configs: &[CardConfig],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>> {
    let names = || {
        configs
            .iter()
            .map(|c| c.config_name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match config {
        Some(name) => configs.iter().find(|c| c.config_name == name),
        None => configs
            .iter()
            .find(|c| c.default)
            .or_else(|| configs.iter().find(|c| c.config_name == "default"))
            .or_else(|| configs.first().filter(|_| configs.len() == 1)),
    }
    .ok_or_else(|| Error::MissingFile {
        path: dir.join("README.md"),
        hint: format!(
            "the dataset card has no config `{}`; its configs: {} (pass --dataset-config)",
            config.unwrap_or("default"),
            names()
        ),
    })?;
    let splits = card_splits(&chosen.data_files);
    let Some((_, patterns)) = splits.iter().find(|(s, _)| s == split) else {
        return Err(Error::MissingFile {
            path: dir.join("README.md"),
            hint: format!(
                "config `{}` of the dataset card has no split `{split}`; its splits: {}",
                chosen.config_name,
                splits
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    };
    let mut builder = globset::GlobSetBuilder::new();
    for p in patterns {
        let glob = globset::GlobBuilder::new(p.trim_start_matches("./"))
            .literal_separator(true)
            .build()
            .map_err(|e| Error::Parse {
                path: dir.join("README.md"),
                line: None,
                message: format!("data_files pattern `{p}`: {e}"),
            })?;
        builder.add(glob);
    }
    let set = builder.build().map_err(|e| Error::Parse {
        path: dir.join("README.md"),
        line: None,
        message: e.to_string(),
    })?;
    let files: Vec<PathBuf> = data_files(dir)?
        .into_iter()
        .filter(|p| {
            p.strip_prefix(dir)
                .is_ok_and(|r| set.is_match(r.to_string_lossy().replace('\\', "/")))
        })
        .collect();
    if files.is_empty() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            hint: format!(
                "no file matches {patterns:?} (config `{}`, split `{split}` of the dataset card)",
                chosen.config_name
            ),
        });
    }
    Ok(files)
}

/// The files of `config` and `split` below `dir`. A dataset card (`README.md`) with `configs:`
/// decides, as on the Hub; otherwise the layout does: `config` is a top folder (default: `data/`
/// when there is one, else everything), and when no file names a split at all and `split` is
/// `train`, every file is training data (a folder of plain files).
pub fn dataset_files(dir: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    if let Some(configs) = card_configs(dir)?.filter(|c| !c.is_empty()) {
        return card_files(dir, &configs, config, split);
    }
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

    #[test]
    fn a_dataset_card_with_configs_decides_the_files() {
        let d = layout(&[
            "chats/part-0.jsonl",
            "chats/part-1.jsonl",
            "chats/heldout.jsonl",
            "extra/notes.csv",
            "math/all.parquet",
        ]);
        let p = d.path();
        std::fs::write(
            p.join("README.md"),
            "---\nlicense: mit\nconfigs:\n- config_name: chats\n  default: true\n  data_files:\n  - split: train\n    path: chats/part-*.jsonl\n  - split: test\n    path: [chats/heldout.jsonl]\n- config_name: math\n  data_files: math/*.parquet\n- config_name: notes\n  data_files:\n    validation: extra/*.csv\n---\n# A dataset\n",
        )
        .unwrap();
        assert_eq!(
            names(p, dataset_files(p, None, "train").unwrap()),
            ["chats/part-0.jsonl", "chats/part-1.jsonl"]
        );
        assert_eq!(
            names(p, dataset_files(p, Some("chats"), "test").unwrap()),
            ["chats/heldout.jsonl"]
        );
        assert_eq!(
            names(p, dataset_files(p, Some("math"), "train").unwrap()),
            ["math/all.parquet"]
        );
        assert_eq!(
            names(p, dataset_files(p, Some("notes"), "validation").unwrap()),
            ["extra/notes.csv"]
        );
        let err = dataset_files(p, Some("poems"), "train")
            .unwrap_err()
            .to_string();
        assert!(err.contains("configs: chats, math, notes"), "{err}");
        let err = dataset_files(p, Some("math"), "test")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no split `test`") && err.contains("splits: train"),
            "{err}"
        );
        std::fs::write(p.join("README.md"), "---\nconfigs: [\n---\n").unwrap();
        let err = dataset_files(p, None, "train").unwrap_err().to_string();
        assert!(
            err.contains("README.md") && err.contains("front matter"),
            "{err}"
        );
    }
}
