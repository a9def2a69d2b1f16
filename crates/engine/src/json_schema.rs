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
                let min = obj
                    .get("minimum")
                    .map(|v| v.as_f64().ok_or_else(|| format!("{at}/minimum: expected a number")))
                    .transpose()?;
                if let Some(k) = ["maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"]
                    .iter()
                    .find(|k| obj.contains_key(**k))
                {
                    return Err(format!(
                        "{at}: unsupported keyword `{k}` (numeric bounds other than minimum: 0 are not enforced)"
                    ));
                }
                let base = if t == "integer" { INTEGER } else { NUMBER };
                match min {
                    None => Ok(format!("(?:{base})")),
                    Some(0.0) => Ok(format!("(?:{})", base.trim_start_matches("-?"))),
                    Some(m) => Err(format!("{at}/minimum: only minimum 0 is supported, got {m}")),
                }
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

/// The keywords this converter understands for each type.
fn type_keywords(t: &str) -> &'static [&'static str] {
    match t {
        "string" => &["minLength", "maxLength", "pattern", "format"],
        // `maximum` and the others are listed so that `typed` names them precisely.
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
        let e = schema_to_regex(&json!({"type": "integer", "maximum": 5})).unwrap_err();
        assert!(e.contains("maximum"), "{e}");
        let e = schema_to_regex(&json!({"type": "string", "format": "hostname"})).unwrap_err();
        assert!(e.contains("hostname"), "{e}");
    }
}
