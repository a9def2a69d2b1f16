//! Reading the texts to classify: JSONL, CSV/TSV with a header row, or one text per line.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use super::error::{ClassifyError, Result};
use super::labels::LabelSet;

/// One text to classify.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The record's `id` field when it has one, else its line number in the file.
    pub id: String,
    pub text: String,
    /// The gold label's index in the label set, when the input has one.
    pub gold: Option<usize>,
    /// Line in the file where the record starts (1-based), for messages.
    pub line: usize,
}

/// The layout of an input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
    /// Tab-separated with a header row.
    Tsv,
    /// One text per line.
    Lines,
}

impl InputFormat {
    /// From the file name: `.jsonl`/`.json`, `.csv`, `.tsv`, anything else one text per line.
    pub fn from_path(path: &Path) -> InputFormat {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("jsonl" | "json" | "ndjson") => InputFormat::Jsonl,
            Some("csv") => InputFormat::Csv,
            Some("tsv") => InputFormat::Tsv,
            _ => InputFormat::Lines,
        }
    }
}

/// Which fields hold what.
#[derive(Debug, Clone)]
pub struct Fields {
    /// The text field (JSONL key or CSV column).
    pub text: String,
    /// The gold label field. `None` means `label` when the records have it.
    pub gold: Option<String>,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            text: "text".into(),
            gold: None,
        }
    }
}

/// Reads every record; gold labels must belong to `labels`, ids must be unique.
pub fn read_items(path: &Path, format: InputFormat, fields: &Fields, labels: &LabelSet) -> Result<Vec<Item>> {
    let raw = match format {
        InputFormat::Jsonl => read_jsonl(path, fields)?,
        InputFormat::Csv => read_delimited(path, b',', fields)?,
        InputFormat::Tsv => read_delimited(path, b'\t', fields)?,
        InputFormat::Lines => read_lines(path)?,
    };
    let mut seen = HashSet::new();
    let mut items = Vec::with_capacity(raw.len());
    for r in raw {
        if r.text.trim().is_empty() {
            return Err(ClassifyError::input(
                path,
                r.line,
                format!("the text field {:?} is empty", fields.text),
            ));
        }
        if !seen.insert(r.id.clone()) {
            return Err(ClassifyError::input(
                path,
                r.line,
                format!("id {:?} appears twice", r.id),
            ));
        }
        let gold = match &r.gold {
            None => None,
            Some(g) => Some(labels.index(g).ok_or_else(|| {
                ClassifyError::input(
                    path,
                    r.line,
                    format!(
                        "gold label {g:?} is not one of the labels ({})",
                        labels.names().join(", ")
                    ),
                )
            })?),
        };
        items.push(Item {
            id: r.id,
            text: r.text,
            gold,
            line: r.line,
        });
    }
    if items.is_empty() {
        return Err(ClassifyError::input(path, 1, "the file holds no records"));
    }
    Ok(items)
}

struct RawItem {
    id: String,
    text: String,
    gold: Option<String>,
    line: usize,
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| ClassifyError::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        ClassifyError::input(path, line, "not valid UTF-8")
    })
}

fn read_jsonl(path: &Path, fields: &Fields) -> Result<Vec<RawItem>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| ClassifyError::input(path, n, format!("not a JSON object: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(ClassifyError::input(path, n, "expected a JSON object"));
        };
        let keys = || obj.keys().cloned().collect::<Vec<_>>().join(", ");
        let text = match obj.get(&fields.text) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(ClassifyError::input(
                    path,
                    n,
                    format!("field {:?} must be a string, got {other}", fields.text),
                ))
            }
            None => {
                return Err(ClassifyError::input(
                    path,
                    n,
                    format!(
                        "no field {:?} (fields: {}); name the text field with --text-field",
                        fields.text,
                        keys()
                    ),
                ))
            }
        };
        let id = match obj.get("id") {
            None | Some(Value::Null) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            Some(other) => {
                return Err(ClassifyError::input(
                    path,
                    n,
                    format!("field \"id\" must be a string or number, got {other}"),
                ))
            }
        };
        let gold_key = fields.gold.as_deref().unwrap_or("label");
        let gold = match obj.get(gold_key) {
            None | Some(Value::Null) if fields.gold.is_some() => {
                return Err(ClassifyError::input(
                    path,
                    n,
                    format!("no gold label field {gold_key:?} (fields: {})", keys()),
                ))
            }
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(x)) => Some(x.to_string()),
            Some(other) => {
                return Err(ClassifyError::input(
                    path,
                    n,
                    format!("gold label {gold_key:?} must be a string, got {other}"),
                ))
            }
        };
        out.push(RawItem {
            id,
            text,
            gold,
            line: n,
        });
    }
    Ok(out)
}

fn read_delimited(path: &Path, delimiter: u8, fields: &Fields) -> Result<Vec<RawItem>> {
    let text = read_text(path)?;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| ClassifyError::input(path, 1, format!("bad header row: {e}")))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let kind = if delimiter == b'\t' { "TSV" } else { "CSV" };
    let Some(text_col) = col(&fields.text) else {
        return Err(ClassifyError::input(
            path,
            1,
            format!(
                "the {kind} header has no column {:?} (columns: {}); name the text column with --text-field",
                fields.text,
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    let gold_col = match &fields.gold {
        Some(g) => Some(col(g).ok_or_else(|| {
            ClassifyError::input(
                path,
                1,
                format!(
                    "the {kind} header has no gold column {g:?} (columns: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })?),
        None => col("label"),
    };
    let id_col = col("id");
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            let msg = match e.kind() {
                csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                    format!("this {kind} row has {len} fields but the header has {expected_len}")
                }
                _ => format!("bad {kind} row: {e}"),
            };
            ClassifyError::input(path, line, msg)
        })?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let get = |c: usize| rec.get(c).unwrap_or("").to_string();
        let id = match id_col.map(get) {
            Some(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => line.to_string(),
        };
        let gold = gold_col.map(get).filter(|g| !g.trim().is_empty());
        if fields.gold.is_some() && gold.is_none() {
            return Err(ClassifyError::input(path, line, "the gold label is empty"));
        }
        out.push(RawItem {
            id,
            text: get(text_col),
            gold,
            line,
        });
    }
    Ok(out)
}

fn read_lines(path: &Path) -> Result<Vec<RawItem>> {
    let text = read_text(path)?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| RawItem {
            id: (i + 1).to_string(),
            text: l.trim_end_matches('\r').to_string(),
            gold: None,
            line: i + 1,
        })
        .collect())
}
