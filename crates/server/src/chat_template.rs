//! Hugging Face chat templates, rendered the way `transformers` renders them.
//!
//! A model's `tokenizer_config.json` carries a Jinja `chat_template` that turns an OpenAI-style conversation
//! into the prompt text the model was trained on. The reference renderer is `apply_chat_template` in
//! `transformers`: jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[loopcontrols])`, plus a `raise_exception` and a `strftime_now` global and its own `tojson` filter.
//! Any difference in the rendered text changes the tokens the model sees, so this module reproduces that
//! environment with minijinja:
//!
//! - the same whitespace settings (and no kept trailing newline, jinja2's default);
//! - jinja2's default lenient undefined: a missing key is undefined, falsy and prints as nothing, but using it in
//!   an operation such as `+` is an error;
//! - Python string and dict methods (`content.split('</think>')[-1]`, `.strip()`, `.items()`…) from
//!   minijinja-contrib's pycompat;
//! - `tojson` as `json.dumps(x, ensure_ascii=False)` writes it (`{"a": 1}`, no HTML escaping) rather than
//!   minijinja's compact, HTML-safe form;
//! - message keys whose value is `null` are dropped before rendering, as transformers does.
//!
//! Known differences: object keys reach the template sorted, as `serde_json::Map` (without its `preserve_order`
//! feature) stores them, where Python keeps the client's order (it only shows in `tojson` output and dict
//! iteration); `strftime_now` uses UTC, not the local time zone, and knows only the common specifiers; the
//! `{% generation %}` tag of transformers' assistant-mask extension is not supported.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

/// Name under which the single template is stored in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A chat template compiled once at startup and rendered for every request; it is `Send + Sync`, so one
/// instance can be shared by all request handlers.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template text does not parse; reported by [`ChatTemplate::new`].
    #[error("invalid chat template: {0}")]
    Syntax(minijinja::Error),
    /// Rendering failed for this conversation: the template called `raise_exception` (templates use it to
    /// reject conversations they cannot format, e.g. roles that do not alternate) or hit an error such as adding
    /// an undefined value to a string.
    #[error("chat template rendering failed: {0}")]
    Render(minijinja::Error),
}

impl ChatTemplate {
    /// Compiles a chat template.
    ///
    /// `source`: the template text; `bos_token`/`eos_token`: the tokenizer's special token strings (may be empty),
    /// exposed to the template as the `bos_token` and `eos_token` variables, as transformers does.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(ChatTemplateError::Syntax)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(ChatTemplateError::Syntax)?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Renders a conversation into prompt text.
    ///
    /// `messages` are OpenAI-style JSON objects (`role`, `content` as a string — the caller flattens lists of
    /// text parts —, optional `tool_calls`, `tool_call_id`, `name`…). Keys whose value is `null` are dropped, as
    /// transformers does: a template then sees them as undefined, not as `none`.
    ///
    /// `extra` holds further template variables (`chat_template_kwargs` such as `thinking`, and `tools`). As in
    /// transformers, `tools` and `documents` are `none` unless given, and `extra` may override `bos_token` and
    /// `eos_token`; `messages` and `add_generation_prompt` always come from the arguments.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let messages: Value = messages.iter().map(message_value).collect();
        let mut ctx = BTreeMap::from([
            ("bos_token".to_owned(), Value::from(self.bos_token.as_str())),
            ("eos_token".to_owned(), Value::from(self.eos_token.as_str())),
            ("tools".to_owned(), Value::from(())),
            ("documents".to_owned(), Value::from(())),
        ]);
        ctx.extend(extra.iter().map(|(key, value)| (key.clone(), json_value(value))));
        ctx.insert("messages".to_owned(), messages);
        ctx.insert("add_generation_prompt".to_owned(), Value::from(add_generation_prompt));
        let template = self.env.get_template(TEMPLATE_NAME).map_err(ChatTemplateError::Render)?;
        template.render(Value::from(ctx)).map_err(ChatTemplateError::Render)
    }

    /// Whether the generation prompt opens a reasoning block, i.e. the model starts its answer inside
    /// `<think>` (DeepSeek-R1), so that the `deepseek_r1` reasoning parser can be chosen automatically.
    ///
    /// Checked by rendering a one-user-message conversation with `add_generation_prompt` and no extra
    /// variables: true when the prompt ends with `<think>`, possibly followed by a newline. A template that
    /// fails to render this conversation does not open reasoning.
    pub fn opens_reasoning(&self) -> bool {
        let messages = [serde_json::json!({"role": "user", "content": "Hello"})];
        self.render(&messages, true, &serde_json::Map::new())
            .is_ok_and(|prompt| prompt.strip_suffix('\n').unwrap_or(&prompt).ends_with("<think>"))
    }
}

/// Converts one message, dropping its `null`-valued keys as transformers does.
fn message_value(message: &serde_json::Value) -> Value {
    match message {
        serde_json::Value::Object(fields) => Value::from(
            fields
                .iter()
                .filter(|(_, value)| !value.is_null())
                .map(|(key, value)| (key.clone(), json_value(value)))
                .collect::<BTreeMap<_, _>>(),
        ),
        other => json_value(other),
    }
}

/// Converts JSON into a template value (minijinja's `serde` feature, which would do it, is not enabled).
fn json_value(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            // Without serde_json's arbitrary_precision every other number is an f64.
            (None, None) => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => items.iter().map(json_value).collect(),
        serde_json::Value::Object(fields) => {
            Value::from(fields.iter().map(|(key, value)| (key.clone(), json_value(value))).collect::<BTreeMap<_, _>>())
        }
    }
}

/// `raise_exception(message)`: lets a template reject a conversation with its own message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current date and time (UTC), used by templates that put today's date in the
/// system prompt.
fn strftime_now(format: &str) -> Result<String, Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
    strftime(format, now)
}

/// Formats `unix_secs` (UTC) with the `strftime` specifiers chat templates use; others are an error rather than
/// silently wrong text.
fn strftime(format: &str, unix_secs: u64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[((days + 3) % 7) as usize];
    let month_name = MONTHS[month as usize - 1];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('H') => write!(out, "{:02}", secs_of_day / 3600),
            Some('M') => write!(out, "{:02}", secs_of_day / 60 % 60),
            Some('S') => write!(out, "{:02}", secs_of_day % 60),
            Some('%') => write!(out, "%"),
            other => {
                let spec = other.map(String::from).unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format specifier '%{spec}'"),
                ));
            }
        };
    }
    Ok(out)
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01, by Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with the same keyword arguments. Unlike minijinja's built-in filter it puts a space after
/// `,` and `:` and does not escape HTML characters, which templates that list tools in the prompt rely on.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(indent) => match (indent.as_str(), indent.as_i64()) {
            (Some(s), _) => Some(s.to_owned()),
            (None, Some(n)) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string")),
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) => match <[String; 2]>::try_from(seps) {
            Ok([item, key]) => (item, key),
            Err(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        },
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    kwargs.assert_all_used()?;
    let mut dumper = PyJsonDumper { ensure_ascii, sort_keys, indent, item_sep, key_sep, out: String::new() };
    dumper.value(value, 0)?;
    Ok(dumper.out)
}

/// Writes values as Python's `json.dumps` does.
#[derive(Default)]
struct PyJsonDumper {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    out: String,
}

impl PyJsonDumper {
    fn value(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self.out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => self.out.push_str(&value.to_string()),
            ValueKind::Number => self.float(f64::try_from(value.clone())?),
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items = value.try_iter()?.collect::<Vec<_>>();
                self.container('[', ']', items.len(), depth, |this, i| this.value(&items[i], depth + 1))?;
            }
            ValueKind::Map => {
                let mut entries = value
                    .try_iter()?
                    .map(|key| Ok((Self::key(&key)?, value.get_item(&key)?)))
                    .collect::<Result<Vec<_>, Error>>()?;
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container('{', '}', entries.len(), depth, |this, i| {
                    let (key, item) = &entries[i];
                    this.string(key);
                    this.out.push_str(&this.key_sep);
                    this.value(item, depth + 1)
                })?;
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: object of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// Writes `len` items between `open` and `close`, with Python's separators and indentation.
    fn container(
        &mut self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.out.push(open);
        for i in 0..len {
            if i > 0 {
                self.out.push_str(&self.item_sep);
            }
            self.newline(depth + 1);
            item(self, i)?;
        }
        if len > 0 {
            self.newline(depth);
        }
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(indent) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(indent);
            }
        }
    }

    /// Python turns `int`, `float`, `bool` and `None` keys into their JSON text; other keys are an error.
    fn key(key: &Value) -> Result<String, Error> {
        match key.kind() {
            ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
            ValueKind::Number | ValueKind::Bool | ValueKind::None => {
                let mut text = PyJsonDumper::default();
                text.value(key, 0)?;
                Ok(text.out)
            }
            kind => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
            )),
        }
    }

    /// Python's `float.__repr__`: shortest round-trip digits, fixed notation for exponents -4..16 (with `.0` when
    /// integral), otherwise `1e+16` style; `json.dumps` writes non-finite values as `NaN`/`Infinity`.
    fn float(&mut self, x: f64) {
        if x.is_nan() {
            self.out.push_str("NaN");
        } else if x.is_infinite() {
            self.out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
        } else {
            let scientific = format!("{x:e}");
            let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
            let exponent: i32 = exponent.parse().unwrap_or(0);
            if (-4..16).contains(&exponent) {
                let fixed = x.to_string();
                let integral = !fixed.contains('.');
                self.out.push_str(&fixed);
                if integral {
                    self.out.push_str(".0");
                }
            } else {
                let sign = if exponent < 0 { '-' } else { '+' };
                let _ = write!(self.out, "{mantissa}e{sign}{:02}", exponent.abs());
            }
        }
    }

    /// A JSON string escaped as Python does: always `"`, `\`, and control characters; everything outside
    /// printable ASCII too when `ensure_ascii`.
    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if c < ' ' || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    const BOS: &str = "<｜begin▁of▁sentence｜>";
    const EOS: &str = "<｜end▁of▁sentence｜>";

    fn testdata(file: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/chat-templates").join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn deepseek(file: &str) -> ChatTemplate {
        ChatTemplate::new(&testdata(file), BOS, EOS).unwrap()
    }

    fn render_str(source: &str, ctx: serde_json::Value) -> Result<String, ChatTemplateError> {
        let extra = ctx.as_object().cloned().unwrap_or_default();
        ChatTemplate::new(source, "", "")?.render(&[], false, &extra)
    }

    /// Every conversation of cases.json renders byte for byte as transformers rendered it, or fails where
    /// transformers failed.
    #[test]
    fn renders_all_cases_like_transformers() {
        let cases: Vec<serde_json::Value> = serde_json::from_str(&testdata("cases.json")).unwrap();
        assert_eq!(cases.len(), 37);
        let mut templates = BTreeMap::new();
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let file = case["template"].as_str().unwrap();
            let template = templates.entry(file.to_owned()).or_insert_with(|| deepseek(file));
            let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
            let extra = case["extra"].as_object().unwrap();
            let label = format!(
                "#{i} {file} {} (add_generation_prompt={add_generation_prompt}, thinking={})",
                case["name"].as_str().unwrap(),
                extra.get("thinking").map_or("absent".to_owned(), |t| t.to_string()),
            );
            let rendered = template.render(case["messages"].as_array().unwrap(), add_generation_prompt, extra);
            match (&rendered, case.get("expected").and_then(|e| e.as_str())) {
                (Ok(actual), Some(expected)) if actual == expected => {}
                (Ok(actual), Some(expected)) => {
                    let at = actual.bytes().zip(expected.bytes()).take_while(|(a, b)| a == b).count();
                    failures.push(format!(
                        "{label}: differs from byte {at}\n  expected: {expected:?}\n  actual:   {actual:?}"
                    ));
                }
                // transformers fails with "UndefinedError: 'dict object' has no attribute 'content'".
                (Err(e), None) if e.to_string().contains("undefined") => {}
                (Err(e), None) => failures.push(format!("{label}: expected error {}, got {e}", case["expected_error"])),
                (Ok(actual), None) => {
                    failures.push(format!("{label}: expected error {}, rendered {actual:?}", case["expected_error"]))
                }
                (Err(e), Some(expected)) => failures.push(format!("{label}: {e}\n  expected: {expected:?}")),
            }
        }
        assert!(failures.is_empty(), "{} of {} cases fail:\n{}", failures.len(), cases.len(), failures.join("\n"));
    }

    #[test]
    fn is_shareable_between_request_handlers() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn opens_reasoning_only_for_r1() {
        assert!(deepseek("deepseek-r1.jinja").opens_reasoning());
        assert!(!deepseek("deepseek-v3-0324.jinja").opens_reasoning());
        assert!(!deepseek("deepseek-v3.1.jinja").opens_reasoning());
    }

    #[test]
    fn syntax_error_at_new() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn raise_exception_is_a_render_error_with_its_message() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user') }}{% endif %}ok";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let extra = serde_json::Map::new();
        assert_eq!(template.render(&[json!({"role": "user", "content": "hi"})], false, &extra).unwrap(), "ok");
        let err = template.render(&[json!({"role": "assistant", "content": "hi"})], false, &extra).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
        assert!(err.to_string().contains("Conversation must start with a user"), "{err}");
    }

    #[test]
    fn null_keys_are_undefined_and_context_defaults() {
        let source = "{{ messages[0].content is defined }} {{ tools is none }} {{ bos_token }}|{{ eos_token }}";
        let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let rendered = template.render(&[json!({"role": "user", "content": null})], false, &serde_json::Map::new());
        assert_eq!(rendered.unwrap(), "False True <s>|</s>");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let data = json!({"data": {"b": [1, 2.5, true, null], "a": "é\"<x>\n\u{1}😀", "f": 1e16, "g": 1e-5, "h": 3.0}});
        // Expected strings are what Python's json.dumps prints for the same data.
        assert_eq!(
            render_str("{{ data | tojson }}", data.clone()).unwrap(),
            r#"{"a": "é\"<x>\n\u0001😀", "b": [1, 2.5, true, null], "f": 1e+16, "g": 1e-05, "h": 3.0}"#
        );
        assert_eq!(
            render_str("{{ data.b | tojson(indent=2) }}|{{ data.a | tojson(ensure_ascii=true) }}", data.clone())
                .unwrap(),
            "[\n  1,\n  2.5,\n  true,\n  null\n]|\"\\u00e9\\\"<x>\\n\\u0001\\ud83d\\ude00\""
        );
        assert_eq!(
            render_str("{{ {'z': 1, 'y': []} | tojson(separators=(',', ':'), sort_keys=true) }}", data).unwrap(),
            r#"{"y":[],"z":1}"#
        );
        assert_eq!(
            render_str("{{ {1: none, 2.5: false} | tojson }}", json!({})).unwrap(),
            r#"{"1": null, "2.5": false}"#
        );
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %a %B %b %y %%", 1_709_211_909).unwrap(),
            "2024-02-29 13:05:09 Thursday Thu February Feb 24 %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert!(strftime("%Q", 0).is_err());
        assert_eq!(render_str("{{ strftime_now('%Y') }}", json!({})).unwrap().len(), 4);
    }
}
