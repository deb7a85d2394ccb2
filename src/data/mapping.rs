//! Mapping dataset columns that are not in TRL's formats onto them, before the format is detected:
//! a text column under another name (`--dataset-text-field`), prompt and completion columns
//! (`--prompt-field`, `--completion-field`), a completion assembled from several columns
//! (`--completion-template "<think>{Complex_CoT}</think>{Response}"`), and a system prompt
//! (`--system-prompt`) that turns prompt/completion rows into conversations.

use super::load::Row;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// How dataset columns map onto TRL's formats; the default changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldMapping {
    /// The column holding plain text (TRL's `dataset_text_field`; `text` when unset).
    pub text_field: Option<String>,
    /// The column holding the prompt.
    pub prompt_field: Option<String>,
    /// The column holding the completion.
    pub completion_field: Option<String>,
    /// The completion assembled from columns: `{Column}` is replaced by the column's text, `{{` and
    /// `}}` are literal braces.
    pub completion_template: Option<String>,
    /// A system message put before each conversation that has none.
    pub system_prompt: Option<String>,
}

impl FieldMapping {
    /// Whether the mapping changes anything.
    pub fn is_identity(&self) -> bool {
        *self == FieldMapping::default()
    }

    /// The row in TRL's format.
    pub fn apply(&self, row: &Row, path: &Path) -> Result<Row> {
        if self.is_identity() {
            return Ok(row.clone());
        }
        let bad = |message: String| Error::BadRow {
            path: path.to_path_buf(),
            line: row.line,
            message,
        };
        let Value::Object(fields) = &row.value else {
            return Ok(row.clone());
        };
        let text_of = |name: &str| -> Result<String> {
            match fields.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) => Ok(n.to_string()),
                Some(other) => Err(bad(format!(
                    "column `{name}` holds {}, expected text",
                    kind(other)
                ))),
                None => Err(bad(format!(
                    "no column `{name}`; the row has {}",
                    fields
                        .keys()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        };
        let mut out: Map<String, Value> = Map::new();
        if let Some(name) = &self.text_field {
            out.insert("text".into(), Value::String(text_of(name)?));
        }
        let prompt = self.prompt_field.as_deref().map(text_of).transpose()?;
        let completion = match (&self.completion_template, &self.completion_field) {
            (Some(template), _) => Some(fill(template, &text_of).map_err(|e| match e {
                Error::Config(m) => bad(m),
                other => other,
            })?),
            (None, Some(name)) => Some(text_of(name)?),
            (None, None) => None,
        };
        match (prompt, completion) {
            (Some(p), Some(c)) => {
                out.insert("prompt".into(), Value::String(p));
                out.insert("completion".into(), Value::String(c));
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    "a prompt column needs a completion column or template and vice versa \
                     (--prompt-field with --completion-field or --completion-template)"
                        .into(),
                ))
            }
        }
        if out.is_empty() {
            out = fields.clone();
        }
        if let Some(system) = &self.system_prompt {
            with_system_prompt(&mut out, system);
        }
        Ok(Row {
            line: row.line,
            value: Value::Object(out),
        })
    }
}

/// Puts a system message first: into `messages` or a conversational prompt when it has none, and
/// turns string prompt/completion rows into conversational ones.
fn with_system_prompt(row: &mut Map<String, Value>, system: &str) {
    let system_message = json!({"role": "system", "content": system});
    let starts_with_system = |messages: &Vec<Value>| {
        messages
            .first()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("system")
    };
    if let Some(Value::Array(messages)) = row.get_mut("messages") {
        if !starts_with_system(messages) {
            messages.insert(0, system_message);
        }
        return;
    }
    match (row.get("prompt").cloned(), row.get("completion").cloned()) {
        (Some(Value::String(p)), Some(Value::String(c))) => {
            row.insert(
                "prompt".into(),
                json!([system_message, {"role": "user", "content": p}]),
            );
            row.insert(
                "completion".into(),
                json!([{"role": "assistant", "content": c}]),
            );
        }
        (Some(Value::Array(mut p)), Some(_)) if !starts_with_system(&p) => {
            p.insert(0, system_message);
            row.insert("prompt".into(), Value::Array(p));
        }
        _ => {}
    }
}

/// Replaces each `{Column}` of `template` by `text_of(Column)`; `{{` / `}}` are literal braces.
fn fill(template: &str, text_of: &dyn Fn(&str) -> Result<String>) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if let Some(after) = tail.strip_prefix('{') {
            let end = after.find('}').ok_or_else(|| {
                Error::Config(format!("--completion-template `{template}`: unclosed `{{`"))
            })?;
            out.push_str(&text_of(&after[..end])?);
            rest = &after[end + 1..];
        } else {
            return Err(Error::Config(format!(
                "--completion-template `{template}`: a lone `}}` (write `}}}}` for a brace)"
            )));
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Row {
        Row { line: 3, value: v }
    }

    #[test]
    fn medical_o1_columns_become_a_conversation_with_a_system_prompt() {
        let mapping = FieldMapping {
            prompt_field: Some("Question".into()),
            completion_template: Some("<think>{Complex_CoT}</think>{Response} {{ok}}".into()),
            system_prompt: Some("You are a doctor.".into()),
            ..FieldMapping::default()
        };
        let r = row(json!({"Question": "Q?", "Complex_CoT": "because", "Response": "A."}));
        let mapped = mapping.apply(&r, Path::new("d.jsonl")).unwrap();
        assert_eq!(
            mapped.value,
            json!({
                "prompt": [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "Q?"}],
                "completion": [{"role": "assistant", "content": "<think>because</think>A. {ok}"}],
            })
        );
    }

    #[test]
    fn a_missing_column_names_the_file_line_and_the_columns_there_are() {
        let mapping = FieldMapping {
            text_field: Some("body".into()),
            ..FieldMapping::default()
        };
        let err = mapping
            .apply(&row(json!({"title": "x"})), Path::new("d.jsonl"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "d.jsonl:3: no column `body`; the row has `title`");
    }

    #[test]
    fn system_prompts_go_first_only_when_missing() {
        let mapping = FieldMapping {
            system_prompt: Some("S".into()),
            ..FieldMapping::default()
        };
        let r = row(json!({"messages": [{"role": "user", "content": "hi"}]}));
        let mapped = mapping.apply(&r, Path::new("d")).unwrap();
        assert_eq!(mapped.value["messages"][0]["role"], "system");
        let again = mapping.apply(&mapped, Path::new("d")).unwrap();
        assert_eq!(again.value["messages"].as_array().unwrap().len(), 2);
    }
}
