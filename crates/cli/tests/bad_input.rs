//! Bad input gets one clear line naming the file, field or limit, and exit code 1
//! (or, for an option that cannot apply, a warning).

mod common;
use common::Scratch;

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn scratch(name: &str) -> Scratch {
    Scratch::new("bad-input", name)
}

fn copy_model(src: &str, name: &str) -> Scratch {
    let dir = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("models").join(src).join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Runs `vicugna generate` on `model` and returns (exit code, stderr).
fn generate(model: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(extra)
        .args(if extra.contains(&"--prompt-ids") {
            &[][..]
        } else {
            &["--prompt-ids", "5,17,42"][..]
        })
        .args(if extra.contains(&"--max-new-tokens") {
            &[][..]
        } else {
            &["--max-new-tokens", "4"][..]
        })
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_fails_with(model: &Path, extra: &[&str], needles: &[&str]) {
    let (code, err) = generate(model, extra);
    assert_eq!(code, 1, "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

#[test]
fn directory_without_config() {
    let dir = scratch("noconfig");
    assert_fails_with(&dir, &[], &["config.json"]);
}

#[test]
fn unknown_architecture() {
    let dir = copy_model("tiny-llama", "gpt2");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt2\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    assert_fails_with(&dir, &[], &["unsupported architecture `gpt2`", "config.json"]);
}

#[test]
fn truncated_safetensors() {
    let dir = copy_model("tiny-llama", "truncated");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_with(&dir, &[], &["model.safetensors"]);
}

#[test]
fn tensor_with_the_wrong_shape() {
    let dir = copy_model("tiny-llama", "shape");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    assert_fails_with(
        &dir,
        &[],
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "expected shape [96, 64], found [128, 64]",
        ],
    );
}

#[test]
fn corrupted_gguf_header() {
    let dir = scratch("gguf");
    let f = dir.join("broken.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // absurd tensor count
    bytes.extend_from_slice(&[0xff; 64]);
    std::fs::write(&f, bytes).unwrap();
    assert_fails_with(&f, &[], &["broken.gguf", "GGUF"]);
    std::fs::write(&f, b"not a gguf at all").unwrap();
    assert_fails_with(&f, &[], &["broken.gguf", "GGUF"]);
}

#[test]
fn invalid_sampling_values() {
    let model = fixtures().join("models/tiny-llama");
    assert_fails_with(
        &model,
        &["--max-new-tokens", "0"],
        &["max_new_tokens must be at least 1"],
    );
    assert_fails_with(&model, &["--temperature", "-1"], &["temperature must be >= 0, got -1"]);
    assert_fails_with(&model, &["--top-p", "1.5"], &["top_p must be in (0, 1], got 1.5"]);
}

#[test]
fn int8_without_quantized_weights_says_it_does_nothing() {
    // tiny-llama is safetensors: nothing for 8-bit activations to apply to.
    let model = fixtures().join("models/tiny-llama");
    let (code, err) = generate(&model, &["--int8", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--int8 has no effect here"), "{err}");
    let (code, err) = generate(&model, &["--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("--int8"), "{err}");
}

#[test]
fn prompt_longer_than_the_context() {
    // tiny-llama's context is 512 tokens.
    let model = fixtures().join("models/tiny-llama");
    let long: Vec<String> = (0..2000).map(|i| (3 + i % 400).to_string()).collect();
    let ids = long.join(",");
    assert_fails_with(&model, &["--prompt-ids", &ids], &["2000 tokens", "512"]);
    let (code, err) = generate(&model, &["--prompt-ids", &ids, "--truncate", "--json"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn text_prompt_for_a_model_without_tokenizer() {
    let model = fixtures().join("models/tiny-llama");
    let out = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "hello"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("tokenizer") && err.contains("token ids"), "{err}");
}

#[test]
fn missing_model_path() {
    let (code, err) = generate(Path::new("/nonexistent/model-dir"), &[]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/model-dir"), "{err}");
}
