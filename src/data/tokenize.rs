//! Samples to token ids and loss masks, reproducing TRL's `SFTTrainer._prepare_dataset`
//! (`add_eos`, `tokenize_fn`, `build_labels`, `truncate` and the filter of fully masked examples).

use std::path::PathBuf;

use super::fast_bpe::FastBpe;
use super::format::{ChatVars, Sample};
use super::mapping::FieldMapping;
use super::template::ChatTemplate;
use super::tokenizer::ChatTokenizer;
use crate::error::{Error, Result};

/// How samples are tokenized; the defaults are TRL's `SFTConfig` defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Keep at most this many tokens of each example (TRL's `max_length`, default 1024, truncation
    /// mode `keep_start`); `None` keeps everything.
    pub max_length: Option<usize>,
    /// Train only on completion tokens of prompt-completion samples. `None` is TRL's default: true for
    /// prompt-completion samples, which are the only ones with a completion mask.
    pub completion_only_loss: Option<bool>,
    /// Train only on assistant turns of conversations (TRL's `assistant_only_loss`): the tokens the
    /// chat template renders inside `{% generation %}` blocks, or, for templates without them, each
    /// assistant message's rendering found by rendering the conversation's prefixes.
    pub assistant_only_loss: bool,
    /// Dataset columns mapped onto TRL's formats before tokenizing.
    pub fields: FieldMapping,
    /// Skip rows that cannot be used (and count them) instead of stopping at the first.
    pub skip_bad_rows: bool,
    /// Where tokenized datasets are cached (see [`super::prepare::prepare_dataset_split`]);
    /// `None` tokenizes into memory every time.
    pub cache_dir: Option<PathBuf>,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            max_length: Some(1024),
            completion_only_loss: None,
            assistant_only_loss: false,
            fields: FieldMapping::default(),
            skip_bad_rows: false,
            cache_dir: None,
        }
    }
}

/// `loss_mask[i] == 1` means token i is a training target (TRL's `labels[i] != -100`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the whole sequence.
    pub input_ids: Vec<u32>,
    /// 1 where the token is a target of the loss, 0 where it is context only; as long as `input_ids`.
    pub loss_mask: Vec<u8>,
    /// Lengths of the documents packed into this example, in order (TRL's `seq_lengths`); empty
    /// for an example that is one document.
    pub seq_lengths: Vec<usize>,
}

impl Example {
    /// One document with its loss mask.
    pub fn new(input_ids: Vec<u32>, loss_mask: Vec<u8>) -> Self {
        Example {
            input_ids,
            loss_mask,
            seq_lengths: Vec::new(),
        }
    }

    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Lengths of the documents in this example (one, unless packed).
    pub fn documents(&self) -> Vec<usize> {
        if self.seq_lengths.is_empty() {
            vec![self.len()]
        } else {
            self.seq_lengths.clone()
        }
    }

    /// The loss targets the shifted loss sees: masked tokens after the first of each document (the
    /// first token of a document is never predicted, not even from the previous packed document).
    pub fn loss_targets(&self) -> usize {
        let mut start = 0;
        let mut n = 0;
        for len in self.documents() {
            n += self.loss_mask[start..start + len]
                .iter()
                .skip(1)
                .filter(|&&b| b == 1)
                .count();
            start += len;
        }
        n
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// The number of tokens marked as loss targets.
    pub fn num_loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&bit| bit == 1).count()
    }

    /// Keeps the first `max_length` tokens (TRL's `truncation_mode="keep_start"`); returns whether
    /// anything was cut.
    pub fn truncate(&mut self, max_length: usize) -> bool {
        if self.input_ids.len() <= max_length {
            return false;
        }
        self.input_ids.truncate(max_length);
        self.loss_mask.truncate(max_length);
        true
    }
}

/// Tokenizes one sample the way TRL prepares it, then truncates it to `opts.max_length`.
///
/// - Text: the EOS token is appended unless the text already ends with it (`add_eos`), and the text is
///   tokenized with the tokenizer's special tokens (`tokenizer(text)`); every token is a target.
/// - Messages: the chat template is rendered and tokenized without special tokens
///   (`apply_chat_template(tokenize=True)`); every token is a target.
/// - Prompt-completion: EOS is appended to the completion unless already there (`add_eos`); `prompt`
///   and `prompt + completion` are tokenized with special tokens; the completion starts where the two
///   id sequences diverge (`common_prefix_length`).
/// - Conversational prompt-completion: the prompt is rendered with `add_generation_prompt=True`,
///   `prompt + completion` without it, both tokenized without special tokens; the completion starts
///   where they diverge.
///
/// Prompt tokens are masked when `completion_only_loss` is on (`build_labels`).
pub fn tokenize_sample(
    sample: &Sample,
    tok: &ChatTokenizer,
    opts: &TokenizeOptions,
) -> Result<Example> {
    let mut tokenizer = SampleTokenizer::new(tok, opts);
    let mut example = tokenizer.tokenize(sample)?;
    if let Some(max_length) = opts.max_length {
        example.truncate(max_length);
    }
    Ok(example)
}

/// Tokenizes samples with one tokenizer, compiling its chat template once, on first use.
pub(crate) struct SampleTokenizer<'a> {
    tok: &'a ChatTokenizer,
    /// The byte-level BPE fast path, when the tokenizer is one it reproduces.
    fast: Option<FastBpe<'a>>,
    completion_only_loss: Option<bool>,
    assistant_only_loss: bool,
    template: Option<ChatTemplate>,
}

impl<'a> SampleTokenizer<'a> {
    pub(crate) fn new(tok: &'a ChatTokenizer, opts: &TokenizeOptions) -> Self {
        SampleTokenizer {
            tok,
            fast: None,
            completion_only_loss: opts.completion_only_loss,
            assistant_only_loss: opts.assistant_only_loss,
            template: None,
        }
    }

    /// With the byte-level BPE fast path where it applies: for a tokenizer that encodes many
    /// samples (setting it up reads the whole tokenizer once).
    pub(crate) fn with_fast_path(mut self) -> Self {
        self.fast = FastBpe::new(self.tok);
        self
    }

    /// The ids of `text`: through the fast path where it applies, else the tokenizer.
    fn encode(&mut self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match self
            .fast
            .as_mut()
            .and_then(|f| f.encode(text, add_special_tokens))
        {
            Some(ids) => ids,
            None => self.tok.encode(text, add_special_tokens),
        }
    }

    /// TRL's `tokenize_fn` followed by `build_labels`, before truncation.
    pub(crate) fn tokenize(&mut self, sample: &Sample) -> Result<Example> {
        // SFTTrainer.__init__: `completion_only_loss = "prompt" in sample and "completion" in sample` when unset.
        let completion_only_loss = self
            .completion_only_loss
            .unwrap_or_else(|| sample.is_prompt_completion());
        if self.assistant_only_loss
            && !matches!(
                sample,
                Sample::Messages(..) | Sample::ConversationalPromptCompletion { .. }
            )
        {
            return Err(Error::Config(
                "--assistant-only-loss needs conversational data (messages, or a prompt and \
                 completion given as messages)"
                    .to_string(),
            ));
        }
        let (input_ids, completion_start) = match sample {
            Sample::Text(text) => {
                let text = with_eos(text, self.eos_token()?);
                (self.encode(&text, true)?, None)
            }
            Sample::Messages(messages, vars) if self.assistant_only_loss => {
                let (ids, mask) = self.assistant_tokens(messages, vars)?;
                return Ok(Example::new(ids, mask));
            }
            Sample::Messages(messages, vars) => {
                let rendered = self.render(messages, false, vars)?;
                (self.encode(&rendered, false)?, None)
            }
            Sample::PromptCompletion { prompt, completion } => {
                let completion = with_eos(completion, self.eos_token()?);
                let prompt_ids = self.encode(prompt, true)?;
                let full_ids = self.encode(&format!("{prompt}{completion}"), true)?;
                let start = common_prefix_length(&prompt_ids, &full_ids);
                (full_ids, Some(start))
            }
            Sample::ConversationalPromptCompletion {
                prompt,
                completion,
                vars,
            } => {
                let prompt_text = self.render(prompt, true, vars)?;
                let conversation: Vec<serde_json::Value> =
                    prompt.iter().chain(completion.iter()).cloned().collect();
                let full_text = self.render(&conversation, false, vars)?;
                let prompt_ids = self.encode(&prompt_text, false)?;
                let full_ids = self.encode(&full_text, false)?;
                let start = common_prefix_length(&prompt_ids, &full_ids);
                (full_ids, Some(start))
            }
        };
        let mut loss_mask: Vec<u8> = match completion_start {
            Some(start) if completion_only_loss => {
                (0..input_ids.len()).map(|i| u8::from(i >= start)).collect()
            }
            _ => vec![1; input_ids.len()],
        };
        if let (
            true,
            Sample::ConversationalPromptCompletion {
                prompt,
                completion,
                vars,
            },
        ) = (self.assistant_only_loss, sample)
        {
            let conversation: Vec<serde_json::Value> =
                prompt.iter().chain(completion.iter()).cloned().collect();
            let (ids, assistant) = self.assistant_tokens(&conversation, vars)?;
            if ids != input_ids {
                return Err(Error::Template(
                    "--assistant-only-loss: the conversation tokenizes differently with and without \
                     generation markers"
                        .to_string(),
                ));
            }
            for (m, a) in loss_mask.iter_mut().zip(assistant) {
                *m &= a;
            }
        }
        Ok(Example::new(input_ids, loss_mask))
    }

    /// The conversation's ids and a mask of its assistant tokens: the tokens overlapping text the
    /// template renders inside `{% generation %}` blocks (transformers'
    /// `return_assistant_tokens_mask`), or, when the template has none, overlapping each assistant
    /// message's own rendering: from the end of the conversation before it (rendered with the
    /// generation prompt) to the end of the conversation including it.
    fn assistant_tokens(
        &mut self,
        messages: &[serde_json::Value],
        vars: &ChatVars,
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        self.render(messages, false, vars)?; // compiles the template
        let template = self.template.as_ref().ok_or_else(|| {
            Error::Template("the chat template could not be compiled".to_string())
        })?;
        let special = self.tok.template_special_tokens();
        let (text, spans) = if template.has_generation_blocks() {
            template.render_with_generation_spans(messages, false, &special, vars)?
        } else {
            let text = template.render_with(messages, false, &special, vars)?;
            let mut spans = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
                    continue;
                }
                let before = if i == 0 {
                    String::new()
                } else {
                    template.render_with(&messages[..i], true, &special, vars)?
                };
                let through = template.render_with(&messages[..=i], false, &special, vars)?;
                if !through.starts_with(&before) || !text.starts_with(&through) {
                    return Err(Error::Template(format!(
                        "--assistant-only-loss: the chat template has no {{% generation %}} blocks and \
                         renders message {i} differently depending on what follows, so its assistant \
                         tokens cannot be located; add {{% generation %}} ... {{% endgeneration %}} \
                         around the assistant content in the template"
                    )));
                }
                spans.push(before.len()..through.len());
            }
            (text, spans)
        };
        let (ids, offsets) = self.tok.encode_with_offsets(&text, false)?;
        let mask = offsets
            .iter()
            .map(|&(s, e)| u8::from(e > s && spans.iter().any(|r| s < r.end && e > r.start)))
            .collect();
        Ok((ids, mask))
    }

    /// The EOS token TRL's `add_eos` appends, which text formats need.
    fn eos_token(&self) -> Result<&'a str> {
        self.tok.eos_token.as_deref().ok_or_else(|| {
            Error::Tokenizer(
                "the tokenizer has no eos_token, which TRL appends to text and completions; set \
                 `eos_token` in tokenizer_config.json"
                    .to_string(),
            )
        })
    }

    /// Renders messages with the tokenizer's chat template, compiled on first use.
    fn render(
        &mut self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        vars: &ChatVars,
    ) -> Result<String> {
        if self.template.is_none() {
            self.template = Some(self.tok.compile_chat_template()?);
        }
        let template = self.template.as_ref().ok_or_else(|| {
            Error::Template("the chat template could not be compiled".to_string())
        })?;
        template.render_with(
            messages,
            add_generation_prompt,
            &self.tok.template_special_tokens(),
            vars,
        )
    }
}

/// `text` with `eos` appended unless it already ends with it (TRL's `add_eos`).
fn with_eos(text: &str, eos: &str) -> String {
    if text.ends_with(eos) {
        text.to_string()
    } else {
        format!("{text}{eos}")
    }
}

/// The number of leading ids two sequences share (TRL's `common_prefix_length`): the completion
/// starts there, which is not always the prompt's length when tokens merge across the boundary or the
/// template renders the prompt differently alone.
fn common_prefix_length(ids: &[u32], other_ids: &[u32]) -> usize {
    ids.iter()
        .zip(other_ids)
        .take_while(|(a, b)| a == b)
        .count()
}

/// The example's text with each run of loss tokens marked (green on a terminal, `[[ ]]` otherwise).
pub fn marked(tok: &ChatTokenizer, e: &Example, color: bool) -> Result<String> {
    let (open, close) = if color {
        ("\x1b[32m", "\x1b[0m")
    } else {
        ("[[", "]]")
    };
    let mut out = String::new();
    let mut start = 0;
    while start < e.len() {
        let bit = e.loss_mask[start];
        let end = (start..e.len())
            .find(|&i| e.loss_mask[i] != bit)
            .unwrap_or(e.len());
        let text = tok.decode(&e.input_ids[start..end], false)?;
        if bit == 1 {
            out.push_str(open);
            out.push_str(&text);
            out.push_str(close);
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::tokenizer::test_support::{bos_tokenizer, chatml_tokenizer};
    use super::*;
    use serde_json::json;

    fn byte_ids(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    #[test]
    fn text_gets_eos_and_special_tokens_and_trains_on_everything() {
        let tok = bos_tokenizer();
        let example = tokenize_sample(
            &Sample::Text("hi".into()),
            &tok,
            &TokenizeOptions::default(),
        )
        .expect("tokenize");
        assert_eq!(
            example.input_ids,
            [vec![258], byte_ids("hi"), vec![259]].concat()
        );
        assert_eq!(example.loss_mask, vec![1; 4]);
    }

    #[test]
    fn text_already_ending_with_eos_is_left_alone() {
        let tok = bos_tokenizer();
        let example = tokenize_sample(
            &Sample::Text("hi</s>".into()),
            &tok,
            &TokenizeOptions::default(),
        )
        .expect("tokenize");
        assert_eq!(
            example.input_ids,
            [vec![258], byte_ids("hi"), vec![259]].concat()
        );
    }

    #[test]
    fn prompt_completion_masks_the_prompt_by_default() {
        let tok = bos_tokenizer();
        let sample = Sample::PromptCompletion {
            prompt: "Q".into(),
            completion: "A".into(),
        };
        let example =
            tokenize_sample(&sample, &tok, &TokenizeOptions::default()).expect("tokenize");
        assert_eq!(example.input_ids, vec![258, 'Q' as u32, 'A' as u32, 259]);
        assert_eq!(example.loss_mask, vec![0, 0, 1, 1]);

        let all = TokenizeOptions {
            completion_only_loss: Some(false),
            ..Default::default()
        };
        let example = tokenize_sample(&sample, &tok, &all).expect("tokenize");
        assert_eq!(example.loss_mask, vec![1; 4]);
    }

    #[test]
    fn messages_render_the_template_without_special_tokens() {
        let tok = bos_tokenizer();
        let sample = Sample::Messages(
            vec![json!({"role": "user", "content": "a"})],
            ChatVars::default(),
        );
        let example =
            tokenize_sample(&sample, &tok, &TokenizeOptions::default()).expect("tokenize");
        assert_eq!(
            example.input_ids,
            [vec![256], byte_ids("user\na"), vec![257], byte_ids("\n")].concat()
        );
        assert!(example.loss_mask.iter().all(|&bit| bit == 1));

        let only_completion = TokenizeOptions {
            completion_only_loss: Some(true),
            ..Default::default()
        };
        let masked = tokenize_sample(&sample, &tok, &only_completion).expect("tokenize");
        assert_eq!(
            masked.loss_mask, example.loss_mask,
            "messages have no completion mask"
        );
    }

    #[test]
    fn conversational_prompt_completion_masks_the_prompt_and_generation_prompt() {
        let tok = chatml_tokenizer();
        let sample = Sample::ConversationalPromptCompletion {
            prompt: vec![json!({"role": "user", "content": "q"})],
            completion: vec![json!({"role": "assistant", "content": "a"})],
            vars: ChatVars::default(),
        };
        let example =
            tokenize_sample(&sample, &tok, &TokenizeOptions::default()).expect("tokenize");
        let prompt_len = [
            vec![256],
            byte_ids("user\nq"),
            vec![257],
            byte_ids("\n"),
            vec![256],
            byte_ids("assistant\n"),
        ]
        .concat()
        .len();
        let expected = [
            vec![256],
            byte_ids("user\nq"),
            vec![257],
            byte_ids("\n"),
            vec![256],
            byte_ids("assistant\na"),
            vec![257],
            byte_ids("\n"),
        ]
        .concat();
        assert_eq!(example.input_ids, expected);
        let expected_mask: Vec<u8> = (0..expected.len())
            .map(|i| u8::from(i >= prompt_len))
            .collect();
        assert_eq!(example.loss_mask, expected_mask);
    }

    #[test]
    fn completion_starts_where_ids_diverge() {
        assert_eq!(common_prefix_length(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix_length(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix_length(&[], &[1]), 0);
    }

    #[test]
    fn truncation_keeps_the_start() {
        let tok = chatml_tokenizer();
        let opts = TokenizeOptions {
            max_length: Some(3),
            completion_only_loss: None,
            assistant_only_loss: false,
            ..TokenizeOptions::default()
        };
        let example =
            tokenize_sample(&Sample::Text("abcdef".into()), &tok, &opts).expect("tokenize");
        assert_eq!(example.input_ids, byte_ids("abc"));
        assert_eq!(example.loss_mask, vec![1, 1, 1]);
    }

    #[test]
    fn text_without_eos_token_is_an_error() {
        let mut tok = chatml_tokenizer();
        tok.eos_token = None;
        let err = tokenize_sample(&Sample::Text("a".into()), &tok, &TokenizeOptions::default())
            .expect_err("must fail");
        assert!(err.to_string().contains("no eos_token"), "{err}");
    }
}
