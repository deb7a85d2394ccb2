//! Tokenized datasets held column-wise: every example's token ids in one array, every loss mask in
//! another, and each example's start offset — either in memory or memory-mapped from a cache folder,
//! so that a dataset of millions of rows costs five bytes a token of page cache and no heap.
//!
//! [`Examples`] is a view over a store: a selection of its rows (a training/evaluation split, the
//! first N rows) or a packing of them into bins, materialised one [`Example`] at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::pack::{bfd_bins, TRL_PACK_BATCH};
use super::tokenize::Example;
use crate::error::{Error, Result};

/// File names of a stored dataset's columns inside its folder.
const IDS_FILE: &str = "input_ids.u32";
const MASK_FILE: &str = "loss_mask.u8";
const OFFSETS_FILE: &str = "offsets.u64";

/// One column of a store: owned, or a read-only memory map of a little-endian file.
enum Column<T: 'static> {
    Owned(Vec<T>),
    Mapped(memmap2::Mmap, std::marker::PhantomData<T>),
}

/// Plain values a column can hold (no padding, every bit pattern valid).
trait Plain: Copy + Default + 'static {
    /// Appends the value's little-endian bytes.
    fn write_le(self, out: &mut impl Write) -> std::io::Result<()>;
}

impl Plain for u8 {
    fn write_le(self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&[self])
    }
}

impl Plain for u32 {
    fn write_le(self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&self.to_le_bytes())
    }
}

impl Plain for u64 {
    fn write_le(self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&self.to_le_bytes())
    }
}

impl<T: Plain> Column<T> {
    /// Maps `path`; the file must hold a whole number of `T`s (an empty file is an empty column).
    fn map(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Ok(Column::Owned(Vec::new()));
        }
        // SAFETY: the cache files are written once, renamed into place and never modified; a user
        // truncating one while we run is outside what any mmap-based reader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let column = Column::Mapped(map, std::marker::PhantomData);
        // Mappings are page aligned, so only a torn file can fail this.
        if !(len as usize).is_multiple_of(std::mem::size_of::<T>()) || column.try_slice().is_none()
        {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: "the cached column is damaged; delete the cache folder to re-tokenize"
                    .into(),
            });
        }
        Ok(column)
    }

    /// The values, or `None` if a mapping is not aligned for `T`.
    fn try_slice(&self) -> Option<&[T]> {
        match self {
            Column::Owned(v) => Some(v),
            Column::Mapped(map, _) => {
                // SAFETY: `T` is a plain integer type (every bit pattern valid) and the files are
                // little-endian, which `Store` requires of the target (see `cfg` below).
                let (head, body, tail) = unsafe { map.align_to::<T>() };
                (head.is_empty() && tail.is_empty()).then_some(body)
            }
        }
    }

    fn as_slice(&self) -> &[T] {
        self.try_slice().unwrap_or(&[])
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("cached token columns are little-endian files mapped in place");

/// Tokenized documents, column-wise: row `r` is `ids[offsets[r]..offsets[r + 1]]` with its mask.
pub struct TokenStore {
    ids: Column<u32>,
    mask: Column<u8>,
    offsets: Column<u64>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("rows", &self.rows())
            .field("tokens", &self.ids.as_slice().len())
            .field("mapped", &matches!(self.ids, Column::Mapped(..)))
            .finish()
    }
}

impl TokenStore {
    /// Stores `examples` (documents; packing information is not kept) in memory.
    pub fn from_examples(examples: &[Example]) -> Self {
        let mut writer = StoreWriter::in_memory();
        for e in examples {
            writer.push(e).expect("writing to memory cannot fail");
        }
        writer.finish().expect("writing to memory cannot fail")
    }

    /// Maps the columns written by a [`StoreWriter`] into `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let store = TokenStore {
            ids: Column::map(&dir.join(IDS_FILE))?,
            mask: Column::map(&dir.join(MASK_FILE))?,
            offsets: Column::map(&dir.join(OFFSETS_FILE))?,
        };
        let offsets = store.offsets.as_slice();
        let tokens = store.ids.as_slice().len() as u64;
        let consistent = offsets.first() == Some(&0)
            && offsets.last() == Some(&tokens)
            && store.mask.as_slice().len() as u64 == tokens
            && offsets.windows(2).all(|w| w[0] <= w[1]);
        if !consistent {
            return Err(Error::Parse {
                path: dir.to_path_buf(),
                line: None,
                message: "the cached dataset's columns disagree; delete this folder to re-tokenize"
                    .into(),
            });
        }
        Ok(store)
    }

    /// The number of stored rows.
    pub fn rows(&self) -> usize {
        self.offsets.as_slice().len().saturating_sub(1)
    }

    /// Whether the columns are memory-mapped from files (rather than held in memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.ids, Column::Mapped(..))
    }

    /// Row `r`'s token ids and loss mask.
    pub fn row(&self, r: usize) -> (&[u32], &[u8]) {
        let offsets = self.offsets.as_slice();
        let (start, end) = (offsets[r] as usize, offsets[r + 1] as usize);
        (
            &self.ids.as_slice()[start..end],
            &self.mask.as_slice()[start..end],
        )
    }

    /// Row `r`'s length in tokens.
    pub fn row_len(&self, r: usize) -> usize {
        let offsets = self.offsets.as_slice();
        (offsets[r + 1] - offsets[r]) as usize
    }
}

/// Appends tokenized rows to a store, in memory or as column files in a folder.
pub struct StoreWriter {
    sink: Sink,
    offsets: Vec<u64>,
}

enum Sink {
    Memory {
        ids: Vec<u32>,
        mask: Vec<u8>,
    },
    Files {
        dir: PathBuf,
        ids: BufWriter<File>,
        mask: BufWriter<File>,
    },
}

impl StoreWriter {
    /// A writer that keeps the columns in memory.
    pub fn in_memory() -> Self {
        StoreWriter {
            sink: Sink::Memory {
                ids: Vec::new(),
                mask: Vec::new(),
            },
            offsets: vec![0],
        }
    }

    /// A writer that streams the columns into files in `dir` (created; existing files replaced).
    pub fn to_dir(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let create = |name: &str| {
            let path = dir.join(name);
            File::create(&path)
                .map(|f| BufWriter::with_capacity(1 << 20, f))
                .map_err(|e| Error::io(&path, e))
        };
        Ok(StoreWriter {
            sink: Sink::Files {
                dir: dir.to_path_buf(),
                ids: create(IDS_FILE)?,
                mask: create(MASK_FILE)?,
            },
            offsets: vec![0],
        })
    }

    /// The number of rows written so far.
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Appends one example's ids and loss mask as a row.
    pub fn push(&mut self, example: &Example) -> Result<()> {
        match &mut self.sink {
            Sink::Memory { ids, mask } => {
                ids.extend_from_slice(&example.input_ids);
                mask.extend_from_slice(&example.loss_mask);
            }
            Sink::Files { dir, ids, mask } => {
                let io = |e| Error::io(dir.as_path(), e);
                for &id in &example.input_ids {
                    id.write_le(ids).map_err(io)?;
                }
                mask.write_all(&example.loss_mask).map_err(io)?;
            }
        }
        let last = *self.offsets.last().expect("offsets start with 0");
        self.offsets.push(last + example.len() as u64);
        Ok(())
    }

    /// Finishes writing; a file-backed store is flushed, synced and mapped.
    pub fn finish(self) -> Result<TokenStore> {
        match self.sink {
            Sink::Memory { ids, mask } => Ok(TokenStore {
                ids: Column::Owned(ids),
                mask: Column::Owned(mask),
                offsets: Column::Owned(self.offsets),
            }),
            Sink::Files { dir, ids, mask } => {
                let close = |w: BufWriter<File>| -> std::io::Result<()> {
                    w.into_inner().map_err(|e| e.into_error())?.sync_all()
                };
                close(ids).map_err(|e| Error::io(&dir, e))?;
                close(mask).map_err(|e| Error::io(&dir, e))?;
                let path = dir.join(OFFSETS_FILE);
                let mut out = BufWriter::new(File::create(&path).map_err(|e| Error::io(&path, e))?);
                for &o in &self.offsets {
                    o.write_le(&mut out).map_err(|e| Error::io(&path, e))?;
                }
                close(out).map_err(|e| Error::io(&path, e))?;
                TokenStore::open(&dir)
            }
        }
    }
}

/// A dataset's examples: rows of a [`TokenStore`], selected and optionally packed.
///
/// Item `i` is the rows `members[ends[i - 1]..ends[i]]` concatenated, each cut to `cut` tokens;
/// items of a packed view carry their documents' lengths. Cloning shares the store.
#[derive(Clone, Debug)]
pub struct Examples {
    store: Arc<TokenStore>,
    members: Vec<u32>,
    ends: Vec<u32>,
    cut: usize,
    packed: bool,
}

impl From<Vec<Example>> for Examples {
    fn from(examples: Vec<Example>) -> Self {
        Examples::all(Arc::new(TokenStore::from_examples(&examples)))
    }
}

impl Examples {
    /// Every row of `store`, in order, one example each.
    pub fn all(store: Arc<TokenStore>) -> Self {
        let n = store.rows() as u32;
        Examples {
            store,
            members: (0..n).collect(),
            ends: (1..=n).collect(),
            cut: usize::MAX,
            packed: false,
        }
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The store the examples read from.
    pub fn store(&self) -> &Arc<TokenStore> {
        &self.store
    }

    /// Whether the examples are packed bins of documents.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    fn rows_of(&self, i: usize) -> &[u32] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.members[start..self.ends[i] as usize]
    }

    /// Example `i`'s length in tokens.
    pub fn example_len(&self, i: usize) -> usize {
        self.rows_of(i)
            .iter()
            .map(|&r| self.store.row_len(r as usize).min(self.cut))
            .sum()
    }

    /// Example `i`'s number of loss tokens (reads only the mask column).
    pub fn example_loss_tokens(&self, i: usize) -> usize {
        self.rows_of(i)
            .iter()
            .map(|&r| {
                let (_, mask) = self.store.row(r as usize);
                mask[..mask.len().min(self.cut)]
                    .iter()
                    .map(|&m| m as usize)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Example `i`, copied out of the store.
    pub fn get(&self, i: usize) -> Example {
        let mut example = Example::new(Vec::new(), Vec::new());
        for &r in self.rows_of(i) {
            let (ids, mask) = self.store.row(r as usize);
            let len = ids.len().min(self.cut);
            example.input_ids.extend_from_slice(&ids[..len]);
            example.loss_mask.extend_from_slice(&mask[..len]);
            if self.packed {
                example.seq_lengths.push(len);
            }
        }
        example
    }

    /// The examples in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Example> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// All examples copied into memory.
    pub fn to_vec(&self) -> Vec<Example> {
        self.iter().collect()
    }

    /// Keeps the first `n` examples.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            let keep = if n == 0 { 0 } else { self.ends[n - 1] as usize };
            self.members.truncate(keep);
            self.ends.truncate(n);
        }
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Examples {
        let mut members = Vec::new();
        let mut ends = Vec::with_capacity(indices.len());
        for &i in indices {
            members.extend_from_slice(self.rows_of(i));
            ends.push(members.len() as u32);
        }
        Examples {
            store: self.store.clone(),
            members,
            ends,
            cut: self.cut,
            packed: self.packed,
        }
    }

    /// Packs the examples as TRL does (`packing=True`, strategy `bfd`): best-fit-decreasing bins of
    /// `max_length` tokens over consecutive batches of [`TRL_PACK_BATCH`] examples, each example cut
    /// to `max_length` first. Only an unpacked view can be packed.
    pub fn pack(&self, max_length: usize) -> Examples {
        assert!(!self.packed, "examples are already packed");
        let max_length = max_length.max(1);
        let mut members = Vec::with_capacity(self.members.len());
        let mut ends = Vec::new();
        let indices: Vec<usize> = (0..self.len()).collect();
        for batch in indices.chunks(TRL_PACK_BATCH) {
            let lengths: Vec<usize> = batch
                .iter()
                .map(|&i| self.example_len(i).min(max_length))
                .collect();
            for bin in bfd_bins(&lengths, max_length) {
                for j in bin {
                    members.extend_from_slice(self.rows_of(batch[j]));
                }
                ends.push(members.len() as u32);
            }
        }
        Examples {
            store: self.store.clone(),
            members,
            ends,
            cut: max_length.min(self.cut),
            packed: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32]) -> Example {
        Example::new(ids.to_vec(), ids.iter().map(|&i| (i % 2) as u8).collect())
    }

    #[test]
    fn file_store_round_trips_and_views_select_truncate_and_pack() {
        let dir = tempfile::tempdir().unwrap();
        let examples = vec![ex(&[1, 2, 3]), ex(&[]), ex(&[4, 5, 6, 7, 8]), ex(&[9])];
        let mut writer = StoreWriter::to_dir(dir.path()).unwrap();
        for e in &examples {
            writer.push(e).unwrap();
        }
        let store = Arc::new(writer.finish().unwrap());
        assert!(store.is_mapped());
        let view = Examples::all(store);
        assert_eq!(view.to_vec(), examples);
        assert_eq!(Examples::from(examples.clone()).to_vec(), examples);

        let picked = view.select(&[2, 0]);
        assert_eq!(
            picked.to_vec(),
            vec![examples[2].clone(), examples[0].clone()]
        );
        let mut first = view.clone();
        first.truncate(2);
        assert_eq!(first.to_vec(), examples[..2].to_vec());
        first.truncate(0);
        assert!(first.is_empty());

        for (i, e) in examples.iter().enumerate() {
            assert_eq!(view.example_loss_tokens(i), e.num_loss_tokens());
            assert_eq!(view.example_len(i), e.len());
        }
        let packed = view.pack(4);
        let vec_packed = super::super::pack::pack_dataset(&examples, 4);
        assert_eq!(packed.to_vec(), vec_packed);
        assert!(packed.iter().all(|e| e.len() <= 4));
    }

    #[test]
    fn a_damaged_cache_is_refused_with_its_folder_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = StoreWriter::to_dir(dir.path()).unwrap();
        writer.push(&ex(&[1, 2, 3])).unwrap();
        writer.finish().unwrap();
        std::fs::write(dir.path().join(MASK_FILE), [1u8]).unwrap();
        let err = TokenStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("delete this folder"), "{err}");
        std::fs::write(dir.path().join(IDS_FILE), [1u8, 2, 3]).unwrap();
        let err = TokenStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
