//! The conversation log: one JSONL file per day, `YYYY-MM-DD-conv.json`, as
//! FastChat's web server writes it. Each row is written whole with one
//! `write` on a file opened for appending, so rows of concurrent requests do
//! not interleave and a crash loses no row already written.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Seconds since the epoch, as FastChat's `tstamp`.
pub fn now_tstamp() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `YYYY-MM-DD` (UTC) of a Unix time. Hand-written (Hinnant's days-to-civil)
/// rather than pulling in a date crate for one function.
pub fn utc_date(secs: i64) -> String {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Appends rows to the day's log file in a directory.
pub struct ConvLog {
    dir: PathBuf,
    /// Serialises appends (one process may run many requests at once).
    lock: Mutex<()>,
}

impl ConvLog {
    /// Creates `dir` if needed and checks that a log file can be written there.
    pub fn open(dir: &Path) -> std::io::Result<ConvLog> {
        std::fs::create_dir_all(dir).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot create log directory {}: {e}", dir.display()))
        })?;
        let log = ConvLog {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        };
        let path = log.path_for(now_tstamp());
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot write log file {}: {e}", path.display())))?;
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_for(&self, tstamp: f64) -> PathBuf {
        self.dir.join(format!("{}-conv.json", utc_date(tstamp as i64)))
    }

    /// Appends one row (a JSON object with a `tstamp`) to its day's file.
    pub fn append(&self, row: &Value) -> std::io::Result<()> {
        let t = row.get("tstamp").and_then(Value::as_f64).unwrap_or_else(now_tstamp);
        let mut line = serde_json::to_string(row).map_err(std::io::Error::other)?;
        line.push('\n');
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = OpenOptions::new().create(true).append(true).open(self.path_for(t))?;
        f.write_all(line.as_bytes())?;
        f.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_795_824_000), "2026-11-28");
        assert_eq!(utc_date(-86_400), "1969-12-31");
    }

    #[test]
    fn appends_whole_lines() {
        let dir = std::env::temp_dir().join(format!("vicugna-log-{}", std::process::id()));
        let log = ConvLog::open(&dir).unwrap();
        log.append(&serde_json::json!({"tstamp": 0.5, "type": "chat"})).unwrap();
        log.append(&serde_json::json!({"tstamp": 1.5, "type": "upvote"}))
            .unwrap();
        let text = std::fs::read_to_string(dir.join("1970-01-01-conv.json")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
    }
}
