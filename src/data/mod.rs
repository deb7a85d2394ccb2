//! Datasets: loading, formats, chat templates, tokenization with loss masks, batching.
//!
//! The path follows TRL's `SFTTrainer`: rows are read ([`load`]), their format detected ([`format`]),
//! conversations rendered with the model's chat template ([`template`]), tokenized with TRL's loss masks
//! ([`tokenize`]) and padded into batches ([`batch`]).

pub mod batch;
pub mod files;
pub mod format;
pub mod load;
pub mod mapping;
pub mod pack;
mod python_format;
mod strftime;
pub mod template;
pub mod tokenize;
pub mod tokenizer;

pub use batch::{collate, Batch};
pub use format::{parse_sample, Sample};
pub use load::{load_rows, Row};
pub use mapping::FieldMapping;
pub use pack::{pack_bfd, pack_dataset};
pub use template::ChatTemplate;
pub use tokenize::{
    prepare_dataset, prepare_dataset_split, tokenize_sample, Example, PreparedDataset,
    TokenizeOptions,
};
pub use tokenizer::ChatTokenizer;
