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
