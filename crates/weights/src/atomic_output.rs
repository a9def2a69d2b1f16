//! Outputs that appear whole or not at all: everything is written into a hidden
//! temporary path next to the target (same filesystem), synced, and renamed into
//! place at the end. A killed job leaves only the temporary path, which the next
//! job writing the same target removes.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Result, WeightsError};

const PARTIAL: &str = ".vicugna-partial-";

/// A directory or file being written under a temporary name.
pub struct AtomicOutput {
    target: PathBuf,
    tmp: PathBuf,
    is_dir: bool,
    committed: bool,
}

fn parent_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.into(),
        _ => PathBuf::from("."),
    }
}

fn partial_prefix(target: &Path) -> OsString {
    let mut s = OsString::from(".");
    s.push(target.file_name().unwrap_or_default());
    s.push(PARTIAL);
    s
}

/// Whether process `pid` is alive.
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

impl AtomicOutput {
    /// Starts a directory output at `target`, which must not exist yet.
    pub fn dir(target: &Path) -> Result<Self> {
        Self::start(target, true)
    }

    /// Starts a single-file output at `target`, which must not exist yet.
    pub fn file(target: &Path) -> Result<Self> {
        Self::start(target, false)
    }

    fn start(target: &Path, is_dir: bool) -> Result<Self> {
        if target.file_name().is_none() {
            return Err(WeightsError::Unsupported(format!(
                "{}: not a usable output path",
                target.display()
            )));
        }
        if target.exists() {
            return Err(WeightsError::TargetExists { path: target.into() });
        }
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent).map_err(|e| WeightsError::io(&parent, e))?;
        remove_stale(target, &parent);
        let mut name = partial_prefix(target);
        name.push(std::process::id().to_string());
        let tmp = parent.join(name);
        if is_dir {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir(&tmp).map_err(|e| WeightsError::io(&tmp, e))?;
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(AtomicOutput {
            target: target.into(),
            tmp,
            is_dir,
            committed: false,
        })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Fails early with a clear error when the filesystem has less than `needed` bytes free.
    /// `VICUGNA_SKIP_SPACE_CHECK=1` skips it (tests of the write-time error use it).
    pub fn check_space(&self, needed: u64) -> Result<()> {
        if std::env::var_os("VICUGNA_SKIP_SPACE_CHECK").is_some_and(|v| v == "1") {
            return Ok(());
        }
        let probe = if self.is_dir {
            self.tmp.clone()
        } else {
            parent_of(&self.tmp)
        };
        if let Some(free) = free_bytes(&probe) {
            if free < needed {
                return Err(WeightsError::DiskFull {
                    path: self.target.clone(),
                    needed,
                });
            }
        }
        Ok(())
    }

    /// Syncs everything and renames the output into place.
    pub fn commit(mut self) -> Result<()> {
        if self.is_dir {
            for entry in std::fs::read_dir(&self.tmp).map_err(|e| WeightsError::io(&self.tmp, e))? {
                let p = entry.map_err(|e| WeightsError::io(&self.tmp, e))?.path();
                sync_path(&p)?;
            }
        }
        sync_path(&self.tmp)?;
        if self.target.exists() {
            return Err(WeightsError::TargetExists {
                path: self.target.clone(),
            });
        }
        std::fs::rename(&self.tmp, &self.target).map_err(|e| WeightsError::io(&self.target, e))?;
        self.committed = true;
        sync_path(&parent_of(&self.target))
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if !self.committed {
            if self.is_dir {
                let _ = std::fs::remove_dir_all(&self.tmp);
            } else {
                let _ = std::fs::remove_file(&self.tmp);
            }
        }
    }
}

/// Removes temporary outputs for `target` left by processes that no longer run.
fn remove_stale(target: &Path, parent: &Path) {
    let prefix = partial_prefix(target);
    let prefix = prefix.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name.strip_prefix(prefix.as_ref()).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 != std::process::id() && !alive(pid) {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

fn sync_path(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| WeightsError::io(path, e))?;
    f.sync_all().map_err(|e| WeightsError::io(path, e))
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Copies the small non-weight files of a model directory (config, tokenizer,
/// generation config, chat template) into `out`, skipping weights.
pub fn copy_side_files(from: &Path, out: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for entry in std::fs::read_dir(from).map_err(|e| WeightsError::io(from, e))? {
        let entry = entry.map_err(|e| WeightsError::io(from, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let p = entry.path();
        let weight = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".pt")
            || name.ends_with(".pth")
            || name.ends_with(".gguf")
            || name.ends_with(".index.json")
            || name.starts_with('.');
        if weight || !p.is_file() {
            continue;
        }
        std::fs::copy(&p, out.join(&name)).map_err(|e| WeightsError::io(&out.join(&name), e))?;
        copied.push(name);
    }
    copied.sort();
    Ok(copied)
}

/// Sets `torch_dtype` in a copied `config.json` (when there is one) to the dtype written.
pub fn set_config_dtype(out: &Path, torch_name: &str) -> Result<()> {
    let path = out.join("config.json");
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| WeightsError::io(&path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| WeightsError::BadFile {
        path: path.clone(),
        format: "JSON",
        message: e.to_string(),
    })?;
    if let Some(o) = v.as_object_mut() {
        o.insert("torch_dtype".into(), torch_name.into());
    }
    let text = serde_json::to_string_pretty(&v).expect("a JSON value serializes");
    std::fs::write(&path, text + "\n").map_err(|e| WeightsError::io(&path, e))
}
