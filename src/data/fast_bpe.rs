//! A fast path for the byte-level BPE tokenizers of the supported families (GPT-2's pattern, and
//! the Llama 3 / Qwen2 split patterns), giving exactly the ids of the `tokenizers` crate: added
//! tokens are split out of the raw text first (leftmost, longest), each remaining segment is cut
//! by the pre-tokenizer's pattern (its one look-ahead, `\s+(?!\S)`, emulated on a look-ahead-free
//! pattern), each piece is mapped to GPT-2's byte alphabet and run through the tokenizer's own BPE
//! model once per distinct piece (cached per tokenizing thread). The crate's general machinery
//! (normalized strings with alignments, a `String` per token, a regex pool shared by all threads)
//! is most of a dataset's tokenizing time; this path skips it.
//!
//! Anything it does not reproduce exactly — another model or pre-tokenizer, a normalizer other
//! than NFC (and NFC only for ASCII text), added tokens that strip or normalize, truncation or
//! fixed padding, a post-processor that adds tokens — is left to the crate ([`FastBpe::new`]
//! returns None, or [`FastBpe::encode`] None for the text).

use std::collections::HashMap;

use serde_json::Value;
use tokenizers::Model;

use super::gguf_vocab::byte_alphabet;
use super::tokenizer::ChatTokenizer;
use crate::error::{Error, Result};

/// GPT-2's pre-tokenization pattern (the `tokenizers` crate's `ByteLevel` with `use_regex`).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The one look-ahead these patterns use, and its look-ahead-free stand-in.
const LOOKAHEAD: &str = r"\s+(?!\S)|\s+";

/// Distinct pieces kept before the cache starts over.
const CACHE_LIMIT: usize = 1 << 18;

/// The byte-level BPE fast path of one tokenizer (one per tokenizing thread: it owns its cache).
pub struct FastBpe<'a> {
    tok: &'a ChatTokenizer,
    /// The pattern without its look-ahead.
    split: regex::Regex,
    /// Whether the pattern has Llama 3's `\s*[\r\n]+` alternative before `\s+`.
    newline_alternative: bool,
    /// Added tokens' contents and ids, longest first.
    added: Vec<(String, u32)>,
    /// Whether some added token starts with this byte.
    starts: [bool; 256],
    /// Whether the normalizer is NFC (then only ASCII text takes this path).
    nfc: bool,
    /// Whether every digit is a piece of its own before the pattern splits (SmolLM's `Digits`).
    digits: bool,
    /// Whether `add_special_tokens` changes the ids (then only encodings without them do).
    post_processes: bool,
    bytes: [char; 256],
    cache: HashMap<String, Vec<u32>>,
}

impl<'a> FastBpe<'a> {
    /// The fast path for `tok`, when its tokenizer is one this path reproduces exactly.
    pub fn new(tok: &'a ChatTokenizer) -> Option<Self> {
        let inner = &tok.inner;
        if inner.get_truncation().is_some()
            || inner
                .get_padding()
                .is_some_and(|p| !matches!(p.strategy, tokenizers::PaddingStrategy::BatchLongest))
        {
            return None;
        }
        let json: Value = serde_json::from_str(&inner.to_string(false).ok()?).ok()?;
        let model = &json["model"];
        if model["type"] != "BPE" || model["byte_fallback"] == true || !model["dropout"].is_null() {
            return None;
        }
        let nfc = match &json["normalizer"] {
            Value::Null => false,
            n if n["type"] == "NFC" => true,
            _ => return None,
        };
        let byte_level = |v: &Value, regex: bool| {
            v["type"] == "ByteLevel"
                && v["add_prefix_space"] != true
                && (v["use_regex"] != false) == regex
        };
        let pre = &json["pre_tokenizer"];
        let (pattern, digits) = if byte_level(pre, true) {
            (GPT2_PATTERN.to_string(), false)
        } else {
            match pre["pretokenizers"].as_array().map(Vec::as_slice) {
                Some([split, bytes])
                    if split["type"] == "Split"
                        && split["behavior"] == "Isolated"
                        && split["invert"] != true
                        && byte_level(bytes, false) =>
                {
                    (split["pattern"]["Regex"].as_str()?.to_string(), false)
                }
                // SmolLM's: every digit apart, then GPT-2's pattern.
                Some([digits, bytes])
                    if digits["type"] == "Digits"
                        && digits["individual_digits"] == true
                        && byte_level(bytes, true) =>
                {
                    (GPT2_PATTERN.to_string(), true)
                }
                _ => return None,
            }
        };
        // The look-ahead must be the usual `\s+(?!\S)|\s+` at the end, and the only one.
        let stem = pattern.strip_suffix(LOOKAHEAD)?;
        if stem.contains("(?=") || stem.contains("(?!") || stem.contains("(?<") {
            return None;
        }
        let split = regex::Regex::new(&format!(r"{stem}\s+")).ok()?;
        let newline_alternative = stem.contains(r"\s*[\r\n]+");
        let mut added = Vec::new();
        for t in json["added_tokens"].as_array()? {
            let plain = ["lstrip", "rstrip", "single_word", "normalized"]
                .iter()
                .all(|k| t[*k] != true);
            if !plain {
                return None;
            }
            added.push((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32));
        }
        added.retain(|(c, _)| !c.is_empty());
        added.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        let mut starts = [false; 256];
        for (c, _) in &added {
            starts[c.as_bytes()[0] as usize] = true;
        }
        let with = inner.encode_fast("a", true).ok()?;
        let without = inner.encode_fast("a", false).ok()?;
        Some(FastBpe {
            tok,
            split,
            newline_alternative,
            added,
            starts,
            nfc,
            digits,
            post_processes: with.get_ids() != without.get_ids(),
            bytes: byte_alphabet(),
            cache: HashMap::new(),
        })
    }

    /// The ids of `text` (as [`ChatTokenizer::encode`]), or None when the text needs the
    /// `tokenizers` crate (non-ASCII text under NFC, special tokens a post-processor adds).
    pub fn encode(&mut self, text: &str, add_special_tokens: bool) -> Option<Result<Vec<u32>>> {
        if (self.nfc && !text.is_ascii()) || (add_special_tokens && self.post_processes) {
            return None;
        }
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut start = 0;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            let found = match self.starts[rest.as_bytes()[0] as usize] {
                true => self
                    .added
                    .iter()
                    .find(|(c, _)| rest.starts_with(c.as_str())),
                false => None,
            };
            match found {
                Some((content, id)) => {
                    let (len, id) = (content.len(), *id);
                    if let Err(e) = self.segment(&text[start..i], &mut ids) {
                        return Some(Err(e));
                    }
                    ids.push(id);
                    i += len;
                    start = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        Some(self.segment(&text[start..], &mut ids).map(|()| ids))
    }

    /// Pre-tokenizes one segment between added tokens and appends its pieces' ids.
    fn segment(&mut self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        if !self.digits {
            return self.split_by_pattern(text, ids);
        }
        // Each numeric character isolated, the pattern applied to the text between them.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.split_by_pattern(&text[start..i], ids)?;
                self.piece(&text[i..i + c.len_utf8()], ids)?;
                start = i + c.len_utf8();
            }
        }
        self.split_by_pattern(&text[start..], ids)
    }

    /// Cuts `text` by the pattern and appends its pieces' ids.
    fn split_by_pattern(&mut self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        let mut pos = 0;
        while pos < text.len() {
            let Some(m) = self.split.find_at(text, pos) else {
                return self.piece(&text[pos..], ids);
            };
            if m.start() > pos {
                self.piece(&text[pos..m.start()], ids)?;
            }
            let mut end = m.end();
            let found = m.as_str();
            // `\s+(?!\S)`: a whitespace run followed by a non-space gives its last character
            // back (to the next piece), unless it was a newline run of `\s*[\r\n]+`.
            if found.chars().all(char::is_whitespace) && found.chars().nth(1).is_some() {
                let newline_run = self.newline_alternative && found.ends_with(['\r', '\n']);
                let next = text[end..].chars().next();
                if !newline_run && next.is_some_and(|c| !c.is_whitespace()) {
                    end -= found.chars().next_back().map_or(0, char::len_utf8);
                }
            }
            self.piece(&text[m.start()..end], ids)?;
            pos = end;
        }
        Ok(())
    }

    /// One pre-tokenized piece through the BPE model (its bytes in GPT-2's alphabet), cached.
    fn piece(&mut self, piece: &str, ids: &mut Vec<u32>) -> Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        if let Some(cached) = self.cache.get(piece) {
            ids.extend_from_slice(cached);
            return Ok(());
        }
        let mapped: String = piece.bytes().map(|b| self.bytes[b as usize]).collect();
        let tokens = self
            .tok
            .inner
            .get_model()
            .tokenize(&mapped)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        let piece_ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        ids.extend_from_slice(&piece_ids);
        if self.cache.len() >= CACHE_LIMIT {
            self.cache.clear();
        }
        self.cache.insert(piece.to_string(), piece_ids);
        Ok(())
    }
}
