//! Vocabulary rows: growing the embedding (and an untied LM head) for added tokens, as
//! transformers' `resize_token_embeddings`, and training only chosen rows, as PEFT's
//! `trainable_token_indices` (saved as `<module>.token_adapter.trainable_tokens_delta`, which holds
//! the rows themselves, not a difference).

use candle_core::{DType, Tensor, Var};

use super::param::Param;
use super::CausalLm;
use crate::{Error, Result};

/// Rows of the embedding (and of an untied LM head) that train while the rest stays frozen.
#[derive(Debug, Clone)]
pub struct TrainableTokens {
    /// The vocabulary ids whose rows train, ascending.
    pub indices: Vec<u32>,
    /// Their embedding rows `[n, hidden]`.
    pub embed: Var,
    /// Their LM-head rows `[n, hidden]`; `None` when the head is tied to the embedding.
    pub head: Option<Var>,
}

/// PEFT's `modules_to_save` over the embedding and the LM head: trained full copies used in place
/// of the base's, which stay as they are (PEFT's `ModulesToSaveWrapper` keeps the original beside
/// the copy). A copy of a tied head trains alone: the adapted model's head and embedding differ.
#[derive(Debug, Clone, Default)]
pub struct SavedModules {
    /// The embedding's copy `[vocab, hidden]`.
    pub embed: Option<Var>,
    /// The LM head's copy `[vocab, hidden]`.
    pub head: Option<Var>,
}

impl SavedModules {
    /// Whether neither module has a copy.
    pub fn is_empty(&self) -> bool {
        self.embed.is_none() && self.head.is_none()
    }
}

/// The names `modules_to_save` may give (PEFT matches them as module-path suffixes).
pub const SAVABLE_MODULES: [&str; 2] = ["embed_tokens", "lm_head"];

/// PEFT's module name of the LM head (the embedding's is [`crate::model::ModelConfig::embed_module`]).
pub const HEAD_MODULE: &str = "lm_head";

/// PEFT's tensor name of a module's trainable rows (without the `base_model.model.` prefix).
pub fn rows_name(module: &str) -> String {
    format!("{module}.token_adapter.trainable_tokens_delta")
}

/// `matrix` with rows `indices` replaced by `rows` (differentiable in `rows`).
fn with_rows(matrix: &Tensor, indices: &[u32], rows: &Tensor) -> candle_core::Result<Tensor> {
    let (vocab, _) = matrix.dims2()?;
    let mut keep = vec![1f32; vocab];
    for &i in indices {
        keep[i as usize] = 0.0;
    }
    let keep = Tensor::from_vec(keep, (vocab, 1), matrix.device())?.to_dtype(matrix.dtype())?;
    let ids = Tensor::new(indices, matrix.device())?;
    let placed = matrix.zeros_like()?.index_add(&ids, rows, 0)?;
    matrix.broadcast_mul(&keep)? + placed
}

/// `matrix` grown to `vocab` rows, the new rows set to the mean of the old ones (transformers'
/// `mean_resizing` draws them from a normal distribution around that mean with a tiny covariance;
/// the mean itself keeps runs reproducible).
fn grow(matrix: &Tensor, vocab: usize) -> candle_core::Result<Tensor> {
    let (old, hidden) = matrix.dims2()?;
    if vocab <= old {
        return matrix.narrow(0, 0, vocab);
    }
    let mean = matrix
        .to_dtype(DType::F32)?
        .mean_keepdim(0)?
        .to_dtype(matrix.dtype())?;
    let extra = mean.broadcast_as((vocab - old, hidden))?.contiguous()?;
    Tensor::cat(&[matrix, &extra], 0)
}

/// `embed_tokens` or `lm_head` for a `modules_to_save` entry naming one of them (as a suffix of
/// its path: `model.embed_tokens` too).
pub fn short_module(name: &str) -> Option<&'static str> {
    SAVABLE_MODULES
        .into_iter()
        .find(|m| name == *m || name.ends_with(&format!(".{m}")))
}

/// The error for a `modules_to_save` entry peft-sft cannot train.
pub fn unsavable(name: &str) -> Error {
    Error::Config(format!(
        "modules_to_save `{name}`: peft-sft trains full copies of the embedding and the LM head only (embed_tokens, lm_head); adapt linear layers with target_modules"
    ))
}

fn check_indices(indices: &[u32], vocab: usize) -> Result<()> {
    if let Some(&bad) = indices.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::Config(format!(
            "token id {bad} is outside the vocabulary of {vocab} rows"
        )));
    }
    if indices.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Config(
            "trainable token indices must be distinct and ascending".into(),
        ));
    }
    Ok(())
}

impl CausalLm {
    /// Grows (or shrinks) the embedding and the untied LM head to `vocab` rows, new rows at the
    /// mean of the old, and sets `config.vocab_size`. Trainable matrices stay trainable.
    pub fn resize_token_embeddings(&mut self, vocab: usize) -> Result<()> {
        if vocab == self.config.vocab_size && vocab == self.embed_tokens.tensor().dim(0)? {
            return Ok(());
        }
        let resize = |p: &Param| -> Result<Param> {
            Ok(Param::new(grow(p.tensor(), vocab)?, p.var().is_some())?)
        };
        self.embed_tokens = resize(&self.embed_tokens)?;
        if let Some(head) = &self.lm_head {
            self.lm_head = Some(resize(head)?);
        }
        self.config.vocab_size = vocab;
        Ok(())
    }

    /// Makes rows `indices` of the embedding and of an untied LM head trainable (their current
    /// values are the start), leaving the matrices frozen.
    pub fn train_token_rows(&mut self, indices: Vec<u32>) -> Result<()> {
        check_indices(&indices, self.config.vocab_size)?;
        let ids = Tensor::new(indices.as_slice(), &self.device)?;
        let rows = |m: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&m.index_select(&ids, 0)?)?) };
        let embed = rows(self.embed_tokens.tensor())?;
        let head = self
            .lm_head
            .as_ref()
            .map(|h| rows(h.tensor()))
            .transpose()?;
        self.trainable_tokens = Some(TrainableTokens {
            indices,
            embed,
            head,
        });
        Ok(())
    }

    /// Writes `embed` (and, for an untied head, `head`) into rows `indices` of the frozen
    /// matrices, growing them first when an index is past the vocabulary (a loaded adapter).
    pub fn set_token_rows(
        &mut self,
        indices: &[u32],
        embed: &Tensor,
        head: Option<&Tensor>,
    ) -> Result<()> {
        let needed = indices.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        if needed > self.config.vocab_size {
            self.resize_token_embeddings(needed)?;
        }
        check_indices(indices, self.config.vocab_size)?;
        let hidden = self.config.hidden_size;
        for (what, t) in [("embedding", Some(embed)), ("LM head", head)] {
            if let Some(t) = t {
                if t.dims() != [indices.len(), hidden] {
                    return Err(Error::Config(format!(
                        "{what} rows have shape {:?}, expected [{}, {hidden}]",
                        t.dims(),
                        indices.len()
                    )));
                }
            }
        }
        let set = |p: &Param, rows: &Tensor| -> Result<Param> {
            let rows = rows.to_dtype(p.tensor().dtype())?;
            Ok(Param::new(
                with_rows(p.tensor(), indices, &rows)?,
                p.var().is_some(),
            )?)
        };
        self.embed_tokens = set(&self.embed_tokens, embed)?;
        if let (Some(h), Some(rows)) = (&self.lm_head, head) {
            self.lm_head = Some(set(h, rows)?);
        }
        Ok(())
    }

    /// Makes trained copies of the modules `names` names (`embed_tokens`, `lm_head`, PEFT's
    /// `modules_to_save`), starting from their current weights; the base's stay frozen.
    pub fn train_modules(&mut self, names: &[String]) -> Result<()> {
        for name in names {
            let start = match short_module(name) {
                Some("embed_tokens") => self.embed_tokens.tensor(),
                Some(_) => self.lm_head.as_ref().unwrap_or(&self.embed_tokens).tensor(),
                None => return Err(unsavable(name)),
            };
            // A copy of its own: the base's matrix stays as it is.
            let copy = Var::from_tensor(&start.copy()?)?;
            match short_module(name) {
                Some("embed_tokens") => self.saved_modules.embed = Some(copy),
                _ => self.saved_modules.head = Some(copy),
            }
        }
        Ok(())
    }

    /// Trains the rows of tokens added to the vocabulary (a chat-format setup), as PEFT's
    /// `trainable_token_indices` — unless full copies of the embedding and the LM head train
    /// (`modules_to_save`), which train every row. A copy of only one of them would leave the
    /// other's new rows untrained: refused.
    pub fn train_new_token_rows(&mut self, ids: Vec<u32>) -> Result<()> {
        match (&self.saved_modules.embed, &self.saved_modules.head) {
            (None, None) => self.train_token_rows(ids),
            (Some(_), Some(_)) => Ok(()),
            _ => Err(Error::Config(format!(
                "the chat-format setup adds {} tokens, whose embedding and LM-head rows must both train: give modules_to_save both embed_tokens and lm_head, or neither",
                ids.len()
            ))),
        }
    }

    /// The trained copies as PEFT saves them (`model.embed_tokens.weight`, `lm_head.weight`).
    pub fn saved_module_tensors(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if let Some(e) = &self.saved_modules.embed {
            out.push((format!("{}.weight", self.config.embed_module()), e.clone()));
        }
        if let Some(h) = &self.saved_modules.head {
            out.push((format!("{HEAD_MODULE}.weight"), h.clone()));
        }
        out
    }

    /// Embeddings of `ids` (flat), with the trainable rows in place of the frozen ones.
    pub(crate) fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let table = match &self.saved_modules.embed {
            Some(copy) => copy.as_tensor(),
            None => self.embed_tokens.tensor(),
        };
        let x = table.embedding(ids)?;
        let Some(tt) = &self.trainable_tokens else {
            return Ok(x);
        };
        let host = ids.to_vec1::<u32>()?;
        let mut local = vec![0u32; host.len()];
        let mut hit = vec![0f32; host.len()];
        for (k, id) in host.iter().enumerate() {
            if let Ok(j) = tt.indices.binary_search(id) {
                local[k] = j as u32;
                hit[k] = 1.0;
            }
        }
        if !hit.contains(&1.0) {
            return Ok(x);
        }
        let n = host.len();
        let local = Tensor::from_vec(local, n, ids.device())?;
        let hit = Tensor::from_vec(hit, (n, 1), ids.device())?.to_dtype(x.dtype())?;
        let rows = tt.embed.as_tensor().embedding(&local)?;
        x.broadcast_mul(&(1.0 - &hit)?)? + rows.broadcast_mul(&hit)?
    }

    /// The LM head's weight (the embedding when tied), with the trainable rows in place.
    pub fn head_weight(&self) -> candle_core::Result<Tensor> {
        if let Some(copy) = &self.saved_modules.head {
            return Ok(copy.as_tensor().clone());
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens).tensor();
        match &self.trainable_tokens {
            None => Ok(head.clone()),
            Some(tt) => {
                let rows = tt.head.as_ref().unwrap_or(&tt.embed);
                with_rows(head, &tt.indices, rows.as_tensor())
            }
        }
    }

    /// The trainable rows as PEFT names them (`model.embed_tokens.token_adapter.
    /// trainable_tokens_delta`, and `lm_head....` for an untied head).
    pub fn trainable_token_tensors(&self) -> Vec<(String, Var)> {
        let Some(tt) = &self.trainable_tokens else {
            return Vec::new();
        };
        let mut out = vec![(rows_name(&self.config.embed_module()), tt.embed.clone())];
        if let Some(head) = &tt.head {
            out.push((rows_name(HEAD_MODULE), head.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_replace_and_grow() {
        let m = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 2))
            .unwrap();
        let grown = grow(&m, 5).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(grown[3], vec![2.0, 3.0]);
        assert_eq!(grown[4], vec![2.0, 3.0]);
        let rows = Tensor::new(&[[9f32, 9.0]], &Device::Cpu).unwrap();
        let replaced = with_rows(&m, &[1], &rows)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            replaced,
            vec![vec![0.0, 1.0], vec![9.0, 9.0], vec![4.0, 5.0]]
        );
        assert!(check_indices(&[1, 1], 3).is_err());
        assert!(check_indices(&[3], 3).is_err());
    }
}
