//! Chat-format setup for base models that have no chat template (TRL's `setup_chat_format`, TRL
//! 0.19–0.25): ChatML's `<|im_start|>` / `<|im_end|>` become special tokens, `<|im_end|>` ends
//! turns and pads, and the template is ChatML's. The model side (new embedding and LM-head rows
//! that train) is [`crate::model::CausalLm::resize_token_embeddings`] and
//! [`crate::model::CausalLm::train_token_rows`].

use std::path::Path;

use tokenizers::AddedToken;

use super::tokenizer::ChatTokenizer;
use crate::error::{Error, Result};

/// The name `--chat-template` takes for this setup.
pub const CHATML: &str = "chatml";

/// ChatML's turn start token.
pub const IM_START: &str = "<|im_start|>";
/// ChatML's turn end token (also EOS and padding after the setup).
pub const IM_END: &str = "<|im_end|>";

/// The template TRL's `setup_chat_format` sets: every message as
/// `<|im_start|>role\ncontent<|im_end|>\n`, no default system message, and
/// `<|im_start|>assistant\n` as the generation prompt.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// What [`setup_chatml`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatFormatSetup {
    /// Ids of the tokens added to the vocabulary (empty when the tokenizer already had both).
    pub new_token_ids: Vec<u32>,
    /// The vocabulary size the embedding must have: `len(tokenizer)`.
    pub vocab_size: usize,
}

/// Sets up ChatML on `tok` as TRL's `setup_chat_format` does: bos `<|im_start|>`, eos and pad
/// `<|im_end|>`, both added as special tokens when missing, and [`CHATML_TEMPLATE`].
pub fn setup_chatml(tok: &mut ChatTokenizer) -> Result<ChatFormatSetup> {
    let before = tok.inner.get_vocab_size(true);
    let missing: Vec<AddedToken> = [IM_START, IM_END]
        .into_iter()
        .filter(|t| tok.inner.token_to_id(t).is_none())
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.inner.add_special_tokens(&missing);
    let new_token_ids: Vec<u32> = missing
        .iter()
        .filter_map(|t| tok.inner.token_to_id(&t.content))
        .collect();
    if new_token_ids.len() != missing.len() {
        return Err(Error::Tokenizer(
            "could not add the ChatML tokens to the tokenizer".into(),
        ));
    }
    tok.bos_token = Some(IM_START.into());
    tok.eos_token = Some(IM_END.into());
    tok.pad_token = Some(IM_END.into());
    tok.chat_template = Some(CHATML_TEMPLATE.into());
    let vocab_size = tok.inner.get_vocab_size(true);
    debug_assert!(vocab_size >= before);
    Ok(ChatFormatSetup {
        new_token_ids,
        vocab_size,
    })
}

/// Writes `tok` as transformers' `save_pretrained` lays a fast tokenizer out: `tokenizer.json`,
/// `tokenizer_config.json` (special tokens) and `chat_template.jinja`; each file is written to a
/// temporary name and renamed.
pub fn save_tokenizer(tok: &ChatTokenizer, dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    crate::io::write_atomic(&path, |tmp| {
        tok.inner
            .save(tmp, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    })?;
    let mut config = serde_json::Map::new();
    for (key, value) in [
        ("bos_token", &tok.bos_token),
        ("eos_token", &tok.eos_token),
        ("pad_token", &tok.pad_token),
        ("unk_token", &tok.unk_token),
    ] {
        config.insert(key.into(), value.clone().into());
    }
    // transformers reads special_tokens_map.json over tokenizer_config.json: keep them equal (and
    // replace a stale copy from the base).
    crate::io::write_json(&dir.join("special_tokens_map.json"), &config)?;
    config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    crate::io::write_json(&dir.join("tokenizer_config.json"), &config)?;
    if let Some(template) = &tok.chat_template {
        crate::io::write_bytes(&dir.join("chat_template.jinja"), template.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ChatTokenizer {
        ChatTokenizer::from_dir(Path::new("tests/fixtures/chatml_setup/base")).unwrap()
    }

    #[test]
    fn setup_matches_trl_and_the_saved_tokenizer_reads_back() {
        let mut tok = base();
        assert!(tok.chat_template.is_none());
        let setup = setup_chatml(&mut tok).unwrap();
        assert_eq!(setup.new_token_ids, vec![400, 401]);
        assert_eq!(setup.vocab_size, 402);
        let expected = ChatTokenizer::from_dir(Path::new(
            "tests/fixtures/chatml_setup/after_setup_tokenizer",
        ))
        .unwrap();
        assert_eq!(tok.chat_template, expected.chat_template);
        assert_eq!(
            (tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()),
            (Some(400), Some(401), Some(401))
        );
        let setup_json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string("tests/fixtures/chatml_setup/setup.json").unwrap(),
        )
        .unwrap();
        let messages = setup_json["conversation"].as_array().unwrap().clone();
        let render = |t: &ChatTokenizer| {
            let text = t.apply_chat_template(&messages, false).unwrap();
            t.encode(&text, false).unwrap()
        };
        let ids = render(&tok);
        let expected_ids: Vec<u32> = setup_json["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, expected_ids);

        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(&tok, dir.path()).unwrap();
        let back = ChatTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(render(&back), ids);
        assert_eq!(back.eos_token_id(), Some(401));
        // A second setup adds nothing.
        let mut again = back;
        assert!(setup_chatml(&mut again).unwrap().new_token_ids.is_empty());
    }
}
