//! Chat templates: the Jinja `chat_template` of a Hugging Face tokenizer, rendered with minijinja
//! the way transformers renders it (`_compile_jinja_template` and `apply_chat_template`):
//! `trim_blocks` and `lstrip_blocks` on, the template's final newline dropped (Jinja2's default
//! `keep_trailing_newline=False`), `break`/`continue`, Python string and dict methods
//! (`.strip()`, `.items()`...), the globals `raise_exception` and `strftime_now`, and the filters
//! `tojson` (Python's `json.dumps`, not Jinja's HTML-safe one) and `trim` (Python's `str.strip`).
//! Not covered: the `{% generation %}` block (assistant masks), Python's spelling of non-string
//! values printed directly (`None`/`True`; minijinja prints `none`/`true`), and U+001C..U+001F
//! in the `.strip()` methods (minijinja-contrib strips Rust's whitespace; the `trim` filter here
//! is exact).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use chrono::format::{Item, StrftimeItems};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

/// One chat turn, as transformers' `apply_chat_template` takes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The template variables a caller chooses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatOptions {
    /// End the prompt with the header of an assistant turn.
    pub add_generation_prompt: bool,
    /// Passed as `date_string` (Llama 3.x templates print it as "Today Date"); when `None` the
    /// variable is left undefined and such templates fall back to `strftime_now` (today).
    pub date_string: Option<String>,
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names its line.
    pub fn new(source: &str) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("trim", python_strip);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .context("compiling the chat template")?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` with the variables transformers passes: `messages`, `tools` and
    /// `documents` (both none), `add_generation_prompt`, the special tokens of the tokenizer
    /// config (`bos_token`, `eos_token`... as `special_tokens`), and `date_string` when given.
    pub fn render(
        &self,
        messages: &[Message],
        special_tokens: &[(String, String)],
        opts: &ChatOptions,
    ) -> anyhow::Result<String> {
        let mut vars: BTreeMap<&str, Value> = special_tokens
            .iter()
            .map(|(name, token)| (name.as_str(), Value::from(token.as_str())))
            .collect();
        vars.insert("messages", Value::from_serialize(messages));
        vars.insert("tools", Value::from(()));
        vars.insert("documents", Value::from(()));
        vars.insert(
            "add_generation_prompt",
            Value::from(opts.add_generation_prompt),
        );
        if let Some(date) = &opts.date_string {
            vars.insert("date_string", Value::from(date.as_str()));
        }
        let template = self.env.get_template(TEMPLATE_NAME)?;
        template.render(vars).context("rendering the chat template")
    }
}

/// `raise_exception(message)`: the template's own error, surfaced with its message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the chat template raised an exception: {message}"),
    ))
}

/// `strftime_now(format)`: local time now, in Python's `strftime` codes.
fn strftime_now(format: &str) -> Result<String, Error> {
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.contains(&Item::Error) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(
        out,
        "{}",
        chrono::Local::now().format_with_items(items.iter())
    )
    .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime_now: format failed"))?;
    Ok(out)
}

/// Python's `str.isspace`: Rust's White_Space plus the separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Jinja2's `trim` filter is Python's `str.strip(chars)`.
fn python_strip(value: &str, chars: Option<&str>) -> String {
    match chars {
        Some(chars) => value.trim_matches(|c| chars.contains(c)).to_string(),
        None => value.trim_matches(is_python_space).to_string(),
    }
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` with those keyword arguments.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(indent) if indent.is_none() => None,
        Some(indent) => match indent.as_str() {
            Some(text) => Some(text.to_string()),
            None => Some(" ".repeat(i64::try_from(indent)?.max(0) as usize)),
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => (item, key),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be (item_separator, key_separator)",
                ))
            }
        },
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = PythonJson {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    json.write_value(value, 0, &mut out)?;
    Ok(out)
}

/// The options of Python's `json.dumps`.
struct PythonJson {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

impl PythonJson {
    fn write_value(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
            ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(value.clone())?)),
            ValueKind::String => self.write_string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(('[', ']'), items.len(), depth, out, |i, out| {
                    self.write_value(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    entries.push((python_json_key(&key)?, value.get_item(&key)?));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(('{', '}'), entries.len(), depth, out, |i, out| {
                    self.write_string(&entries[i].0, out);
                    out.push_str(&self.key_sep);
                    self.write_value(&entries[i].1, depth + 1, out)
                })?;
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {kind} value is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// `[a, b]`, or with an indent each item on its own line, as `json.dumps` lays them out.
    fn write_container(
        &self,
        (open, close): (char, char),
        len: usize,
        depth: usize,
        out: &mut String,
        mut write_item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len > 0 {
            let newline = |level: usize| match &self.indent {
                Some(indent) => format!("\n{}", indent.repeat(level)),
                None => String::new(),
            };
            out.push_str(&newline(depth + 1));
            for i in 0..len {
                if i > 0 {
                    out.push_str(&self.item_sep);
                    out.push_str(&newline(depth + 1));
                }
                write_item(i, out)?;
            }
            out.push_str(&newline(depth));
        }
        out.push(close);
        Ok(())
    }

    fn write_string(&self, text: &str, out: &mut String) {
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c < ' ' || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `json.dumps` turns str, int, float, bool and None keys into strings.
fn python_json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number if key.is_integer() => Ok(key.to_string()),
        ValueKind::Number => Ok(python_float_repr(f64::try_from(key.clone())?)),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

/// Python's `repr(float)` as `json.dumps` writes it. Rust's `{:?}` is the same shortest
/// round-trip form and switches to exponent form at the same bounds (below 1e-4, from 1e16);
/// Python spells the exponent with a sign and at least two digits (`1e+16`, `1e-05`).
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let shortest = format!("{x:?}");
    match shortest.split_once('e') {
        Some((mantissa, exponent)) => {
            let (sign, digits) = match exponent.strip_prefix('-') {
                Some(digits) => ('-', digits),
                None => ('+', exponent),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => shortest,
    }
}
