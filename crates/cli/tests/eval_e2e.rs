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

    // Verdicts as a schema: every rating and winner is read on the first ask
    // and written as FastChat's judges write theirs.
    let judge_args = |mode: &str, answers: &Path, out: &Path| -> Vec<String> {
        [
            "eval",
            "judge",
            "--mode",
            mode,
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
            out.to_str().unwrap(),
            "--max-tokens",
            "40",
            "--parallel",
            "5",
            "--schema-verdicts",
            "--yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let schema_single = dir.path().join("schema_single.jsonl");
    let args = judge_args("single", &answers, &schema_single);
    let s = ok(&vicugna(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(
        s.contains("5 judged now, 0 failed, 0 verdicts unreadable, 0 forced"),
        "{s}"
    );
    for r in read_jsonl(&schema_single) {
        let score = r["score"].as_i64().unwrap_or_else(|| panic!("an integer score: {r}"));
        assert!((1..=10).contains(&score), "{r}");
        let judgment = r["judgment"].as_str().unwrap();
        assert!(judgment.ends_with(&format!("Rating: [[{score}]]")), "{r}");
        assert!(r["user_prompt"].as_str().unwrap().contains("JSON object"), "{r}");
    }
    // Pairwise: the same answers under a second name.
    let pair_answers = dir.path().join("pair_answers");
    std::fs::create_dir_all(&pair_answers).unwrap();
    let text = std::fs::read_to_string(&answer_file).unwrap();
    std::fs::write(pair_answers.join("smol.jsonl"), &text).unwrap();
    std::fs::write(pair_answers.join("twin.jsonl"), text.replace("\"smol\"", "\"twin\"")).unwrap();
    let schema_pair = dir.path().join("schema_pair.jsonl");
    let args = judge_args("pairwise-all", &pair_answers, &schema_pair);
    let s = ok(&vicugna(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(
        s.contains("judged now, 0 failed, 0 verdicts unreadable, 0 forced"),
        "{s}"
    );
    let rows = read_jsonl(&schema_pair);
    assert!(!rows.is_empty());
    for r in &rows {
        // [[A]] in g1 means model_1, in g2 (positions swapped) model_2.
        for (g, a_is) in [("g1", "model_1"), ("g2", "model_2")] {
            let judgment = r[format!("{g}_judgment")].as_str().unwrap();
            let winner = r[format!("{g}_winner")].as_str().unwrap();
            let b_is = if a_is == "model_1" { "model_2" } else { "model_1" };
            let want = if judgment.ends_with("[[A]]") {
                a_is
            } else if judgment.ends_with("[[B]]") {
                b_is
            } else {
                assert!(judgment.ends_with("[[C]]"), "{r}");
                "tie"
            };
            assert_eq!(winner, want, "{r}");
        }
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
