//! Hugging Face Jinja chat templates (`tokenizer_config.json` → `chat_template`).
//!
//! HF transformers renders a chat template with a sandboxed jinja2 environment
//! set up in a particular way (`trim_blocks`, `lstrip_blocks`, its own `tojson`,
//! `raise_exception`, `strftime_now`, the `loopcontrols` extension) and passes
//! `messages`, `add_generation_prompt`, `tools`, `documents` and the special
//! tokens. [`HfChatTemplate`] rebuilds that environment on minijinja, with
//! minijinja-contrib's `pycompat` for the Python string/dict methods templates
//! call (`.strip()`, `.startswith()`, `.items()`, …), so prompts come out byte
//! for byte as `tokenizer.apply_chat_template(..., tokenize=False)` gives them.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{merge_maps, Kwargs, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::Serialize;

use crate::conversation::ChatMessage;
use crate::error::ChatError;
use crate::tools::ToolSyntax;

/// Name under which the single template is stored in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled HF chat template plus the special tokens it is rendered with.
///
/// Cheap to share: rendering takes `&self` and the type is `Send + Sync`.
///
/// Known differences from jinja2, none of which real chat templates rely on:
/// printing a whole list or dict gives minijinja's form (`["a"]`) rather than
/// Python's repr (`['a']`); `~` and `|string` use minijinja's number
/// formatting; `strftime_now` uses UTC rather than the server's local time.
#[derive(Clone)]
pub struct HfChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// How the template writes tool calls, when it renders `tools`.
    tool_syntax: Option<ToolSyntax>,
}

impl std::fmt::Debug for HfChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The error a template's `raise_exception(msg)` produces, carried as the
/// source of the minijinja error so it can be told apart from other failures.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl HfChatTemplate {
    /// Compiles `source` (a Jinja chat template) to be rendered with these
    /// `bos_token` / `eos_token` strings. Fails with [`ChatError::Template`] on
    /// a syntax error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // HF: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        // keep_trailing_newline stays false in both jinja2 and minijinja.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, translate_generation_tags(source))
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            tool_syntax: ToolSyntax::detect(source),
        })
    }

    /// How this template writes tool calls (`None`: it does not render `tools`).
    pub fn tool_syntax(&self) -> Option<ToolSyntax> {
        self.tool_syntax
    }

    /// Builds the template from a parsed `tokenizer_config.json`: its
    /// `chat_template` (a string, or HF's list of `{name, template}` from which
    /// `"default"` is taken) and its `bos_token` / `eos_token` (a string or an
    /// `AddedToken` object; missing ones render as empty).
    pub fn from_tokenizer_config(config: &serde_json::Value) -> Result<Self, ChatError> {
        Self::from_tokenizer_config_named(config, None)
    }

    /// Like [`Self::from_tokenizer_config`], picking a named template (e.g.
    /// `"tool_use"`) when the config holds several.
    pub fn from_tokenizer_config_named(config: &serde_json::Value, name: Option<&str>) -> Result<Self, ChatError> {
        let missing = || ChatError::MissingChatTemplate {
            name: name.map(str::to_string),
        };
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) if name.is_none() => s.as_str(),
            Some(serde_json::Value::Array(list)) => {
                let wanted = name.unwrap_or("default");
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(wanted))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(missing)?
            }
            _ => return Err(missing()),
        };
        let token = |key: &str| -> String {
            match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(obj) => obj
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                None => String::new(),
            }
        };
        Self::new(source, &token("bos_token"), &token("eos_token"))
    }

    /// Renders `messages` (HF's `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=…)`).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        self.render_with(messages, add_generation_prompt, &())
    }

    /// Renders any serializable message list (e.g. messages carrying
    /// `tool_calls`), with `extra` (a serializable map, or `()` for none) added
    /// to the template context the way HF passes extra `apply_chat_template`
    /// keyword arguments (`tools`, `documents`, `unk_token`, custom flags, …).
    ///
    /// Dict keys are seen, and printed by `tojson`, in the order the values
    /// serialize them, so use structs or ordered maps where that order matters.
    pub fn render_with<M: Serialize + ?Sized, E: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
        extra: &E,
    ) -> Result<String, ChatError> {
        let base = context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        // HF passes tools=None and documents=None when not given, so
        // `tools is none` holds. In a merge the last map wins, so `extra` can
        // set tools/documents but not shadow the core variables.
        let defaults = context! { tools => (), documents => () };
        let extra = Value::from_serialize(extra);
        let ctx = if extra.kind() == ValueKind::Map {
            merge_maps([defaults, extra, base])
        } else {
            merge_maps([defaults, base])
        };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(ctx).map_err(template_error)
    }
}

/// Turns a minijinja error into ours, recognising `raise_exception`.
fn template_error(err: Error) -> ChatError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return ChatError::TemplateException {
                message: raised.0.clone(),
            };
        }
        source = e.source();
    }
    ChatError::Template {
        message: err.to_string(),
    }
}

/// HF's `raise_exception(message)`: aborts rendering with `message`.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

/// HF's `strftime_now(format)`: the current time formatted with Python's
/// `strftime`. Uses UTC (HF uses the server's local time; servers mostly run
/// in UTC and we carry no timezone database).
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

/// Formats a Unix time (UTC) with the common Python/C `strftime` directives;
/// unknown directives are kept as written, as glibc does.
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
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
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` (no padding) is common in chat templates.
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &num(year.rem_euclid(100), 2),
            Some('m') => out += &num(month, 2),
            Some('d') => out += &num(day, 2),
            Some('e') => out += &format!("{day:2}"),
            Some('H') => out += &num(hour, 2),
            Some('I') => out += &num(hour12, 2),
            Some('M') => out += &num(minute, 2),
            Some('S') => out += &num(second, 2),
            Some('j') => out += &num(day_of_year, 3),
            Some('p') => out += if hour < 12 { "AM" } else { "PM" },
            Some('A') => out += DAYS[weekday],
            Some('a') => out += &DAYS[weekday][..3],
            Some('B') => out += MONTHS[(month - 1) as usize],
            Some('b') | Some('h') => out += &MONTHS[(month - 1) as usize][..3],
            Some('F') => out += &format!("{year}-{month:02}-{day:02}"),
            Some('T') => out += &format!("{hour:02}:{minute:02}:{second:02}"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) → days since 1970-01-01; inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// HF's `tojson` filter: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`, not minijinja's (which
/// HTML-escapes and drops the spaces after `,` and `:`).
fn tojson(value: &Value, ensure_ascii: Option<bool>, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii = match ensure_ascii {
        Some(v) => v,
        None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    // Python accepts an int (spaces) or a string as indent.
    let indent: Option<String> = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_i64() {
            Some(n) => " ".repeat(n.max(0) as usize),
            None => v.as_str().unwrap_or_default().to_string(),
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) if seps.len() == 2 => (seps[0].clone(), seps[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson separators must be a pair",
            ))
        }
        // json.dumps drops the space after ',' when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    // Python returns a plain str: jinja2 would escape it under autoescape,
    // which chat templates never enable.
    Ok(Value::from(out))
}

/// `value` as HF's `tojson` prints it with no options (`json.dumps` defaults,
/// `ensure_ascii` off): how templates write a tool call's arguments.
pub(crate) fn py_json<T: Serialize + ?Sized>(value: &T) -> Option<String> {
    let opts = JsonOpts {
        ensure_ascii: false,
        indent: None,
        item_sep: ", ".to_string(),
        key_sep: ": ".to_string(),
        sort_keys: false,
    };
    let mut out = String::new();
    write_json(&mut out, &Value::from_serialize(value), &opts, 0).ok()?;
    Some(out)
}

/// `json.dumps` options.
struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Writes `value` as Python's `json.dumps` would.
fn write_json(out: &mut String, value: &Value, o: &JsonOpts, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => {
            let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            out.push_str(&py_float_repr(f));
        }
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), o, depth, |out, i| {
                write_json(out, &items[i], o, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            write_container(out, '{', '}', keys.len(), o, depth, |out, i| {
                let key = &keys[i];
                // Python converts non-string keys (ints, bools, None) to text.
                let key_text = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    _ => key.to_string(),
                };
                write_json_str(out, &key_text, o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &value.get_item(key)?, o, depth + 1)
            })?;
        }
        // jinja2's Undefined is not JSON serializable either.
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {} is not JSON serializable", value.kind()),
            ))
        }
    }
    Ok(())
}

/// Writes a JSON array or object body with Python's indent/separator rules.
fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    o: &JsonOpts,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        if let Some(indent) = &o.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(indent) = &o.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON string literal as Python writes it: `\"`, `\\`, `\n`, `\r`, `\t`,
/// `\b`, `\f`, other control characters as `\u00XX`, and with `ensure_ascii`
/// every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF).
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
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

/// Python's `repr(float)`: shortest round-trip digits, `.0` on integral
/// values, exponent form below 1e-4 and from 1e16 (`1e+16`, `1e-05`), and
/// json's `NaN` / `Infinity`.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's Debug already picks the same notation thresholds and shortest
    // digits; only the exponent spelling differs.
    let s = format!("{f:?}");
    match s.split_once('e') {
        None => s,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

/// Rewrites HF's `{% generation %}…{% endgeneration %}` (transformers'
/// AssistantTracker extension, used to mark assistant tokens for training
/// masks) into `{% if true %}…{% endif %}`, which renders the same text and
/// keeps any `-`/`+` whitespace control. minijinja has no custom tags.
fn translate_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let lead = inner.strip_prefix(['-', '+']).map_or("", |_| &inner[..1]);
        let body = inner[lead.len()..].trim_end_matches(['-', '+']);
        let trail = &inner[lead.len() + body.len()..];
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{lead} {r} {trail}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-07-23 14:05:09 UTC, a Tuesday.
        let t = 1_721_743_509;
        assert_eq!(strftime("%d %b %Y", t), "23 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %y %H:%M:%S %p %j %%", t),
            "Tuesday July 23, 24 14:05:09 PM 205 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(0.1), "0.1");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(py_float_repr(123456.789), "123456.789");
    }

    #[test]
    fn generation_tags_become_if_blocks() {
        assert_eq!(
            translate_generation_tags("a{%- generation %}b{% endgeneration -%}c{% if x %}"),
            "a{%- if true %}b{% endif -%}c{% if x %}"
        );
    }
}
