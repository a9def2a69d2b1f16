//! JSON Schema → regular expression, so structured output and tool-call
//! arguments run through the same byte-level DFA as any other constraint.
//!
//! The JSON produced is in one fixed layout, the one Python's `json.dumps`
//! writes by default (`{"a": 1, "b": [1, 2]}`): no freedom in whitespace keeps
//! the DFA small and every answer parses. Object properties come in the order
//! the schema declares them. What a regular language cannot say (recursion,
//! unbounded nesting) or what this converter does not know is refused with a
//! message naming the keyword and where it is, never silently dropped.

use serde_json::{Map, Value};

/// Nesting depth of free-form JSON (`{"type": "object"}` without properties,
/// `json_object` mode): past it only scalars may appear.
pub const FREE_FORM_DEPTH: usize = 2;
/// Deepest `$ref` chain / schema nesting followed.
const MAX_DEPTH: usize = 32;

/// Keywords that only annotate a schema; they do not change what matches.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "example",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
    "$defs",
    "definitions",
    "discriminator",
];

/// A JSON string's characters: anything but a quote, a backslash or a control
/// character, or an escape.
const STRING_CHAR: &str = r#"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})"#;
const INTEGER: &str = r"-?(?:0|[1-9][0-9]{0,15})";
const NUMBER: &str = r"-?(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,15})?(?:[eE][+-]?[0-9]{1,3})?";

/// Converts `schema` to a regex matching exactly the JSON texts (in the fixed
/// layout) that the schema accepts. Errors name the keyword and its JSON pointer.
pub fn schema_to_regex(schema: &Value) -> Result<String, String> {
    let conv = Converter { root: schema };
    conv.value(schema, "#", 0, &mut Vec::new())
}

/// A regex for any JSON object (nested up to [`FREE_FORM_DEPTH`] levels).
pub fn any_object_regex() -> String {
    free_object(FREE_FORM_DEPTH)
}

fn string_re(min: usize, max: Option<usize>) -> String {
    match (min, max) {
        (0, None) => format!("\"{STRING_CHAR}*\""),
        (m, None) => format!("\"{STRING_CHAR}{{{m},}}\""),
        (m, Some(x)) => format!("\"{STRING_CHAR}{{{m},{x}}}\""),
    }
}

fn free_value(depth: usize) -> String {
    let scalars = format!("{}|{NUMBER}|true|false|null", string_re(0, None));
    if depth == 0 {
        return format!("(?:{scalars})");
    }
    format!("(?:{scalars}|{}|{})", free_object(depth), free_array(depth))
}

fn free_object(depth: usize) -> String {
    let inner = free_value(depth - 1);
    let s = string_re(0, None);
    format!(r"\{{(?:{s}: {inner}(?:, {s}: {inner})*)?\}}")
}

fn free_array(depth: usize) -> String {
    let inner = free_value(depth - 1);
    format!(r"\[(?:{inner}(?:, {inner})*)?\]")
}

/// A JSON value (as `json.dumps` writes it) as a literal in a regex.
pub fn literal(v: &Value) -> String {
    regex_syntax::escape(&v.to_string())
}

struct Converter<'a> {
    root: &'a Value,
}

impl Converter<'_> {
    fn resolve(&self, r: &str, at: &str) -> Result<&Value, String> {
        let path = r
            .strip_prefix("#/")
            .ok_or_else(|| format!("{at}: only local $ref (\"#/$defs/...\") is supported, got {r:?}"))?;
        let mut v = self.root;
        for part in path.split('/') {
            let part = part.replace("~1", "/").replace("~0", "~");
            v = v
                .get(&part)
                .ok_or_else(|| format!("{at}: $ref {r:?} points to nothing"))?;
        }
        Ok(v)
    }

    fn value(&self, s: &Value, at: &str, depth: usize, refs: &mut Vec<String>) -> Result<String, String> {
        if depth > MAX_DEPTH {
            return Err(format!("{at}: the schema nests deeper than {MAX_DEPTH} levels"));
        }
        let obj = match s {
            Value::Bool(true) => return Ok(free_value(FREE_FORM_DEPTH)),
            Value::Bool(false) => return Err(format!("{at}: the schema `false` accepts nothing")),
            Value::Object(o) => o,
            other => return Err(format!("{at}: a schema must be an object, got {other}")),
        };
        if let Some(r) = obj.get("$ref") {
            let r = r.as_str().ok_or_else(|| format!("{at}/$ref: expected a string"))?;
            if refs.iter().any(|x| x == r) {
                return Err(format!(
                    "{at}: recursive $ref {r:?} is not supported (a recursive schema is not a regular language)"
                ));
            }
            let target = self.resolve(r, at)?;
            refs.push(r.to_string());
            let out = self.value(target, r, depth + 1, refs);
            refs.pop();
            let others: Vec<&String> = obj
                .keys()
                .filter(|k| *k != "$ref" && !ANNOTATIONS.contains(&k.as_str()))
                .collect();
            if !others.is_empty() {
                return Err(format!(
                    "{at}: keywords beside $ref are not supported: {}",
                    names(&others)
                ));
            }
            return out;
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = obj.get(key) {
                let list = list
                    .as_array()
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| format!("{at}/{key}: expected a non-empty array of schemas"))?;
                let alts = list
                    .iter()
                    .enumerate()
                    .map(|(i, sub)| self.value(sub, &format!("{at}/{key}/{i}"), depth + 1, refs))
                    .collect::<Result<Vec<_>, _>>()?;
                self.check_keys(obj, at, &[key])?;
                return Ok(format!("(?:{})", alts.join("|")));
            }
        }
        if let Some(list) = obj.get("allOf") {
            match list.as_array().map(Vec::as_slice) {
                Some([one]) => return self.value(one, &format!("{at}/allOf/0"), depth + 1, refs),
                _ => return Err(format!("{at}/allOf: only a single-schema allOf is supported")),
            }
        }
        if let Some(c) = obj.get("const") {
            self.check_keys(obj, at, &["const", "type"])?;
            return Ok(literal(c));
        }
        if let Some(e) = obj.get("enum") {
            let items = e
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| format!("{at}/enum: expected a non-empty array"))?;
            self.check_keys(obj, at, &["enum", "type"])?;
            let alts: Vec<String> = items.iter().map(literal).collect();
            return Ok(format!("(?:{})", alts.join("|")));
        }
        let types: Vec<&str> = match obj.get("type") {
            None if obj.contains_key("properties") => vec!["object"],
            None if obj.contains_key("items") => vec!["array"],
            None => {
                self.check_keys(obj, at, &[])?;
                return Ok(free_value(FREE_FORM_DEPTH));
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts
                .iter()
                .map(|t| t.as_str().ok_or_else(|| format!("{at}/type: expected strings")))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("{at}/type: expected a string or a list, got {other}")),
        };
        // Every keyword must belong to one of the listed types.
        let known: Vec<&str> = types.iter().flat_map(|t| type_keywords(t).iter().copied()).collect();
        self.check_keys(obj, at, &known)?;
        let mut alts = Vec::new();
        for t in types {
            alts.push(self.typed(obj, t, at, depth, refs)?);
        }
        Ok(if alts.len() == 1 {
            alts.pop().unwrap_or_default()
        } else {
            format!("(?:{})", alts.join("|"))
        })
    }

    /// Refuses every keyword of `obj` that is neither an annotation, nor `type`,
    /// nor one of `known`.
    fn check_keys(&self, obj: &Map<String, Value>, at: &str, known: &[&str]) -> Result<(), String> {
        let bad: Vec<&String> = obj
            .keys()
            .filter(|k| !ANNOTATIONS.contains(&k.as_str()) && k.as_str() != "type" && !known.contains(&k.as_str()))
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{at}: unsupported keyword{} {}",
                if bad.len() > 1 { "s" } else { "" },
                names(&bad)
            ))
        }
    }

    fn typed(
        &self,
        obj: &Map<String, Value>,
        t: &str,
        at: &str,
        depth: usize,
        refs: &mut Vec<String>,
    ) -> Result<String, String> {
        let usize_of = |k: &str| -> Result<Option<usize>, String> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| format!("{at}/{k}: expected a non-negative integer")),
            }
        };
        match t {
            "string" => {
                if let Some(p) = obj.get("pattern") {
                    let p = p.as_str().ok_or_else(|| format!("{at}/pattern: expected a string"))?;
                    if obj.contains_key("format") || obj.contains_key("minLength") || obj.contains_key("maxLength") {
                        return Err(format!(
                            "{at}: pattern together with format/minLength/maxLength is not supported"
                        ));
                    }
                    let p = p.strip_prefix('^').unwrap_or(p);
                    let p = p.strip_suffix('$').filter(|q| !q.ends_with('\\')).unwrap_or(p);
                    regex_syntax::Parser::new()
                        .parse(p)
                        .map_err(|e| format!("{at}/pattern: not a valid regular expression: {e}"))?;
                    return Ok(format!("\"(?:{p})\""));
                }
                if let Some(f) = obj.get("format") {
                    let f = f.as_str().unwrap_or_default();
                    let re = match f {
                        "date" => r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
                        "time" => {
                            r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})?"
                        }
                        "date-time" => {
                            r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})"
                        }
                        "uuid" => r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                        "email" => r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,4}",
                        other => {
                            return Err(format!(
                            "{at}/format: format {other:?} is not supported (date, time, date-time, uuid, email are)"
                        ))
                        }
                    };
                    return Ok(format!("\"{re}\""));
                }
                let min = usize_of("minLength")?.unwrap_or(0);
                let max = usize_of("maxLength")?;
                if max.is_some_and(|m| m < min) {
                    return Err(format!("{at}: maxLength is below minLength"));
                }
                Ok(string_re(min, max))
            }
            "integer" | "number" => {
                if obj.contains_key("multipleOf") {
                    return Err(format!("{at}: unsupported keyword `multipleOf`"));
                }
                let lower = bound(obj, at, "minimum", "exclusiveMinimum", true)?;
                let upper = bound(obj, at, "maximum", "exclusiveMaximum", false)?;
                if lower.is_none() && upper.is_none() {
                    return Ok(format!("(?:{})", if t == "integer" { INTEGER } else { NUMBER }));
                }
                let re = if t == "integer" {
                    integer_range(lower, upper)
                } else {
                    number_range(at, lower, upper)?
                };
                re.ok_or_else(|| format!("{at}: no {t} lies between the minimum and the maximum"))
            }
            "boolean" => Ok("(?:true|false)".into()),
            "null" => Ok("null".into()),
            "array" => {
                let item = match obj.get("items") {
                    None => free_value(FREE_FORM_DEPTH - 1),
                    Some(i) => self.value(i, &format!("{at}/items"), depth + 1, refs)?,
                };
                let min = usize_of("minItems")?.unwrap_or(0);
                let max = usize_of("maxItems")?;
                if max.is_some_and(|m| m < min) {
                    return Err(format!("{at}: maxItems is below minItems"));
                }
                if max == Some(0) {
                    return Ok(r"\[\]".into());
                }
                let more = match max {
                    None => format!("{{{},}}", min.saturating_sub(1)),
                    Some(x) => format!("{{{},{}}}", min.saturating_sub(1), x - 1),
                };
                let body = format!("{item}(?:, {item}){more}");
                Ok(if min == 0 {
                    format!(r"\[(?:{body})?\]")
                } else {
                    format!(r"\[{body}\]")
                })
            }
            "object" => {
                let props = match obj.get("properties") {
                    None => {
                        return match obj.get("additionalProperties") {
                            None | Some(Value::Bool(true)) => Ok(free_object(FREE_FORM_DEPTH)),
                            Some(_) => Err(format!(
                                "{at}/additionalProperties: a schema for additional properties is not supported"
                            )),
                        }
                    }
                    Some(Value::Object(p)) => p,
                    Some(_) => return Err(format!("{at}/properties: expected an object")),
                };
                match obj.get("additionalProperties") {
                    None | Some(Value::Bool(_)) => {}
                    Some(_) => {
                        return Err(format!(
                            "{at}/additionalProperties: a schema for additional properties is not supported"
                        ))
                    }
                }
                let required: Vec<&str> = match obj.get("required") {
                    None => vec![],
                    Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                    Some(_) => return Err(format!("{at}/required: expected an array of names")),
                };
                if let Some(missing) = required.iter().find(|r| !props.contains_key(**r)) {
                    return Err(format!("{at}/required: {missing:?} is not among the properties"));
                }
                let mut items = Vec::with_capacity(props.len());
                for (name, sub) in props {
                    let v = self.value(sub, &format!("{at}/properties/{name}"), depth + 1, refs)?;
                    let key = regex_syntax::escape(&Value::String(name.clone()).to_string());
                    items.push((format!("{key}: {v}"), required.contains(&name.as_str())));
                }
                Ok(format!(r"\{{{}\}}", members(&items)))
            }
            other => Err(format!("{at}/type: unknown type {other:?}")),
        }
    }
}

/// The members of an object, in order, each optional one allowed to be absent,
/// with commas only between the members present.
fn members(items: &[(String, bool)]) -> String {
    // Once a member is known to be written, every later one is ", member" or
    // absent (when optional). Before that, the first present member has no comma.
    let after = |from: usize| -> String {
        items[from..]
            .iter()
            .map(|(m, req)| if *req { format!(", {m}") } else { format!("(?:, {m})?") })
            .collect()
    };
    // Alternatives by which member comes first: any optional one up to and
    // including the first required one.
    let mut alts = Vec::new();
    for (i, (m, req)) in items.iter().enumerate() {
        alts.push(format!("{m}{}", after(i + 1)));
        if *req {
            return format!("(?:{})", alts.join("|"));
        }
    }
    // All optional: the object may be empty.
    if alts.is_empty() {
        String::new()
    } else {
        format!("(?:{})?", alts.join("|"))
    }
}

/// Largest magnitude of an integer part the JSON layout writes (16 digits,
/// as [`INTEGER`] and [`NUMBER`] allow).
const MAX_DIGITS_VALUE: i128 = 9_999_999_999_999_999;

/// A numeric bound as `(value, exclusive)`; values past what the layout can
/// write are clamped just outside it so arithmetic cannot overflow.
type Bound = (BoundValue, bool);

/// A bound's value: exact when the schema gave an integer.
#[derive(Clone, Copy, Debug)]
enum BoundValue {
    Int(i128),
    Float(f64),
}

impl BoundValue {
    fn of(n: &serde_json::Number) -> Option<BoundValue> {
        let limit = MAX_DIGITS_VALUE + 1;
        if let Some(i) = n.as_i64() {
            return Some(BoundValue::Int((i as i128).clamp(-limit, limit)));
        }
        if let Some(u) = n.as_u64() {
            return Some(BoundValue::Int((u as i128).min(limit)));
        }
        let f = n.as_f64()?;
        if f.fract() == 0.0 || f.abs() > limit as f64 {
            // `as` saturates; the clamp keeps negation and +1 in range.
            Some(BoundValue::Int((f as i128).clamp(-limit, limit)))
        } else {
            Some(BoundValue::Float(f))
        }
    }

    /// The smallest integer at or above this value.
    fn ceil(self) -> i128 {
        match self {
            BoundValue::Int(i) => i,
            BoundValue::Float(f) => f.ceil() as i128,
        }
    }

    /// The largest integer at or below this value.
    fn floor(self) -> i128 {
        match self {
            BoundValue::Int(i) => i,
            BoundValue::Float(f) => f.floor() as i128,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            BoundValue::Int(i) => i as f64,
            BoundValue::Float(f) => f,
        }
    }
}

/// The tightest of `incl` (e.g. `minimum`) and `excl` (`exclusiveMinimum`,
/// a number, or draft 4's boolean that makes `minimum` exclusive).
fn bound(
    obj: &Map<String, Value>,
    at: &str,
    incl: &'static str,
    excl: &'static str,
    is_lower: bool,
) -> Result<Option<(Bound, &'static str)>, String> {
    let num = |k: &str| -> Result<Option<BoundValue>, String> {
        match obj.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(BoundValue::of(n)),
            Some(other) => Err(format!("{at}/{k}: expected a number, got {other}")),
        }
    };
    let mut inclusive = num(incl)?.map(|v| (v, false));
    let exclusive = match obj.get(excl) {
        Some(Value::Bool(b)) => {
            if let Some((_, x)) = inclusive.as_mut() {
                *x = *b;
            }
            None
        }
        _ => num(excl)?.map(|v| (v, true)),
    };
    let keyword = |b: &Bound| if b.1 { excl } else { incl };
    let tighter = match (inclusive, exclusive) {
        (Some(a), Some(b)) => {
            let (fa, fb) = (a.0.as_f64(), b.0.as_f64());
            // At an equal value the exclusive bound is the tighter one.
            let b_wins = if is_lower { fb >= fa } else { fb <= fa };
            Some(if b_wins { b } else { a })
        }
        (a, b) => a.or(b),
    };
    Ok(tighter.map(|b| (b, keyword(&b))))
}

/// The integers between the bounds, exactly, as `json.dumps` writes them
/// (no leading zeros, no `-0`); `None` when there are none.
fn integer_range(lower: Option<(Bound, &str)>, upper: Option<(Bound, &str)>) -> Option<String> {
    let lo = lower.map_or(
        -MAX_DIGITS_VALUE,
        |((v, x), _)| if x { v.floor() + 1 } else { v.ceil() },
    );
    let hi = upper.map_or(MAX_DIGITS_VALUE, |((v, x), _)| if x { v.ceil() - 1 } else { v.floor() });
    let (lo, hi) = (lo.max(-MAX_DIGITS_VALUE), hi.min(MAX_DIGITS_VALUE));
    let mut alts = Vec::new();
    if hi >= lo.max(0) {
        alts.push(digits_range(lo.max(0) as u64, hi as u64));
    }
    if lo < 0 && hi.min(-1) >= lo {
        alts.push(format!("-(?:{})", digits_range((-hi.min(-1)) as u64, (-lo) as u64)));
    }
    (!alts.is_empty()).then(|| format!("(?:{})", alts.join("|")))
}

/// The numbers between the bounds, written without an exponent (with one, a
/// bound is not a regular property of the digits). Only whole-number bounds
/// are expressible; others are refused naming the keyword.
fn number_range(
    at: &str,
    lower: Option<(Bound, &str)>,
    upper: Option<(Bound, &str)>,
) -> Result<Option<String>, String> {
    let whole = |b: Option<(Bound, &str)>| -> Result<Option<(i128, bool)>, String> {
        match b {
            None => Ok(None),
            Some(((BoundValue::Int(i), x), _)) => Ok(Some((i, x))),
            Some(((BoundValue::Float(f), _), k)) => Err(format!(
                "{at}/{k}: only whole-number bounds are supported for type number, got {f}"
            )),
        }
    };
    let (lo, hi) = (whole(lower)?, whole(upper)?);
    let mut alts = Vec::new();
    // x >= 0, written as its magnitude.
    if hi.is_none_or(|(h, x)| h > 0 || (h == 0 && !x)) {
        let from = lo.filter(|(l, _)| *l >= 0).unwrap_or((0, false));
        alts.extend(magnitude_range(from, hi));
    }
    // x < 0, written as "-" and a magnitude between -hi and -lo.
    if lo.is_none_or(|(l, _)| l < 0) {
        let from = hi.filter(|(h, _)| *h <= 0).map_or((0, false), |(h, x)| (-h, x));
        if let Some(m) = magnitude_range(from, lo.map(|(l, x)| (-l, x))) {
            alts.push(format!("-{m}"));
        }
    }
    Ok((!alts.is_empty()).then(|| format!("(?:{})", alts.join("|"))))
}

/// Non-negative decimals `m` (integer part and optional fraction) with
/// `from.0 <= m` (`<` when `from.1`) and `m <= to.0` (`<` when `to.1`).
fn magnitude_range(from: (i128, bool), to: Option<(i128, bool)>) -> Option<String> {
    const ANY: &str = r"(?:\.[0-9]{1,15})?";
    const ZERO: &str = r"(?:\.0{1,15})?";
    const NONZERO: &str = r"\.0{0,14}[1-9][0-9]{0,14}";
    let (l, lx) = from;
    if l > MAX_DIGITS_VALUE {
        return None;
    }
    // An upper bound the layout cannot reach bounds nothing.
    let to = to.filter(|(h, _)| *h <= MAX_DIGITS_VALUE);
    let mut alts = Vec::new();
    match to {
        Some((h, hx)) if h < l || (h == l && (lx || hx)) => return None,
        Some((h, _)) if h == l => return Some(format!("(?:{l}{ZERO})")),
        Some((h, hx)) => {
            let first = l + i128::from(lx);
            if first < h {
                alts.push(format!("(?:{}){ANY}", digits_range(first as u64, (h - 1) as u64)));
            }
            if !hx {
                alts.push(format!("{h}{ZERO}"));
            }
        }
        None => {
            let first = l + i128::from(lx);
            if first <= MAX_DIGITS_VALUE {
                alts.push(format!(
                    "(?:{}){ANY}",
                    digits_range(first as u64, MAX_DIGITS_VALUE as u64)
                ));
            }
        }
    }
    if lx {
        alts.push(format!("{l}{NONZERO}"));
    }
    Some(format!("(?:{})", alts.join("|")))
}

/// A regex for the decimal integers `a..=b` (`a <= b`) written without
/// leading zeros, as alternatives by number of digits.
fn digits_range(a: u64, b: u64) -> String {
    let len = |x: u64| x.to_string().len();
    let mut alts = Vec::new();
    // Runs of lengths whose whole span is inside the range: "[1-9][0-9]{m,n}".
    let mut full: Option<(usize, usize)> = None;
    let flush = |full: &mut Option<(usize, usize)>, alts: &mut Vec<String>| {
        if let Some((f, t)) = full.take() {
            alts.push(match (f - 1, t - 1) {
                (0, 0) => "[1-9]".into(),
                (m, n) if m == n => format!("[1-9][0-9]{{{m}}}"),
                (m, n) => format!("[1-9][0-9]{{{m},{n}}}"),
            });
        }
    };
    for n in len(a)..=len(b) {
        let first = if n == 1 { 0 } else { 10u64.pow(n as u32 - 1) };
        let last = 10u64.pow(n as u32) - 1;
        let (lo, hi) = (a.max(first), b.min(last));
        if n > 1 && lo == first && hi == last {
            full = Some(full.map_or((n, n), |(f, _)| (f, n)));
            continue;
        }
        flush(&mut full, &mut alts);
        alts.push(same_length(&lo.to_string(), &hi.to_string()));
    }
    flush(&mut full, &mut alts);
    alts.join("|")
}

/// A regex for the digit strings from `a` to `b`, both of the same length.
fn same_length(a: &str, b: &str) -> String {
    let n = a.len();
    if n == 0 || a == b {
        return a.to_string();
    }
    let (a0, b0) = (a.as_bytes()[0], b.as_bytes()[0]);
    if a0 == b0 {
        return format!("{}{}", a0 as char, same_length(&a[1..], &b[1..]));
    }
    let class = |x: u8, y: u8| {
        if x == y {
            (x as char).to_string()
        } else {
            format!("[{}-{}]", x as char, y as char)
        }
    };
    let tail = |k: usize| if k == 0 { String::new() } else { format!("[0-9]{{{k}}}") };
    let (rest_low, rest_high) = (&a[1..], &b[1..]);
    let mut alts = Vec::new();
    let mut mid_from = a0;
    if !rest_low.bytes().all(|c| c == b'0') {
        alts.push(format!(
            "{}(?:{})",
            a0 as char,
            same_length(rest_low, &"9".repeat(n - 1))
        ));
        mid_from = a0 + 1;
    }
    let high_whole = rest_high.bytes().all(|c| c == b'9');
    let mid_to = if high_whole { b0 } else { b0 - 1 };
    if mid_from <= mid_to {
        alts.push(format!("{}{}", class(mid_from, mid_to), tail(n - 1)));
    }
    if !high_whole {
        alts.push(format!(
            "{}(?:{})",
            b0 as char,
            same_length(&"0".repeat(n - 1), rest_high)
        ));
    }
    format!("(?:{})", alts.join("|"))
}

/// The keywords this converter understands for each type.
fn type_keywords(t: &str) -> &'static [&'static str] {
    match t {
        "string" => &["minLength", "maxLength", "pattern", "format"],
        // `multipleOf` is listed so that `typed` names it precisely.
        "integer" | "number" => &[
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "multipleOf",
        ],
        "array" => &["items", "minItems", "maxItems"],
        "object" => &["properties", "required", "additionalProperties"],
        _ => &[],
    }
}

fn names(keys: &[&String]) -> String {
    keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matches(schema: Value, ok: &[&str], bad: &[&str]) {
        use regex_automata::dfa::{dense, Automaton};
        let re = schema_to_regex(&schema).unwrap();
        let dfa = dense::DFA::new(&format!("^(?:{re})$")).unwrap();
        let is_match = |s: &str| dfa.try_search_fwd(&regex_automata::Input::new(s)).unwrap().is_some();
        for s in ok {
            assert!(is_match(s), "{schema} should accept {s}: {re}");
            serde_json::from_str::<Value>(s).unwrap();
        }
        for s in bad {
            assert!(!is_match(s), "{schema} should refuse {s}: {re}");
        }
    }

    #[test]
    fn objects_with_required_and_optional_properties() {
        matches(
            json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}}, "required": ["b"]}),
            &[
                r#"{"b": "x"}"#,
                r#"{"a": 1, "b": "x"}"#,
                r#"{"a": -3, "b": "", "c": true}"#,
                r#"{"b": "x", "c": false}"#,
            ],
            &[
                r#"{}"#,
                r#"{"a": 1}"#,
                r#"{"b": 1}"#,
                r#"{"b": "x",}"#,
                r#"{"c": true, "b": "x"}"#,
            ],
        );
        matches(
            json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "null"}}}),
            &["{}", r#"{"a": 1}"#, r#"{"b": null}"#, r#"{"a": 0, "b": null}"#],
            &[r#"{, "b": null}"#, r#"{"a": 01}"#],
        );
    }

    #[test]
    fn enums_strings_numbers_arrays_refs_any_of() {
        matches(
            json!({"enum": ["red", "green", 3]}),
            &[r#""red""#, "3"],
            &[r#""blue""#, "red"],
        );
        matches(
            json!({"type": "string", "maxLength": 3}),
            &[r#""""#, r#""abc""#, r#""a\"b""#],
            &[r#""abcd""#],
        );
        matches(
            json!({"type": "string", "pattern": "^[a-z]+@x$"}),
            &[r#""ab@x""#],
            &[r#""@x""#],
        );
        matches(
            json!({"type": "number"}),
            &["1.5", "-0.25", "3e10", "7"],
            &["1.", ".5", "+1"],
        );
        matches(json!({"type": "integer", "minimum": 0}), &["0", "42"], &["-1", "1.0"]);
        matches(
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}),
            &["[1]", "[1, 2, 3]"],
            &["[]", "[1, 2, 3, 4]", "[1,2]"],
        );
        matches(
            json!({"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                   "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                   "required": ["p", "q"]}),
            &[r#"{"p": {"x": 1}, "q": null}"#, r#"{"p": {"x": 1}, "q": "s"}"#],
            &[r#"{"p": {}, "q": null}"#],
        );
        matches(
            json!({"type": "object"}),
            &["{}", r#"{"a": [1, null], "b": {"c": "d"}}"#],
            &["[]"],
        );
    }

    #[test]
    fn free_form_json_compiles_within_the_constraint_limits() {
        crate::Constraint::JsonObject.compile().unwrap();
        crate::Constraint::JsonSchema(
            json!({"type": "object", "properties": {"a": {"type": "object"}, "b": {"type": "array"}}}),
        )
        .compile()
        .unwrap();
    }

    #[test]
    fn unsupported_keywords_and_recursion_are_named() {
        let e = schema_to_regex(&json!({"type": "object", "properties": {"x": {"type": "string", "not": {}}}}))
            .unwrap_err();
        assert!(e.contains("#/properties/x") && e.contains("`not`"), "{e}");
        let e = schema_to_regex(&json!({"$defs": {"N": {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}))
            .unwrap_err();
        assert!(e.contains("recursive"), "{e}");
        let e = schema_to_regex(&json!({"type": "integer", "multipleOf": 5})).unwrap_err();
        assert!(e.contains("multipleOf"), "{e}");
        let e = schema_to_regex(&json!({"type": "string", "format": "hostname"})).unwrap_err();
        assert!(e.contains("hostname"), "{e}");
    }

    /// A DFA for the whole-text match of `schema`'s regex.
    fn acceptor(schema: &Value) -> impl Fn(&str) -> bool {
        use regex_automata::dfa::{dense, Automaton};
        let re = schema_to_regex(schema).unwrap();
        let dfa = dense::DFA::new(&format!("^(?:{re})$")).unwrap();
        move |s: &str| dfa.try_search_fwd(&regex_automata::Input::new(s)).unwrap().is_some()
    }

    #[test]
    fn integer_bounds_match_exactly_the_integers_in_range() {
        // (schema bounds, inclusive range they mean)
        let cases: &[(Value, i64, i64)] = &[
            (json!({"minimum": 1, "maximum": 10}), 1, 10),
            (json!({"minimum": -7, "maximum": 123}), -7, 123),
            (json!({"minimum": -250, "maximum": -19}), -250, -19),
            (json!({"exclusiveMinimum": 0, "exclusiveMaximum": 100}), 1, 99),
            (json!({"minimum": 1.5, "maximum": 9.5}), 2, 9),
            (json!({"exclusiveMinimum": -1.5, "exclusiveMaximum": 2.0}), -1, 1),
            (json!({"minimum": 0, "exclusiveMinimum": 3, "maximum": 1000}), 4, 1000),
            (json!({"minimum": 5, "exclusiveMinimum": true, "maximum": 20}), 6, 20),
            (json!({"minimum": 99, "maximum": 99}), 99, 99),
            (json!({"minimum": 17, "maximum": 4321}), 17, 4321),
        ];
        for (bounds, lo, hi) in cases {
            let mut schema = bounds.clone();
            schema["type"] = json!("integer");
            let accepts = acceptor(&schema);
            for n in (lo - 150)..=(hi + 150) {
                let want = (*lo..=*hi).contains(&n);
                assert_eq!(accepts(&n.to_string()), want, "{schema} on {n}");
            }
            for bad in ["01", "-0", "1.0", "1e2", "+1", ""] {
                assert!(!accepts(bad), "{schema} should refuse {bad:?}");
            }
        }
        // Open-ended sides reach the layout's 16 digits and no further.
        let accepts = acceptor(&json!({"type": "integer", "minimum": -3}));
        for (s, want) in [
            ("-3", true),
            ("-4", false),
            ("0", true),
            ("9999999999999999", true),
            ("10000000000000000", false),
        ] {
            assert_eq!(accepts(s), want, "minimum -3 on {s}");
        }
        let accepts = acceptor(&json!({"type": "integer", "exclusiveMaximum": 10}));
        for (s, want) in [("9", true), ("10", false), ("-9999999999999999", true), ("0", true)] {
            assert_eq!(accepts(s), want, "exclusiveMaximum 10 on {s}");
        }
        // Bounds beyond what 16 digits can write bound nothing.
        let accepts = acceptor(&json!({"type": "integer", "minimum": -1e30, "maximum": 1e30}));
        assert!(accepts("-42") && accepts("42"));
        let e = schema_to_regex(&json!({"type": "integer", "minimum": 3, "maximum": 2})).unwrap_err();
        assert!(e.contains("no integer"), "{e}");
        let e = schema_to_regex(&json!({"type": "integer", "exclusiveMinimum": 2, "exclusiveMaximum": 3})).unwrap_err();
        assert!(e.contains("no integer"), "{e}");
    }

    #[test]
    fn number_bounds_match_the_decimals_in_range() {
        let accepts = acceptor(&json!({"type": "number", "minimum": 0, "maximum": 1}));
        for s in ["0", "0.5", "0.999", "1", "1.0", "1.000"] {
            assert!(accepts(s), "[0, 1] should accept {s}");
        }
        for s in ["1.01", "2", "-0.1", "-1", "1e0", ".5", "10"] {
            assert!(!accepts(s), "[0, 1] should refuse {s}");
        }
        let accepts = acceptor(&json!({"type": "number", "exclusiveMinimum": -2, "exclusiveMaximum": 3}));
        for s in ["-1.999", "-1", "0", "2.5", "2.999", "-0.25"] {
            assert!(accepts(s), "(-2, 3) should accept {s}");
        }
        for s in ["-2", "-2.0", "-2.5", "3", "3.0", "3.1", "-3"] {
            assert!(!accepts(s), "(-2, 3) should refuse {s}");
        }
        let accepts = acceptor(&json!({"type": "number", "exclusiveMinimum": 5}));
        for (s, want) in [
            ("5.01", true),
            ("6", true),
            ("5", false),
            ("5.0", false),
            ("4.9", false),
            ("-6", false),
        ] {
            assert_eq!(accepts(s), want, "> 5 on {s}");
        }
        let accepts = acceptor(&json!({"type": "number", "maximum": -10}));
        for (s, want) in [
            ("-10", true),
            ("-10.5", true),
            ("-9.9", false),
            ("0", false),
            ("-10.0", true),
        ] {
            assert_eq!(accepts(s), want, "<= -10 on {s}");
        }
        // A bound between whole numbers is refused, naming keyword and place.
        let e = schema_to_regex(&json!({"type": "object", "properties": {"p": {"type": "number", "maximum": 0.5}}}))
            .unwrap_err();
        assert!(e.contains("#/properties/p/maximum") && e.contains("0.5"), "{e}");
        let e = schema_to_regex(&json!({"type": "number", "minimum": 2, "exclusiveMaximum": 2})).unwrap_err();
        assert!(e.contains("no number"), "{e}");
        let e = schema_to_regex(&json!({"type": "number", "minimum": "1"})).unwrap_err();
        assert!(e.contains("#/minimum"), "{e}");
    }

    #[test]
    fn bounded_schemas_compile_within_the_constraint_limits() {
        crate::Constraint::JsonSchema(json!({"type": "object", "properties": {
            "rating": {"type": "integer", "minimum": 1, "maximum": 10},
            "score": {"type": "number", "minimum": -100, "maximum": 100},
            "n": {"type": "integer", "exclusiveMinimum": 0}}, "required": ["rating"]}))
        .compile()
        .unwrap();
    }
}
