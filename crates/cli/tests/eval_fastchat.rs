//! `vicugna eval show` against FastChat 0.2.36's own `show_result` (PyPI
//! `fschat`, run as `python -m fastchat.llm_judge.show_result`) on the same
//! judgment files: every mean score, win, loss, tie and rate must agree.
//! The Python side lives in a venv under target/ (made on first use); outside
//! CI the test skips when it cannot be made, in CI it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::{json, Value};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// target/ (the parent of the profile folder holding this test binary).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

/// A Python with fschat 0.2.36 and pandas: `$VICUGNA_EVAL_PYTHON`, or a venv under target/.
fn python() -> Option<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Ok(p) = std::env::var("VICUGNA_EVAL_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let dir = target_dir().join("eval-pyenv");
    let py = dir.join("bin/python");
    if dir.join(".ready").exists() {
        return Some(py);
    }
    let fail = |m: &str| -> Option<PathBuf> {
        assert!(!in_ci(), "{m}");
        eprintln!("skipping: {m}");
        None
    };
    if !Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success())
    {
        return fail("python3 -m venv failed (install python3-venv)");
    }
    let pip = |args: &[&str]| {
        Command::new(&py)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    // show_result needs only pandas; FastChat's other dependencies (torch, …) stay out.
    if !pip(&["fschat==0.2.36", "--no-deps"]) || !pip(&["pandas"]) {
        return fail("pip install of fschat==0.2.36 / pandas failed");
    }
    std::fs::write(dir.join(".ready"), "").unwrap();
    Some(py)
}

/// A small deterministic generator, so the files differ by seed but not by run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

const MODELS: [&str; 4] = ["vicuna-7b", "alpaca-13b", "llama-13b", "gpt-3.5-turbo"];

fn single_file(path: &Path, seed: u64) {
    let mut r = Lcg(seed);
    let mut s = String::new();
    for m in MODELS {
        for q in 81..101 {
            for turn in [1, 2] {
                // Integer and fractional ratings, and unreadable ones (-1).
                let score = match r.next(12) {
                    0 => json!(-1),
                    1 => json!(r.next(19) as f64 / 2.0 + 1.0),
                    _ => json!(r.next(10) + 1),
                };
                let mut row = json!({"question_id": q, "model": m, "judge": ["gpt-4", "single-v1"], "user_prompt": "p",
                    "judgment": "j", "score": score, "turn": turn, "tstamp": 1.0});
                // The fields vicugna adds must not disturb FastChat.
                if r.next(2) == 0 {
                    row["category"] = json!("writing");
                    row["verdict_forced"] = json!(true);
                }
                s += &format!("{row}\n");
            }
        }
    }
    std::fs::write(path, s).unwrap();
}

fn pair_file(path: &Path, seed: u64) {
    let mut r = Lcg(seed);
    let mut s = String::new();
    let outcomes = ["model_1", "model_2", "tie", "error"];
    for (i, m1) in MODELS.iter().enumerate() {
        for m2 in &MODELS[i + 1..] {
            for q in 81..96 {
                for turn in [1, 2] {
                    // Mostly agreeing orders, some disagreements, ties and errors.
                    let g1 = outcomes[r.next(4) as usize];
                    let g2 = if r.next(3) == 0 {
                        outcomes[r.next(4) as usize]
                    } else {
                        g1
                    };
                    let mut row = json!({"question_id": q, "model_1": m1, "model_2": m2, "g1_winner": g1,
                        "g2_winner": g2, "judge": ["gpt-4", "pair-v2"], "g1_user_prompt": "", "g1_judgment": "",
                        "g2_user_prompt": "", "g2_judgment": "", "turn": turn, "tstamp": 1.0});
                    if r.next(2) == 0 {
                        row["category"] = json!("math");
                        row["verdict_forced"] = json!(true);
                    }
                    s += &format!("{row}\n");
                }
            }
        }
    }
    std::fs::write(path, s).unwrap();
}

/// Runs FastChat's show_result; returns its stdout.
fn fastchat(py: &Path, file: &Path, mode: &str, baseline: Option<&str>) -> String {
    let mut c = Command::new(py);
    c.args(["-m", "fastchat.llm_judge.show_result", "--mode", mode, "--input-file"])
        .arg(file);
    if let Some(b) = baseline {
        c.args(["--baseline-model", b]);
    }
    let out = c.output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "FastChat show_result failed:\n{o}\n{e}");
    o.into_owned()
}

fn vicugna_show(file: &Path, baseline: Option<&str>) -> Value {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vicugna"));
    c.args(["eval", "show", "--json", "--no-chart", "--judgments"])
        .arg(file);
    if let Some(b) = baseline {
        c.args(["--baseline", b]);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The rows of pandas' printout per section: model → the numbers on its line.
fn parse_pandas(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<f64>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut section = String::from("table");
    for line in text.lines() {
        if let Some(t) = line.trim().strip_prefix("##########") {
            section = t.trim_end_matches('#').trim().to_string();
            continue;
        }
        let tok: Vec<&str> = line.split_whitespace().collect();
        if tok.len() < 2 || !MODELS.contains(&tok[0]) {
            continue;
        }
        let nums: Vec<f64> = tok[1..].iter().map(|t| t.parse().unwrap()).collect();
        out.entry(section.clone()).or_default().insert(tok[0].to_string(), nums);
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    // pandas prints 6 decimals.
    (a - b).abs() < 2e-6
}

#[test]
fn single_mode_numbers_equal_fastchat_show_result() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for seed in [1, 2] {
        let f = dir.path().join(format!("gpt-4_single_{seed}.jsonl"));
        single_file(&f, seed);
        let theirs = parse_pandas(&fastchat(&py, &f, "single", None));
        let ours = vicugna_show(&f, None);
        for (section, key) in [
            ("First turn", "first_turn"),
            ("Second turn", "second_turn"),
            ("Average", "average"),
        ] {
            let rows = ours[key].as_array().unwrap();
            let t = &theirs[section];
            assert_eq!(rows.len(), t.len(), "{section}: {t:?} vs {rows:?}");
            for r in rows {
                let m = r["model"].as_str().unwrap();
                // First/second turn rows print (model, turn, score); average prints (model, score).
                let theirs_score = *t[m].last().unwrap();
                let ours_score = r["score"].as_f64().unwrap();
                assert!(
                    close(ours_score, theirs_score),
                    "{section} {m}: ours {ours_score}, FastChat {theirs_score}"
                );
            }
            // Same order (best first) where scores differ.
            let order: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
            let mut theirs_order: Vec<(&String, f64)> = t.iter().map(|(m, v)| (m, *v.last().unwrap())).collect();
            theirs_order.sort_by(|a, b| b.1.total_cmp(&a.1));
            assert_eq!(order.len(), theirs_order.len());
            for (o, (_, s)) in order.iter().zip(&theirs_order) {
                assert!(
                    close(*t[*o].last().unwrap(), *s),
                    "{section}: order differs: {order:?} vs {theirs_order:?}"
                );
            }
        }
    }
}

#[test]
fn pairwise_numbers_equal_fastchat_show_result() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for seed in [3, 4] {
        let f = dir.path().join(format!("gpt-4_pair_{seed}.jsonl"));
        pair_file(&f, seed);
        for (mode, baseline) in [("pairwise-all", None), ("pairwise-baseline", Some("gpt-3.5-turbo"))] {
            let theirs = parse_pandas(&fastchat(&py, &f, mode, baseline));
            let t = &theirs["table"];
            let ours = vicugna_show(&f, baseline);
            let rows = ours["rows"].as_array().unwrap();
            assert_eq!(rows.len(), t.len(), "{mode}: {t:?} vs {rows:?}");
            for r in rows {
                let m = r["model"].as_str().unwrap();
                let v = &t[m];
                let ours_nums = ["win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted"]
                    .map(|k| r[k].as_f64().unwrap());
                for (i, (a, b)) in ours_nums.iter().zip(v).enumerate() {
                    assert!(close(*a, *b), "{mode} {m} column {i}: ours {a}, FastChat {b}");
                }
            }
            if baseline.is_some() {
                assert!(!t.contains_key("gpt-3.5-turbo"));
            }
        }
    }
}
