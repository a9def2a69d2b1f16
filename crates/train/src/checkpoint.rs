//! Checkpoints that survive being killed at any instant.
//!
//! A checkpoint is a directory `checkpoint-NNNNNNNN` holding the trainable
//! tensors, the optimizer's moments and `state.json` (step, schedule, seed, loss
//! history, and the sha256 of each tensor file). It is written under a temporary
//! name, every file synced, then renamed into place, so a reader sees a whole
//! checkpoint or none. `--resume auto` takes the newest one whose files match
//! their recorded hashes and reports (and skips) any that do not.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError};

/// Everything about a run's progress besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer updates done.
    pub step: usize,
    pub total_steps: usize,
    /// Seed of the data order and of the dropout masks (both are functions of
    /// seed and step, so this is the whole RNG state).
    pub seed: u64,
    /// AdamW's update counter.
    pub adam_t: usize,
    /// Labelled tokens trained on so far.
    pub tokens: u64,
    pub train_loss: Vec<(usize, f32)>,
    pub eval_loss: Vec<(usize, f32)>,
    /// Digest of the settings that must not change across a resume.
    pub settings: String,
    /// CPU threads of the run that wrote it (bit-identical resume needs the same).
    #[serde(default)]
    pub threads: Option<usize>,
    /// File name → sha256, filled when saving.
    #[serde(default)]
    pub files: HashMap<String, String>,
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn sync_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

/// Writes named tensors as one safetensors file (atomically, when `path` is final).
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| TrainError::Write {
            path: path.into(),
            message: e.to_string(),
        })
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| TrainError::io(path, e))
        });
    if let Err(e) = written {
        // A full disk is the usual cause: leave no partial file taking its space.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// The directory of checkpoints under a run's output directory.
pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

/// Saves a checkpoint and removes all but the newest `keep`. Returns its path.
pub fn save(
    output: &Path,
    state: &TrainState,
    params: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(output);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let name = format!("checkpoint-{:08}", state.step);
    let fin = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    if let Err(e) = write_checkpoint_files(&tmp, state, params, optimizer) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| TrainError::io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| TrainError::io(&fin, e))?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    // Older checkpoints beyond `keep`, and temporaries left by killed runs.
    let mut all = list(&root);
    all.sort();
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, p) in all.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(p);
    }
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(".checkpoint-") && e.path() != tmp {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(fin)
}

fn write_checkpoint_files(
    dir: &Path,
    state: &TrainState,
    params: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
) -> Result<()> {
    let mut state = state.clone();
    for (file, tensors) in [("params.safetensors", params), ("optimizer.safetensors", optimizer)] {
        let p = dir.join(file);
        save_safetensors(&p, tensors)?;
        state.files.insert(file.to_string(), sha256_file(&p)?);
    }
    let json = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::BadCheckpoint {
        path: dir.into(),
        message: e.to_string(),
    })?;
    sync_write(&dir.join("state.json"), &json)
}

fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let step = n.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect()
}

/// A checkpoint read back.
pub struct Loaded {
    pub path: PathBuf,
    pub state: TrainState,
    pub params: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// Reads and verifies one checkpoint directory.
pub fn load(path: &Path) -> Result<Loaded> {
    let bad = |m: String| TrainError::BadCheckpoint {
        path: path.into(),
        message: m,
    };
    let sp = path.join("state.json");
    let text = std::fs::read(&sp).map_err(|e| bad(format!("state.json: {e}")))?;
    let state: TrainState = serde_json::from_slice(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    let mut tensors = Vec::new();
    for file in ["params.safetensors", "optimizer.safetensors"] {
        let p = path.join(file);
        let want = state
            .files
            .get(file)
            .ok_or_else(|| bad(format!("state.json lists no hash for {file}")))?;
        let got = sha256_file(&p).map_err(|e| bad(e.to_string()))?;
        if &got != want {
            return Err(bad(format!("{file} does not match its recorded sha256 (torn write)")));
        }
        let t =
            candle_core::safetensors::load(&p, &candle_core::Device::Cpu).map_err(|e| bad(format!("{file}: {e}")))?;
        tensors.push(t);
    }
    let optimizer = tensors.pop().unwrap_or_default();
    let params = tensors.pop().unwrap_or_default();
    Ok(Loaded {
        path: path.into(),
        state,
        params,
        optimizer,
    })
}

/// The newest valid checkpoint of a run, and a note for each newer one skipped.
pub fn latest(output: &Path) -> (Option<Loaded>, Vec<String>) {
    let mut all = list(&checkpoints_dir(output));
    all.sort();
    let mut skipped = Vec::new();
    for (_, p) in all.into_iter().rev() {
        match load(&p) {
            Ok(l) => return (Some(l), skipped),
            Err(e) => skipped.push(format!("ignoring {e}")),
        }
    }
    (None, skipped)
}
