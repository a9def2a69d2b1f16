//! `vicugna classify --method score`, `channel` and `baseline` end to end on the
//! real binary: label log-probabilities read from the default model, the
//! text's likelihood after each label's statement, batch
//! calibration undoing a biased label, a resumed run keeping its labels, the
//! TF-IDF + logistic regression baseline, and clear errors for bad flags.

mod common;
use common::Scratch;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn model_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
            .unwrap_or_else(|e| panic!("the default model is needed for these tests: {e}"));
    });
}

fn classify(args: &[&str]) -> Output {
    model_ready();
    Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .arg("classify")
        .args(args)
        .args(["--threads", "2"])
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
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn labels_of(recs: &[Value]) -> Vec<String> {
    recs.iter().map(|r| r["label"].as_str().unwrap().to_string()).collect()
}

const REVIEWS: &[(&str, &str)] = &[
    (
        "r1",
        "I love this phone, the screen is wonderful and the battery lasts for days.",
    ),
    ("r2", "Terrible. It broke after one day and support never answered."),
    ("r3", "Excellent book, beautifully written, I recommend it to everyone."),
    ("r4", "Awful quality, a waste of money, I want a refund."),
    ("r5", "Great value and fast delivery, very happy with it."),
    (
        "r6",
        "The worst purchase I have made this year; it does not work at all.",
    ),
];

fn write_reviews(path: &Path) {
    let text: String = REVIEWS
        .iter()
        .map(|(id, t)| {
            let label = if ["r1", "r3", "r5"].contains(id) {
                "positive"
            } else {
                "negative"
            };
            format!("{}\n", serde_json::json!({"id": id, "text": t, "label": label}))
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn score_picks_labels_and_writes_per_label_scores() {
    let dir = Scratch::new("classify-score", "scores");
    let input = dir.join("in.jsonl");
    write_reviews(&input);
    let out = dir.join("out.jsonl");
    let o = classify(&[
        "--labels",
        "positive,negative",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--method",
        "score",
        "--calibrate",
        "none",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let recs = records(&out);
    assert_eq!(
        recs.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(),
        ["r1", "r2", "r3", "r4", "r5", "r6"],
        "one record per input, in input order"
    );
    for r in &recs {
        let scores = r["scores"].as_object().unwrap_or_else(|| panic!("no scores: {r}"));
        assert_eq!(scores.len(), 2, "{r}");
        // Raw log-probabilities of the labels' tokens: negative numbers.
        assert!(scores.values().all(|v| v.as_f64().unwrap() < 0.0), "{r}");
        let probs = r["probs"].as_object().unwrap();
        let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{r}");
        // Uncalibrated: the label is the one with the higher raw score.
        let best = scores
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        assert_eq!(r["label"].as_str().unwrap(), best, "{r}");
    }
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out.metrics.json")).unwrap()).unwrap();
    assert!(metrics["accuracy"].as_f64().is_some(), "{metrics}");
    let scores_file = std::fs::read_to_string(dir.join("out.scores.jsonl")).unwrap();
    assert_eq!(scores_file.lines().count(), 6);
}

#[test]
fn batch_calibration_changes_a_biased_decision() {
    // A batch of glowing reviews: uncalibrated, every one is positive; batch
    // calibration subtracts each label's mean over the batch, so the reviews
    // that lean less toward positive than the batch's average flip: the
    // calibrated decision is relative to the run's inputs.
    let dir = Scratch::new("classify-score", "bias");
    let input = dir.join("in.jsonl");
    let glowing = [
        "I love this phone, the screen is wonderful and the battery lasts for days.",
        "Excellent book, beautifully written, I recommend it to everyone.",
        "Great value and fast delivery, very happy with it.",
        "Perfect gift, my daughter adores it. Five stars!",
        "Fantastic sound quality, best headphones I have owned.",
        "Superb service and a lovely product, thank you!",
    ];
    let text: String = glowing
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}\n", serde_json::json!({"id": format!("g{i}"), "text": t})))
        .collect();
    std::fs::write(&input, text).unwrap();
    let run = |cal: &str| {
        let out = dir.join(format!("out-{cal}.jsonl"));
        let o = classify(&[
            "--labels",
            "positive,negative",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--method",
            "score",
            "--calibrate",
            cal,
        ]);
        assert!(o.status.success(), "{}", show(&o));
        labels_of(&records(&out))
    };
    let raw = run("none");
    assert!(raw.iter().all(|l| l == "positive"), "uncalibrated: {raw:?}");
    let cal = run("batch");
    assert!(cal.iter().any(|l| l == "positive"), "{cal:?}");
    assert!(
        cal.iter().any(|l| l == "negative"),
        "batch calibration flips some: {cal:?}"
    );
    let stored: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out-batch.calibration.json")).unwrap()).unwrap();
    assert_eq!(stored["calibrate"], "batch", "{stored}");
    assert_eq!(stored["inputs"], 6, "{stored}");
}

#[test]
fn resumed_batch_run_keeps_the_same_labels() {
    let dir = Scratch::new("classify-score", "resume");
    let input = dir.join("in.jsonl");
    write_reviews(&input);
    let out = dir.join("out.jsonl");
    let args = [
        "--labels",
        "positive,negative",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--method",
        "score",
        "--calibrate",
        "batch",
    ];
    let o = classify(&args);
    assert!(o.status.success(), "{}", show(&o));
    let first = std::fs::read_to_string(&out).unwrap();
    // As if the run died while writing: two whole lines and a torn third.
    let lines: Vec<&str> = first.lines().collect();
    std::fs::write(&out, format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..10])).unwrap();
    let o = classify(&args);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("calibration batch from"),
        "{}",
        show(&o)
    );
    assert_eq!(
        labels_of(&records(&out)),
        labels_of(
            &first
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        )
    );
    // A changed calibration on a resumed run is refused, naming the setting.
    let mut other = args.to_vec();
    other[9] = "none";
    let o = classify(&other);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("calibrate"), "{}", show(&o));
}

#[test]
fn baseline_trains_on_the_demos_and_labels() {
    let dir = Scratch::new("classify-score", "baseline");
    let train = dir.join("train.jsonl");
    let pos = [
        "love it",
        "wonderful product",
        "great quality",
        "excellent, happy",
        "really great",
    ];
    let neg = [
        "awful thing",
        "terrible quality",
        "broken, refund",
        "waste of money",
        "really awful",
    ];
    let mut text = String::new();
    for i in 0..4 {
        for p in pos {
            text += &format!(
                "{}\n",
                serde_json::json!({"text": format!("{p} {i}"), "label": "positive"})
            );
        }
        for n in neg {
            text += &format!(
                "{}\n",
                serde_json::json!({"text": format!("{n} {i}"), "label": "negative"})
            );
        }
    }
    std::fs::write(&train, text).unwrap();
    let input = dir.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\":\"a\",\"text\":\"great and wonderful\",\"label\":\"positive\"}\n\
         {\"id\":\"b\",\"text\":\"awful, broken, terrible\",\"label\":\"negative\"}\n",
    )
    .unwrap();
    let out = dir.join("out.jsonl");
    let summary = dir.join("summary.json");
    let o = classify(&[
        "--labels",
        "positive,negative",
        "--input",
        input.to_str().unwrap(),
        "--demos",
        train.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--method",
        "baseline",
        "--summary-json",
        summary.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(labels_of(&records(&out)), ["positive", "negative"]);
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["method"], "baseline");
    assert_eq!(s["metrics"]["accuracy"], 1.0, "{s}");
}

#[test]
fn channel_reads_each_text_after_each_label_statement() {
    let dir = Scratch::new("classify-score", "channel");
    let input = dir.join("in.jsonl");
    write_reviews(&input);
    let out = dir.join("out.jsonl");
    let o = classify(&[
        "--labels",
        "positive,negative",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--method",
        "channel",
        "--calibrate",
        "none",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    // The default statement comes from the default task.
    assert!(err.contains("\"The category of a text is {label}.\""), "{err}");
    let recs = records(&out);
    assert_eq!(recs.len(), 6);
    for r in &recs {
        // log P(text | statement): a sum over the text's tokens, far below a
        // single label's log-probability.
        let scores = r["scores"].as_object().unwrap_or_else(|| panic!("no scores: {r}"));
        assert!(scores.values().all(|v| v.as_f64().unwrap() < -10.0), "{r}");
    }
    // Each obvious review reads as more likely after its own label's statement.
    assert_eq!(
        labels_of(&recs),
        ["positive", "negative", "positive", "negative", "positive", "negative"]
    );
    let run: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out.run.json")).unwrap()).unwrap();
    assert_eq!(run["method"], "channel", "{run}");
    assert_eq!(run["channel_template"], "The category of a text is {label}.", "{run}");

    // Another statement is another run: refused on the same output, with the reason.
    expect_error(
        &[
            "--labels",
            "positive,negative",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--method",
            "channel",
            "--calibrate",
            "none",
            "--channel-template",
            "A {label} review:",
        ],
        &["channel_template"],
    );
}

/// Each record's raw scores, in input order.
fn scores_of(path: &Path) -> Vec<Vec<f64>> {
    records(path)
        .iter()
        .map(|r| {
            let s = r["scores"].as_object().unwrap_or_else(|| panic!("no scores: {r}"));
            s.values().map(|v| v.as_f64().unwrap()).collect()
        })
        .collect()
}

#[test]
fn channel_on_k_quants_keeps_f32_activations_unless_asked() {
    // Gemma 3 270M's Q4_K_M file: generation rounds its activations to 8 bits
    // by default (where the CPU has VNNI); a sum of log-probabilities over a
    // whole text does not, unless --int8 on asks.
    let dir = Scratch::new("classify-score", "channel-int8");
    let input = dir.join("in.jsonl");
    write_reviews(&input);
    let run = |name: &str, more: &[&str]| {
        let out = dir.join(format!("{name}.jsonl"));
        let args: Vec<&str> = [
            "--labels",
            "positive,negative",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--method",
            "channel",
            "--calibrate",
            "none",
            "--limit",
            "2",
            "--model",
            "gemma3-270m",
        ]
        .into_iter()
        .chain(more.iter().copied())
        .collect();
        let o = classify(&args);
        assert!(o.status.success(), "{}", show(&o));
        scores_of(&out)
    };
    let default = run("default", &[]);
    let off = run("off", &["--int8", "off"]);
    let close = |a: &[Vec<f64>], b: &[Vec<f64>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| (x - y).abs() < 1e-2)
    };
    assert!(close(&default, &off), "default {default:?} vs --int8 off {off:?}");
    if std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" avx512_vnni")) {
        let on = run("on", &["--int8", "on"]);
        assert!(!close(&on, &off), "--int8 on {on:?} vs off {off:?}");
    }
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let o = classify(args);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

#[test]
fn bad_flags_are_clear_errors() {
    let dir = Scratch::new("classify-score", "bad");
    let input = dir.join("in.jsonl");
    write_reviews(&input);
    let out = dir.join("out.jsonl");
    let base = [
        "--labels",
        "positive,negative",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    let with = |more: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(more.iter().copied()).collect() };
    expect_error(&with(&["--method", "baseline"]), &["--method baseline", "--demos FILE"]);
    expect_error(
        &with(&["--method", "score", "--calibrate", "mean"]),
        &["--calibrate", "batch", "content-free"],
    );
    expect_error(
        &with(&["--method", "score", "--shots", "2", "--demos", "x.jsonl"]),
        &["--method score and channel are zero-shot", "--shots"],
    );
    expect_error(
        &with(&["--method", "score", "--api-base", "http://127.0.0.1:9/v1"]),
        &["--method score", "--api-base"],
    );
    expect_error(
        &with(&["--method", "channel", "--channel-template", "A review:"]),
        &["--channel-template \"A review:\" names no label", "{label}"],
    );
    expect_error(
        &with(&["--method", "score", "--channel-template", "A {label} review:"]),
        &["--channel-template is for --method channel"],
    );
    let same = dir.join("same.txt");
    std::fs::write(&same, "positive: a review\nnegative: a review\n").unwrap();
    let mut args = with(&["--method", "channel", "--channel-template", "This is {description}."]);
    args[1] = same.to_str().unwrap();
    expect_error(&args, &["label \"negative\" the same statement", "This is a review."]);
    assert!(!out.exists(), "no results file after a refused run");
}
