//! Helpers shared by the CLI tests.

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A scratch directory under the system temp dir, removed when the test that made it
/// ends. A full fine-tune of the default model writes ~2 GB here, so leaving these
/// behind fills the disk within a few runs. A failing test keeps its directory (and
/// says where) for inspection.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `vicugna-{suite}-{pid}-{name}`, emptied first.
    pub fn new(suite: &str, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vicugna-{suite}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
