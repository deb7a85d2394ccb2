//! Reading a model's safetensors weights: one `model.safetensors` or a sharded set listed by
//! `model.safetensors.index.json`. Only the headers are read up front; each tensor is read from
//! its file on demand and checked for shape, so loading never holds a second copy of the model
//! (memory-mapped files would keep every touched page resident next to the loaded tensors).

use crate::quant::gguf::GgufFile;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// The weight files of one model folder, or one GGUF file.
pub struct Weights {
    entries: HashMap<String, Entry>,
    names: BTreeSet<String>,
    dir: PathBuf,
    gguf: Option<GgufFile>,
    /// Random weights made where they are asked for (benchmarks: no files).
    random: Option<RandomWeights>,
}

/// How [`Weights::random`] makes tensors.
#[derive(Debug, Clone)]
struct RandomWeights {
    /// Where the values are drawn (a GPU draws a model's worth in moments).
    device: Device,
    std: f64,
}

fn parse_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

/// A JSON array of sizes (a tensor shape) as numbers; empty when it is not one.
pub(crate) fn json_dims(value: &serde_json::Value) -> Vec<usize> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the header of one safetensors file: every tensor's dtype, shape and byte range.
fn read_header(path: &Path) -> Result<Vec<(String, Entry)>> {
    let bad = |message: String| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message,
    };
    // Length, names and byte ranges checked against the file.
    let (header, base) = crate::io::safetensors_header(path)?;
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = info["dtype"].as_str().unwrap_or_default();
        let dtype = parse_dtype(dtype_name).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has unsupported dtype {dtype_name}"
            ))
        })?;
        let shape = json_dims(&info["shape"]);
        let offsets: Vec<u64> = info["data_offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let [start, end] = offsets[..] else {
            return Err(bad(format!("tensor `{name}` has no data_offsets")));
        };
        // Checked: a hostile shape must not overflow into a plausible size.
        let expected = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
        if expected != Some((end - start) as usize) {
            return Err(bad(format!(
                "tensor `{name}`: {} bytes for shape {shape:?}",
                end - start
            )));
        }
        out.push((
            name,
            Entry {
                file: path.to_path_buf(),
                dtype,
                shape,
                start: base + start,
                end: base + end,
            },
        ));
    }
    Ok(out)
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
    /// Reads the headers of the weight files of the model folder `dir`.
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
        let mut entries = HashMap::new();
        for f in &files {
            entries.extend(read_header(f)?);
        }
        let names = entries.keys().cloned().collect();
        Ok(Weights {
            entries,
            names,
            dir: dir.to_path_buf(),
            gguf: None,
            random: None,
        })
    }

    /// Weights of any shape asked for, drawn when asked: normal with standard deviation `std`
    /// (transformers' `initializer_range`, 0.02) on `draw_on`, norms one and biases zero. For
    /// benchmarks of models of any size without writing their files; holds nothing itself.
    pub fn random(std: f64, draw_on: &Device) -> Self {
        Weights {
            entries: HashMap::new(),
            names: BTreeSet::new(),
            dir: PathBuf::from("<random weights>"),
            gguf: None,
            random: Some(RandomWeights {
                device: draw_on.clone(),
                std,
            }),
        }
    }

    /// The tensors of a GGUF file, under their Hugging Face names.
    pub fn from_gguf(gguf: GgufFile) -> Self {
        Weights {
            entries: HashMap::new(),
            names: gguf.names().clone(),
            dir: gguf.path().to_path_buf(),
            gguf: Some(gguf),
            random: None,
        }
    }

    /// Also answers to the module paths of names stored under other prefixes (`(stored,
    /// module)` pairs, [`crate::model::ModelConfig::name_aliases`]): a multimodal wrapper's text
    /// model, stored as `language_model.model.*`, is read as `model.language_model.*`.
    pub fn with_aliases(mut self, aliases: &[(&str, &str)]) -> Self {
        let renamed: Vec<(String, String)> = self
            .names
            .iter()
            .filter_map(|name| {
                aliases.iter().find_map(|(stored, module)| {
                    let rest = name.strip_prefix(stored)?;
                    Some((name.clone(), format!("{module}{rest}")))
                })
            })
            .collect();
        for (stored, module) in renamed {
            if let Some(entry) = self.entries.get(&stored).cloned() {
                self.entries.insert(module.clone(), entry);
            }
            self.names.insert(module);
        }
        self
    }

    /// The GGUF file behind these weights, if any.
    pub fn gguf(&self) -> Option<&GgufFile> {
        self.gguf.as_ref()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    /// Loads `name` as stored (its own dtype and shape; GGUF tensors dequantized to f32) on
    /// `device`.
    pub fn get_raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        if let Some(gguf) = &self.gguf {
            return Ok(gguf.tensor(name, device)?.dequantize(device)?);
        }
        let entry = self.entries.get(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            message: format!("missing from the weights in {}", self.dir.display()),
        })?;
        let mut file = std::fs::File::open(&entry.file).map_err(|e| Error::io(&entry.file, e))?;
        file.seek(SeekFrom::Start(entry.start))
            .map_err(|e| Error::io(&entry.file, e))?;
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        file.read_exact(&mut bytes)
            .map_err(|e| Error::io(&entry.file, e))?;
        Ok(Tensor::from_raw_buffer(
            &bytes,
            entry.dtype,
            &entry.shape,
            device,
        )?)
    }

    /// Loads `name` in its stored dtype on `device` and checks its shape.
    pub fn get_stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        if let Some(random) = &self.random {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, DType::F32, &random.device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, &random.device)?
            } else {
                Tensor::randn(0f32, random.std as f32, shape, &random.device)?
            };
            return Ok(t.to_device(device)?);
        }
        let t = self.get_raw(name, device)?;
        if t.dims() != shape {
            return Err(Error::Tensor {
                name: name.into(),
                message: format!("has shape {:?}, the config implies {:?}", t.dims(), shape),
            });
        }
        Ok(t)
    }

    /// Loads `name`, checks its shape, and converts it to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        Ok(self.get_stored(name, shape, device)?.to_dtype(dtype)?)
    }
}
