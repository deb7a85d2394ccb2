//! Reading a model's safetensors weights: one `model.safetensors` or a sharded set listed by
//! `model.safetensors.index.json`, memory-mapped, each tensor checked for shape on load.

use crate::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The weight files of one model folder.
pub struct Weights {
    files: MmapedSafetensors,
    names: BTreeSet<String>,
    dir: PathBuf,
}

/// The weight files of a model folder: the index's shards, or the single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Parse {
            path: index.clone(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Parse {
                path: index.clone(),
                line: None,
                message: "no `weight_map` object".into(),
            })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::MissingFile {
        path: single,
        hint: "a model folder needs model.safetensors or model.safetensors.index.json (PyTorch .bin weights are not read: convert them with transformers' save_pretrained(safe_serialization=True))".into(),
    })
}

impl Weights {
    /// Memory-maps the weights of the model folder `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        for f in &files {
            if !f.exists() {
                return Err(Error::MissingFile {
                    path: f.clone(),
                    hint: "the shard index names this file; download the complete model".into(),
                });
            }
        }
        // SAFETY: the files are mapped read-only; peft-sft never writes to a model folder it reads.
        let files = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::Parse {
            path: dir.to_path_buf(),
            line: None,
            message: format!("cannot read safetensors: {e}"),
        })?;
        let names = files.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Weights {
            files,
            names,
            dir: dir.to_path_buf(),
        })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    /// Loads `name`, checks its shape, and converts it to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(Error::Tensor {
                name: name.into(),
                message: format!("missing from the weights in {}", self.dir.display()),
            });
        }
        let t = self.files.load(name, device)?;
        if t.dims() != shape {
            return Err(Error::Tensor {
                name: name.into(),
                message: format!("has shape {:?}, the config implies {:?}", t.dims(), shape),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }
}
