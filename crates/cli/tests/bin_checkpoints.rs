//! LLaMA-era checkpoints: PyTorch `.bin` shards with a SentencePiece
//! `tokenizer.model` (the fixture `tiny-llama-bin`, made by HF transformers), read
//! by `generate`, `tokenize`, `delta apply` and `convert`; models by `ORG/NAME` from
//! the HF cache; and bad `.bin` files refused with the file and what is wrong.

mod common;
use common::Scratch;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use half::f16;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> PathBuf {
    fixtures().join("models/tiny-llama-bin")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden/bin-checkpoints.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn vicugna(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicugna")).args(args).output().unwrap()
}

fn vicugna_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vicugna"));
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vicugna failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn ids_arg(v: &Value) -> String {
    ids(v).iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Greedy ids of `vicugna generate` on a model path.
fn greedy(model: &Path, prompt: &Value, extra: &[&str]) -> Vec<u64> {
    let prompt = ids_arg(prompt);
    let mut args = vec![
        "generate",
        "--model",
        p(model),
        "--prompt-ids",
        &prompt,
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    args.extend(extra);
    let out = ok(&vicugna(&args));
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    ids(&v["ids"])
}

/// A torch.save-style zip (`archive/data.pkl` + stored `archive/data/<k>`) of a
/// state dict: (name, torch storage type, shape, raw little-endian bytes). `global`
/// puts one more global into the pickle, as a crafted file would.
fn write_torch_bin(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], global: Option<&str>) {
    let mut pk: Vec<u8> = vec![0x80, 0x02, b'}', b'('];
    let unicode = |pk: &mut Vec<u8>, s: &str| {
        pk.push(b'X');
        pk.extend((s.len() as u32).to_le_bytes());
        pk.extend(s.as_bytes());
    };
    let int = |pk: &mut Vec<u8>, i: usize| {
        pk.push(b'J');
        pk.extend((i as i32).to_le_bytes());
    };
    for (k, (name, storage, shape, bytes)) in tensors.iter().enumerate() {
        let elem = if *storage == "FloatStorage" { 4 } else { 2 };
        unicode(&mut pk, name);
        pk.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        // persistent id ('storage', type, key, location, numel)
        pk.push(b'(');
        unicode(&mut pk, "storage");
        pk.extend(format!("ctorch\n{storage}\n").as_bytes());
        unicode(&mut pk, &k.to_string());
        unicode(&mut pk, "cpu");
        int(&mut pk, bytes.len() / elem);
        pk.extend(b"tQ");
        int(&mut pk, 0);
        pk.push(b'(');
        for &d in shape {
            int(&mut pk, d);
        }
        pk.extend(b"t(");
        let mut stride = 1;
        let mut strides = vec![0; shape.len()];
        for (i, &d) in shape.iter().enumerate().rev() {
            strides[i] = stride;
            stride *= d;
        }
        for s in strides {
            int(&mut pk, s);
        }
        pk.push(b't');
        pk.push(0x89);
        pk.extend(b"ccollections\nOrderedDict\n)R");
        pk.extend(b"tR");
    }
    if let Some(g) = global {
        unicode(&mut pk, "payload");
        pk.extend(format!("c{g}\n").as_bytes());
        pk.push(b')');
        pk.push(b'R');
    }
    pk.extend(b"u.");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pk).unwrap();
    for (k, (_, _, _, bytes)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{k}"), opts.with_alignment(64))
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// A copy of the fixture model in `dir`, without the files `skip` names.
fn copy_model(dir: &Path, skip: &[&str]) -> PathBuf {
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(model()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(e.path(), out.join(&name)).unwrap();
        }
    }
    out
}

#[test]
fn tokenize_matches_hf_on_tokenizer_model() {
    for case in golden()["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let out = ok(&vicugna(&[
            "tokenize",
            "--model",
            p(&model()),
            "--text",
            text,
            "--json",
        ]));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&case["ids"]), "text {text:?}");
        let out = ok(&vicugna(&[
            "tokenize",
            "--model",
            p(&model()),
            "--text",
            text,
            "--json",
            "--special",
        ]));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&case["with_bos"]), "text {text:?} with BOS");
    }
}

#[test]
fn generate_from_bin_shards_gives_hf_greedy_ids() {
    for case in golden()["generation_cases"].as_array().unwrap() {
        if case["model"] != "base" {
            continue;
        }
        assert_eq!(
            greedy(&model(), &case["prompt_ids"], &[]),
            ids(&case["greedy_ids"]),
            "prompt {}",
            case["prompt_ids"]
        );
    }
}

#[test]
fn model_by_name_from_the_hf_cache() {
    let dir = Scratch::new("bin-ckpt", "hf-cache");
    let repo = dir.join("hub/models--lmsys--tiny-vicuna");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    std::os::unix::fs::symlink(model(), &snap).unwrap();
    let case = &golden()["tokenizer_cases"][0];
    let text = case["text"].as_str().unwrap();
    let out = vicugna_env(
        &["tokenize", "--model", "lmsys/tiny-vicuna", "--text", text, "--json"],
        &[("HF_HOME", &dir)],
    );
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(ids(&v["ids"]), ids(&case["ids"]));

    let err = fails(&vicugna_env(
        &["tokenize", "--model", "lmsys/not-here", "--text", "x"],
        &[("HF_HOME", &dir)],
    ));
    assert!(
        err.contains("lmsys/not-here") && err.contains("models--lmsys--not-here"),
        "{err}"
    );
}

/// Reads the tensors of a safetensors directory (the delta apply output) as raw bytes.
fn read_safetensors_dir(dir: &Path) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.push((name, format!("{:?}", view.dtype()), view.data().to_vec()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn delta_apply_on_bin_base_and_delta_is_fastchats_float16() {
    let dir = Scratch::new("bin-ckpt", "delta");
    // A float16 delta for every tensor of the base, as a .bin file.
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(model().join("pytorch_model.bin.index.json")).unwrap()).unwrap();
    let names: Vec<String> = index["weight_map"].as_object().unwrap().keys().cloned().collect();
    let base = vicugna_engine::torch_bin::find_weight_files(&model()).unwrap();
    let mut base_tensors = std::collections::HashMap::new();
    for path in base.paths() {
        let bytes = std::fs::read(path).unwrap();
        for t in vicugna_engine::torch_bin::read_bin(path).unwrap() {
            let data = &bytes[t.offset as usize..(t.offset + t.len) as usize];
            let v: Vec<f32> = data
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            base_tensors.insert(t.name.clone(), (t.shape.clone(), v));
        }
    }
    let delta_dir = dir.join("delta");
    std::fs::create_dir_all(&delta_dir).unwrap();
    let mut delta = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let (shape, base) = &base_tensors[name];
        let d: Vec<f16> = (0..base.len())
            .map(|i| f16::from_f32(((i * 7919 + k * 104729) % 2001) as f32 / 1000.0 - 1.0))
            .collect();
        delta.push((name.as_str(), shape.clone(), d));
    }
    let entries: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = delta
        .iter()
        .map(|(n, s, d)| {
            (
                *n,
                "HalfStorage",
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    write_torch_bin(&delta_dir.join("pytorch_model.bin"), &entries, None);
    // A released delta carries the tokenizer, as lmsys/vicuna-7b-delta-v1.1 does.
    for f in ["config.json", "tokenizer.model", "tokenizer_config.json"] {
        std::fs::copy(model().join(f), delta_dir.join(f)).unwrap();
    }

    let target = dir.join("target");
    ok(&vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&model()),
        "--delta",
        p(&delta_dir),
        "--target",
        p(&target),
    ]));
    // FastChat: base loaded in float16, then `param.data += base` in float16 (torch
    // adds two halves exactly in f32 and rounds once).
    let got = read_safetensors_dir(&target);
    assert_eq!(got.len(), names.len());
    for (name, dtype, bytes) in got {
        assert_eq!(dtype, "F16", "{name}");
        let (_, base) = &base_tensors[&name];
        let (_, _, d) = delta.iter().find(|(n, _, _)| *n == name).unwrap();
        let want: Vec<u8> = base
            .iter()
            .zip(d)
            .flat_map(|(&b, &d)| f16::from_f32(f16::from_f32(b).to_f32() + d.to_f32()).to_le_bytes())
            .collect();
        assert!(bytes == want, "{name}: not bit-identical to FastChat's float16 sum");
    }
    assert!(
        target.join("tokenizer.model").is_file(),
        "the delta's tokenizer is copied"
    );
    // The target is a model: it generates.
    let case = &golden()["generation_cases"][0];
    assert_eq!(greedy(&target, &case["prompt_ids"], &[]).len(), 12);
}

#[test]
fn convert_bin_with_sentencepiece_vocab_to_gguf() {
    let dir = Scratch::new("bin-ckpt", "convert");
    let gguf = dir.join("x.gguf");
    ok(&vicugna(&["convert", "--input", p(&model()), "--output", p(&gguf)]));
    // The GGUF's vocabulary is SentencePiece's, as llama.cpp reads it: a run of
    // leading spaces keeps every space (SentencePiece's own ids).
    for case in golden()["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        if text.contains("</s>") {
            continue;
        }
        let out = ok(&vicugna(&["tokenize", "--model", p(&gguf), "--text", text, "--json"]));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&case["slow_ids"]), "text {text:?}");
    }
    for case in golden()["generation_cases"].as_array().unwrap() {
        if case["model"] == "base" {
            assert_eq!(greedy(&gguf, &case["prompt_ids"], &[]), ids(&case["greedy_ids"]));
        }
    }
}

#[test]
fn bad_bin_files_are_named() {
    let dir = Scratch::new("bin-ckpt", "bad");
    // A pickle naming a foreign global.
    let evil = copy_model(&dir.join("evil"), &[]);
    let shard = evil.join("pytorch_model-00002-of-00003.bin");
    let w: Vec<u8> = (0..64 * 64).flat_map(|_| 0f32.to_le_bytes()).collect();
    write_torch_bin(
        &shard,
        &[("model.norm.weight", "FloatStorage", vec![64], w[..256].to_vec())],
        Some("os\nsystem"),
    );
    let err = fails(&vicugna(&[
        "generate",
        "--model",
        p(&evil),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
    ]));
    assert!(
        err.contains("pytorch_model-00002-of-00003.bin") && err.contains("os.system"),
        "{err}"
    );
    let err = fails(&vicugna(&[
        "convert",
        "--input",
        p(&evil),
        "--output",
        p(&dir.join("e.gguf")),
    ]));
    assert!(
        err.contains("pytorch_model-00002-of-00003.bin") && err.contains("os.system"),
        "{err}"
    );

    // A truncated shard.
    let cut = copy_model(&dir.join("cut"), &[]);
    let shard = cut.join("pytorch_model-00001-of-00003.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&vicugna(&[
        "generate",
        "--model",
        p(&cut),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
    ]));
    assert!(
        err.contains("pytorch_model-00001-of-00003.bin") && err.contains("truncated"),
        "{err}"
    );

    // A shard the index lists is missing.
    let gone = copy_model(&dir.join("gone"), &["pytorch_model-00003-of-00003.bin"]);
    let err = fails(&vicugna(&[
        "generate",
        "--model",
        p(&gone),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
    ]));
    assert!(
        err.contains("pytorch_model-00003-of-00003.bin") && err.contains("pytorch_model.bin.index.json"),
        "{err}"
    );
    let err = fails(&vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&gone),
        "--delta",
        p(&model()),
        "--target",
        p(&dir.join("t")),
    ]));
    assert!(err.contains("pytorch_model-00003-of-00003.bin"), "{err}");
}

#[test]
fn convert_exports_llama3_rope_scaling() {
    let dir = Scratch::new("bin-ckpt", "llama3");
    let gguf = dir.join("r.gguf");
    let src = fixtures().join("models/tiny-llama3-rope");
    ok(&vicugna(&[
        "convert",
        "--input",
        p(&src),
        "--output",
        p(&gguf),
        "--dtype",
        "f32",
    ]));
    // llama.cpp's divisors are in the file, and vicugna reads the scaling back.
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let freqs = &content.tensor_infos["rope_freqs.weight"];
    assert_eq!(freqs.shape.dims(), &[8]);
    let text = std::fs::read_to_string(fixtures().join("golden/tiny-models.json")).unwrap();
    let g: Value = serde_json::from_str(&text).unwrap();
    for case in g["models"]["tiny-llama3-rope"]["cases"].as_array().unwrap() {
        let want: Vec<u64> = ids(&case["greedy_ids"]).into_iter().take(12).collect();
        assert_eq!(greedy(&gguf, &case["prompt_ids"], &[]), want);
    }
}

#[test]
fn lora_merge_of_a_bin_adapter_gives_peft_greedy_ids() {
    let dir = Scratch::new("bin-ckpt", "lora");
    let merged = dir.join("merged");
    let lora = fixtures().join("models/tiny-llama-lora-bin");
    ok(&vicugna(&[
        "lora",
        "merge",
        "--base",
        p(&model()),
        "--lora",
        p(&lora),
        "--out",
        p(&merged),
    ]));
    for case in golden()["generation_cases"].as_array().unwrap() {
        if case["model"] == "lora_merged" {
            assert_eq!(greedy(&merged, &case["prompt_ids"], &[]), ids(&case["greedy_ids"]));
        }
    }
}

/// The README's first steps, command for command: a delta made from the merged
/// adapter, applied to the `.bin` base, chatted with, exported to GGUF.
#[test]
fn readme_first_steps_run() {
    let dir = Scratch::new("bin-ckpt", "readme");
    let f = fixtures().join("models");
    let (base, lora) = (f.join("tiny-llama-bin"), f.join("tiny-llama-lora-bin"));
    let (tuned, delta, vicuna, gguf) = (
        dir.join("tuned"),
        dir.join("delta"),
        dir.join("vicuna"),
        dir.join("vicuna-f16.gguf"),
    );
    ok(&vicugna(&[
        "lora",
        "merge",
        "--base",
        p(&base),
        "--lora",
        p(&lora),
        "--out",
        p(&tuned),
    ]));
    ok(&vicugna(&[
        "delta",
        "make",
        "--base",
        p(&base),
        "--target",
        p(&tuned),
        "--delta",
        p(&delta),
        "--dtype",
        "f16",
    ]));
    ok(&vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&base),
        "--delta",
        p(&delta),
        "--target",
        p(&vicuna),
    ]));
    let mut chat = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args([
            "chat",
            "--model",
            p(&vicuna),
            "--conv-template",
            "vicuna_v1.1",
            "--style",
            "programmatic",
            "--max-new-tokens",
            "8",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(b"Hi\n").unwrap();
    ok(&chat.wait_with_output().unwrap());
    ok(&vicugna(&["convert", "--input", p(&vicuna), "--output", p(&gguf)]));
    ok(&vicugna(&[
        "generate",
        "--model",
        p(&gguf),
        "--prompt",
        "USER: Hi ASSISTANT:",
        "--max-new-tokens",
        "4",
    ]));
}

#[test]
fn lora_flag_serves_a_bin_adapter_as_peft_merged() {
    let lora = fixtures().join("models/tiny-llama-lora-bin");
    for case in golden()["generation_cases"].as_array().unwrap() {
        if case["model"] == "lora_merged" {
            assert_eq!(
                greedy(&model(), &case["prompt_ids"], &["--lora", p(&lora)]),
                ids(&case["greedy_ids"])
            );
        }
    }
}
