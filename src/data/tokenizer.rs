//! A model's tokenizer as transformers loads it from a model folder: `tokenizer.json` plus the special
//! tokens and chat template of `tokenizer_config.json`, `special_tokens_map.json` and
//! `chat_template.jinja`.

use std::path::Path;

use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

use super::format::ChatVars;
use super::gguf_vocab::GgufVocab;
use super::template::ChatTemplate;
use crate::error::{Error, Result};

/// A fast tokenizer with the special tokens and chat template transformers would give it.
#[derive(Clone)]
pub struct ChatTokenizer {
    /// The `tokenizers` tokenizer read from `tokenizer.json` (truncation and padding disabled).
    pub inner: Tokenizer,
    /// The beginning-of-sequence token, if the model has one.
    pub bos_token: Option<String>,
    /// The end-of-sequence token; TRL appends it to text and completions.
    pub eos_token: Option<String>,
    /// The padding token, if set; [`ChatTokenizer::pad_token_id`] falls back to the EOS token as TRL does.
    pub pad_token: Option<String>,
    /// The unknown token, if set (a chat template variable).
    pub unk_token: Option<String>,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .field("unk_token", &self.unk_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The special-token settings read from `tokenizer_config.json` and `special_tokens_map.json`.
#[derive(Debug, Default)]
struct SpecialTokens {
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
}

impl SpecialTokens {
    /// Overrides the tokens that `config` sets (a string or an `AddedToken` object); keys set to null
    /// clear the token as in Python.
    fn merge(&mut self, config: &serde_json::Map<String, Value>) {
        for (key, slot) in [
            ("bos_token", &mut self.bos_token),
            ("eos_token", &mut self.eos_token),
            ("pad_token", &mut self.pad_token),
            ("unk_token", &mut self.unk_token),
        ] {
            if let Some(value) = config.get(key) {
                *slot = token_content(value);
            }
        }
        if let Some(Value::Bool(add)) = config.get("add_bos_token") {
            self.add_bos_token = Some(*add);
        }
        if let Some(Value::Bool(add)) = config.get("add_eos_token") {
            self.add_eos_token = Some(*add);
        }
    }
}

/// A token's byte range `(start, end)` in the encoded text.
pub type ByteRange = (usize, usize);

impl ChatTokenizer {
    /// Loads tokenizer.json, tokenizer_config.json (special tokens, `chat_template` as a string or as a
    /// list of named templates -> use "default"), special_tokens_map.json and chat_template.jinja (takes
    /// precedence when present) from a model folder.
    ///
    /// As in transformers (`PreTrainedTokenizerBase._from_pretrained`), `special_tokens_map.json` is read
    /// only when `tokenizer_config.json` has no `added_tokens_decoder`, and then overrides it; when
    /// `tokenizer_config.json` sets `add_bos_token` / `add_eos_token`, or `tokenizer.json` has no
    /// post-processor, the post-processor is rebuilt from those flags (`TokenizersBackend.update_post_processor`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(Error::MissingFile {
                path: tokenizer_path,
                hint: "The model folder needs a fast tokenizer (tokenizer.json); convert a slow tokenizer with \
                       transformers' `AutoTokenizer.from_pretrained(...).save_pretrained(...)`."
                    .to_string(),
            });
        }
        // Parsed as JSON first: the tokenizers crate panics on some malformed files (a decoder
        // object that does not parse) instead of returning its error.
        let bytes = std::fs::read(&tokenizer_path).map_err(|e| Error::io(&tokenizer_path, e))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Parse {
            path: tokenizer_path.clone(),
            line: Some(e.line()),
            message: format!("cannot load the tokenizer: not valid JSON ({e})"),
        })?;
        let mut inner: Tokenizer = serde_json::from_value(json).map_err(|e| Error::Parse {
            path: tokenizer_path.clone(),
            line: None,
            message: format!("cannot load the tokenizer: {e}"),
        })?;

        let config = read_json_object(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let mut special = SpecialTokens::default();
        special.merge(&config);
        if !config.contains_key("added_tokens_decoder") {
            if let Some(map) = read_json_object(&dir.join("special_tokens_map.json"))? {
                special.merge(&map);
            }
        }
        if special.pad_token.is_none() {
            // transformers takes the pad token from tokenizer.json's padding settings when unset.
            special.pad_token = inner.get_padding().map(|padding| padding.pad_token.clone());
        }
        // transformers disables the truncation and padding stored in tokenizer.json for plain calls.
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);

        if special.add_bos_token.is_some()
            || special.add_eos_token.is_some()
            || inner.get_post_processor().is_none()
        {
            rebuild_post_processor(&mut inner, &special)?;
        }

        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.exists() {
            Some(
                std::fs::read_to_string(&template_file)
                    .map_err(|e| Error::io(&template_file, e))?,
            )
        } else {
            config_chat_template(&config, &dir.join("tokenizer_config.json"))?
        };

        Ok(Self::assembled(inner, special, chat_template))
    }

    /// The tokenizer of `inner` with `special`'s tokens and a chat template.
    fn assembled(inner: Tokenizer, special: SpecialTokens, chat_template: Option<String>) -> Self {
        ChatTokenizer {
            inner,
            bos_token: special.bos_token,
            eos_token: special.eos_token,
            pad_token: special.pad_token,
            unk_token: special.unk_token,
            chat_template,
        }
    }

    /// The tokenizer a GGUF file's metadata describes ([`GgufVocab`]), as transformers builds it
    /// from the file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): the vocabulary and
    /// merges, the special tokens by id, BOS/EOS added as `add_bos_token`/`add_eos_token` say, and
    /// the chat template of `tokenizer.chat_template`.
    pub fn from_gguf(vocab: &GgufVocab) -> Result<Self> {
        let json = vocab.tokenizer_json()?;
        let mut inner: Tokenizer = serde_json::from_value(json).map_err(|e| {
            Error::Tokenizer(format!("cannot build the GGUF file's tokenizer: {e}"))
        })?;
        let special = SpecialTokens {
            bos_token: vocab.token(vocab.bos_id),
            eos_token: vocab.token(vocab.eos_id),
            pad_token: vocab.token(vocab.pad_id),
            unk_token: vocab.token(vocab.unk_id),
            add_bos_token: vocab
                .add_bos
                .or(vocab.adds_bos_by_default().then_some(true)),
            add_eos_token: vocab.add_eos,
        };
        rebuild_post_processor(&mut inner, &special)?;
        Ok(Self::assembled(inner, special, vocab.chat_template.clone()))
    }

    /// Replaces the chat template (TRL's `chat_template_path`).
    pub fn with_chat_template(mut self, template: String) -> Self {
        self.chat_template = Some(template);
        self
    }

    /// Uses `template` when the tokenizer files had no chat template (e.g. the one stored in a GGUF
    /// file's metadata).
    pub fn with_chat_template_if_missing(mut self, template: Option<String>) -> Self {
        if self.chat_template.is_none() {
            self.chat_template = template;
        }
        self
    }

    /// The id of the BOS token, if it is set and in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// The id of the EOS token, if it is set and in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// The id used for padding: the pad token's, or the EOS token's when there is no pad token
    /// (TRL's `SFTTrainer.__init__`: `pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token`).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
            .or_else(|| self.eos_token_id())
    }

    /// Tokenizes `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS token),
    /// as transformers' `tokenizer(text, add_special_tokens=...)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // Ids only: no offsets to convert from bytes to characters.
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Tokenizes `text` and returns each token's byte range (start, end) in `text` as well.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Turns ids back into text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// Renders the chat template as transformers' apply_chat_template(tokenize=False) does.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &ChatVars::default())
    }

    /// [`Self::apply_chat_template`] with `tools` and extra template variables ([`ChatVars`]).
    pub fn apply_chat_template_with(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        vars: &ChatVars,
    ) -> Result<String> {
        self.compile_chat_template()?.render_with(
            messages,
            add_generation_prompt,
            &self.template_special_tokens(),
            vars,
        )
    }

    /// Compiles this tokenizer's chat template, or says how to provide one.
    pub fn compile_chat_template(&self) -> Result<ChatTemplate> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template(
                "the tokenizer has no chat template, so conversational rows cannot be formatted; add a \
                 chat_template.jinja to the model folder or use a model with a chat template"
                    .to_string(),
            )
        })?;
        ChatTemplate::new(source)
    }

    /// The special tokens a chat template sees as variables (transformers' `special_tokens_map`: only
    /// the tokens that are set).
    pub fn template_special_tokens(&self) -> Vec<(&'static str, &str)> {
        [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ]
        .into_iter()
        .filter_map(|(name, token)| token.as_deref().map(|token| (name, token)))
        .collect()
    }
}

/// transformers' `TokenizersBackend.update_post_processor`: `[bos] $A [eos]` per `add_bos_token` /
/// `add_eos_token` (both default to false).
fn rebuild_post_processor(inner: &mut Tokenizer, special: &SpecialTokens) -> Result<()> {
    let token_with_id = |token: &Option<String>, add: Option<bool>| -> Option<(String, u32)> {
        if !add.unwrap_or(false) {
            return None;
        }
        let token = token.as_ref()?;
        inner.token_to_id(token).map(|id| (token.clone(), id))
    };
    let bos = token_with_id(&special.bos_token, special.add_bos_token);
    let eos = token_with_id(&special.eos_token, special.add_eos_token);
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if let Some((token, _)) = &bos {
        single.push(format!("{token}:0"));
        pair.push(format!("{token}:0"));
    }
    single.push("$A:0".to_string());
    pair.push("$A:0".to_string());
    if let Some((token, _)) = &eos {
        single.push(format!("{token}:0"));
        pair.push(format!("{token}:0"));
    }
    if let Some((token, _)) = &bos {
        pair.push(format!("{token}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some((token, _)) = &eos {
        pair.push(format!("{token}:1"));
    }
    let special_tokens: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
    let processor = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .and_then(|builder| builder.try_pair(pair.join(" ")))
        .map_err(|e| Error::Tokenizer(format!("cannot build the post-processor: {e}")))?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build the post-processor: {e}")))?;
    inner.with_post_processor(Some(processor));
    Ok(())
}

/// The chat template of tokenizer_config.json: a string, or a list of `{name, template}` of which
/// the one named "default" is used (transformers' `get_chat_template` without tools).
fn config_chat_template(
    config: &serde_json::Map<String, Value>,
    path: &Path,
) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(template)) => Ok(Some(template.clone())),
        Some(Value::Array(templates)) => {
            let mut names = Vec::new();
            for entry in templates {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_string())),
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => {
                        return Err(Error::Parse {
                            path: path.to_path_buf(),
                            line: None,
                            message: "`chat_template` list entries must be {\"name\": str, \"template\": str}".to_string(),
                        })
                    }
                }
            }
            Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                message: format!(
                    "`chat_template` lists templates [{}] but none is named \"default\"",
                    names.join(", ")
                ),
            })
        }
        Some(_) => Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            message: "`chat_template` must be a string or a list of {\"name\", \"template\"}"
                .to_string(),
        }),
    }
}

/// A token given as a string or as a serialized `AddedToken` (`{"content": ..., ...}`).
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(token) => Some(token.clone()),
        Value::Object(fields) => fields
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// Reads a JSON object file if it exists.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            message: "expected a JSON object".to_string(),
        }),
        Err(e) => Err(Error::Parse {
            path: path.to_path_buf(),
            line: Some(e.line()),
            message: format!("invalid JSON: {e}"),
        }),
    }
}

/// A tiny byte-level BPE tokenizer for tests: one token per byte (ids 0..256), no merges, plus
/// ChatML and Llama-style special tokens.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// The special tokens of the test tokenizer with their ids.
    pub const SPECIAL_TOKENS: [(&str, u32); 4] = [
        ("<|im_start|>", 256),
        ("<|im_end|>", 257),
        ("<s>", 258),
        ("</s>", 259),
    ];

    /// GPT-2's byte-to-character map used by byte-level BPE.
    fn byte_chars() -> Vec<char> {
        let mut printable: Vec<u32> = ('!' as u32..='~' as u32)
            .chain('¡' as u32..='¬' as u32)
            .chain('®' as u32..='ÿ' as u32)
            .collect();
        let mut chars: Vec<u32> = printable.clone();
        let mut extra = 0;
        for byte in 0..256u32 {
            if !printable.contains(&byte) {
                printable.push(byte);
                chars.push(256 + extra);
                extra += 1;
            }
        }
        let mut by_byte: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
        by_byte.sort();
        by_byte
            .into_iter()
            .map(|(_, c)| char::from_u32(c).expect("valid char"))
            .collect()
    }

    /// The `tokenizer.json` text of the test tokenizer; `bos_post_processor` prepends `<s>` when
    /// special tokens are added.
    pub fn tokenizer_json(bos_post_processor: bool) -> String {
        let vocab: serde_json::Map<String, Value> = byte_chars()
            .into_iter()
            .enumerate()
            .map(|(id, c)| (c.to_string(), Value::from(id)))
            .collect();
        let added: Vec<Value> = SPECIAL_TOKENS
            .iter()
            .map(|(content, id)| {
                serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let post_processor = if bos_post_processor {
            serde_json::json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [258], "tokens": ["<s>"]}}})
        } else {
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
        };
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        })
        .to_string()
    }

    /// A ChatML template as Qwen-style models ship it.
    pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// Writes a model folder with the test tokenizer and returns it.
    pub fn model_dir(bos_post_processor: bool, config: Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tokenizer_json(bos_post_processor),
        )
        .expect("write tokenizer.json");
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())
            .expect("write tokenizer_config.json");
        dir
    }

    /// A ChatML tokenizer: EOS `<|im_end|>`, no BOS, no pad token.
    pub fn chatml_tokenizer() -> ChatTokenizer {
        let dir = model_dir(
            false,
            serde_json::json!({"eos_token": "<|im_end|>", "bos_token": null, "chat_template": CHATML_TEMPLATE}),
        );
        ChatTokenizer::from_dir(dir.path()).expect("load test tokenizer")
    }

    /// A Llama-2-style tokenizer: BOS `<s>` added by the post-processor, EOS `</s>`.
    pub fn bos_tokenizer() -> ChatTokenizer {
        let dir = model_dir(
            true,
            serde_json::json!({"eos_token": "</s>", "bos_token": "<s>", "chat_template": CHATML_TEMPLATE}),
        );
        ChatTokenizer::from_dir(dir.path()).expect("load test tokenizer")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_bytes_and_special_tokens() {
        let tok = chatml_tokenizer();
        let ids = tok.encode("<|im_start|>ab", true).expect("encode");
        assert_eq!(ids, vec![256, 'a' as u32, 'b' as u32]);
        assert_eq!(tok.decode(&ids, false).expect("decode"), "<|im_start|>ab");
        assert_eq!(tok.decode(&ids, true).expect("decode"), "ab");
    }

    #[test]
    fn pad_falls_back_to_eos() {
        let tok = chatml_tokenizer();
        assert_eq!(tok.pad_token, None);
        assert_eq!(tok.eos_token_id(), Some(257));
        assert_eq!(tok.pad_token_id(), Some(257));
        assert_eq!(tok.bos_token_id(), None);
    }

    #[test]
    fn post_processor_adds_bos_only_with_special_tokens() {
        let tok = bos_tokenizer();
        assert_eq!(
            tok.encode("a", true).expect("encode"),
            vec![258, 'a' as u32]
        );
        assert_eq!(tok.encode("a", false).expect("encode"), vec!['a' as u32]);
    }

    #[test]
    fn add_bos_and_eos_flags_rebuild_the_post_processor() {
        let dir = model_dir(
            false,
            json!({"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
                   "add_bos_token": true, "add_eos_token": true}),
        );
        let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
        assert_eq!(
            tok.encode("a", true).expect("encode"),
            vec![258, 'a' as u32, 259]
        );
    }

    #[test]
    fn special_tokens_map_overrides_legacy_configs_only() {
        let dir = model_dir(false, json!({"eos_token": "</s>"}));
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            json!({"eos_token": {"content": "<|im_end|>"}, "pad_token": "<s>"}).to_string(),
        )
        .expect("write");
        let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(tok.pad_token_id(), Some(258));

        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            json!({"eos_token": "</s>", "added_tokens_decoder": {}}).to_string(),
        )
        .expect("write");
        let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.eos_token.as_deref(), Some("</s>"));
        assert_eq!(tok.pad_token, None);
    }

    #[test]
    fn chat_template_sources_and_precedence() {
        let dir = model_dir(
            false,
            json!({"eos_token": "</s>", "chat_template": [
                {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]}),
        );
        let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.chat_template.as_deref(), Some("default"));

        std::fs::write(dir.path().join("chat_template.jinja"), "from file").expect("write");
        let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.chat_template.as_deref(), Some("from file"));
        let rendered = tok
            .apply_chat_template(&[json!({"role": "user", "content": "x"})], false)
            .expect("render");
        assert_eq!(rendered, "from file");
    }

    #[test]
    fn template_list_without_default_is_an_error() {
        let dir = model_dir(
            false,
            json!({"chat_template": [{"name": "rag", "template": "x"}]}),
        );
        let err = ChatTokenizer::from_dir(dir.path()).expect_err("must fail");
        assert!(
            err.to_string().contains("none is named \"default\""),
            "{err}"
        );
    }

    #[test]
    fn missing_tokenizer_json_gives_a_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = ChatTokenizer::from_dir(dir.path()).expect_err("must fail");
        assert!(matches!(err, Error::MissingFile { .. }));
        assert!(err.to_string().contains("tokenizer.json"));
    }

    #[test]
    fn missing_chat_template_is_explained() {
        let dir = model_dir(false, json!({"eos_token": "</s>"}));
        let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
        let err = tok
            .apply_chat_template(&[json!({"role": "user", "content": "x"})], false)
            .expect_err("must fail");
        assert!(err.to_string().contains("no chat template"), "{err}");
    }

    #[test]
    fn template_sees_only_set_special_tokens() {
        let tok = chatml_tokenizer();
        assert_eq!(
            tok.template_special_tokens(),
            vec![("eos_token", "<|im_end|>")]
        );
    }
}
