//! The results file: one JSON line per input, appended as each input finishes,
//! so that a crash or Ctrl-C loses at most the line being written. On a rerun
//! the finished ids are skipped and a torn last line is cut off.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::error::{ClassifyError, Result};

/// One classified input, as written to the results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub text: String,
    /// The decided label; `null` only when an external API's answer could not be parsed.
    pub label: Option<String>,
    /// Probability of each label (from the model's logprobs, averaged over votes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub probs: BTreeMap<String, f64>,
    #[serde(default)]
    pub clues: String,
    #[serde(default)]
    pub reasoning: String,
    /// Every vote, in order.
    #[serde(default)]
    pub votes: Vec<VoteRecord>,
    /// Majority-vote label (most frequent; ties go to the higher total probability).
    #[serde(default)]
    pub majority: Option<String>,
    /// Weighted-probability-vote label (highest probability summed over votes).
    #[serde(default)]
    pub weighted: Option<String>,
    /// The gold label, when the input has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<String>,
    /// Votes whose answer could not be parsed (external API only).
    #[serde(default)]
    pub parse_failures: usize,
    /// Ids of the demonstrations shown, in prompt order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub demos: Vec<String>,
    /// `--method score`: each label's raw log-probability after the prompt, before calibration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scores: BTreeMap<String, f64>,
}

/// One vote of an input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteRecord {
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub probs: BTreeMap<String, f64>,
    #[serde(default)]
    pub clues: String,
    #[serde(default)]
    pub reasoning: String,
}

/// An open results file that records are appended to.
pub struct ResultsFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl ResultsFile {
    /// Opens `path` for appending and returns the records already in it. A last
    /// line without its newline (the process died while writing it) is removed.
    pub fn open(path: &Path) -> Result<(ResultsFile, Vec<Record>)> {
        let mut done = Vec::new();
        let mut keep = 0u64;
        match std::fs::read(path) {
            Ok(bytes) => {
                let complete = match bytes.iter().rposition(|&b| b == b'\n') {
                    Some(p) => p + 1,
                    None => 0,
                };
                keep = complete as u64;
                let text = std::str::from_utf8(&bytes[..complete]).map_err(|_| ClassifyError::Output {
                    path: path.to_path_buf(),
                    message: "the existing results file is not UTF-8; use another --output".into(),
                })?;
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let r: Record = serde_json::from_str(line).map_err(|e| ClassifyError::Output {
                        path: path.to_path_buf(),
                        message: format!(
                            "line {}: not a result record ({e}); is this the results file of another program?",
                            i + 1
                        ),
                    })?;
                    done.push(r);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ClassifyError::io(path, e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ClassifyError::io(dir, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ClassifyError::io(path, e))?;
        // Drop a torn last line, then append after the last whole one.
        file.set_len(keep).map_err(|e| ClassifyError::io(path, e))?;
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| ClassifyError::io(path, e))?;
        Ok((
            ResultsFile {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            },
            done,
        ))
    }

    /// Appends one record as a single write of one whole line.
    pub fn append(&self, r: &Record) -> Result<()> {
        let mut line = serde_json::to_string(r).map_err(|e| ClassifyError::Output {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(line.as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| ClassifyError::io(&self.path, e))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Rewrites a finished results file with its records in input order (`ids`),
/// records of ids not in `ids` last, in file order. Runs append records as
/// they finish (which keeps a killed run resumable); the final file reads in
/// the order of the inputs.
pub fn rewrite_in_order(path: &Path, ids: &[&str]) -> Result<()> {
    let (_, mut records) = ResultsFile::open(path)?;
    let rank: std::collections::HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    // A stable sort: unknown ids keep their order after the known ones.
    records.sort_by_key(|r| rank.get(r.id.as_str()).copied().unwrap_or(usize::MAX));
    let mut text = String::new();
    for r in &records {
        text.push_str(&serde_json::to_string(r).map_err(|e| ClassifyError::Output {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Writes `contents` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| ClassifyError::io(dir, e))?;
    tmp.write_all(contents).map_err(|e| ClassifyError::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| ClassifyError::io(path, e.error))?;
    Ok(())
}

/// Checks that a results file is resumed with the settings it was started with,
/// recorded in `<output>.run.json`; writes that file on a fresh start.
pub fn check_run_settings(output: &Path, settings: &serde_json::Value, has_records: bool) -> Result<()> {
    let side = sidecar(output, "run.json");
    if has_records {
        if let Ok(text) = std::fs::read_to_string(&side) {
            if let Ok(old) = serde_json::from_str::<serde_json::Value>(&text) {
                if &old != settings {
                    let diff: Vec<String> = settings
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, v)| old.get(k.as_str()) != Some(v))
                        .map(|(k, v)| {
                            format!(
                                "{k}: was {}, now {v}",
                                old.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                            )
                        })
                        .collect();
                    return Err(ClassifyError::Output {
                        path: output.to_path_buf(),
                        message: format!(
                            "holds results made with other settings ({}); give a new --output, or delete it to start over",
                            diff.join("; ")
                        ),
                    });
                }
            }
        }
    }
    let text = serde_json::to_string_pretty(settings).unwrap_or_default();
    write_atomic(&side, text.as_bytes())
}

/// `<output>.<suffix>` next to the results file (`out.jsonl` → `out.metrics.json`).
pub fn sidecar(output: &Path, suffix: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}.{suffix}"))
}
