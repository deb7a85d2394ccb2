//! The tokenizer a GGUF file describes in its metadata (`tokenizer.ggml.*`), rebuilt as the
//! `tokenizer.json` a Hugging Face folder would hold, so that a GGUF file alone is a base.
//!
//! As transformers builds them from a GGUF file (`gguf_file=`):
//! - byte-level BPE (`tokenizer.ggml.model = gpt2`, `GPT2Tokenizer` over the file's vocabulary and
//!   merges): tokens not spelled in the byte alphabet are respelled byte by byte, and the text is
//!   split as the pre-tokenizer `tokenizer.ggml.pre` names (llama.cpp's names) before the
//!   byte-level mapping;
//! - SentencePiece BPE (`llama`, `LlamaTokenizer`): the pieces as the file spells them, merges
//!   recovered from the vocabulary ranked by the pieces' scores, `▁` for spaces prepended to the
//!   first word, byte fallback (`<0x0A>`); BOS added unless the file says otherwise.
//!
//! In both, control tokens (type 3) become special added tokens and user-defined ones (type 4)
//! plain added tokens.

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
    /// `tokenizer.ggml.merges`: `"a b"` pairs, best first (byte-level files).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores`, by id (SentencePiece files).
    pub scores: Vec<f32>,
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

/// A `tokenizer.json` without normalizer, post-processor, truncation or padding.
fn tokenizer_file(added: Vec<Value>, pre_tokenizer: Value, decoder: Value, model: Value) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": model,
    })
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
            "llama" => self.sentencepiece_json(),
            other => Err(Error::Tokenizer(format!(
                "the GGUF file's tokenizer is `{other}` (tokenizer.ggml.model); peft-sft builds byte-level BPE (`gpt2`) and SentencePiece BPE (`llama`) tokenizers from GGUF metadata: pass --tokenizer with the model's Hugging Face folder"
            ))),
        }
    }

    /// Whether BOS is added when the file does not say: SentencePiece vocabularies add it (llama.cpp
    /// and transformers both default to it for `llama`), byte-level ones do not.
    pub fn adds_bos_by_default(&self) -> bool {
        self.model == "llama"
    }

    /// The added-tokens entries: the BOS/EOS/UNK/PAD tokens and control tokens (those `keep`
    /// accepts) special, user-defined ones in the vocabulary plain.
    fn added_tokens(&self, vocab: &Map<String, Value>, keep: impl Fn(&str) -> bool) -> Vec<Value> {
        let named = [self.bos_id, self.eos_id, self.unk_id, self.pad_id];
        let mut added = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            let kind = self.token_types.get(id).copied().unwrap_or(0);
            let special = match kind {
                _ if named.contains(&Some(id as u32)) => true,
                CONTROL if keep(token) => true,
                USER_DEFINED if vocab.contains_key(token) => false,
                _ => continue,
            };
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special,
            }));
        }
        added
    }

    /// SentencePiece BPE as transformers' `LlamaTokenizer` over the file's pieces: merges are every
    /// split of a piece into two pieces of the vocabulary, ranked by the whole piece's score
    /// (highest first; ties: longer left, then longer right piece, then file order).
    fn sentencepiece_json(&self) -> Result<Value> {
        if self.scores.len() != self.tokens.len() {
            return Err(Error::Tokenizer(format!(
                "the GGUF file's SentencePiece vocabulary has {} tokens but {} scores (tokenizer.ggml.scores)",
                self.tokens.len(),
                self.scores.len()
            )));
        }
        let mut vocab = Map::new();
        let mut score = std::collections::HashMap::new();
        for (id, (token, s)) in self.tokens.iter().zip(&self.scores).enumerate() {
            vocab.insert(token.clone(), json!(id));
            score.insert(token.as_str(), *s);
        }
        let id_of = |t: &str| vocab.get(t).and_then(Value::as_u64).unwrap_or(0);
        // In the order of the (deduplicated) score table, as transformers' `generate_merges`.
        let mut seen = std::collections::HashSet::new();
        let mut merges: Vec<(&str, &str, f32)> = Vec::new();
        for token in &self.tokens {
            if !seen.insert(token.as_str()) {
                continue;
            }
            let piece_score = score[token.as_str()];
            let mut local: Vec<(&str, &str, f32)> = token
                .char_indices()
                .skip(1)
                .map(|(i, _)| (&token[..i], &token[i..]))
                .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
                .map(|(l, r)| (l, r, piece_score))
                .collect();
            local.sort_by_key(|(l, r, _)| (id_of(l), id_of(r)));
            merges.extend(local);
        }
        // Stable: equal keys keep the order above (Python's sorted(reverse=True) does too).
        let char_len = |s: &str| s.chars().count();
        merges.sort_by(|a, b| {
            b.2.total_cmp(&a.2)
                .then(char_len(b.0).cmp(&char_len(a.0)))
                .then(char_len(b.1).cmp(&char_len(a.1)))
        });
        let merges: Vec<Value> = merges.iter().map(|(l, r, _)| json!([l, r])).collect();
        let added = self.added_tokens(&vocab, |_| true);
        Ok(tokenizer_file(
            added,
            json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]}),
            json!({
                "type": "BPE", "dropout": null, "unk_token": self.token(self.unk_id),
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            }),
        ))
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
        let added = self.added_tokens(&vocab, spelled);
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
        Ok(tokenizer_file(
            added,
            pre_tokenizer,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            json!({
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            }),
        ))
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
    fn an_unknown_tokenizer_model_is_refused_with_the_way_out() {
        let v = GgufVocab {
            model: "rwkv".into(),
            ..Default::default()
        };
        let err = v.tokenizer_json().unwrap_err().to_string();
        assert!(
            err.contains("`rwkv`") && err.contains("--tokenizer"),
            "{err}"
        );
    }

    /// transformers' `generate_merges` on a toy vocabulary: "abc" (score -1) splits as a+bc and
    /// ab+c; higher-scored pieces' merges come first, and a tie prefers the longer left piece.
    #[test]
    fn sentencepiece_merges_rank_by_score_then_length() {
        let v = GgufVocab {
            model: "llama".into(),
            tokens: ["a", "b", "c", "ab", "bc", "abc"]
                .map(String::from)
                .to_vec(),
            scores: vec![0.0, 0.0, 0.0, -2.0, -3.0, -1.0],
            token_types: vec![1; 6],
            ..Default::default()
        };
        let json = v.tokenizer_json().unwrap();
        let merges: Vec<Vec<String>> =
            serde_json::from_value(json["model"]["merges"].clone()).unwrap();
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|m| (m[0].as_str(), m[1].as_str()))
            .collect();
        assert_eq!(pairs, [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]);
    }
}
