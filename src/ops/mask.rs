//! Which keys each query may attend to ([`AttentionMask`]): the rules (causal, sliding window,
//! packed documents) that every attention kernel — the candle-op ones in `attention.rs`, the CPU
//! flash kernel in `flash.rs` — asks for the blocks or tiles it computes.

use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// Which keys each query may attend to: causal, an optional sliding window and optional document
/// boundaries (packed rows), kept as those rules — never as a dense `[t, t]` matrix. The kernels
/// ask for the additive bias (0 or -inf) of the query × key blocks they compute.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    t_q: usize,
    offset: usize,
    window: Option<usize>,
    /// Document ids of every key position, one row per batch element (packed rows only).
    documents: Option<Arc<Documents>>,
    dtype: DType,
    device: Device,
}

impl AttentionMask {
    /// Causal mask for `t_q` queries at positions `offset..offset + t_q` over `offset + t_q` keys;
    /// `window` limits each query to the last `window` keys (Mistral's sliding window: key j is
    /// visible from query i when `i - j < window`); `documents` (one id per token and row) keeps
    /// attention inside each packed document.
    pub fn new(
        t_q: usize,
        offset: usize,
        window: Option<usize>,
        documents: Option<&[Vec<u32>]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if let Some(docs) = documents {
            if docs.iter().any(|d| d.len() < offset + t_q) {
                candle_core::bail!("attention mask: a document row is shorter than the keys");
            }
        }
        Ok(AttentionMask {
            t_q,
            offset,
            window,
            documents: documents.map(|d| Arc::new(Documents::new(d))),
            dtype,
            device: device.clone(),
        })
    }

    /// Whether query `i` (absolute position) may see key `j` in batch row `row`.
    pub(super) fn visible(&self, row: usize, i: usize, j: usize) -> bool {
        j <= i
            && self.window.is_none_or(|w| i - j < w)
            && self
                .documents
                .as_ref()
                .is_none_or(|d| d.ids[row][i] == d.ids[row][j])
    }

    /// Position of the first query of this call (keys before it are cached ones).
    pub(super) fn offset(&self) -> usize {
        self.offset
    }

    /// The sliding window, if any.
    pub(super) fn window(&self) -> Option<usize> {
        self.window
    }

    /// Batch rows the document ids cover (None: no documents).
    pub(super) fn document_rows(&self) -> Option<usize> {
        self.documents.as_ref().map(|d| d.ids.len())
    }

    /// Per position of batch row `row`: the first position with the same document id.
    pub(super) fn document_firsts(&self, row: usize) -> Option<&[u32]> {
        self.documents.as_ref().map(|d| d.first[row].as_slice())
    }

    /// Per position of batch row `row`: where its run of equal document ids starts.
    pub(super) fn document_runs(&self, row: usize) -> Option<&[u32]> {
        self.documents.as_ref().map(|d| d.run_start[row].as_slice())
    }

    /// The bias for queries `q0..q1` (indices into this call's queries) and keys `k0..k1`:
    /// `[b or 1, 1, q1 - q0, k1 - k0]` of 0 (visible) and -inf.
    pub(super) fn block(
        &self,
        (q0, q1): (usize, usize),
        (k0, k1): (usize, usize),
    ) -> Result<Tensor> {
        let rows = self.document_rows().unwrap_or(1);
        let mut bias = Vec::with_capacity(rows * (q1 - q0) * (k1 - k0));
        for row in 0..rows {
            for qi in q0..q1 {
                let i = qi + self.offset;
                for j in k0..k1 {
                    bias.push(if self.visible(row, i, j) {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
        }
        Tensor::from_vec(bias, (rows, 1, q1 - q0, k1 - k0), &self.device)?.to_dtype(self.dtype)
    }

    /// The number of keys.
    pub(super) fn t_k(&self) -> usize {
        self.offset + self.t_q
    }

    /// The number of queries.
    pub(super) fn t_q(&self) -> usize {
        self.t_q
    }

    /// Keys `[start, end)` that queries `q_start..q_end` (indices into this call's queries) may see.
    pub(super) fn key_range(&self, q_start: usize, q_end: usize) -> (usize, usize) {
        let first = self.offset + q_start;
        let start = self.window.map_or(0, |w| (first + 1).saturating_sub(w));
        (start, self.offset + q_end)
    }

    /// Queries (indices into this call's queries, `t_q` of them) that may see any key in
    /// `k_start..k_end`.
    pub(super) fn query_range(&self, k_start: usize, k_end: usize, t_q: usize) -> (usize, usize) {
        let start = k_start.saturating_sub(self.offset).min(t_q);
        let end = match self.window {
            Some(w) => (k_end + w - 1).saturating_sub(self.offset).min(t_q),
            None => t_q,
        };
        (start, end.max(start))
    }
}

/// Document ids of packed rows with the two indexes the flash kernel bounds its tiles by.
#[derive(Debug)]
struct Documents {
    /// The id of every position, one row per batch element.
    ids: Vec<Vec<u32>>,
    /// Per position, the first position with the same id.
    first: Vec<Vec<u32>>,
    /// Per position, the start of its run of equal ids.
    run_start: Vec<Vec<u32>>,
}

impl Documents {
    fn new(ids: &[Vec<u32>]) -> Self {
        let first = ids
            .iter()
            .map(|row| {
                let mut seen = std::collections::HashMap::new();
                (0..row.len() as u32)
                    .map(|i| *seen.entry(row[i as usize]).or_insert(i))
                    .collect()
            })
            .collect();
        let run_start = ids
            .iter()
            .map(|row| {
                let mut start = 0u32;
                (0..row.len())
                    .map(|i| {
                        if i > 0 && row[i] != row[i - 1] {
                            start = i as u32;
                        }
                        start
                    })
                    .collect()
            })
            .collect();
        Documents {
            ids: ids.to_vec(),
            first,
            run_start,
        }
    }
}
