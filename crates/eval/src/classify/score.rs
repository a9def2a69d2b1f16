//! `--method score`: each label's log-probability after the prompt, read
//! rather than generated, then calibrated.
//!
//! Small models favour some labels whatever the input (the label's prior, its
//! length in tokens, its place in the list). Calibration subtracts a per-label
//! bias before the argmax:
//! - `batch` (Zhou et al. 2023): each label's mean log-probability over every
//!   input of the run;
//! - `content-free` (Zhao et al. 2021): the log of each label's probability for
//!   inputs with no content (`N/A`, an empty text, `[MASK]`), averaged.
//!
//! The raw scores are appended to `<output>.scores.jsonl` as they are read
//! (resumable); the bias is computed once every input is scored and kept in
//! `<output>.calibration.json`, so a resumed or repeated run labels with the
//! same bias.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::backend::normalize;
use super::error::{ClassifyError, Result};
use super::output::write_atomic;

/// How label scores are calibrated before the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Calibration {
    /// Raw log-probabilities.
    None,
    /// Subtract each label's mean log-probability over the run's inputs.
    Batch,
    /// Subtract each label's log-probability on content-free inputs.
    ContentFree,
}

impl Calibration {
    /// The name used on the command line and in output files.
    pub fn name(self) -> &'static str {
        match self {
            Calibration::None => "none",
            Calibration::Batch => "batch",
            Calibration::ContentFree => "content-free",
        }
    }
}

/// The content-free inputs of Zhao et al. (2021).
pub const CONTENT_FREE_INPUTS: [&str; 3] = ["N/A", "", "[MASK]"];

/// One input's raw label scores, as a line of `<output>.scores.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreLine {
    pub id: String,
    /// Log-probability of each label, in label-set order.
    pub logprobs: Vec<f64>,
}

/// The scores file: one line per scored input, appended as each is read.
pub struct ScoresFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl ScoresFile {
    /// Opens `path` for appending and returns the scores already in it (a torn
    /// last line is cut off); lines whose label count differs from `labels` are an error.
    pub fn open(path: &Path, labels: usize) -> Result<(ScoresFile, HashMap<String, Vec<f64>>)> {
        let mut done = HashMap::new();
        let mut keep = 0u64;
        if let Ok(bytes) = std::fs::read(path) {
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            keep = complete as u64;
            let text = String::from_utf8_lossy(&bytes[..complete]);
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let s: ScoreLine = serde_json::from_str(line).map_err(|e| ClassifyError::Output {
                    path: path.to_path_buf(),
                    message: format!("line {}: not a score line ({e}); delete the file to rescore", n + 1),
                })?;
                if s.logprobs.len() != labels {
                    return Err(ClassifyError::Output {
                        path: path.to_path_buf(),
                        message: format!(
                            "line {}: {} scores for {labels} labels (another label set); delete the file to rescore",
                            n + 1,
                            s.logprobs.len()
                        ),
                    });
                }
                done.insert(s.id, s.logprobs);
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ClassifyError::io(path, e))?;
        file.set_len(keep).map_err(|e| ClassifyError::io(path, e))?;
        Ok((
            ScoresFile {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            },
            done,
        ))
    }

    /// Appends one input's scores.
    pub fn append(&self, line: &ScoreLine) -> Result<()> {
        let mut text = serde_json::to_string(line).map_err(|e| ClassifyError::Output {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        text.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(text.as_bytes())
            .map_err(|e| ClassifyError::io(&self.path, e))
    }
}

/// The bias subtracted from each label's log-probability, kept with the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationFile {
    pub calibrate: Calibration,
    pub labels: Vec<String>,
    /// Per label, in label order.
    pub bias: Vec<f64>,
    /// Inputs the bias was computed from.
    pub inputs: usize,
}

impl CalibrationFile {
    /// The stored calibration at `path`, if it exists and matches `calibrate` and `labels`.
    pub fn load(path: &Path, calibrate: Calibration, labels: &[String]) -> Option<CalibrationFile> {
        let text = std::fs::read_to_string(path).ok()?;
        let c: CalibrationFile = serde_json::from_str(&text).ok()?;
        (c.calibrate == calibrate && c.labels == labels).then_some(c)
    }

    /// Writes it to `path` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ClassifyError::Output {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes())
    }
}

/// Batch calibration's bias: each label's mean log-probability over `scores`.
pub fn batch_bias<'a>(scores: impl IntoIterator<Item = &'a Vec<f64>>, labels: usize) -> (Vec<f64>, usize) {
    let mut sum = vec![0.0; labels];
    let mut n = 0usize;
    for s in scores {
        for (t, v) in sum.iter_mut().zip(s) {
            *t += v;
        }
        n += 1;
    }
    if n > 0 {
        sum.iter_mut().for_each(|t| *t /= n as f64);
    }
    (sum, n)
}

/// Content-free calibration's bias: the log of each label's probability
/// (normalised over the labels) averaged over the content-free inputs.
pub fn content_free_bias(scores: &[Vec<f64>], labels: usize) -> Vec<f64> {
    let mut mean = vec![0.0; labels];
    for s in scores {
        for (m, p) in mean.iter_mut().zip(normalize(s)) {
            *m += p / scores.len().max(1) as f64;
        }
    }
    mean.iter().map(|p| p.max(1e-12).ln()).collect()
}

/// The decision from raw log-probabilities and a bias: the label with the
/// highest calibrated score, and the calibrated probabilities.
pub fn decide(logprobs: &[f64], bias: &[f64]) -> (usize, Vec<f64>) {
    let cal: Vec<f64> = logprobs.iter().zip(bias).map(|(l, b)| l - b).collect();
    let best = cal
        .iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        )
        .0;
    (best, normalize(&cal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_calibration_undoes_a_label_prior() {
        // Label 0 is favoured by 2 nats on every input; input b truly prefers label 1.
        let a = vec![-0.5, -4.0];
        let b = vec![-1.0, -1.5];
        assert_eq!(decide(&b, &[0.0, 0.0]).0, 0);
        let (bias, n) = batch_bias([&a, &b], 2);
        assert_eq!(n, 2);
        assert_eq!(decide(&b, &bias).0, 1);
        assert_eq!(decide(&a, &bias).0, 0);
    }

    #[test]
    fn content_free_bias_is_a_log_probability() {
        let bias = content_free_bias(&[vec![0.0, -1.0], vec![0.0, -1.0]], 2);
        let p: f64 = bias.iter().map(|b| b.exp()).sum();
        assert!((p - 1.0).abs() < 1e-9);
        assert!(bias[0] > bias[1]);
    }
}
