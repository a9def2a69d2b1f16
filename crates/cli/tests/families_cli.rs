//! Every model family through the binary: HF directories and GGUF files written
//! by `vicugna convert` give HF transformers' greedy ids; unknown architectures
//! and missing tensors are named.

mod common;
use common::Scratch;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vicugna(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicugna")).args(args).output().unwrap()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("golden").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `vicugna generate --prompt-ids … --temperature 0 --ignore-eos --json`.
fn greedy(model: &Path, prompt: &[u64], n: usize) -> Vec<u64> {
    let prompt: Vec<String> = prompt.iter().map(u64::to_string).collect();
    let o = vicugna(&[
        "generate",
        "--model",
        p(model),
        "--prompt-ids",
        &prompt.join(","),
        "--max-new-tokens",
        &n.to_string(),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        o.status.success(),
        "{}: {}",
        model.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    ids(&v["ids"])
}

#[test]
fn every_family_gives_hf_greedy_ids_from_hf_and_from_gguf() {
    let g = golden("tiny-models-2.json");
    let d = Scratch::new("families-cli", "gguf");
    for name in ["tiny-qwen3", "tiny-gemma3", "tiny-phi3", "tiny-mixtral"] {
        let dir = fixtures().join("models").join(name);
        let gguf = d.join(format!("{name}.gguf"));
        let o = vicugna(&["convert", "--input", p(&dir), "--output", p(&gguf), "--dtype", "f32"]);
        // llama.cpp fixes gemma3's layer pattern and query scale; the tiny model
        // differs (a global layer every third, query_pre_attn_scalar 24), so its
        // GGUF would run differently there: refused, saying why. The real Gemma 3
        // 270M GGUF is llama.cpp's own layout (crates/engine/tests/gemma3_270m.rs).
        let to_gguf = name != "tiny-gemma3";
        if to_gguf {
            assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains("llama.cpp assumes"),
                "{name}: {err}"
            );
            assert!(!gguf.exists());
        }
        for (ci, case) in g["models"][name]["cases"].as_array().unwrap().iter().enumerate() {
            let (prompt, want) = (ids(&case["prompt_ids"]), ids(&case["greedy_ids"]));
            assert_eq!(
                greedy(&dir, &prompt, want.len()),
                want,
                "{name} case {ci}, HF directory"
            );
            if to_gguf {
                assert_eq!(greedy(&gguf, &prompt, want.len()), want, "{name} case {ci}, GGUF");
            }
        }
    }
    // llama.cpp's layout: phi3's fused projections stay fused, mixtral's experts
    // are stacked, and q/k rows are permuted only where llama.cpp permutes them.
    let mut file = std::fs::File::open(d.join("tiny-mixtral.gguf")).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert_eq!(c.metadata["general.architecture"].to_string().unwrap(), "llama");
    assert_eq!(c.metadata["llama.expert_count"].to_u32().unwrap(), 4);
    assert_eq!(c.tensor_infos["blk.0.ffn_gate_exps.weight"].shape.dims(), &[4, 128, 64]);
    let mut file = std::fs::File::open(d.join("tiny-phi3.gguf")).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert_eq!(c.metadata["general.architecture"].to_string().unwrap(), "phi3");
    assert_eq!(c.tensor_infos["blk.0.attn_qkv.weight"].shape.dims(), &[128, 64]);
    assert_eq!(c.tensor_infos["blk.0.ffn_up.weight"].shape.dims(), &[256, 64]);
}

#[test]
fn unknown_architectures_and_missing_tensors_are_named() {
    let d = Scratch::new("families-cli", "bad");
    let tiny = fixtures().join("models").join("tiny-llama");
    // An architecture the engine does not run: the file, the name, the list.
    let odd = d.join("gpt-neox");
    std::fs::create_dir_all(&odd).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "gpt_neox".into();
    std::fs::write(odd.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(tiny.join("model.safetensors"), odd.join("model.safetensors")).unwrap();
    let o = vicugna(&[
        "generate",
        "--model",
        p(&odd),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    for needle in [
        "gpt-neox/config.json",
        "gpt_neox",
        "qwen3",
        "gemma3_text",
        "phi3",
        "mixtral",
    ] {
        assert!(err.contains(needle), "no {needle:?} in: {err}");
    }
    // llama weights under a qwen3 config: the first missing tensor is named.
    cfg["model_type"] = "qwen3".into();
    std::fs::write(odd.join("config.json"), cfg.to_string()).unwrap();
    let o = vicugna(&[
        "generate",
        "--model",
        p(&odd),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("model.layers.0.self_attn.q_norm.weight") && err.contains("missing"),
        "{err}"
    );
}
