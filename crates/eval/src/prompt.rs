//! Judge prompts in FastChat's `judge_prompts.jsonl` layout, and Python
//! `str.format` substitution of their `{placeholders}`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{EvalError, Result};
use crate::jsonl;

/// One judge prompt (`single-v1`, `pair-v2`, …).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JudgePrompt {
    /// Its name.
    pub name: String,
    /// `single` or `pairwise`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The system message.
    pub system_prompt: String,
    /// The user message, with `{question}`, `{answer}`, … placeholders.
    pub prompt_template: String,
    /// `[[rating]]`, `[[A]]` or `[[rating_a,rating_b]]`: how the verdict is read.
    pub output_format: String,
    /// `general`, `math`, …
    #[serde(default)]
    pub category: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
}

/// The output formats FastChat can parse.
pub const OUTPUT_FORMATS: [&str; 3] = ["[[rating]]", "[[A]]", "[[rating_a,rating_b]]"];

/// Reads a judge prompt file: name → prompt.
pub fn load_judge_prompts(path: &Path) -> Result<BTreeMap<String, JudgePrompt>> {
    let rows: Vec<(usize, JudgePrompt)> = jsonl::read(path)?;
    let mut out = BTreeMap::new();
    for (line, p) in rows {
        let bad = |msg: String| EvalError::BadLine {
            path: path.to_path_buf(),
            line,
            msg,
        };
        if !matches!(p.kind.as_str(), "single" | "pairwise") {
            return Err(bad(format!(
                "type must be \"single\" or \"pairwise\", got {:?}",
                p.kind
            )));
        }
        if !OUTPUT_FORMATS.contains(&p.output_format.as_str()) {
            return Err(bad(format!(
                "output_format must be one of {}, got {:?}",
                OUTPUT_FORMATS.join(", "),
                p.output_format
            )));
        }
        if p.kind == "single" && p.output_format != "[[rating]]" {
            return Err(bad(format!(
                "a single prompt must have output_format [[rating]], got {:?}",
                p.output_format
            )));
        }
        placeholders(&p.prompt_template).map_err(|e| bad(format!("prompt_template: {e}")))?;
        out.insert(p.name.clone(), p);
    }
    Ok(out)
}

/// The `{names}` a Python format string uses (`{{` and `}}` are literal braces).
pub fn placeholders(template: &str) -> std::result::Result<Vec<String>, String> {
    let mut names = Vec::new();
    walk(template, |piece| {
        if let Piece::Field(n) = piece {
            names.push(n.to_string());
        }
        Ok(())
    })?;
    Ok(names)
}

/// Python's `template.format(**vars)` for plain `{name}` fields: an unknown
/// name is an error, unused variables are fine.
pub fn py_format(template: &str, vars: &[(&str, &str)]) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(template.len() + vars.iter().map(|(_, v)| v.len()).sum::<usize>());
    walk(template, |piece| {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Field(n) => match vars.iter().find(|(k, _)| *k == n) {
                Some((_, v)) => out.push_str(v),
                None => return Err(format!("no value for {{{n}}}")),
            },
        }
        Ok(())
    })?;
    Ok(out)
}

enum Piece<'a> {
    Text(&'a str),
    Field(&'a str),
}

fn walk<'a>(
    t: &'a str,
    mut f: impl FnMut(Piece<'a>) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let mut rest = t;
    while let Some(i) = rest.find(['{', '}']) {
        f(Piece::Text(&rest[..i]))?;
        let (c, after) = (rest.as_bytes()[i], &rest[i + 1..]);
        if after.as_bytes().first() == Some(&c) {
            f(Piece::Text(&rest[i..i + 1]))?;
            rest = &after[1..];
            continue;
        }
        if c == b'}' {
            return Err("single '}' encountered in format string".into());
        }
        let Some(end) = after.find('}') else {
            return Err("'{' without its '}'".into());
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|ch| ch.is_alphanumeric() || ch == '_') {
            return Err(format!("unsupported field {{{name}}} (only {{name}} fields)"));
        }
        f(Piece::Field(name))?;
        rest = &after[end + 1..];
    }
    f(Piece::Text(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_format() {
        let t = "[Q]\n{question}\n{{literal}} {answer}";
        assert_eq!(placeholders(t).unwrap(), ["question", "answer"]);
        let s = py_format(t, &[("question", "Why {x}?"), ("answer", "Because"), ("unused", "")]).unwrap();
        assert_eq!(s, "[Q]\nWhy {x}?\n{literal} Because");
        assert!(py_format("{missing}", &[]).unwrap_err().contains("{missing}"));
        assert!(placeholders("a } b").is_err());
        assert!(placeholders("{a:>3}").is_err());
    }
}
