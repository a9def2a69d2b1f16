//! `vicugna classify` end to end on the default model (SmolLM2-135M-Instruct):
//! English JSONL and Chinese CSV inputs, CARP zero- and few-shot, votes, the
//! results file, metrics and the confusion-matrix PNG, resuming after the
//! process is killed, the OpenAI-API path through `vicugna serve`, and clear
//! errors for bad input. Generation budgets are kept small so the tests are fast.

mod common;
use common::Scratch;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

fn model_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
            .unwrap_or_else(|e| panic!("the default model is needed for these tests: {e}"));
    });
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/classify")
        .join(name)
}

fn scratch(name: &str) -> Scratch {
    Scratch::new("classify", name)
}

/// Small budgets: these tests check behaviour, not answer quality.
const FAST: &[&str] = &["--clue-tokens", "12", "--reasoning-tokens", "16", "--threads", "2"];

fn classify(args: &[&str]) -> Output {
    model_ready();
    Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .arg("classify")
        .args(args)
        .output()
        .expect("run vicugna classify")
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the results file ends with a whole line"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect()
}

/// Every record has a label from `labels`, probabilities over exactly those
/// labels summing to 1, and the label is the most probable one.
fn check_records(recs: &[Value], labels: &[&str]) {
    for r in recs {
        let label = r["label"].as_str().unwrap_or_else(|| panic!("no label: {r}"));
        assert!(labels.contains(&label), "label {label:?} not in {labels:?}: {r}");
        let probs = r["probs"].as_object().unwrap_or_else(|| panic!("no probs: {r}"));
        let keys: HashSet<&str> = probs.keys().map(String::as_str).collect();
        assert_eq!(keys, labels.iter().copied().collect::<HashSet<_>>(), "{r}");
        let sum: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-6, "probabilities sum to {sum}: {r}");
        let best = probs
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        assert_eq!(best, label, "a single greedy vote picks the most probable label: {r}");
        assert!(r["text"].as_str().is_some_and(|t| !t.is_empty()), "{r}");
        assert!(r["votes"].as_array().is_some_and(|v| !v.is_empty()), "{r}");
    }
}

fn accuracy(recs: &[Value]) -> f64 {
    let right = recs.iter().filter(|r| r["label"] == r["gold"]).count();
    right as f64 / recs.len() as f64
}

#[test]
fn english_carp_zero_shot_writes_valid_labels_metrics_and_png() {
    let dir = scratch("en");
    let out = dir.join("out.jsonl");
    let summary = dir.join("summary.json");
    let o = classify(
        &[
            &[
                "--labels",
                "positive,negative",
                "--input",
                data("en.jsonl").to_str().unwrap(),
            ],
            &[
                "--output",
                out.to_str().unwrap(),
                "--summary-json",
                summary.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 4, "{}", show(&o));
    check_records(&recs, &["positive", "negative"]);
    let ids: HashSet<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        HashSet::from(["e1", "e2", "e3", "e4"]),
        "ids come from the id field"
    );
    for r in &recs {
        assert!(
            !r["clues"].as_str().unwrap().trim().is_empty(),
            "CARP writes clues: {r}"
        );
        assert!(
            !r["reasoning"].as_str().unwrap().trim().is_empty(),
            "CARP writes reasoning: {r}"
        );
        assert!(r["gold"].is_string(), "{r}");
    }
    // The metrics agree with the records.
    let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out.metrics.json")).unwrap()).unwrap();
    assert_eq!(m["n"], 4);
    assert!((m["accuracy"].as_f64().unwrap() - accuracy(&recs)).abs() < 1e-12, "{m}");
    let confusion_total: u64 = m["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(confusion_total, 4);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("macro-F1") && stdout.contains("confusion matrix"),
        "{stdout}"
    );
    let png = std::fs::read(dir.join("out.confusion.png")).expect("the confusion-matrix PNG");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["items"], 4);
    assert!(s["items_per_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["completion_tokens"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn chinese_csv_with_a_label_file_gets_chinese_prompts() {
    let dir = scratch("zh");
    let out = dir.join("out.jsonl");
    let o = classify(
        &[
            &["--labels", data("zh-labels.txt").to_str().unwrap()][..],
            &[
                "--input",
                data("zh.csv").to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", show(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    check_records(&recs, &["正面", "负面"]);
    let run: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out.run.json")).unwrap()).unwrap();
    assert_eq!(run["lang"], "zh", "Chinese is detected from the data: {run}");
    // No --model: Chinese gets Gemma 3 270M (the default model reads no Chinese),
    // named in the run file and the metrics.
    assert!(run["model"].as_str().unwrap().contains("gemma-3-270m"), "{run}");
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out.metrics.json")).unwrap()).unwrap();
    assert!(metrics["model"].as_str().unwrap().contains("gemma-3-270m"), "{metrics}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("prompts in zh"),
        "{}",
        show(&o)
    );
    let ids: HashSet<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, HashSet::from(["z1", "z2", "z3", "z4"]));
}

#[test]
fn few_shot_knn_with_votes_uses_cached_demonstrations() {
    let dir = scratch("fewshot");
    let out = dir.join("out.jsonl");
    let cache = dir.join("demos-cache.jsonl");
    let args = |out: &Path| {
        [
            &[
                "--labels",
                "positive,negative",
                "--input",
                data("en.jsonl").to_str().unwrap(),
            ][..],
            &[
                "--output",
                out.to_str().unwrap(),
                "--demos",
                data("en-demos.jsonl").to_str().unwrap(),
            ],
            &[
                "--shots",
                "2",
                "--votes",
                "3",
                "--demo-cache",
                cache.to_str().unwrap(),
                "--limit",
                "2",
            ],
            FAST,
        ]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
    };
    let a = args(&out);
    let o = classify(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", show(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 2, "--limit 2");
    let demo_ids = ["d1", "d2", "d3", "d4"];
    for r in &recs {
        let label = r["label"].as_str().unwrap();
        assert!(["positive", "negative"].contains(&label), "{r}");
        let votes = r["votes"].as_array().unwrap();
        assert_eq!(votes.len(), 3, "{r}");
        for v in votes {
            assert!(["positive", "negative"].contains(&v["label"].as_str().unwrap()), "{r}");
        }
        for k in ["majority", "weighted"] {
            assert!(["positive", "negative"].contains(&r[k].as_str().unwrap()), "{k}: {r}");
        }
        assert_eq!(r["label"], r["weighted"], "the default rule is the weighted vote");
        let demos: Vec<&str> = r["demos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        assert_eq!(demos.len(), 2, "{r}");
        assert!(demos.iter().all(|d| demo_ids.contains(d)), "{r}");
    }
    let cached = std::fs::read_to_string(&cache).unwrap();
    let n_cached = cached.lines().count();
    assert!(
        (2..=4).contains(&n_cached),
        "one cache line per demonstration used:\n{cached}"
    );
    for l in cached.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(!v["clues"].as_str().unwrap().is_empty(), "{v}");
    }
    // A second run with the same demonstrations writes no new explanations.
    let out2 = dir.join("out2.jsonl");
    let a = args(&out2);
    let o = classify(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        std::fs::read_to_string(&cache).unwrap().lines().count(),
        n_cached,
        "cache reused"
    );
    assert_eq!(records(&out2).len(), 2);
}

#[test]
fn resumes_after_sigkill_without_losing_or_duplicating() {
    model_ready();
    let dir = scratch("resume");
    let out = dir.join("out.jsonl");
    let more = data("more.txt");
    let args = [
        &["--labels", "positive,negative", "--input", more.to_str().unwrap()][..],
        &["--output", out.to_str().unwrap(), "--concurrency", "1"],
        FAST,
    ]
    .concat();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .arg("classify")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(&out).map(|t| t.lines().count()).unwrap_or(0);
        if n >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    let before = records(&out).len();
    assert!(before < 6, "killed before the end");
    // A line torn by the kill, as a crash mid-write leaves it.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&out)
        .unwrap()
        .write_all(br#"{"id":"3","text":"The so"#)
        .unwrap();
    let o = classify(&args);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("6 inputs ({before} already in")),
        "{}",
        show(&o)
    );
    let recs = records(&out);
    let ids: Vec<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 6, "no duplicates: {ids:?}");
    assert_eq!(
        unique,
        HashSet::from(["1", "2", "3", "4", "5", "6"]),
        "ids are line numbers"
    );
    check_records(&recs, &["positive", "negative"]);
    // Resuming with other settings is refused rather than mixed.
    let o = classify(&[&args[..], &["--method", "vanilla"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("other settings"),
        "{}",
        show(&o)
    );
}

#[test]
fn api_path_through_vicugna_serve_parses_answers() {
    model_ready();
    let mut server = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["serve", "--port", "0", "--controller-port", "0", "--worker-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let api = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("vicugna serve printed no API URL");
        if let Some(rest) = line.trim().strip_prefix("API:") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let api = if api.ends_with("/v1") { api } else { format!("{api}/v1") };
    // The model's name as served.
    let client = reqwest::blocking::Client::new();
    let mut model = None;
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{api}/models")).send() {
            if let Ok(v) = r.json::<Value>() {
                if let Some(id) = v["data"][0]["id"].as_str() {
                    model = Some(id.to_string());
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let model = model.expect("the served model");
    let dir = scratch("api");
    let out = dir.join("out.jsonl");
    let summary = dir.join("summary.json");
    let o = classify(&[
        "--labels",
        "positive,negative",
        "--input",
        data("en.jsonl").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        // No --model: the server's only model (named after its file) is used.
        "--api-base",
        &api,
        "--method",
        "vanilla",
        "--summary-json",
        summary.to_str().unwrap(),
    ]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(o.status.success(), "{}", show(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    // The finished file is in input order, whatever order the answers came in.
    let input_ids: Vec<String> = std::fs::read_to_string(data("en.jsonl"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["id"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| (i + 1).to_string())
        })
        .collect();
    let out_ids: Vec<String> = recs.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(out_ids, input_ids);
    // The label is asked for as `{"label": enum}` and the server's engine
    // enforces it: every answer names one of the labels.
    for r in &recs {
        let label = r["label"].as_str().unwrap_or_else(|| panic!("no label: {r}"));
        assert!(["positive", "negative"].contains(&label), "{r}");
    }
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["metrics"]["parse_failures"].as_u64(), Some(0), "{s}");
    assert_eq!(s["parse_failures"].as_u64(), Some(0), "{s}");
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("refused response_format"),
        "{}",
        show(&o)
    );
    assert!(s["model"].as_str().unwrap().starts_with(&model), "{s}");
}

/// An OpenAI-compatible server without `response_format`: it answers 400 to a
/// request that carries one, and free text (`LABEL: negative`) otherwise.
/// Returns its `/v1` URL and how many requests carried `response_format`.
fn server_without_response_format() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let refused = std::sync::Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let body = loop {
                let Ok(n) = stream.read(&mut chunk) else { break None };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string());
                    }
                }
            };
            let Some(body) = body else { continue };
            let (status, reply) = if body.contains("response_format") {
                count.fetch_add(1, Ordering::SeqCst);
                (
                    "400 Bad Request",
                    r#"{"error": {"message": "Unrecognized request argument supplied: response_format"}}"#.to_string(),
                )
            } else {
                ("200 OK", serde_json::json!({
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The review is unhappy.\nLABEL: negative"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }).to_string())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, refused)
}

#[test]
fn api_path_falls_back_to_free_text_when_response_format_is_refused() {
    let (api, refused) = server_without_response_format();
    let dir = scratch("api-fallback");
    let out = dir.join("out.jsonl");
    let summary = dir.join("summary.json");
    let o = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["classify", "--labels", "positive,negative", "--input"])
        .arg(data("en.jsonl"))
        .arg("--output")
        .arg(&out)
        .args([
            "--api-base",
            &api,
            "--model",
            "m",
            "--method",
            "vanilla",
            "--summary-json",
        ])
        .arg(&summary)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("refused response_format").count(), 1, "one warning:\n{err}");
    assert!(
        err.contains("Unrecognized request argument"),
        "the server's reason is shown:\n{err}"
    );
    assert!(refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    assert!(recs.iter().all(|r| r["label"] == "negative"), "{recs:?}");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["parse_failures"].as_u64(), Some(0), "{s}");
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .arg("classify")
        .args(args)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

#[test]
fn bad_inputs_are_reported_with_file_and_line() {
    let dir = scratch("bad");
    let out = dir.join("out.jsonl");
    let out = out.to_str().unwrap();
    let bad_csv = dir.join("bad.csv");
    std::fs::write(
        &bad_csv,
        "id,text,label\n1,fine text,positive\n2,too,many,fields,here\n",
    )
    .unwrap();
    expect_error(
        &[
            "--labels",
            "positive,negative",
            "--input",
            bad_csv.to_str().unwrap(),
            "--output",
            out,
        ],
        &["bad.csv:3", "5 fields but the header has 3"],
    );
    let unknown = dir.join("unknown.jsonl");
    std::fs::write(
        &unknown,
        "{\"text\": \"good\", \"label\": \"positive\"}\n{\"text\": \"meh\", \"label\": \"neutral\"}\n",
    )
    .unwrap();
    expect_error(
        &[
            "--labels",
            "positive,negative",
            "--input",
            unknown.to_str().unwrap(),
            "--output",
            out,
        ],
        &["unknown.jsonl:2", "\"neutral\"", "positive, negative"],
    );
    expect_error(
        &[
            "--labels",
            "positive,negative",
            "--input",
            data("en.jsonl").to_str().unwrap(),
            "--text-field",
            "body",
            "--output",
            out,
        ],
        &["en.jsonl:1", "no field \"body\"", "--text-field"],
    );
    let not_json = dir.join("broken.jsonl");
    std::fs::write(&not_json, "{\"text\": \"ok\"}\n{\"text\": \"unterminated\n").unwrap();
    expect_error(
        &[
            "--labels",
            "a,b",
            "--input",
            not_json.to_str().unwrap(),
            "--output",
            out,
        ],
        &["broken.jsonl:2", "not a JSON object"],
    );
    expect_error(
        &[
            "--labels",
            "only",
            "--input",
            not_json.to_str().unwrap(),
            "--output",
            out,
        ],
        &["at least two labels"],
    );
    assert!(!Path::new(out).exists(), "no results file is created for bad input");
}
