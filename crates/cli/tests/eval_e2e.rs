//! The whole evaluation loop with real parts: `vicugna serve` with the
//! default model on free ports answers a small question file, the same
//! server judges the answers, and `vicugna eval show` prints the table and
//! draws the chart.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Stops the server when dropped (also on panic).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../eval/tests/data")
        .join(name)
}

fn vicugna(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vicugna")
}

fn ok(out: &Output) -> String {
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "exit {}\nstdout:\n{o}\nstderr:\n{e}", out.status);
    o.into_owned()
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Starts `vicugna serve` on free ports; returns it with its API base URL.
fn serve() -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["serve", "--port", "0", "--controller-port", "0", "--worker-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let t0 = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("vicugna serve printed no API URL");
        if let Some(rest) = line.trim().strip_prefix("API:") {
            let url = rest.split_whitespace().next().unwrap().to_string();
            return (server, url);
        }
        assert!(t0.elapsed() < Duration::from_secs(180));
    }
}

#[test]
fn serve_answers_judges_and_shows() {
    let (_server, api) = serve();
    // The served model's name, once the worker has registered.
    let http = reqwest::blocking::Client::new();
    let base = api.trim_end_matches('/').trim_end_matches("/v1").to_string();
    let t0 = Instant::now();
    let model = loop {
        if let Ok(r) = http.get(format!("{base}/v1/models")).send() {
            if let Ok(v) = r.json::<Value>() {
                if let Some(id) = v["data"][0]["id"].as_str() {
                    break id.to_string();
                }
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the model was never listed");
        std::thread::sleep(Duration::from_millis(200));
    };
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers");
    let answer_file = answers.join("smol.jsonl");
    let q = data("questions.jsonl");
    let s = ok(&vicugna(&[
        "eval",
        "answer",
        "--questions",
        q.to_str().unwrap(),
        "--model-id",
        "smol",
        "--api-base",
        &base,
        "--model",
        &model,
        "--answer-file",
        answer_file.to_str().unwrap(),
        "--max-tokens",
        "24",
        "--parallel",
        "3",
    ]));
    assert!(s.contains("3 answered now"), "{s}");
    let rows = read_jsonl(&answer_file);
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let turns = r["choices"][0]["turns"].as_array().unwrap();
        assert!(turns.iter().all(|t| !t.as_str().unwrap().trim().is_empty()), "{r}");
    }

    let judgments = dir.path().join("judgments.jsonl");
    let s = ok(&vicugna(&[
        "eval",
        "judge",
        "--mode",
        "single",
        "--judge-model",
        &model,
        "--judge-api-base",
        &base,
        "--judge-prompts",
        data("judge_prompts.jsonl").to_str().unwrap(),
        "--questions",
        q.to_str().unwrap(),
        "--answers",
        answers.to_str().unwrap(),
        "--ref-answers",
        data("reference_answers.jsonl").to_str().unwrap(),
        "--output",
        judgments.to_str().unwrap(),
        "--max-tokens",
        "48",
        "--parallel",
        "5",
        "--yes",
    ]));
    assert!(s.contains("5 judged now, 0 failed"), "{s}");
    let rows = read_jsonl(&judgments);
    assert_eq!(rows.len(), 5);
    for r in &rows {
        assert_eq!(r["model"], "smol");
        assert_eq!(r["judge"][0], model.as_str());
        // The judge saw the model's own answer.
        let qid = &r["question_id"];
        let ans = read_jsonl(&answer_file)
            .into_iter()
            .find(|a| &a["question_id"] == qid)
            .unwrap();
        let first = ans["choices"][0]["turns"][0].as_str().unwrap();
        assert!(r["user_prompt"].as_str().unwrap().contains(first));
        // Constrained decoding makes every verdict readable.
        let score = r["score"].as_f64().unwrap();
        assert!((1.0..=10.0).contains(&score), "{r}");
    }

    let chart = dir.path().join("chart.png");
    let s = ok(&vicugna(&[
        "eval",
        "show",
        "--judgments",
        judgments.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
    ]));
    assert!(s.contains("########## Average ##########"), "{s}");
    assert!(s.lines().any(|l| l.starts_with("smol")), "{s}");
    assert_eq!(&std::fs::read(&chart).unwrap()[..4], b"\x89PNG");
}

#[test]
fn local_model_answers_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("local.jsonl");
    let q = data("questions.jsonl");
    let s = ok(&vicugna(&[
        "eval",
        "answer",
        "--questions",
        q.to_str().unwrap(),
        "--model-id",
        "smol-local",
        "--model",
        "default",
        "--answer-file",
        out.to_str().unwrap(),
        "--max-tokens",
        "16",
        "--parallel",
        "3",
    ]));
    assert!(s.contains("3 answered now"), "{s}");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["model_id"], "smol-local");
    let turns: Vec<usize> = rows
        .iter()
        .map(|r| r["choices"][0]["turns"].as_array().unwrap().len())
        .collect();
    assert_eq!(turns, [2, 2, 1]);
    assert!(rows.iter().all(|r| r.get("error").is_none()));

    // The same model judges locally; constrained decoding makes every verdict readable.
    let answers = dir.path().join("answers");
    std::fs::create_dir_all(&answers).unwrap();
    std::fs::copy(&out, answers.join("smol-local.jsonl")).unwrap();
    let judgments = dir.path().join("local-judge.jsonl");
    let s = ok(&vicugna(&[
        "eval",
        "judge",
        "--judge-model",
        "default",
        "--judge-prompts",
        data("judge_prompts.jsonl").to_str().unwrap(),
        "--questions",
        q.to_str().unwrap(),
        "--answers",
        answers.to_str().unwrap(),
        "--ref-answers",
        data("reference_answers.jsonl").to_str().unwrap(),
        "--output",
        judgments.to_str().unwrap(),
        "--max-tokens",
        "24",
        "--parallel",
        "5",
        "--yes",
    ]));
    assert!(s.contains("5 judged now, 0 failed, 0 verdicts unreadable"), "{s}");
    for r in read_jsonl(&judgments) {
        let score = r["score"].as_f64().unwrap();
        assert!((1.0..=10.0).contains(&score), "{r}");
    }
}
