//! TRL's dataset formats, detected per row: language modeling (`text` or conversational `messages`)
//! and prompt-completion (standard strings or conversational message lists). ShareGPT rows
//! (`conversations` of `{from, value}`) are converted to `messages` as TRL's `maybe_convert_to_chatml` does.

use std::path::Path;

use serde_json::Value;

use super::load::{json_kind, Row};
use crate::error::{Error, Result};

/// One training sample in one of TRL's four SFT dataset formats.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// Standard language modeling: `{"text": "..."}`.
    Text(String),
    /// Conversational language modeling: `{"messages": [{"role": ..., "content": ...}, ...]}`,
    /// with the row's template variables.
    Messages(Vec<Value>, ChatVars),
    /// Standard prompt-completion: `{"prompt": "...", "completion": "..."}`.
    PromptCompletion {
        /// The text the model is conditioned on.
        prompt: String,
        /// The text the model learns to produce.
        completion: String,
    },
    /// Conversational prompt-completion: `{"prompt": [messages], "completion": [messages]}`.
    ConversationalPromptCompletion {
        /// The conversation so far (usually ending with a user turn).
        prompt: Vec<Value>,
        /// The turns the model learns to produce (usually one assistant turn).
        completion: Vec<Value>,
        /// The row's template variables.
        vars: ChatVars,
    },
}

/// What a conversational row adds to its chat template's variables, as TRL 1.16 passes them to
/// `apply_chat_template`: the `tools` column (a list of tool schemas, or a JSON string of one) and
/// `chat_template_kwargs` (a mapping whose entries become template variables, e.g.
/// `enable_thinking`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatVars {
    /// The tool schemas, None when the row has none.
    pub tools: Option<Value>,
    /// Extra template variables.
    pub kwargs: serde_json::Map<String, Value>,
}

/// Template variables `chat_template_kwargs` may not set: `apply_chat_template`'s own arguments.
const RESERVED_VARS: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

impl ChatVars {
    /// The `tools` and `chat_template_kwargs` columns of a row (both optional, null = absent).
    fn from_fields(fields: &serde_json::Map<String, Value>) -> std::result::Result<Self, String> {
        let tools = match fields.get("tools") {
            None | Some(Value::Null) => None,
            // TRL: `json.loads(tools) if isinstance(tools, str)` (datasets often store them so).
            Some(Value::String(text)) => Some(serde_json::from_str(text).map_err(|e| {
                format!("`tools` is a string that is not JSON ({e}); give a list of tool schemas or its JSON text")
            })?),
            Some(other) => Some(other.clone()),
        };
        match &tools {
            None | Some(Value::Array(_)) => {}
            Some(other) => {
                return Err(format!(
                    "`tools` is {}, expected a list of tool schemas ({{\"type\": \"function\", \"function\": {{...}}}})",
                    json_kind(other)
                ))
            }
        }
        let kwargs = match fields.get("chat_template_kwargs") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(other) => {
                return Err(format!(
                    "`chat_template_kwargs` is {}, expected an object of template variables such as {{\"enable_thinking\": false}}",
                    json_kind(other)
                ))
            }
        };
        if let Some(key) = kwargs.keys().find(|k| RESERVED_VARS.contains(&k.as_str())) {
            return Err(format!(
                "`chat_template_kwargs` sets `{key}`, which the chat template receives from the row itself"
            ));
        }
        Ok(ChatVars { tools, kwargs })
    }
}

impl Sample {
    /// Whether TRL treats this sample as prompt-completion, which decides the default of
    /// `completion_only_loss` (`SFTTrainer.__init__`: `"prompt" in dataset_sample and "completion" in dataset_sample`).
    pub fn is_prompt_completion(&self) -> bool {
        matches!(
            self,
            Sample::PromptCompletion { .. } | Sample::ConversationalPromptCompletion { .. }
        )
    }
}

/// The formats a row may have, listed in error messages.
const EXPECTED_FORMATS: &str =
    "expected one of: {\"text\": str}, {\"messages\": [{\"role\", \"content\"}, ...]}, \
{\"prompt\": str, \"completion\": str}, {\"prompt\": [messages], \"completion\": [messages]}, \
or {\"conversations\": [{\"from\", \"value\"}, ...]}";

/// Detects the format of one row the way TRL's `SFTTrainer._prepare_dataset` does.
///
/// Precedence follows TRL's `tokenize_fn`: a row with `prompt` is prompt-completion; otherwise a row
/// with conversational `messages` (or ShareGPT `conversations`) is conversational language modeling;
/// otherwise `text` is standard language modeling. `path` is used only in error messages.
pub fn parse_sample(row: &Row, path: &Path) -> Result<Sample> {
    let bad_row = |message: String| Error::BadRow {
        path: path.to_path_buf(),
        line: row.line,
        message,
    };
    let Value::Object(fields) = &row.value else {
        return Err(bad_row(format!(
            "expected a JSON object, found {}",
            json_kind(&row.value)
        )));
    };

    if let Some(prompt) = fields.get("prompt") {
        let completion = fields.get("completion").ok_or_else(|| {
            bad_row(
                "the row has `prompt` but no `completion`; prompt-completion rows need both"
                    .to_string(),
            )
        })?;
        return match (prompt, completion) {
            (Value::String(prompt), Value::String(completion)) => Ok(Sample::PromptCompletion {
                prompt: prompt.clone(),
                completion: completion.clone(),
            }),
            (Value::Array(prompt), Value::Array(completion)) => {
                Ok(Sample::ConversationalPromptCompletion {
                    prompt: parse_messages(prompt, "prompt").map_err(bad_row)?,
                    completion: parse_messages(completion, "completion").map_err(bad_row)?,
                    vars: ChatVars::from_fields(fields).map_err(bad_row)?,
                })
            }
            (prompt, completion) => Err(bad_row(format!(
                "`prompt` is {} and `completion` is {}; both must be strings or both lists of messages",
                json_kind(prompt),
                json_kind(completion)
            ))),
        };
    }

    for key in ["messages", "conversations"] {
        if let Some(value) = fields.get(key) {
            let Value::Array(messages) = value else {
                return Err(bad_row(format!(
                    "`{key}` is {}, expected a list of messages",
                    json_kind(value)
                )));
            };
            return Ok(Sample::Messages(
                parse_messages(messages, key).map_err(bad_row)?,
                ChatVars::from_fields(fields).map_err(bad_row)?,
            ));
        }
    }

    if let Some(text) = fields.get("text") {
        return match text {
            Value::String(text) => Ok(Sample::Text(text.clone())),
            other => Err(bad_row(format!(
                "`text` is {}, expected a string",
                json_kind(other)
            ))),
        };
    }

    let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    Err(bad_row(format!(
        "no known dataset format; the row has keys [{}]; {EXPECTED_FORMATS}",
        keys.join(", ")
    )))
}

/// Checks a list of chat messages and converts ShareGPT `from`/`value` keys to `role`/`content`
/// (TRL's `maybe_convert_to_chatml`, which keeps role names such as `human` and `gpt` as they are).
///
/// Every message must be an object with a string `role`, and a string `content` unless it carries
/// `tool_calls` (then `content` may be missing or null, which transformers drops before rendering).
fn parse_messages(messages: &[Value], key: &str) -> std::result::Result<Vec<Value>, String> {
    if messages.is_empty() {
        return Err(format!(
            "`{key}` is an empty list; it needs at least one message"
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            let Value::Object(fields) = message else {
                return Err(format!(
                    "`{key}[{index}]` is {}, expected an object like {{\"role\": \"user\", \"content\": \"...\"}}",
                    json_kind(message)
                ));
            };
            let mut fields = fields.clone();
            if let Some(role) = fields.remove("from") {
                fields.insert("role".to_string(), role);
            }
            if let Some(content) = fields.remove("value") {
                fields.insert("content".to_string(), content);
            }
            match fields.get("role") {
                Some(Value::String(_)) => {}
                Some(other) => {
                    return Err(format!(
                        "`{key}[{index}].role` is {}, expected a string",
                        json_kind(other)
                    ))
                }
                None => {
                    return Err(format!(
                        "`{key}[{index}]` has no `role`; messages need `role` and `content`"
                    ))
                }
            }
            let has_tool_calls = fields.get("tool_calls").is_some_and(|calls| !calls.is_null());
            match fields.get("content") {
                Some(Value::String(_)) => {}
                None | Some(Value::Null) if has_tool_calls => {}
                Some(Value::Array(_)) => {
                    return Err(format!(
                        "`{key}[{index}].content` is a list of content parts; only string content is supported"
                    ))
                }
                Some(other) => {
                    return Err(format!(
                        "`{key}[{index}].content` is {}, expected a string",
                        json_kind(other)
                    ))
                }
                None => {
                    return Err(format!(
                        "`{key}[{index}]` has no `content`; messages need `role` and `content`"
                    ))
                }
            }
            let empty = matches!(fields.get("content"), Some(Value::String(c)) if c.trim().is_empty());
            if empty && !has_tool_calls && fields.get("role").and_then(Value::as_str) == Some("assistant") {
                return Err(format!(
                    "`{key}[{index}]` is an empty assistant turn: there is nothing to learn from it"
                ));
            }
            Ok(Value::Object(fields))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(value: Value) -> Row {
        Row { line: 7, value }
    }

    fn parse(value: Value) -> Result<Sample> {
        parse_sample(&row(value), Path::new("data/train.jsonl"))
    }

    #[test]
    fn detects_text() {
        assert_eq!(
            parse(json!({"text": "hello"})).expect("text"),
            Sample::Text("hello".into())
        );
    }

    #[test]
    fn detects_messages() {
        let sample = parse(json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}
        ]}))
        .expect("messages");
        let Sample::Messages(messages, _) = sample else {
            panic!("expected messages");
        };
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1]["content"], "hello");
    }

    #[test]
    fn detects_prompt_completion() {
        assert_eq!(
            parse(json!({"prompt": "The sky is", "completion": " blue."})).expect("pc"),
            Sample::PromptCompletion {
                prompt: "The sky is".into(),
                completion: " blue.".into()
            }
        );
    }

    #[test]
    fn detects_conversational_prompt_completion() {
        let sample = parse(json!({
            "prompt": [{"role": "user", "content": "Color of the sky?"}],
            "completion": [{"role": "assistant", "content": "Blue."}]
        }))
        .expect("cpc");
        assert!(matches!(
            sample,
            Sample::ConversationalPromptCompletion { .. }
        ));
        assert!(sample.is_prompt_completion());
    }

    #[test]
    fn prompt_takes_precedence_over_text_and_messages() {
        let sample = parse(json!({"prompt": "a", "completion": "b", "text": "c"})).expect("pc");
        assert!(matches!(sample, Sample::PromptCompletion { .. }));
        let sample = parse(json!({"messages": [{"role": "user", "content": "x"}], "text": "c"}))
            .expect("messages");
        assert!(matches!(sample, Sample::Messages(..)));
    }

    #[test]
    fn sharegpt_conversations_become_messages() {
        let sample = parse(json!({"conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"}
        ]}))
        .expect("sharegpt");
        assert_eq!(
            sample,
            Sample::Messages(
                vec![
                    json!({"role": "human", "content": "hi"}),
                    json!({"role": "gpt", "content": "hello"})
                ],
                ChatVars::default()
            )
        );
    }

    #[test]
    fn tools_and_template_kwargs_are_read_as_trl_reads_them() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        let messages = json!([{"role": "user", "content": "x"}]);
        for given in [tools.clone(), Value::String(tools.to_string())] {
            let sample = parse(json!({"messages": messages, "tools": given,
                "chat_template_kwargs": {"enable_thinking": false}}))
            .expect("tools");
            let Sample::Messages(_, vars) = sample else {
                panic!("messages");
            };
            assert_eq!(vars.tools.as_ref(), Some(&tools));
            assert_eq!(vars.kwargs["enable_thinking"], json!(false));
        }
        for (row, says) in [
            (
                json!({"messages": messages, "tools": "{not json"}),
                "`tools` is a string that is not JSON",
            ),
            (
                json!({"messages": messages, "tools": {"name": "f"}}),
                "`tools` is an object, expected a list",
            ),
            (
                json!({"messages": messages, "chat_template_kwargs": [1]}),
                "`chat_template_kwargs` is a list",
            ),
            (
                json!({"messages": messages, "chat_template_kwargs": {"tools": []}}),
                "sets `tools`",
            ),
        ] {
            let err = parse(row).expect_err("bad row").to_string();
            assert!(err.contains("train.jsonl:7") && err.contains(says), "{err}");
        }
    }

    #[test]
    fn unknown_format_names_keys_and_formats() {
        let err = parse(json!({"question": "q", "answer": "a"})).expect_err("must fail");
        let message = err.to_string();
        assert!(message.starts_with("data/train.jsonl:7: "), "{message}");
        assert!(
            message.contains("[question, answer]"),
            "keys in row order: {message}"
        );
        assert!(message.contains("\"messages\""), "{message}");
        assert!(
            message.contains("\"prompt\": str, \"completion\": str"),
            "{message}"
        );
    }

    #[test]
    fn prompt_without_completion_is_rejected() {
        let err = parse(json!({"prompt": "a"})).expect_err("must fail");
        assert!(err.to_string().contains("no `completion`"), "{err}");
    }

    #[test]
    fn mixed_prompt_completion_kinds_are_rejected() {
        let err = parse(json!({"prompt": [{"role": "user", "content": "a"}], "completion": "b"}))
            .expect_err("must fail");
        assert!(err.to_string().contains("both must be strings"), "{err}");
    }

    #[test]
    fn messages_need_string_role_and_content() {
        let err =
            parse(json!({"messages": [{"role": "user", "content": 3}]})).expect_err("content");
        assert!(
            err.to_string()
                .contains("`messages[0].content` is a number"),
            "{err}"
        );
        let err = parse(json!({"messages": [{"content": "x"}]})).expect_err("role");
        assert!(err.to_string().contains("has no `role`"), "{err}");
        let err = parse(json!({"messages": [{"role": 1, "content": "x"}]})).expect_err("role");
        assert!(
            err.to_string().contains("`messages[0].role` is a number"),
            "{err}"
        );
        let err = parse(json!({"messages": []})).expect_err("empty");
        assert!(err.to_string().contains("empty list"), "{err}");
    }

    #[test]
    fn tool_call_messages_may_omit_content() {
        let sample = parse(json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
        ]}));
        assert!(sample.is_ok(), "{sample:?}");
    }

    #[test]
    fn text_must_be_a_string() {
        let err = parse(json!({"text": ["a"]})).expect_err("must fail");
        assert!(err.to_string().contains("`text` is a list"), "{err}");
    }
}
