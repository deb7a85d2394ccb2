//! Datasets: loading, formats, chat templates, tokenization with loss masks, batching.
