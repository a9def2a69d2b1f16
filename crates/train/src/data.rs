//! Conversation data in FastChat's ShareGPT layout
//! (`[{id, conversations: [{from, value}]}]`), read from a JSON array, JSONL, or
//! Alpaca-style `{instruction, input, output}` records, and written back
//! atomically.
//!
//! A JSON array that is cut off mid-record (as the published ShareGPT dump is)
//! still yields every whole record before the cut; the broken tail is reported
//! in [`Loaded::broken_tail`] instead of failing the whole file.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TrainError};

/// One turn of a conversation, as ShareGPT writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// One conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    #[serde(default)]
    pub id: String,
    pub conversations: Vec<Turn>,
}

/// The role a ShareGPT speaker name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Maps ShareGPT's (and OpenAI's) speaker names; `None` for names it does not know.
    pub fn of(from: &str) -> Option<Role> {
        match from.to_ascii_lowercase().as_str() {
            "human" | "user" => Some(Role::User),
            "gpt" | "chatgpt" | "bard" | "bing" | "assistant" | "model" => Some(Role::Assistant),
            "system" => Some(Role::System),
            _ => None,
        }
    }

    /// The OpenAI-style role name templates take.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Where a truncated file stops making sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenTail {
    /// Byte offset where the unfinished record starts.
    pub offset: usize,
    /// Bytes from there to the end of the file.
    pub bytes: usize,
    /// What the parser said about it.
    pub message: String,
}

/// The samples read from a file, and how the file ended.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub samples: Vec<Sample>,
    /// The file's layout: "json", "jsonl" or "alpaca".
    pub format: &'static str,
    pub broken_tail: Option<BrokenTail>,
}

fn bad(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::BadData {
        path: path.into(),
        message: message.into(),
    }
}

/// Reads a data file (JSON array or JSONL of ShareGPT or Alpaca records).
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    parse(&bytes, path)
}

/// Parses data file contents; `path` is only used in messages.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Loaded> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else {
        return Err(bad(path, "the file is empty; expected a JSON array or JSON lines"));
    };
    let (records, broken_tail, lines) = match bytes[start] {
        b'[' => {
            let (r, t) = parse_array(bytes, start + 1, path)?;
            (r, t, false)
        }
        b'{' => (parse_lines(bytes, path)?, None, true),
        other => {
            return Err(bad(
                path,
                format!(
                    "starts with {:?}; expected a JSON array `[...]` or JSON lines `{{...}}`",
                    other as char
                ),
            ))
        }
    };
    let mut alpaca = false;
    let mut samples = Vec::with_capacity(records.len());
    for (i, (offset, v)) in records.into_iter().enumerate() {
        let (s, is_alpaca) =
            to_sample(v, i).map_err(|m| bad(path, format!("record {} (byte {offset}): {m}", i + 1)))?;
        alpaca |= is_alpaca;
        samples.push(s);
    }
    let format = if alpaca {
        "alpaca"
    } else if lines {
        "jsonl"
    } else {
        "json"
    };
    Ok(Loaded {
        samples,
        format,
        broken_tail,
    })
}

type Records = Vec<(usize, Value)>;

/// Elements of a JSON array one by one, so that a cut in record N leaves
/// records 1..N-1 intact.
fn parse_array(bytes: &[u8], mut pos: usize, path: &Path) -> Result<(Records, Option<BrokenTail>)> {
    let mut out = Vec::new();
    let skip_ws = |p: &mut usize| {
        while *p < bytes.len() && bytes[*p].is_ascii_whitespace() {
            *p += 1;
        }
    };
    let torn = |offset: usize, message: String| BrokenTail {
        offset,
        bytes: bytes.len() - offset,
        message,
    };
    skip_ws(&mut pos);
    if pos < bytes.len() && bytes[pos] == b']' {
        return Ok((out, None));
    }
    loop {
        skip_ws(&mut pos);
        if pos >= bytes.len() {
            return Ok((out, Some(torn(pos, "the file ends inside the array".into()))));
        }
        let mut stream = serde_json::Deserializer::from_slice(&bytes[pos..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                out.push((pos, v));
                pos += stream.byte_offset();
            }
            Some(Err(e)) if e.is_eof() => {
                return Ok((out, Some(torn(pos, format!("unfinished record: {e}")))));
            }
            Some(Err(e)) => {
                let (line, col) = line_col(bytes, pos, &e);
                return Err(bad(
                    path,
                    format!("record {} at line {line}, column {col}: {e}", out.len() + 1),
                ));
            }
            None => return Ok((out, Some(torn(pos, "the file ends inside the array".into())))),
        }
        skip_ws(&mut pos);
        match bytes.get(pos) {
            Some(b',') => pos += 1,
            Some(b']') => {
                pos += 1;
                skip_ws(&mut pos);
                if pos < bytes.len() {
                    return Err(bad(path, format!("unexpected data after the array at byte {pos}")));
                }
                return Ok((out, None));
            }
            Some(&c) => {
                return Err(bad(
                    path,
                    format!(
                        "expected ',' or ']' after record {} at byte {pos}, found {:?}",
                        out.len(),
                        c as char
                    ),
                ))
            }
            None => return Ok((out, Some(torn(pos, "the file ends before the array is closed".into())))),
        }
    }
}

/// Line and column in the whole file of an error inside the record at `base`.
fn line_col(bytes: &[u8], base: usize, e: &serde_json::Error) -> (usize, usize) {
    let before = &bytes[..base];
    let base_line = before.iter().filter(|&&b| b == b'\n').count();
    let base_col = base - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let line = base_line + e.line();
    let col = if e.line() == 1 {
        base_col + e.column()
    } else {
        e.column()
    };
    (line, col)
}

fn parse_lines(bytes: &[u8], path: &Path) -> Result<Records> {
    let text = std::str::from_utf8(bytes).map_err(|e| bad(path, format!("not UTF-8: {e}")))?;
    let mut out = Vec::new();
    let mut offset = 0;
    for (n, line) in text.split('\n').enumerate() {
        let here = offset;
        offset += line.len() + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| bad(path, format!("line {}: {e}", n + 1)))?;
        out.push((here, v));
    }
    Ok(out)
}

/// One record as a sample; the flag says it came from the Alpaca layout.
fn to_sample(v: Value, index: usize) -> std::result::Result<(Sample, bool), String> {
    let Value::Object(obj) = &v else {
        return Err("expected an object".into());
    };
    if obj.contains_key("conversations") {
        let s: Sample =
            serde_json::from_value(v).map_err(|e| format!("expected {{id, conversations: [{{from, value}}]}}: {e}"))?;
        return Ok((s, false));
    }
    if let Some(Value::Array(msgs)) = obj.get("messages") {
        let mut turns = Vec::new();
        for (j, m) in msgs.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) => turns.push(Turn {
                    from: r.to_string(),
                    value: c.to_string(),
                }),
                _ => return Err(format!("messages[{j}]: expected {{role, content}} strings")),
            }
        }
        let id = obj
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("sample_{index}"), String::from);
        return Ok((
            Sample {
                id,
                conversations: turns,
            },
            false,
        ));
    }
    if obj.contains_key("instruction") && obj.contains_key("output") {
        let field = |k: &str| -> std::result::Result<String, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(format!("field {k:?} must be a string")),
            }
        };
        let (instruction, input, output) = (field("instruction")?, field("input")?, field("output")?);
        let prompt = if input.trim().is_empty() {
            instruction
        } else {
            format!("{instruction}\n\n{input}")
        };
        let id = format!("alpaca_{index}");
        let conversations = vec![
            Turn {
                from: "human".into(),
                value: prompt,
            },
            Turn {
                from: "gpt".into(),
                value: output,
            },
        ];
        return Ok((Sample { id, conversations }, true));
    }
    Err("expected ShareGPT {id, conversations}, OpenAI {messages} or Alpaca {instruction, input, output}".into())
}

/// Writes samples atomically: a JSON array (indented, as FastChat writes it), or
/// JSON lines when the file name ends in `.jsonl`.
pub fn save(path: &Path, samples: &[Sample]) -> Result<()> {
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut buf = Vec::new();
    if jsonl {
        for s in samples {
            serde_json::to_writer(&mut buf, s).map_err(|e| bad(path, e.to_string()))?;
            buf.push(b'\n');
        }
    } else {
        serde_json::to_writer_pretty(&mut buf, samples).map_err(|e| bad(path, e.to_string()))?;
        buf.push(b'\n');
    }
    write_atomic(path, &buf)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it
/// over `path`: readers see the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(TrainError::io(path, e));
    }
    Ok(())
}
