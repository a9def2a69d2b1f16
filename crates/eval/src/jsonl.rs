//! JSON-lines files: reading with line-numbered errors, appending one record
//! at a time while a job runs, and replacing a file atomically at the end.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{EvalError, Result};

/// Every non-empty line of `path` as a `T` (with its 1-based line number).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    read_inner(path, false).map(|(rows, _)| rows)
}

/// Like [`read`], but a last line without its newline that does not parse is
/// taken for the remnant of an interrupted append and dropped (returned as
/// `true`), so that a resumed job redoes that record.
pub fn read_resumable<T: DeserializeOwned>(path: &Path) -> Result<(Vec<(usize, T)>, bool)> {
    read_inner(path, true)
}

fn read_inner<T: DeserializeOwned>(path: &Path, tolerate_torn_tail: bool) -> Result<(Vec<(usize, T)>, bool)> {
    let file = std::fs::File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let mut rows = Vec::new();
    let mut buf = String::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(|e| EvalError::io(path, e))?;
        if n == 0 {
            return Ok((rows, false));
        }
        line_no += 1;
        let complete = buf.ends_with('\n');
        let text = buf.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(text) {
            Ok(v) => rows.push((line_no, v)),
            Err(_) if tolerate_torn_tail && !complete => return Ok((rows, true)),
            Err(e) => {
                return Err(EvalError::BadLine {
                    path: path.to_path_buf(),
                    line: line_no,
                    msg: e.to_string(),
                })
            }
        }
    }
}

/// Replaces `path` with `rows`, one JSON object a line, through a temporary
/// file in the same folder: readers never see a half-written file.
pub fn write_atomic<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| EvalError::io(dir, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        for row in rows {
            let line = serde_json::to_string(row).expect("JSON values always serialize");
            writeln!(w, "{line}").map_err(|e| EvalError::io(path, e))?;
        }
        w.flush().map_err(|e| EvalError::io(path, e))?;
    }
    readable_by_all(tmp.as_file(), path)?;
    tmp.persist(path).map_err(|e| EvalError::io(path, e.error))?;
    Ok(())
}

/// Writes a whole text file atomically (see [`write_atomic`]).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| EvalError::io(dir, e))?;
    tmp.write_all(text.as_bytes()).map_err(|e| EvalError::io(path, e))?;
    readable_by_all(tmp.as_file(), path)?;
    tmp.persist(path).map_err(|e| EvalError::io(path, e.error))?;
    Ok(())
}

/// Temporary files are created owner-only; results are ordinary files (0644).
pub(crate) fn readable_by_all(file: &std::fs::File, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| EvalError::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

/// An open file that records are appended to as they finish, one whole line
/// per write, so an interrupted job leaves every finished record on disk.
pub struct Appender {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl Appender {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = parent_dir(path);
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| EvalError::io(path, e))?;
        Ok(Appender {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one record.
    pub fn push<T: Serialize>(&mut self, row: &T) -> Result<()> {
        let mut line = serde_json::to_string(row).expect("JSON values always serialize");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| EvalError::io(&self.path, e))
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
