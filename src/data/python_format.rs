//! Python's text forms of template values, so that chat templates render as they do under Jinja2
//! in transformers: `str()` for `{{ value }}` (`True`, `None`, `1.0`, `['a']`) and `json.dumps` for
//! transformers' `tojson` filter (`ensure_ascii=False`, `", "` / `": "` separators, `indent`).

use minijinja::value::ValueKind;
use minijinja::{Error as TemplateError, ErrorKind, Value};

/// Options of Python's `json.dumps` that transformers' `tojson` filter exposes.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonDumpsOptions {
    /// Escape non-ASCII characters as `\uXXXX` (transformers' default: `false`).
    pub ensure_ascii: bool,
    /// Pretty-print with this indent string (Python's `indent=4` is four spaces).
    pub indent: Option<String>,
    /// `(item_separator, key_separator)`; Python's default is `(", ", ": ")`, or `(",", ": ")` with an indent.
    pub separators: Option<(String, String)>,
    /// Sort object keys.
    pub sort_keys: bool,
}

/// Serializes `value` as Python's `json.dumps(value, **options)` would.
pub(crate) fn json_dumps(
    value: &Value,
    options: &JsonDumpsOptions,
) -> Result<String, TemplateError> {
    let (item_separator, key_separator) = match &options.separators {
        Some((item, key)) => (item.clone(), key.clone()),
        None if options.indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let writer = JsonWriter {
        options,
        item_separator,
        key_separator,
    };
    let mut out = String::new();
    writer.write(value, 0, &mut out)?;
    Ok(out)
}

/// Writes JSON with Python's spacing rules.
struct JsonWriter<'a> {
    options: &'a JsonDumpsOptions,
    item_separator: String,
    key_separator: String,
}

impl JsonWriter<'_> {
    fn write(&self, value: &Value, level: usize, out: &mut String) -> Result<(), TemplateError> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&number_text(value, true)),
            ValueKind::String => write_json_string(
                value.as_str().unwrap_or_default(),
                self.options.ensure_ascii,
                out,
            ),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(('[', ']'), items.len(), level, out, |index, level, out| {
                    self.write(&items[index], level, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((json_key(&key)?, item));
                }
                if self.options.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(
                    ('{', '}'),
                    entries.len(),
                    level,
                    out,
                    |index, level, out| {
                        let (key, item) = &entries[index];
                        write_json_string(key, self.options.ensure_ascii, out);
                        out.push_str(&self.key_separator);
                        self.write(item, level, out)
                    },
                )?;
            }
            ValueKind::Undefined => {
                return Err(TemplateError::new(
                    ErrorKind::InvalidOperation,
                    "Object of type Undefined is not JSON serializable",
                ))
            }
            kind => {
                return Err(TemplateError::new(
                    ErrorKind::InvalidOperation,
                    format!("Object of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// Writes `open items close`, one item a line when indenting, as `json.encoder` does.
    fn write_container(
        &self,
        (open, close): (char, char),
        len: usize,
        level: usize,
        out: &mut String,
        mut write_item: impl FnMut(usize, usize, &mut String) -> Result<(), TemplateError>,
    ) -> Result<(), TemplateError> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        let inner_newline = self
            .options
            .indent
            .as_ref()
            .map(|indent| format!("\n{}", indent.repeat(level + 1)));
        if let Some(newline) = &inner_newline {
            out.push_str(newline);
        }
        for index in 0..len {
            if index > 0 {
                out.push_str(&self.item_separator);
                if let Some(newline) = &inner_newline {
                    out.push_str(newline);
                }
            }
            write_item(index, level + 1, out)?;
        }
        if let Some(indent) = &self.options.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
        out.push(close);
        Ok(())
    }
}

/// A JSON object key as `json.dumps` converts it: strings as they are, numbers, booleans and None as text.
fn json_key(key: &Value) -> Result<String, TemplateError> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => Ok(number_text(key, true)),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        kind => Err(TemplateError::new(
            ErrorKind::InvalidOperation,
            format!("keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

/// Writes a JSON string literal with the escapes of Python's `json` module.
fn write_json_string(text: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `str(value)`, which Jinja2 prints for `{{ value }}`.
pub(crate) fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => python_repr(value),
    }
}

/// Python's `repr(value)` for the JSON-like values templates handle.
pub(crate) fn python_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_string(),
        ValueKind::Number => number_text(value, false),
        ValueKind::String => string_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => match value.try_iter() {
            Ok(items) => format!(
                "[{}]",
                items
                    .map(|item| python_repr(&item))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(_) => value.to_string(),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => format!(
                "{{{}}}",
                keys.map(|key| {
                    let item = value.get_item(&key).unwrap_or_default();
                    format!("{}: {}", python_repr(&key), python_repr(&item))
                })
                .collect::<Vec<_>>()
                .join(", ")
            ),
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

/// Python's `repr(str)`: single quotes unless the text holds a single quote and no double quote.
fn string_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A number as Python writes it: integers as digits, floats as `repr(float)`; `json` spells the
/// non-finite floats `NaN` / `Infinity`.
fn number_text(value: &Value, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(x) => python_float_repr(x, json),
        Err(_) => value.to_string(),
    }
}

/// `repr(x)` for a Python float: the shortest digits that round-trip, fixed notation for exponents
/// in `-4..16` (always with a fractional part), otherwise scientific with a signed two-digit exponent.
pub(crate) fn python_float_repr(x: f64, json: bool) -> String {
    if x.is_nan() {
        return if json { "NaN" } else { "nan" }.to_string();
    }
    if x.is_infinite() {
        let text = match (x > 0.0, json) {
            (true, true) => "Infinity",
            (false, true) => "-Infinity",
            (true, false) => "inf",
            (false, false) => "-inf",
        };
        return text.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e3".
    let scientific = format!("{:e}", x.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (whole, fraction) = digits.split_at(point as usize);
            format!("{whole}.{fraction}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exponent_sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(value: serde_json::Value, options: JsonDumpsOptions) -> String {
        json_dumps(&Value::from_serialize(&value), &options).expect("dumps")
    }

    #[test]
    fn json_dumps_uses_python_separators() {
        let value = serde_json::json!({"a": [1, 2.5, "x"], "b": null, "c": true});
        assert_eq!(
            dumps(value, JsonDumpsOptions::default()),
            r#"{"a": [1, 2.5, "x"], "b": null, "c": true}"#
        );
    }

    #[test]
    fn json_dumps_indent_matches_python() {
        let value = serde_json::json!({"a": [1, {}], "b": []});
        let options = JsonDumpsOptions {
            indent: Some("  ".into()),
            ..Default::default()
        };
        assert_eq!(
            dumps(value, options),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"
        );
    }

    #[test]
    fn json_dumps_escapes_like_python() {
        let value = serde_json::json!("é <b>\"q\"\n\u{1}");
        assert_eq!(
            dumps(value.clone(), JsonDumpsOptions::default()),
            "\"é <b>\\\"q\\\"\\n\\u0001\""
        );
        let options = JsonDumpsOptions {
            ensure_ascii: true,
            ..Default::default()
        };
        assert_eq!(
            dumps(serde_json::json!("é😀"), options),
            "\"\\u00e9\\ud83d\\ude00\""
        );
    }

    #[test]
    fn json_dumps_separators_and_sort_keys() {
        let value = serde_json::json!({"b": 1, "a": 2});
        let options = JsonDumpsOptions {
            separators: Some((",".into(), ":".into())),
            sort_keys: true,
            ..Default::default()
        };
        assert_eq!(dumps(value, options), r#"{"a":2,"b":1}"#);
    }

    #[test]
    fn float_repr_matches_python() {
        for (x, expected) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float_repr(x, false), expected, "{x}");
        }
    }

    #[test]
    fn str_and_repr_match_python() {
        assert_eq!(python_str(&Value::from(true)), "True");
        assert_eq!(python_str(&Value::from(())), "None");
        assert_eq!(python_str(&Value::from("it's")), "it's");
        assert_eq!(
            python_str(&Value::from_serialize(serde_json::json!([
                "a", "it's", 1, 2.0, null
            ]))),
            "['a', \"it's\", 1, 2.0, None]"
        );
        assert_eq!(
            python_str(&Value::from_serialize(serde_json::json!({"k": false}))),
            "{'k': False}"
        );
    }
}
