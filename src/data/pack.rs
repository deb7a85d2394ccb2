//! Packing (TRL's `packing=True`, best-fit-decreasing strategy): tokenized examples are placed
//! into rows of at most `max_length` tokens, longest first, each into the fullest row it still
//! fits; a row remembers its documents' lengths so attention and positions restart per document.

use super::tokenize::Example;

/// Rows TRL packs together at most: `pack_dataset` is a batched `datasets.map` (1000 rows per batch),
/// so rows of different batches never share a packed row.
pub const TRL_PACK_BATCH: usize = 1000;

/// Packs a dataset as TRL does: [`pack_bfd`] over consecutive batches of [`TRL_PACK_BATCH`] rows.
pub fn pack_dataset(examples: &[Example], max_length: usize) -> Vec<Example> {
    examples
        .chunks(TRL_PACK_BATCH)
        .flat_map(|batch| pack_bfd(batch, max_length))
        .collect()
}

/// Packs `examples` into rows of at most `max_length` tokens (best fit decreasing, see
/// [`bfd_bins`]). Examples longer than `max_length` are truncated to it first (the rest is dropped,
/// as TRL's `bfd`).
pub fn pack_bfd(examples: &[Example], max_length: usize) -> Vec<Example> {
    let max_length = max_length.max(1);
    let lengths: Vec<usize> = examples.iter().map(|e| e.len().min(max_length)).collect();
    bfd_bins(&lengths, max_length)
        .into_iter()
        .map(|members| {
            let mut row = Example::new(Vec::new(), Vec::new());
            for i in members {
                let e = &examples[i];
                let len = lengths[i];
                row.input_ids.extend_from_slice(&e.input_ids[..len]);
                row.loss_mask.extend_from_slice(&e.loss_mask[..len]);
                row.seq_lengths.push(len);
            }
            row
        })
        .collect()
}

/// Best-fit-decreasing bins of capacity `max_length` for items of the given `lengths` (each at
/// most `max_length`; empty items are left out): longest first, equal lengths in order, each item
/// into the bin with the least space left that still fits it, the earliest such bin on ties. Bins
/// come out in the order they were opened, members in the order they were placed.
pub fn bfd_bins(lengths: &[usize], max_length: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] > 0).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    // (space left, members) per bin.
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let len = lengths[i];
        let best = bins
            .iter()
            .enumerate()
            .filter(|(_, (left, _))| *left >= len)
            .min_by_key(|(r, (left, _))| (*left, *r))
            .map(|(r, _)| r);
        match best {
            Some(r) => {
                bins[r].0 -= len;
                bins[r].1.push(i);
            }
            None => bins.push((max_length - len, vec![i])),
        }
    }
    bins.into_iter().map(|(_, members)| members).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, tag: u32) -> Example {
        Example::new(vec![tag; len], vec![1; len])
    }

    #[test]
    fn fills_the_fullest_row_that_fits_longest_first() {
        let examples = [ex(3, 0), ex(6, 1), ex(4, 2), ex(2, 3), ex(5, 4), ex(12, 5)];
        let rows = pack_bfd(&examples, 10);
        let lengths: Vec<Vec<usize>> = rows.iter().map(|r| r.seq_lengths.clone()).collect();
        // 12 -> truncated to 10 (row 0); 6 -> row 1; 5 -> row 2; 4 -> row 1 (fits exactly);
        // 3 -> row 2 (5 left, the fullest that fits); 2 -> row 2.
        assert_eq!(lengths, vec![vec![10], vec![6, 4], vec![5, 3, 2]]);
        assert_eq!(rows[1].input_ids, [vec![1; 6], vec![2; 4]].concat());
        assert!(rows.iter().all(|r| r.len() <= 10));
        let total: usize = rows.iter().map(|r| r.len()).sum();
        assert_eq!(total, 10 + 6 + 4 + 5 + 3 + 2);
    }
}
