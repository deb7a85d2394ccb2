//! The tokenizer a GGUF file describes in its metadata (`tokenizer.ggml.*`), rebuilt as the
//! `tokenizer.json` a Hugging Face folder would hold, so that a GGUF file alone is a base.
//!
//! Byte-level BPE (`tokenizer.ggml.model = gpt2`), as transformers builds it from a GGUF file
//! (`GPT2Tokenizer` over the file's vocabulary and merges): tokens that are not spelled in the
//! byte alphabet are respelled byte by byte, control tokens (type 3) become special added tokens
//! and user-defined ones (type 4) plain added tokens, and the text is split as the pre-tokenizer
//! `tokenizer.ggml.pre` names (llama.cpp's names) before the byte-level mapping.

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Llama 3's split (llama.cpp's `llama-bpe` and the pre-tokenizers that share it).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split: single digits, no leading space on letters' prefix.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizers named in llama.cpp that split as Llama 3 does.
const LLAMA3_NAMES: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "dbrx",
    "smaug-bpe",
];

/// The pre-tokenizers named in llama.cpp that split as Qwen2 does.
const QWEN2_NAMES: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez"];

/// A GGUF file's tokenizer metadata.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE), `llama` (SentencePiece), ...
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's name of the pre-tokenizer (`llama-bpe`, `qwen2`,
    /// `smollm`, `gpt-2`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, by id (empty when absent).
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.merges`: `"a b"` pairs, best first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.{bos,eos,unknown,padding}_token_id`.
    pub bos_id: Option<u32>,
    /// End of sequence.
    pub eos_id: Option<u32>,
    /// Unknown token.
    pub unk_id: Option<u32>,
    /// Padding.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// GPT-2's map from bytes to printable characters: printable Latin-1 bytes stand for themselves,
/// the others take the code points from 256 on, in byte order.
pub fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in map.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).expect("below 512");
    }
    map
}

impl GgufVocab {
    /// The token of `id`, if the vocabulary has it.
    pub fn token(&self, id: Option<u32>) -> Option<String> {
        id.and_then(|i| self.tokens.get(i as usize)).cloned()
    }

    /// The `tokenizer.json` these tokens describe (without a post-processor: the special-token
    /// flags build it).
    pub fn tokenizer_json(&self) -> Result<Value> {
        match self.model.as_str() {
            "gpt2" => self.byte_level_json(),
            other => Err(Error::Tokenizer(format!(
                "the GGUF file's tokenizer is `{other}` (tokenizer.ggml.model); peft-sft builds byte-level BPE (`gpt2`) tokenizers from GGUF metadata: pass --tokenizer with the model's Hugging Face folder"
            ))),
        }
    }

    fn byte_level_json(&self) -> Result<Value> {
        let alphabet = byte_alphabet();
        let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab = Map::new();
        for (id, token) in self.tokens.iter().enumerate() {
            let key = if spelled(token) {
                token.clone()
            } else {
                token.bytes().map(|b| alphabet[b as usize]).collect()
            };
            vocab.insert(key, json!(id));
        }
        let merges = self
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| Error::Tokenizer(format!("GGUF merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<Value>>>()?;
        // Control tokens spelled outside the byte alphabet are llama.cpp mislabels (transformers
        // skips them too); user-defined ones are matched whole but are not special.
        let mut added = Vec::new();
        for (id, (token, kind)) in self.tokens.iter().zip(&self.token_types).enumerate() {
            let special = match *kind {
                CONTROL if spelled(token) => true,
                USER_DEFINED if vocab.contains_key(token) => false,
                _ => continue,
            };
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special,
            }));
        }
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |regex: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]})
        };
        let pre = self.pre.as_deref().unwrap_or("default");
        let pre_tokenizer = if LLAMA3_NAMES.contains(&pre) {
            split(LLAMA3_SPLIT)
        } else if QWEN2_NAMES.contains(&pre) {
            split(QWEN2_SPLIT)
        } else if pre == "smollm" {
            // llama.cpp's `smollm`: digits one by one, then GPT-2's split (the model's own
            // tokenizer.json: Digits(individual_digits) + ByteLevel).
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        } else {
            // GPT-2's split (`gpt-2` and names transformers has no split for).
            byte_level(true)
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[0], 'Ā');
        let distinct: std::collections::BTreeSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn a_sentencepiece_vocabulary_is_refused_with_the_way_out() {
        let v = GgufVocab {
            model: "llama".into(),
            ..Default::default()
        };
        let err = v.tokenizer_json().unwrap_err().to_string();
        assert!(
            err.contains("`llama`") && err.contains("--tokenizer"),
            "{err}"
        );
    }
}
