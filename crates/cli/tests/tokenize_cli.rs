//! `vicugna tokenize` / `vicugna detokenize`, run as a user runs them: on an HF
//! tokenizer directory, on the named model `gemma3-270m`, on a GGUF holding only
//! a vocabulary, and with bad input.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::quantized::gguf_file::{self, Content, Value};
use common::Scratch;
use serde_json::{json, Value as Json};

fn vicugna(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vicugna runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// stdout of a run that must succeed.
fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = vicugna(args, stdin);
    assert!(
        out.status.success(),
        "vicugna {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// stderr of a run that must fail.
fn fails(args: &[&str], stdin: Option<&str>) -> String {
    let out = vicugna(args, stdin);
    assert!(!out.status.success(), "vicugna {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn smollm2_dir() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/smollm2-tokenizer")
        .display()
        .to_string()
}

#[test]
fn tokenize_and_detokenize_an_hf_directory() {
    let dir = smollm2_dir();
    let m = dir.as_str();
    // HF's ids for SmolLM2 (golden/smollm2-135m-instruct.json).
    let out = ok(&["tokenize", "--model", m, "--text", "Hello, world!", "--json"], None);
    assert_eq!(
        serde_json::from_str::<Json>(&out).unwrap(),
        json!({"ids": [19556, 28, 905, 17]})
    );
    assert_eq!(
        ok(&["tokenize", "--model", m, "--text", "Hello, world!"], None),
        "19556 28 905 17\n"
    );
    // From a file, taken exactly (its final newline is a token).
    let scratch = Scratch::new("tokenize", "file");
    let file = scratch.join("in.txt");
    std::fs::write(&file, "Hello, world!\n").unwrap();
    let ids = ok(&["tokenize", "--model", m, "--file", file.to_str().unwrap()], None);
    assert!(
        ids.starts_with("19556 28 905 17 ") && ids.split(' ').count() == 5,
        "{ids}"
    );

    assert_eq!(
        ok(&["detokenize", "--model", m, "--ids", "19556,28,905,17"], None),
        "Hello, world!"
    );
    assert_eq!(
        ok(&["detokenize", "--model", m, "--ids", "19556 28 905 17"], None),
        "Hello, world!"
    );
    let out = ok(&["detokenize", "--model", m, "--json", "[19556, 28, 905, 17]"], None);
    assert_eq!(
        serde_json::from_str::<Json>(&out).unwrap(),
        json!({"text": "Hello, world!"})
    );
    // tokenize --json piped into detokenize round-trips, specials included.
    let text = "<|im_start|>user\n你好 🦙 café<|im_end|>\n";
    let ids = ok(&["tokenize", "--model", m, "--text", text, "--json"], None);
    assert_eq!(ok(&["detokenize", "--model", m], Some(&ids)), text);
    let out = ok(&["detokenize", "--model", m, "--json", "--skip-special"], Some(&ids));
    assert_eq!(
        serde_json::from_str::<Json>(&out).unwrap(),
        json!({"text": "user\n你好 🦙 café\n"})
    );
}

#[test]
fn gemma3_named_model_and_a_vocabulary_only_gguf() {
    // HF's ids (golden/gemma3-270m.json); --special adds Gemma's <bos> (id 2).
    let hello = [9259, 236764, 1902, 236888];
    let out = ok(
        &[
            "tokenize",
            "--model",
            "gemma3-270m",
            "--text",
            "Hello, world!",
            "--json",
        ],
        None,
    );
    assert_eq!(serde_json::from_str::<Json>(&out).unwrap(), json!({ "ids": hello }));
    let out = ok(
        &[
            "tokenize",
            "--model",
            "gemma3-270m",
            "--text",
            "Hello, world!",
            "--json",
            "--special",
        ],
        None,
    );
    assert_eq!(
        serde_json::from_str::<Json>(&out).unwrap(),
        json!({"ids": [2, 9259, 236764, 1902, 236888]})
    );

    // The same vocabulary in a GGUF without any tensor.
    let gguf =
        vicugna_engine::default_model::resolve_model_arg(Some("gemma3-270m"), &mut |m| eprintln!("{m}")).unwrap();
    let scratch = Scratch::new("tokenize", "vocab-only");
    let vocab = scratch.join("gemma3-vocab.gguf");
    write_vocab_only(&gguf, &vocab);
    let v = vocab.to_str().unwrap();
    let text = "评论：物流很快，包装完好，非常满意！\n情感：";
    let want = [
        61171, 237184, 104668, 64455, 236900, 64109, 237888, 237389, 236900, 13869, 112228, 237354, 107, 125677, 237184,
    ];
    let out = ok(&["tokenize", "--model", v, "--text", text, "--json"], None);
    assert_eq!(serde_json::from_str::<Json>(&out).unwrap(), json!({ "ids": want }));
    let ids: Vec<String> = want.iter().map(u32::to_string).collect();
    assert_eq!(ok(&["detokenize", "--model", v, "--ids", &ids.join(",")], None), text);
    // Out of range for Gemma's 262144 ids: the error names the id and the size.
    let err = fails(&["detokenize", "--model", v, "--ids", "2,262144"], None);
    assert!(
        err.contains("id 262144 is out of range") && err.contains("262144 ids"),
        "{err}"
    );
}

/// Writes `src`'s metadata, and no tensors, to `dst`.
fn write_vocab_only(src: &Path, dst: &Path) {
    let mut f = std::fs::File::open(src).unwrap();
    let content = Content::read(&mut f).unwrap();
    let md: Vec<(&str, &Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md, &[]).unwrap();
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = smollm2_dir();
    let m = dir.as_str();
    let err = fails(
        &["tokenize", "--model", "/nonexistent/model.gguf", "--text", "hi"],
        None,
    );
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("not found"),
        "{err}"
    );
    assert!(err.contains("gemma3-270m"), "the named models are listed: {err}");
    // A directory without tokenizer.json.
    let scratch = Scratch::new("tokenize", "empty-dir");
    let err = fails(
        &["tokenize", "--model", scratch.to_str().unwrap(), "--text", "hi"],
        None,
    );
    assert!(err.contains("tokenizer.json"), "{err}");
    // A file that is not a GGUF.
    let junk = scratch.join("junk.gguf");
    std::fs::write(&junk, "not a gguf").unwrap();
    let err = fails(&["tokenize", "--model", junk.to_str().unwrap(), "--text", "hi"], None);
    assert!(err.contains("junk.gguf") && err.contains("GGUF"), "{err}");
    // Ids: not numbers, out of range, bad JSON.
    let err = fails(&["detokenize", "--model", m, "--ids", "1,x,3"], None);
    assert!(err.contains("`x` is not a token id"), "{err}");
    let err = fails(&["detokenize", "--model", m, "--ids", "1,-2"], None);
    assert!(err.contains("`-2` is not a token id"), "{err}");
    let err = fails(&["detokenize", "--model", m, "--ids", "5,49152"], None);
    assert!(
        err.contains("id 49152 is out of range") && err.contains("49152 ids"),
        "{err}"
    );
    let err = fails(&["detokenize", "--model", m, "--json", "[1, 2"], None);
    assert!(err.contains("--json") && err.contains("JSON"), "{err}");
    let err = fails(&["detokenize", "--model", m], Some("{\"text\": \"hi\"}"));
    assert!(err.contains("standard input") && err.contains("\"ids\""), "{err}");
    // Text from two places, or none.
    let err = fails(&["tokenize", "--model", m, "--text", "a", "--file", "b"], None);
    assert!(err.contains("--file"), "{err}");
    fails(&["tokenize", "--model", m], None);
}
