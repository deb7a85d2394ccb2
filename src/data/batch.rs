//! Batching tokenized examples as TRL's `DataCollatorForLanguageModeling`: right padding (padding
//! is masked by position, never by token id, since the pad token may be EOS), or, for packed
//! examples, padding-free: the batch becomes one row of concatenated documents whose positions
//! restart at each document and whose attention never crosses one.

use candle_core::{Device, Tensor};

use super::tokenize::Example;
use crate::error::{Error, Result};

/// A padded batch of examples.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, right-padded with the pad id: u32 `[batch, seq]`.
    pub input_ids: Tensor,
    /// 1 where token t is a loss target, 0 for context and padding: f32 `[batch, seq]`.
    /// Targets are unshifted (TRL's labels): the logits at t - 1 predict token t.
    pub loss_mask: Tensor,
    /// 1 for real tokens, 0 for padding: f32 `[batch, seq]`.
    pub attention_mask: Tensor,
    /// The number of loss targets the shifted loss sees: targets at positions 1.. of each row, as
    /// transformers' `Trainer` counts `labels[..., 1:] != -100` for `num_items_in_batch`.
    pub num_loss_tokens: usize,
    /// The number of real (non-padding) tokens, TRL's `num_tokens` metric (`attention_mask.sum()`).
    pub num_tokens: usize,
    /// RoPE positions: one row shared by all rows, or one per row (restarting per document).
    pub positions: Vec<Vec<u32>>,
    /// Document id of each token per row, for packed batches (attention stays within a document).
    pub documents: Option<Vec<Vec<u32>>>,
}

/// Pads `examples` on the right to the longest one with `pad_id` and builds the masks.
///
/// input_ids: u32 `[batch, seq]`; loss_mask, attention_mask: f32 `[batch, seq]`, on `device`.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::Config("cannot collate an empty batch".to_string()));
    }
    for (index, example) in examples.iter().enumerate() {
        if example.loss_mask.len() != example.input_ids.len() {
            return Err(Error::Config(format!(
                "example {index} of the batch has {} ids but a loss mask of length {}",
                example.input_ids.len(),
                example.loss_mask.len()
            )));
        }
    }
    if examples.iter().any(|e| !e.seq_lengths.is_empty()) {
        return collate_padding_free(examples, device);
    }
    let seq_len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    if seq_len == 0 {
        return Err(Error::Config(
            "cannot collate a batch of empty examples".to_string(),
        ));
    }
    let batch_size = examples.len();
    let mut input_ids = vec![pad_id; batch_size * seq_len];
    let mut loss_mask = vec![0f32; batch_size * seq_len];
    let mut attention_mask = vec![0f32; batch_size * seq_len];
    let mut num_loss_tokens = 0;
    let mut num_tokens = 0;
    for (row, example) in examples.iter().enumerate() {
        let offset = row * seq_len;
        let len = example.len();
        input_ids[offset..offset + len].copy_from_slice(&example.input_ids);
        for (position, &bit) in example.loss_mask.iter().enumerate() {
            loss_mask[offset + position] = f32::from(bit);
        }
        attention_mask[offset..offset + len].fill(1.0);
        num_loss_tokens += example.loss_targets();
        num_tokens += len;
    }
    let shape = (batch_size, seq_len);
    Ok(Batch {
        input_ids: Tensor::from_vec(input_ids, shape, device)?,
        loss_mask: Tensor::from_vec(loss_mask, shape, device)?,
        attention_mask: Tensor::from_vec(attention_mask, shape, device)?,
        num_loss_tokens,
        num_tokens,
        positions: vec![(0..seq_len as u32).collect()],
        documents: None,
    })
}

/// Padding-free batch of packed examples: all documents of all examples in one row `[1, n]`,
/// positions restarting at 0 per document, a document id per token, and no loss on the first
/// token of a document (it is never predicted from the previous document's last token).
fn collate_padding_free(examples: &[&Example], device: &Device) -> Result<Batch> {
    let mut input_ids = Vec::new();
    let mut loss_mask = Vec::new();
    let mut positions = Vec::new();
    let mut documents = Vec::new();
    let mut document = 0u32;
    for example in examples {
        let mut start = 0;
        for len in example.documents() {
            input_ids.extend_from_slice(&example.input_ids[start..start + len]);
            for i in 0..len {
                let bit = example.loss_mask[start + i];
                loss_mask.push(if i == 0 { 0.0 } else { f32::from(bit) });
                positions.push(i as u32);
                documents.push(document);
            }
            document += 1;
            start += len;
        }
    }
    let n = input_ids.len();
    let num_loss_tokens = examples.iter().map(|e| e.loss_targets()).sum();
    Ok(Batch {
        input_ids: Tensor::from_vec(input_ids, (1, n), device)?,
        loss_mask: Tensor::from_vec(loss_mask, (1, n), device)?,
        attention_mask: Tensor::ones((1, n), candle_core::DType::F32, device)?,
        num_loss_tokens,
        num_tokens: n,
        positions: vec![positions],
        documents: Some(vec![documents]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(input_ids: Vec<u32>, loss_mask: Vec<u8>) -> Example {
        Example::new(input_ids, loss_mask)
    }

    #[test]
    fn pads_right_and_masks_padding_by_position_when_pad_is_eos() {
        let eos = 2;
        // Both rows end with a real EOS, which must stay a target even though pad == eos.
        let long = example(vec![5, 6, 7, eos], vec![0, 1, 1, 1]);
        let short = example(vec![8, eos], vec![1, 1]);
        let batch = collate(&[&long, &short], eos, &Device::Cpu).expect("collate");
        assert_eq!(batch.input_ids.dims(), &[2, 4]);
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().expect("ids"),
            vec![vec![5, 6, 7, eos], vec![8, eos, eos, eos]]
        );
        assert_eq!(
            batch.loss_mask.to_vec2::<f32>().expect("loss"),
            vec![vec![0., 1., 1., 1.], vec![1., 1., 0., 0.]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<f32>().expect("attention"),
            vec![vec![1., 1., 1., 1.], vec![1., 1., 0., 0.]]
        );
        assert_eq!(batch.num_tokens, 6);
        // Position 0 is never predicted: 3 targets in row 0, 1 in row 1.
        assert_eq!(batch.num_loss_tokens, 4);
    }

    #[test]
    fn packed_examples_become_one_padding_free_row() {
        let packed = Example {
            input_ids: vec![5, 6, 7, 8, 9],
            loss_mask: vec![1, 1, 1, 0, 1],
            seq_lengths: vec![3, 2],
        };
        let single = example(vec![4, 3], vec![1, 1]);
        let batch = collate(&[&packed, &single], 0, &Device::Cpu).expect("collate");
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().expect("ids"),
            vec![vec![5, 6, 7, 8, 9, 4, 3]]
        );
        assert_eq!(batch.positions, vec![vec![0, 1, 2, 0, 1, 0, 1]]);
        assert_eq!(batch.documents, Some(vec![vec![0, 0, 0, 1, 1, 2, 2]]));
        assert_eq!(
            batch.loss_mask.to_vec2::<f32>().expect("loss"),
            vec![vec![0., 1., 1., 0., 1., 0., 1.]]
        );
        assert_eq!(batch.num_loss_tokens, 2 + 1 + 1);
        assert_eq!(batch.num_tokens, 7);
    }

    #[test]
    fn empty_batches_are_rejected() {
        assert!(collate(&[], 0, &Device::Cpu).is_err());
        let empty = example(vec![], vec![]);
        assert!(collate(&[&empty], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn mismatched_mask_is_rejected() {
        let bad = example(vec![1, 2], vec![1]);
        assert!(collate(&[&bad], 0, &Device::Cpu).is_err());
    }
}
