//! Chat templates rendered the way transformers renders them (`utils/chat_template_utils.py`:
//! `_compile_jinja_template` and `render_jinja_template`): Jinja2 with `trim_blocks` and `lstrip_blocks`,
//! loop controls, `raise_exception`, transformers' `tojson`, `strftime_now`, Python string methods and
//! Python's way of printing values, here on minijinja.

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, Error as TemplateError, ErrorKind};
use serde_json::Value as JsonValue;

use super::format::ChatVars;
use super::python_format::{json_dumps, python_str, JsonDumpsOptions};
use super::strftime::strftime_now;
use crate::error::{Error, Result};

/// The name the template is stored under; minijinja reports it in error locations.
const TEMPLATE_NAME: &str = "chat_template";

/// Message fields holding a model's reasoning; transformers' `_alias_reasoning_fields` copies the first
/// one present to `reasoning_content` (and to `thinking`, for templates that read that name).
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// The error `raise_exception(message)` raises inside a template; carried as the source of the
/// minijinja error so that the user sees the template's own message.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// Instructions one rendering may run (minijinja's fuel): far above what any chat template needs
/// for a long conversation, far below a loop that does not end.
const MAX_FUEL: u64 = 10_000_000;

/// Bytes one rendering may produce.
const MAX_RENDER_BYTES: usize = 32 << 20;

/// A rendering's output, refusing to grow past [`MAX_RENDER_BYTES`].
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDER_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template with the environment transformers uses.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        // A template from a model folder is untrusted: bound the work of one rendering.
        env.set_fuel(Some(MAX_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            out.write_str(&python_str(value))
                .map_err(|_| TemplateError::new(ErrorKind::WriteFailure, "could not write output"))
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", tojson);
        env.add_test("iterable", is_iterable);
        env.add_test("sequence", is_sequence);
        env.add_test("number", is_number);
        // Jinja2's lexer turns every newline sequence into "\n"; minijinja keeps "\r\n".
        let source = source.replace("\r\n", "\n").replace('\r', "\n");
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(&source))
            .map_err(|e| template_error(&e))?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` as transformers' `apply_chat_template(..., tokenize=False)` does.
    ///
    /// Like transformers, message keys whose value is null are dropped, reasoning fields are aliased,
    /// `tools` and `documents` are none, and `special_tokens` (pairs such as `("eos_token", "</s>")`)
    /// become template variables.
    pub fn render(
        &self,
        messages: &[JsonValue],
        add_generation_prompt: bool,
        special_tokens: &[(&str, &str)],
    ) -> Result<String> {
        self.render_with(
            messages,
            add_generation_prompt,
            special_tokens,
            &ChatVars::default(),
        )
    }

    /// [`ChatTemplate::render`] with a row's `tools` and `chat_template_kwargs` ([`ChatVars`]):
    /// `tools` as given, each kwarg a template variable (over a special token of the same name,
    /// as transformers passes them).
    pub fn render_with(
        &self,
        messages: &[JsonValue],
        add_generation_prompt: bool,
        special_tokens: &[(&str, &str)],
        vars: &ChatVars,
    ) -> Result<String> {
        let marked = self.render_marked(messages, add_generation_prompt, special_tokens, vars)?;
        Ok(without_markers(&marked).0)
    }

    /// Renders with the generation markers left in.
    fn render_marked(
        &self,
        messages: &[JsonValue],
        add_generation_prompt: bool,
        special_tokens: &[(&str, &str)],
        vars: &ChatVars,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Template(
                "cannot apply the chat template to an empty conversation; provide at least one message".to_string(),
            ));
        }
        let messages: Vec<JsonValue> = messages.iter().map(normalize_message).collect();
        let mut context: Vec<(&str, Value)> = special_tokens
            .iter()
            .map(|(name, token)| (*name, Value::from(*token)))
            .collect();
        for (name, value) in &vars.kwargs {
            context.push((name.as_str(), Value::from_serialize(value)));
        }
        context.push(("messages", Value::from_serialize(&messages)));
        context.push((
            "tools",
            vars.tools
                .as_ref()
                .map_or(Value::from(()), Value::from_serialize),
        ));
        context.push(("documents", Value::from(())));
        context.push(("add_generation_prompt", Value::from(add_generation_prompt)));
        let context: Value = context.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error(&e))?;
        let mut out = Capped::default();
        match template.render_captured_to(context, &mut out) {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| Error::Template("the chat template rendered invalid UTF-8".into())),
            Err(_) if out.overflowed => Err(Error::Template(format!(
                "rendered more than {} MiB for one conversation; a chat template should render the conversation, not generate text",
                MAX_RENDER_BYTES >> 20
            ))),
            Err(e) => Err(template_error(&e)),
        }
    }

    /// Like [`ChatTemplate::render`], also returning the byte ranges of the text rendered inside
    /// `{% generation %}` blocks (transformers' `return_assistant_tokens_mask`).
    pub fn render_with_generation_spans(
        &self,
        messages: &[JsonValue],
        add_generation_prompt: bool,
        special_tokens: &[(&str, &str)],
        vars: &ChatVars,
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let messages: Vec<JsonValue> = messages.to_vec();
        let marked = self.render_marked(&messages, add_generation_prompt, special_tokens, vars)?;
        Ok(without_markers(&marked))
    }

    /// Whether the template has `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.env
            .get_template(TEMPLATE_NAME)
            .map(|t| t.source().contains(GENERATION_START))
            .unwrap_or(false)
    }
}

/// Removes the generation markers from rendered text: the text, and the byte ranges between each
/// start and end marker.
fn without_markers(marked: &str) -> (String, Vec<std::ops::Range<usize>>) {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in marked.chars() {
        match c {
            GENERATION_START => open = Some(text.len()),
            GENERATION_END => {
                if let Some(start) = open.take() {
                    spans.push(start..text.len());
                }
            }
            other => text.push(other),
        }
    }
    (text, spans)
}

/// transformers' preparation of one message: keys with null values are dropped
/// (`apply_chat_template`) and reasoning is aliased (`_alias_reasoning_fields`).
fn normalize_message(message: &JsonValue) -> JsonValue {
    let JsonValue::Object(fields) = message else {
        return message.clone();
    };
    let mut fields: serde_json::Map<String, JsonValue> = fields
        .iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let reasoning = REASONING_FIELDS
        .iter()
        .find_map(|key| fields.get(*key))
        .cloned();
    if let Some(reasoning) = reasoning {
        fields
            .entry("thinking".to_string())
            .or_insert_with(|| reasoning.clone());
        fields.insert("reasoning_content".to_string(), reasoning);
    }
    JsonValue::Object(fields)
}

/// Jinja2's `is iterable` (`iter(value)` succeeds): true for strings, lists, dicts and undefined,
/// false for none, booleans and numbers (minijinja would iterate none as empty).
fn is_iterable(value: &Value) -> bool {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Invalid => false,
        ValueKind::Undefined => true,
        _ => value.try_iter().is_ok(),
    }
}

/// Jinja2's `is sequence` (has a length and item access): true for strings, lists and dicts.
fn is_sequence(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::String
            | ValueKind::Bytes
            | ValueKind::Seq
            | ValueKind::Map
            | ValueKind::Undefined
    )
}

/// Jinja2's `is number` (`isinstance(value, Number)`), which holds for booleans too.
fn is_number(value: &Value) -> bool {
    matches!(value.kind(), ValueKind::Number | ValueKind::Bool)
}

/// `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(message: String) -> std::result::Result<Value, TemplateError> {
    Err(
        TemplateError::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python's `json.dumps`, without Jinja's HTML escaping.
fn tojson(
    value: &Value,
    positional: Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, TemplateError> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > names.len() {
        return Err(TemplateError::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments: ensure_ascii, indent, separators, sort_keys",
        ));
    }
    let argument = |index: usize| -> std::result::Result<Option<Value>, TemplateError> {
        if let Some(value) = positional.get(index) {
            return Ok(Some(value.clone()));
        }
        kwargs.get::<Option<Value>>(names[index])
    };
    let mut options = JsonDumpsOptions::default();
    if let Some(ensure_ascii) = argument(0)? {
        options.ensure_ascii = ensure_ascii.is_true();
    }
    if let Some(indent) = argument(1)? {
        options.indent = if indent.is_none() {
            None
        } else if let Some(text) = indent.as_str() {
            Some(text.to_string())
        } else {
            let width = indent.as_i64().ok_or_else(|| {
                TemplateError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                )
            })?;
            Some(" ".repeat(width.max(0) as usize))
        };
    }
    if let Some(separators) = argument(2)? {
        if !separators.is_none() {
            let parts: Vec<String> = separators
                .try_iter()?
                .map(|part| part.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .unwrap_or_default();
            let [item, key] = <[String; 2]>::try_from(parts).map_err(|_| {
                TemplateError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be two strings (item_separator, key_separator)",
                )
            })?;
            options.separators = Some((item, key));
        }
    }
    if let Some(sort_keys) = argument(3)? {
        options.sort_keys = sort_keys.is_true();
    }
    kwargs.assert_all_used()?;
    json_dumps(value, &options).map(Value::from)
}

/// Marks the start of a `{% generation %}` block in rendered text (a private-use character that
/// rendering removes again, recording where it was).
const GENERATION_START: char = '\u{F8F0}';
/// Marks the end of a `{% generation %}` block.
const GENERATION_END: char = '\u{F8F1}';

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` block (which marks assistant
/// tokens for `return_assistant_tokens_mask` and renders its body unchanged) with an `if true`
/// block that also prints a marker character, since minijinja has no custom tags. The marker sits
/// between two tags so the original whitespace control (`-`, `trim_blocks`, `lstrip_blocks`) still
/// applies to the text around the original tag.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((length, replacement)) => {
                out.push_str(&replacement);
                rest = &tag[length..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with `{%[-+] generation [-+]%}` or the `endgeneration` form, returns its length and
/// the equivalent `if` / `endif` tag.
fn parse_generation_tag(tag: &str) -> Option<(usize, String)> {
    let body = &tag[2..];
    let (open_marker, body) = match body.chars().next() {
        Some(marker @ ('-' | '+')) => (marker.to_string(), &body[1..]),
        _ => (String::new(), body),
    };
    let trimmed = body.trim_start();
    let (keyword, outer, inner, marker) = if let Some(after) = trimmed.strip_prefix("endgeneration")
    {
        (after, "endif", "endif", GENERATION_END)
    } else if let Some(after) = trimmed.strip_prefix("generation") {
        (after, "if true", "if true", GENERATION_START)
    } else {
        return None;
    };
    let after_keyword = keyword.trim_start();
    let (close_marker, after_close) = match after_keyword.chars().next() {
        Some(marker @ ('-' | '+')) if after_keyword[1..].starts_with("%}") => {
            (marker.to_string(), &after_keyword[3..])
        }
        _ if after_keyword.starts_with("%}") => (String::new(), &after_keyword[2..]),
        _ => return None,
    };
    let length = tag.len() - after_close.len();
    Some((
        length,
        format!("{{%{open_marker} {outer} %}}{{{{ '{marker}' }}}}{{% {inner} {close_marker}%}}"),
    ))
}

/// Converts a minijinja error into the crate's error, keeping `raise_exception`'s message as is.
fn template_error(error: &TemplateError) -> Error {
    if error.kind() == ErrorKind::OutOfFuel {
        return Error::Template(format!(
            "ran more than {MAX_FUEL} steps on one conversation (a loop that does not end?); fix the template or replace it (--chat-template)"
        ));
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(raised) = current.downcast_ref::<RaisedByTemplate>() {
            return Error::Template(raised.0.clone());
        }
        source = current.source();
    }
    Error::Template(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn render(
        source: &str,
        messages: serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages = messages.as_array().cloned().unwrap_or_default();
        ChatTemplate::new(source)?.render(
            &messages,
            add_generation_prompt,
            &[("eos_token", "</s>")],
        )
    }

    fn conversation() -> serde_json::Value {
        json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    }

    #[test]
    fn renders_chatml() {
        let text = render(CHATML, conversation(), false).expect("render");
        assert_eq!(
            text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        );
        let text =
            render(CHATML, json!([{"role": "user", "content": "Hi"}]), true).expect("render");
        assert!(text.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn trims_and_lstrips_blocks() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        assert_eq!(
            render(source, conversation(), false).expect("render"),
            "[Hi]\n"
        );
    }

    #[test]
    fn drops_a_single_trailing_newline_like_jinja2() {
        assert_eq!(render("x\n", conversation(), false).expect("render"), "x");
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let source = "{% if messages[0].role != 'system' %}{{ raise_exception('Conversations must start with a system message') }}{% endif %}";
        let err = render(source, conversation(), false).expect_err("must fail");
        assert!(
            matches!(&err, Error::Template(m) if m == "Conversations must start with a system message"),
            "{err:?}"
        );
    }

    #[test]
    fn loop_controls_work() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content }}{% endfor %}|{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}";
        assert_eq!(
            render(source, conversation(), false).expect("render"),
            "Hi|Hello"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let source = "{{ messages[0].content.strip() }}|{{ messages[0].content.startswith('he') }}|{{ messages[0].content.split(' ') | join(',') }}|{{ messages[0].content.upper() }}";
        let messages = json!([{"role": "user", "content": "  hello world "}]);
        assert_eq!(
            render(source, messages, false).expect("render"),
            "hello world|False|,,hello,world,|  HELLO WORLD "
        );
    }

    #[test]
    fn tojson_matches_transformers() {
        let messages = json!([{"role": "user", "content": "<b>é</b>", "extra": {"a": [1, 2]}}]);
        let text = render(
            "{{ messages[0].content | tojson }} {{ messages[0].extra | tojson }}",
            messages.clone(),
            false,
        )
        .expect("render");
        assert_eq!(text, "\"<b>é</b>\" {\"a\": [1, 2]}");
        let text = render(
            "{{ messages[0].extra | tojson(indent=2) }}",
            messages,
            false,
        )
        .expect("render");
        assert_eq!(text, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    }

    #[test]
    fn prints_values_as_python_does() {
        let text = render(
            "{{ add_generation_prompt }} {{ none }} {{ 1.0 }} {{ [1, 'a'] }}",
            conversation(),
            true,
        )
        .expect("render");
        assert_eq!(text, "True None 1.0 [1, 'a']");
    }

    #[test]
    fn special_tokens_tools_and_namespace_are_available() {
        let source = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ eos_token }}{{ tools is none }}{{ bos_token is defined }}";
        assert_eq!(
            render(source, conversation(), false).expect("render"),
            "2</s>TrueFalse"
        );
    }

    #[test]
    fn strftime_now_is_available() {
        let text = render("{{ strftime_now('%Y') }}", conversation(), false).expect("render");
        assert_eq!(text.len(), 4);
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let source = "{% for m in messages %}{%- if m.role == 'assistant' -%}\n{% generation %}{{ m.content }}{%- endgeneration %}{% endif %}{% endfor %}";
        assert_eq!(
            render(source, conversation(), false).expect("render"),
            "Hello"
        );
        assert_eq!(
            without_generation_tags("{%- generation -%}x{%endgeneration%}"),
            format!(
                "{{%- if true %}}{{{{ '{GENERATION_START}' }}}}{{% if true -%}}x\
                 {{% endif %}}{{{{ '{GENERATION_END}' }}}}{{% endif %}}"
            )
        );
        // The spans cover exactly the block's output, whitespace control included.
        let template = ChatTemplate::new(source).expect("compile");
        let messages = vec![
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello"}),
            json!({"role": "user", "content": "More"}),
            json!({"role": "assistant", "content": "Sure"}),
        ];
        let (text, spans) = template
            .render_with_generation_spans(&messages, false, &[], &ChatVars::default())
            .expect("render");
        assert_eq!(text, "HelloSure");
        assert_eq!(spans, vec![0..5, 5..9]);
        assert!(template.has_generation_blocks());
        assert_eq!(
            without_generation_tags("{% generations %}{% if a %}"),
            "{% generations %}{% if a %}"
        );
    }

    #[test]
    fn null_keys_are_dropped_and_reasoning_aliased() {
        let messages = json!([{"role": "assistant", "content": null, "reasoning": "think"}]);
        let source = "{{ messages[0].content is defined }} {{ messages[0].reasoning_content }} {{ messages[0].thinking }}";
        assert_eq!(
            render(source, messages, false).expect("render"),
            "False think think"
        );
    }

    #[test]
    fn crlf_templates_render_plain_newlines_like_jinja2() {
        let source = "{% for m in messages %}\r\n{{ m.content }}\r\n{% endfor %}";
        assert_eq!(
            render(source, conversation(), false).expect("render"),
            "Hi\nHello\n"
        );
    }

    #[test]
    fn type_tests_follow_python() {
        let source =
            "{{ tools is iterable }} {{ messages is iterable }} {{ undefined_name is iterable }} \
                      {{ 'x' is sequence }} {{ true is number }} {{ none is sequence }}";
        assert_eq!(
            render(source, conversation(), false).expect("render"),
            "False True True True True False"
        );
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        let err = ChatTemplate::new("{% for m in messages %}").expect_err("must fail");
        assert!(matches!(err, Error::Template(_)));
    }

    #[test]
    fn empty_conversations_are_rejected() {
        let err = render(CHATML, json!([]), false).expect_err("must fail");
        assert!(err.to_string().contains("empty conversation"), "{err}");
    }
}
