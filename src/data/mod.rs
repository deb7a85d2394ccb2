//! Datasets: loading, formats, chat templates, tokenization with loss masks, batching.
//!
//! The path follows TRL's `SFTTrainer`: rows are read ([`load`]), their format detected ([`format`](mod@format)),
//! conversations rendered with the model's chat template ([`template`]), tokenized with TRL's loss masks
//! ([`tokenize`]), stored column-wise and cached ([`prepare`], [`store`]), packed ([`pack`]) and
//! padded into batches ([`batch`]).

pub mod batch;
pub mod chat_format;
pub mod fast_bpe;
pub mod files;
pub mod format;
pub mod gguf_vocab;
pub mod load;
pub mod mapping;
pub mod pack;
pub mod prepare;
mod python_format;
pub mod store;
mod strftime;
pub mod template;
pub mod tokenize;
pub mod tokenizer;

pub use batch::{collate, Batch};
pub use format::{parse_sample, ChatVars, Sample};
pub use load::{load_rows, Row};
pub use mapping::FieldMapping;
pub use pack::{bfd_bins, pack_bfd, pack_dataset};
pub use prepare::{default_cache_dir, prepare_dataset, prepare_dataset_split, PreparedDataset};
pub use store::{Examples, TokenStore};
pub use template::ChatTemplate;
pub use tokenize::{marked, tokenize_sample, Example, TokenizeOptions};
pub use tokenizer::ChatTokenizer;
