//! `vicugna bench`: the JSON line a benchmark script reads, for one stream and
//! for a batch, and a clear error for settings it cannot time.

use std::path::PathBuf;
use std::process::Command;

fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-llama")
}

fn bench(gen_tokens: &str, batch: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .arg("bench")
        .arg("--model")
        .arg(tiny_llama())
        .args(["--prompt-tokens", "8", "--threads", "1", "--json"])
        .args(["--gen-tokens", gen_tokens, "--batch", batch])
        .output()
        .unwrap()
}

#[test]
fn bench_reports_rates_for_one_stream_and_a_batch() {
    for batch in [1usize, 3] {
        let out = bench("6", &batch.to_string());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "batch {batch}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["batch"], batch, "{line}");
        assert_eq!(v["prompt_tokens"], 8, "{line}");
        for key in [
            "prefill_tok_s",
            "decode_tok_s",
            "load_s",
            "peak_rss_mib",
            "rss_bound_mib",
        ] {
            let x = v[key].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{key} should be a positive number: {line}");
        }
    }
}

#[test]
fn bench_refuses_too_few_tokens_to_time() {
    let out = bench("1", "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--gen-tokens"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The activations a run on a named model reports in its JSON line.
fn activations(model: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args([
            "bench",
            "--model",
            model,
            "--prompt-tokens",
            "4",
            "--gen-tokens",
            "2",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{model} {extra:?}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["activations"].as_str().expect("activations").to_string()
}

#[test]
fn int8_activations_are_the_default_for_k_quants_only() {
    let vnni = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" avx512_vnni"));
    let int8 = if vnni { "int8" } else { "f32" };
    // Gemma 3 270M's Q4_K_M file: K-quant products round activations by default.
    assert_eq!(activations("gemma3-270m", &[]), int8);
    assert_eq!(activations("gemma3-270m", &["--int8", "off"]), "f32");
    // The default model is Q4_1 / Q8_0: f32 unless asked.
    assert_eq!(activations("default", &[]), "f32");
    assert_eq!(activations("default", &["--int8"]), int8);
}
