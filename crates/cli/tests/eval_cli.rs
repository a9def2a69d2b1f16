//! `vicugna eval` against a scripted OpenAI-compatible server on a real port:
//! FastChat's file layouts, two-turn conversations, per-category
//! temperatures, retries with Retry-After, resuming after failures, the
//! judge's prompts, references, position swap and verdict parsing, the
//! constrained second ask, the Vicuna-80 review, and charts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

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
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[derive(Default)]
struct Script {
    requests: Mutex<Vec<Value>>,
    /// Answer this many calls with 429 and Retry-After: 1 first.
    rate_limited: AtomicUsize,
    /// Until set, a question containing FLAKY gets HTTP 500.
    flaky_ok: AtomicBool,
}

fn reply(body: &Value) -> String {
    if let Some(c) = body["guided_choice"].as_array() {
        return c[c.len() / 2].as_str().unwrap().to_string();
    }
    if body.get("guided_regex").is_some() {
        return "7 6".into();
    }
    let msgs = body["messages"].as_array().unwrap();
    let system = msgs
        .iter()
        .find(|m| m["role"] == "system")
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let last = msgs.last().unwrap()["content"].as_str().unwrap();
    if last.contains("Assistant 1's Answer") {
        return if last.contains("7 times 6") {
            "Scores: 7 6".into()
        } else {
            "8 5\nAssistant 1 explains more.".into()
        };
    }
    if let Some(i) = last
        .find("[Assistant B]")
        .or_else(|| last.find("<|Conversation of assistant B|>"))
    {
        let (a, b) = last.split_at(i);
        if a.contains("MUMBLE") || b.contains("MUMBLE") {
            return "Both have merits.".into();
        }
        return if a.contains("GOOD") {
            "A is clearer. [[A]]".into()
        } else if b.contains("GOOD") {
            "B is clearer. [[B]]".into()
        } else {
            "[[C]]".into()
        };
    }
    if system.contains("[[rating]]") || last.contains("[[rating]]") {
        return if last.contains("MUMBLE") {
            "Hard to say.".into()
        } else if last.contains("GOOD") {
            "Helpful. Rating: [[9]]".into()
        } else {
            "Weak. Rating: [[3]]".into()
        };
    }
    format!("answer to: {last}")
}

async fn chat(State(s): State<Arc<Script>>, Json(body): Json<Value>) -> (StatusCode, HeaderMap, Json<Value>) {
    s.requests.lock().unwrap().push(body.clone());
    let mut h = HeaderMap::new();
    if s.rate_limited
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        h.insert("retry-after", "1".parse().unwrap());
        let e = json!({"error": {"message": "Rate limit reached", "type": "rate_limit"}});
        return (StatusCode::TOO_MANY_REQUESTS, h, Json(e));
    }
    let last = body["messages"].as_array().unwrap().last().unwrap()["content"].to_string();
    if last.contains("FLAKY") && !s.flaky_ok.load(Ordering::SeqCst) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            h,
            Json(json!({"error": {"message": "boom"}})),
        );
    }
    let text = reply(&body);
    let r = json!({"id": "c", "object": "chat.completion", "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
    (StatusCode::OK, h, Json(r))
}

/// The scripted server on a free port; it lives as long as the test process.
fn server() -> (String, Arc<Script>) {
    let script = Arc::new(Script::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route(
            "/v1/models",
            get(|| async {
                let ids = ["m1", "judge-x", "rev"];
                Json(json!({"object": "list", "data": ids.iter().map(|i| json!({"id": i, "object": "model", "owned_by": "vicugna"})).collect::<Vec<_>>()}))
            }),
        )
        .with_state(script.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    (format!("http://{addr}"), script)
}

fn user_turns(req: &Value) -> Vec<String> {
    req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{}: {}", m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn answers_in_fastchat_layout_with_retries_and_temperatures() {
    let (url, script) = server();
    script.rate_limited.store(2, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("answers/m1.jsonl");
    let t0 = Instant::now();
    let q = data("questions.jsonl");
    ok(&vicugna(&[
        "eval",
        "answer",
        "--questions",
        q.to_str().unwrap(),
        "--model-id",
        "m1",
        "--api-base",
        &url,
        "--answer-file",
        out.to_str().unwrap(),
        "--parallel",
        "2",
        "--max-tokens",
        "32",
    ]));
    // Two 429s with Retry-After: 1 were waited out.
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    let rows = read_jsonl(&out);
    let ids: Vec<i64> = rows.iter().map(|r| r["question_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3]);
    for r in &rows {
        assert_eq!(r["model_id"], "m1");
        assert_eq!(r["answer_id"].as_str().unwrap().len(), 22);
        assert!(r["tstamp"].as_f64().unwrap() > 1.7e9);
        assert!(r.get("error").is_none(), "{r}");
    }
    assert_eq!(
        rows[0]["choices"],
        json!([{"index": 0, "turns": ["answer to: Write one sentence about the sea.",
            "answer to: Now rewrite that sentence so that it rhymes."]}])
    );
    assert_eq!(rows[2]["choices"][0]["turns"].as_array().unwrap().len(), 1);

    let reqs = script.requests.lock().unwrap().clone();
    let ok_reqs: Vec<&Value> = reqs.iter().skip(2).collect();
    assert_eq!(ok_reqs.len(), 5, "2 + 2 + 1 turns");
    // Turn 2 carries the whole conversation.
    let t2 = ok_reqs
        .iter()
        .find(|r| r["messages"].as_array().unwrap().len() == 3 && r["messages"][0]["content"] == "What is 12 plus 30?")
        .expect("turn 2 of question 2");
    assert_eq!(
        user_turns(t2),
        [
            "user: What is 12 plus 30?",
            "assistant: answer to: What is 12 plus 30?",
            "user: What is that number doubled?"
        ]
    );
    // FastChat's temperatures: writing 0.7, math 0, stem 0.1; the model name defaults to the id.
    let temp = |first: &str| {
        ok_reqs
            .iter()
            .find(|r| r["messages"][0]["content"].as_str().unwrap().starts_with(first))
            .unwrap()["temperature"]
            .as_f64()
            .unwrap()
    };
    assert!((temp("Write one") - 0.7).abs() < 1e-6);
    assert_eq!(temp("What is 12"), 0.0);
    assert!((temp("Which planet") - 0.1).abs() < 1e-6);
    assert!(ok_reqs.iter().all(|r| r["model"] == "m1"));
}

#[test]
fn failed_answers_are_recorded_and_redone_on_the_next_run() {
    let (url, script) = server();
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.jsonl");
    std::fs::write(
        &q,
        "{\"question_id\": 7, \"category\": \"writing\", \"turns\": [\"Say hi.\"]}\n\
         {\"question_id\": 8, \"category\": \"coding\", \"turns\": [\"FLAKY one\", \"and two\"]}\n",
    )
    .unwrap();
    let out = dir.path().join("a.jsonl");
    let args = [
        "eval",
        "answer",
        "--questions",
        q.to_str().unwrap(),
        "--model-id",
        "m1",
        "--api-base",
        &url,
        "--answer-file",
        out.to_str().unwrap(),
        "--max-retries",
        "1",
    ];
    let first = vicugna(&args);
    assert!(!first.status.success());
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains("run the same command again"), "{err}");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 2, "one record per question, failed or not");
    assert_eq!(rows[1]["choices"][0]["turns"], json!(["$ERROR$", "$ERROR$"]));
    assert!(rows[1]["error"].as_str().unwrap().contains("500"), "{}", rows[1]);
    let kept_id = rows[0]["answer_id"].clone();

    script.flaky_ok.store(true, Ordering::SeqCst);
    let before = script.requests.lock().unwrap().len();
    ok(&vicugna(&args));
    let reqs = script.requests.lock().unwrap()[before..].to_vec();
    assert_eq!(reqs.len(), 2, "only the failed question's two turns are redone");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["answer_id"], kept_id);
    assert_eq!(
        rows[1]["choices"][0]["turns"],
        json!(["answer to: FLAKY one", "answer to: and two"])
    );
    assert!(rows[1].get("error").is_none());
}

fn write_answers(dir: &Path, model: &str, word: &str) {
    let mut s = String::new();
    for (id, turns) in [(1, 2), (2, 2), (3, 1)] {
        let t: Vec<String> = (1..=turns).map(|i| format!("{word} reply {i} to {id}")).collect();
        s += &format!(
            "{}\n",
            json!({"question_id": id, "answer_id": format!("{model}{id}"), "model_id": model,
                "choices": [{"index": 0, "turns": t}], "tstamp": 1.0})
        );
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{model}.jsonl")), s).unwrap();
}

fn judge_args<'a>(url: &'a str, answers: &'a str, out: &'a str, mode: &'a str, refs: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "eval",
        "judge",
        "--mode",
        mode,
        "--judge-model",
        "judge-x",
        "--judge-api-base",
        url,
        "--judge-prompts",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(data("judge_prompts.jsonl").display().to_string());
    v.extend(["--questions".into(), data("questions.jsonl").display().to_string()]);
    v.extend([
        "--answers".into(),
        answers.into(),
        "--output".into(),
        out.into(),
        "--parallel".into(),
        "3".into(),
    ]);
    if refs {
        v.extend([
            "--ref-answers".into(),
            data("reference_answers.jsonl").display().to_string(),
        ]);
    }
    v
}

fn run(args: &[String]) -> Output {
    vicugna(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn single_judge_follows_fastchat() {
    let (url, script) = server();
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers");
    write_answers(&answers, "good", "GOOD");
    write_answers(&answers, "bad", "BAD");
    let out = dir.path().join("j/single.jsonl");
    let (a, o) = (answers.to_str().unwrap(), out.to_str().unwrap());

    // Math questions need reference answers: refused before any call.
    let r = run(&judge_args(&url, a, o, "single", false));
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--ref-answers"));
    assert!(!out.exists());

    // A dry run counts: per model q1, q3 (general) + q2 (math) on turn 1, q1 + q2 on turn 2.
    let mut dry = judge_args(&url, a, o, "single", true);
    dry.push("--dry-run".into());
    let s = ok(&run(&dry));
    assert!(s.contains("10 matches to judge") && s.contains("10 judge calls"), "{s}");
    assert!(!out.exists());

    // Without --yes and with no one to press Enter, nothing runs.
    let r = run(&judge_args(&url, a, o, "single", true));
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--yes"));

    let mut args = judge_args(&url, a, o, "single", true);
    args.push("--yes".into());
    ok(&run(&args));
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 10);
    for r in &rows {
        let good = r["model"] == "good";
        assert_eq!(r["score"], if good { 9 } else { 3 }, "{r}");
        let name = r["judge"][1].as_str().unwrap();
        assert_eq!(r["judge"][0], "judge-x");
        let math = r["question_id"] == 2;
        let turn2 = r["turn"] == 2;
        let want = match (math, turn2) {
            (false, false) => "single-v1",
            (true, false) => "single-math-v1",
            (false, true) => "single-v1-multi-turn",
            (true, true) => "single-math-v1-multi-turn",
        };
        assert_eq!(name, want);
        let p = r["user_prompt"].as_str().unwrap();
        assert_eq!(p.contains("12 + 30 = 42."), math, "reference answer only for math: {p}");
        assert_eq!(p.contains("42 doubled is 84."), math && turn2);
        if turn2 {
            assert!(p.contains("reply 1 to") && p.contains("reply 2 to"), "{p}");
        }
    }
    // Resumable: a second run has nothing to do.
    let s = ok(&run(&args));
    assert!(s.contains("already judged"), "{s}");
    // After a crash (a failed row, a missing row, a torn last line) only the
    // failed and the missing judgments are redone.
    let mut lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.pop();
    let mut failed: Value = serde_json::from_str(&lines[0]).unwrap();
    failed["judgment"] = json!("$ERROR$");
    failed["score"] = json!(-1);
    failed["error"] = json!("HTTP 500");
    lines[0] = failed.to_string();
    std::fs::write(&out, lines.join("\n") + "\n{\"question_id\": 1, \"mod").unwrap();
    let before = script.requests.lock().unwrap().len();
    let s = ok(&run(&args));
    assert!(s.contains("2 judged now"), "{s}");
    assert_eq!(script.requests.lock().unwrap().len() - before, 2);
    let again = read_jsonl(&out);
    assert_eq!(again.len(), 10);
    assert!(again.iter().all(|r| r.get("error").is_none() && r["score"] != -1));

    let s = ok(&vicugna(&["eval", "show", "--judgments", o, "--json", "--no-chart"]));
    let v: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v["mode"], "single");
    assert_eq!(v["average"][0]["model"], "good");
    assert_eq!(v["average"][0]["score"], 9.0);
    assert_eq!(v["first_turn"][1]["score"], 3.0);
    assert_eq!(v["by_category"]["good"]["math"], 9.0);
}

#[test]
fn pairwise_judge_swaps_positions_and_forces_unreadable_verdicts() {
    let (url, script) = server();
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers");
    write_answers(&answers, "good", "GOOD");
    write_answers(&answers, "bad", "BAD");
    write_answers(&answers, "mumble", "MUMBLE");
    let out = dir.path().join("pair.jsonl");
    let mut args = judge_args(
        &url,
        answers.to_str().unwrap(),
        out.to_str().unwrap(),
        "pairwise-all",
        true,
    );
    args.push("--yes".into());
    ok(&run(&args));
    let rows = read_jsonl(&out);
    // 3 pairs x 5 matches.
    assert_eq!(rows.len(), 15);
    for r in &rows {
        let pair = (r["model_1"].as_str().unwrap(), r["model_2"].as_str().unwrap());
        match pair {
            // Sorted model order, as the answer folder lists them.
            ("bad", "good") => {
                assert_eq!(
                    (r["g1_winner"].as_str(), r["g2_winner"].as_str()),
                    (Some("model_2"), Some("model_2")),
                    "{r}"
                );
                // g1 shows model_1 as A, g2 shows it as B.
                let (g1, g2) = (
                    r["g1_user_prompt"].as_str().unwrap(),
                    r["g2_user_prompt"].as_str().unwrap(),
                );
                assert!(g1.find("BAD").unwrap() < g1.find("GOOD").unwrap());
                assert!(g2.find("GOOD").unwrap() < g2.find("BAD").unwrap());
            }
            ("bad", "mumble") | ("good", "mumble") => {
                // No verdict in the reply: asked again with guided_choice [[A]]/[[B]]/[[C]];
                // this server picks the middle one, [[B]].
                assert_eq!(r["verdict_forced"], true, "{r}");
                assert!(r["g1_judgment"].as_str().unwrap().ends_with("\n\n[[B]]"));
                assert_eq!(
                    (r["g1_winner"].as_str(), r["g2_winner"].as_str()),
                    (Some("model_2"), Some("model_1"))
                );
            }
            other => panic!("unexpected pair {other:?}"),
        }
    }
    let forced: Vec<Value> = script
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.get("guided_choice").is_some())
        .cloned()
        .collect();
    assert_eq!(forced.len(), 20, "two orders x 10 mumble matches");
    assert_eq!(forced[0]["guided_choice"], json!(["[[A]]", "[[B]]", "[[C]]"]));
    assert_eq!(forced[0]["messages"][2]["role"], "assistant");

    let s = ok(&vicugna(&[
        "eval",
        "show",
        "--judgments",
        out.to_str().unwrap(),
        "--json",
        "--no-chart",
    ]));
    let v: Value = serde_json::from_str(&s).unwrap();
    let row = |m: &str| {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == m)
            .unwrap()
            .clone()
    };
    // good beats bad 5 times; every mumble match is a swap disagreement, a tie.
    assert_eq!(
        (row("good")["win"].as_u64(), row("good")["tie"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(row("bad")["loss"], 5);
    assert_eq!(row("mumble")["tie"], 10);
    assert_eq!(row("good")["win_rate_adjusted"], 0.75);

    // pairwise-baseline: only matches against the baseline, which leaves the table.
    let s = ok(&vicugna(&[
        "eval",
        "show",
        "--judgments",
        out.to_str().unwrap(),
        "--baseline",
        "bad",
        "--json",
        "--no-chart",
    ]));
    let v: Value = serde_json::from_str(&s).unwrap();
    let models: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["good", "mumble"]);
}

#[test]
fn vicuna80_review_score_pairs_and_totals() {
    let (url, _script) = server();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("review.jsonl");
    let s = ok(&vicugna(&[
        "eval",
        "review",
        "--questions",
        data("vicuna80_questions.jsonl").to_str().unwrap(),
        "--answers",
        data("vicuna80_answers_a.jsonl").to_str().unwrap(),
        data("vicuna80_answers_b.jsonl").to_str().unwrap(),
        "--names",
        "model-a",
        "model-b",
        "--reviewer-model",
        "rev",
        "--api-base",
        &url,
        "--output",
        out.to_str().unwrap(),
        "--yes",
    ]));
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["answer1_id"], "a1");
    assert_eq!(rows[0]["answer2_id"], "b1");
    assert_eq!(rows[0]["score"], json!([8.0, 5.0]));
    // general, coding and math questions get their own reviewer prompts.
    let ids: Vec<i64> = rows.iter().map(|r| r["reviewer_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3]);
    // The math review had no score line: asked again, constrained to "a b", put first.
    assert_eq!(rows[2]["score"], json!([7.0, 6.0]));
    assert!(rows[2]["text"].as_str().unwrap().starts_with("7 6\nScores: 7 6"));
    // 8+8+7 = 23 vs 5+5+6 = 16 → 70%.
    assert!(
        s.contains("model-b") && s.contains("16 vs model-a") && s.contains("23 →") && s.contains("70%"),
        "{s}"
    );

    let j = ok(&vicugna(&[
        "eval",
        "show",
        "--reviews",
        out.to_str().unwrap(),
        "--json",
    ]));
    let v: Value = serde_json::from_str(&j).unwrap();
    assert_eq!(v[0]["total_1"], 23.0);
    assert_eq!(v[0]["total_2"], 16.0);
    assert_eq!(v[0]["wins_1"], 3);
}

#[test]
fn show_draws_png_and_svg_charts_per_category() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("single.jsonl");
    let mut s = String::new();
    for (m, base) in [("alpha", 7.0), ("beta", 4.0)] {
        for (q, cat) in [(81, "writing"), (101, "reasoning"), (111, "math")] {
            for turn in [1, 2] {
                s += &format!(
                    "{}\n",
                    json!({"question_id": q, "model": m, "judge": ["gpt-4", "single-v1"], "user_prompt": "",
                        "judgment": "", "score": base + turn as f64, "turn": turn, "tstamp": 0.0, "category": cat})
                );
            }
        }
    }
    std::fs::write(&j, s).unwrap();
    let out = ok(&vicugna(&["eval", "show", "--judgments", j.to_str().unwrap()]));
    assert!(out.contains("########## First turn ##########"), "{out}");
    assert!(out.contains("########## By category ##########"), "{out}");
    let png = std::fs::read(dir.path().join("single.png")).expect("the default chart");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg_path = dir.path().join("c.svg");
    ok(&vicugna(&[
        "eval",
        "show",
        "--judgments",
        j.to_str().unwrap(),
        "--chart",
        svg_path.to_str().unwrap(),
    ]));
    let svg = std::fs::read_to_string(svg_path).unwrap();
    for word in ["writing", "reasoning", "math", "alpha", "beta", "Score per category"] {
        assert!(svg.contains(word), "the chart lacks {word}");
    }
}

#[test]
fn bad_input_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.jsonl");
    std::fs::write(&q, "{\"question_id\": 1, \"turns\": [\"a\"]}\n{\"question_id\": 2}\n").unwrap();
    let r = vicugna(&[
        "eval",
        "answer",
        "--questions",
        q.to_str().unwrap(),
        "--model-id",
        "x",
        "--api-base",
        "http://127.0.0.1:9",
    ]);
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("q.jsonl:2") && e.contains("turns"), "{e}");

    let p = dir.path().join("prompts.jsonl");
    std::fs::write(
        &p,
        std::fs::read_to_string(data("judge_prompts.jsonl"))
            .unwrap()
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let answers = dir.path().join("answers");
    write_answers(&answers, "m", "x");
    let r = vicugna(&[
        "eval",
        "judge",
        "--judge-model",
        "j",
        "--judge-api-base",
        "http://127.0.0.1:9",
        "--judge-prompts",
        p.to_str().unwrap(),
        "--questions",
        data("questions.jsonl").to_str().unwrap(),
        "--answers",
        answers.to_str().unwrap(),
        "--yes",
    ]);
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("\"single-v1\""), "{e}");
}
