//! `vicugna delta apply|make`: results, sharding, mismatch errors, atomic output
//! under kill -9 and a full disk, `--verify`.

mod common;
use common::Scratch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use half::f16;
use safetensors::SafeTensors;
use vicugna_weights::elementwise::encode;
use vicugna_weights::safetensors_io::{OutTensor, ShardedWriter};
use vicugna_weights::Float;

fn scratch(name: &str) -> Scratch {
    Scratch::new("weights-cli", name)
}

fn vicugna(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicugna")).args(args).output().unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A deterministic pseudo-random value in [-1, 1).
fn val(seed: u64, i: usize) -> f32 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Llama-shaped tensors with values from `seed`, times `scale`.
fn llama(vocab: usize, hidden: usize, layers: usize, seed: u64, scale: f32) -> Tensors {
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        for (n, s) in [
            ("input_layernorm.weight", vec![hidden]),
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden / 2, hidden]),
            ("mlp.down_proj.weight", vec![hidden, 2 * hidden]),
        ] {
            shapes.push((format!("model.layers.{l}.{n}"), s));
        }
    }
    shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (n, s))| {
            let len: usize = s.iter().product();
            let v = (0..len).map(|i| scale * val(seed * 1000 + k as u64, i)).collect();
            (n, s, v)
        })
        .collect()
}

fn write_model(dir: &Path, tensors: &Tensors, dtype: Float, max_shard: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let outs = tensors
        .iter()
        .map(|(n, s, _)| OutTensor {
            name: n.clone(),
            dtype: dtype.as_str().into(),
            shape: s.clone(),
        })
        .collect();
    let mut w = ShardedWriter::new(dir, outs, max_shard, false);
    let mut bytes = Vec::new();
    for (n, _, v) in tensors {
        w.begin(n).unwrap();
        encode(dtype, v, &mut bytes);
        w.write(&bytes).unwrap();
        w.end().unwrap();
    }
    w.finish().unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "torch_dtype": "float16"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        format!(r#"{{"from": "{}"}}"#, p(dir)),
    )
    .unwrap();
}

/// Every tensor of a model directory as (dtype, shape, raw bytes), read with the
/// `safetensors` crate.
fn read_model(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            let data = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&data).unwrap();
            for (name, view) in st.tensors() {
                out.insert(
                    name,
                    (
                        format!("{:?}", view.dtype()),
                        view.shape().to_vec(),
                        view.data().to_vec(),
                    ),
                );
            }
        }
    }
    out
}

/// Asserts two model directories hold the same tensors, bit for bit (names the differing ones).
fn same_models(a: &Path, b: &Path) {
    let (x, y) = (read_model(a), read_model(b));
    assert_eq!(
        x.keys().collect::<Vec<_>>(),
        y.keys().collect::<Vec<_>>(),
        "{a:?} vs {b:?}"
    );
    let differ: Vec<&String> = x.keys().filter(|k| x[*k] != y[*k]).collect();
    assert!(differ.is_empty(), "{a:?} and {b:?} differ in {differ:?}");
}

fn f16_bits(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.contains("vicugna-partial").then_some(n)
        })
        .collect()
}

#[test]
fn apply_adds_in_float16_shards_and_copies_the_delta_files() {
    let d = scratch("apply");
    let base = llama(64, 32, 2, 1, 1.0);
    let delta = llama(64, 32, 2, 2, 0.01);
    write_model(&d.join("base"), &base, Float::BF16, 10_000);
    write_model(&d.join("delta"), &delta, Float::F16, 1 << 30);
    let target = d.join("target");
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&d.join("delta")),
        "--target",
        p(&target),
        "--max-shard-size",
        "8KB",
        "--verify",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum verified"));

    let got = read_model(&target);
    assert_eq!(got.len(), base.len());
    for (name, shape, b) in &base {
        let dv = &delta.iter().find(|t| &t.0 == name).unwrap().2;
        // torch: both cast to float16 (the delta's dtype), added, rounded once.
        let want: Vec<u16> = b
            .iter()
            .zip(dv)
            .map(|(x, y)| {
                let x = f16::from_f32(half::bf16::from_f32(*x).to_f32()).to_f32();
                let y = f16::from_f32(*y).to_f32();
                f16::from_f32(x + y).to_bits()
            })
            .collect();
        let (dtype, s, bytes) = &got[name];
        assert_eq!((dtype.as_str(), s), ("F16", shape), "{name}");
        assert_eq!(f16_bits(bytes), want, "{name}");
    }
    // 8 KB shards: several files and an index that names every tensor.
    let shards = std::fs::read_dir(&target)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors")
        })
        .count();
    assert!(shards > 3, "{shards} shards");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(target.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), base.len());
    // The delta's side files, not the base's.
    let tok = std::fs::read_to_string(target.join("tokenizer_config.json")).unwrap();
    assert!(tok.contains("delta"), "{tok}");
    assert!(leftovers(&d).is_empty());
}

#[test]
fn make_then_apply_gives_the_target_back_in_f32() {
    let d = scratch("roundtrip");
    // Values on a coarse grid, so target - base + base is exact in f32.
    let grid = |t: Tensors| -> Tensors {
        t.into_iter()
            .map(|(n, s, v)| (n, s, v.into_iter().map(|x| (x * 256.0).round() / 256.0 + 0.0).collect()))
            .collect()
    };
    let base = grid(llama(48, 16, 3, 3, 1.0));
    let tuned = grid(llama(48, 16, 3, 4, 1.0));
    write_model(&d.join("base"), &base, Float::F32, 4_000);
    write_model(&d.join("tuned"), &tuned, Float::F32, 1 << 30);
    let (delta, back) = (d.join("delta"), d.join("back"));
    let out = vicugna(&[
        "delta",
        "make",
        "--base",
        p(&d.join("base")),
        "--target",
        p(&d.join("tuned")),
        "--delta",
        p(&delta),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&delta),
        "--target",
        p(&back),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    same_models(&back, &d.join("tuned"));

    // --dtype bf16 writes bf16 and says so in config.json.
    let bf = d.join("bf16");
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&delta),
        "--target",
        p(&bf),
        "--dtype",
        "bf16",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(read_model(&bf).values().all(|(dt, _, _)| dt == "BF16"));
    let cfg = std::fs::read_to_string(bf.join("config.json")).unwrap();
    assert!(cfg.contains("\"torch_dtype\": \"bfloat16\""), "{cfg}");
}

#[test]
fn added_vocabulary_rows_are_taken_from_the_delta() {
    let d = scratch("vocab");
    let base = llama(40, 16, 1, 5, 1.0);
    let mut delta = llama(42, 16, 1, 6, 0.01);
    for t in delta
        .iter_mut()
        .filter(|t| t.0.contains("embed") || t.0 == "lm_head.weight")
    {
        for x in t.2[40 * 16..].iter_mut() {
            *x = 0.5;
        }
    }
    write_model(&d.join("base"), &base, Float::F16, 1 << 30);
    write_model(&d.join("delta"), &delta, Float::F16, 1 << 30);
    let target = d.join("target");
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&d.join("delta")),
        "--target",
        p(&target),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = read_model(&target);
    let (_, shape, bytes) = &got["model.embed_tokens.weight"];
    assert_eq!(shape, &vec![42, 16]);
    let bits = f16_bits(bytes);
    assert!(bits[40 * 16..].iter().all(|&b| b == f16::from_f32(0.5).to_bits()));
    let b0 = f16::from_f32(base[0].2[0]).to_f32() + f16::from_f32(delta[0].2[0]).to_f32();
    assert_eq!(bits[0], f16::from_f32(b0).to_bits());
}

#[test]
fn every_mismatch_is_listed_and_nothing_is_written() {
    let d = scratch("mismatch");
    let base = llama(40, 16, 2, 7, 1.0);
    let mut delta = llama(40, 16, 2, 8, 1.0);
    delta.retain(|t| t.0 != "model.layers.1.input_layernorm.weight");
    delta.push(("model.extra.weight".into(), vec![4], vec![0.0; 4]));
    let q = delta
        .iter_mut()
        .find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    q.1 = vec![8, 32];
    // The vocabulary may grow, not shrink.
    let e = delta.iter_mut().find(|t| t.0 == "lm_head.weight").unwrap();
    e.1 = vec![39, 16];
    e.2.truncate(39 * 16);
    write_model(&d.join("base"), &base, Float::F16, 1 << 30);
    write_model(&d.join("delta"), &delta, Float::F16, 1 << 30);
    let target = d.join("target");
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&d.join("delta")),
        "--target",
        p(&target),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "4 problems",
        "model.layers.1.input_layernorm.weight: in ",
        "model.extra.weight: in ",
        "model.layers.0.self_attn.q_proj.weight: shape [8, 32]",
        "lm_head.weight: shape [39, 16]",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(!target.exists());
    assert!(leftovers(&d).is_empty());

    // An existing target, a missing directory and a bad flag: one clear line each.
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&d.join("base")),
        "--target",
        p(&d.join("base")),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("nope")),
        "--delta",
        p(&d.join("base")),
        "--target",
        p(&target),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope") && err.contains("not a directory"), "{err}");
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&d.join("base")),
        "--target",
        p(&target),
        "--dtype",
        "f8",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--dtype \"f8\""),
        "{out:?}"
    );
    // A truncated shard is named with the tensor that does not fit.
    let shard = d.join("delta/model.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let out = vicugna(&[
        "delta",
        "apply",
        "--base",
        p(&d.join("base")),
        "--delta",
        p(&d.join("delta")),
        "--target",
        p(&target),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    assert!(!target.exists());
}

#[test]
fn peak_memory_stays_under_three_largest_tensors_plus_100_mb() {
    let d = scratch("memory");
    // 2 x 64 MB embeddings in f16 per checkpoint: holding both checkpoints
    // (about 300 MB) would break the bound of 3 x 64 MB + 100 MB = 296 MB.
    let base = llama(32000, 1024, 2, 14, 1.0);
    let delta = llama(32000, 1024, 2, 15, 0.01);
    write_model(&d.join("base"), &base, Float::F16, 100_000_000);
    write_model(&d.join("delta"), &delta, Float::F16, 1 << 40);
    let total: usize = base.iter().map(|t| t.2.len() * 2).sum();
    let largest = base.iter().map(|t| t.2.len() * 2).max().unwrap() as u64;
    let bound = 3 * largest + 100_000_000;
    drop((base, delta));
    let target = d.join("target");
    // FastChat's flag names work too.
    let out = vicugna(&[
        "delta",
        "apply",
        "--base-model-path",
        p(&d.join("base")),
        "--delta-path",
        p(&d.join("delta")),
        "--target-model-path",
        p(&target),
        "--verify",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The command reports its own peak (VmHWM): a child's rusage would include the
    // test process's memory, shared until exec.
    let rss: u64 = err
        .split("peak RSS ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {err}"))
        * 1_000_000;
    assert!(
        rss < bound,
        "peak RSS {} MB over the bound {} MB (checkpoints of {} MB)",
        rss / 1_000_000,
        bound / 1_000_000,
        total / 1_000_000
    );
    assert!(target.join("model.safetensors").is_file());
}

#[test]
fn kill_9_leaves_no_target_or_a_complete_one() {
    let d = scratch("kill");
    // ~24 MB per checkpoint: the job takes a noticeable fraction of a second.
    let base = llama(4000, 256, 4, 9, 1.0);
    let delta = llama(4000, 256, 4, 10, 0.01);
    write_model(&d.join("base"), &base, Float::F16, 3_000_000);
    write_model(&d.join("delta"), &delta, Float::F16, 1 << 30);
    let args = |t: &Path| {
        vec![
            "delta".to_string(),
            "apply".into(),
            "--base".into(),
            p(&d.join("base")).into(),
            "--delta".into(),
            p(&d.join("delta")).into(),
            "--target".into(),
            p(t).into(),
            "--max-shard-size".into(),
            "5MB".into(),
        ]
    };
    let reference = d.join("reference");
    assert!(Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(args(&reference))
        .status()
        .unwrap()
        .success());
    let (mut absent, mut complete) = (0, 0);
    for (i, ms) in [0u64, 5, 15, 30, 60, 100, 150, 220, 300, 450, 700, 1000]
        .iter()
        .enumerate()
    {
        let target = d.join(format!("t{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_vicugna"))
            .args(args(&target))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*ms));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        if target.exists() {
            same_models(&target, &reference);
            complete += 1;
        } else {
            absent += 1;
            // A rerun removes the dead job's partial output and completes.
            assert!(Command::new(env!("CARGO_BIN_EXE_vicugna"))
                .args(args(&target))
                .status()
                .unwrap()
                .success());
            same_models(&target, &reference);
        }
        assert!(leftovers(&d).is_empty(), "after kill at {ms} ms: {:?}", leftovers(&d));
    }
    assert!(absent > 0, "no kill landed before the end (complete {complete})");
}

#[test]
fn a_full_disk_gives_a_clear_error_and_no_target() {
    // A 4 MB tmpfs as the output filesystem needs root (CI runs as root).
    let d = scratch("full");
    let mnt = d.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", p(&mnt)])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true but a tmpfs cannot be mounted (needs root)"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let base = llama(4000, 256, 1, 11, 1.0);
    write_model(&d.join("base"), &base, Float::F16, 1 << 30);
    let target = mnt.join("target");
    let out = vicugna(&[
        "delta",
        "make",
        "--base",
        p(&d.join("base")),
        "--target",
        p(&d.join("base")),
        "--delta",
        p(&target),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space left") && err.contains(p(&target)), "{err}");
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "something was left on the full disk"
    );

    // Past the free-space check (skipped here, as when another writer fills the
    // disk during the job): the write itself fails with the same message and the
    // partial output is removed.
    let out = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args([
            "delta",
            "make",
            "--base",
            p(&d.join("base")),
            "--target",
            p(&d.join("base")),
            "--delta",
            p(&target),
        ])
        .args(["--max-shard-size", "1MB"])
        .env("VICUGNA_SKIP_SPACE_CHECK", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space left") && err.contains("model-0000"), "{err}");
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "something was left on the full disk"
    );
    drop(_guard);
}

/// An adapter directory in PEFT's layout.
fn write_adapter(dir: &Path, config: serde_json::Value, tensors: &Tensors) {
    std::fs::create_dir_all(dir).unwrap();
    let outs = tensors
        .iter()
        .map(|(n, s, _)| OutTensor {
            name: n.clone(),
            dtype: "F32".into(),
            shape: s.clone(),
        })
        .collect();
    let mut w = ShardedWriter::new(dir, outs, 1 << 40, false);
    let mut bytes = Vec::new();
    for (n, _, v) in tensors {
        w.begin(n).unwrap();
        encode(Float::F32, v, &mut bytes);
        w.write(&bytes).unwrap();
        w.end().unwrap();
    }
    w.finish().unwrap();
    std::fs::rename(dir.join("model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn lora_merge_adds_the_scaled_product_and_lists_bad_adapters() {
    let d = scratch("lora");
    // Values on a 1/16 grid: every product and sum below is exact in f32.
    let grid =
        |seed: u64, n: usize| -> Vec<f32> { (0..n).map(|i| (val(seed, i) * 16.0).round() / 16.0 + 0.0).collect() };
    let base: Tensors = llama(32, 16, 2, 12, 1.0)
        .into_iter()
        .enumerate()
        .map(|(k, (n, s, v))| (n, s, grid(100 + k as u64, v.len())))
        .collect();
    write_model(&d.join("base"), &base, Float::F32, 1 << 30);
    let r = 4;
    let q = "base_model.model.model.layers.1.self_attn.q_proj";
    let down = "base_model.model.model.layers.0.mlp.down_proj";
    let (a_q, b_q) = (grid(1, r * 16), grid(2, 16 * r));
    let (a_d, b_d) = (grid(3, r * 32), grid(4, 16 * r));
    let adapter: Tensors = vec![
        (format!("{q}.lora_A.weight"), vec![r, 16], a_q.clone()),
        (format!("{q}.lora_B.weight"), vec![16, r], b_q.clone()),
        (format!("{down}.lora_A.weight"), vec![r, 32], a_d.clone()),
        (format!("{down}.lora_B.weight"), vec![16, r], b_d.clone()),
    ];
    let merged_with = |cfg: serde_json::Value, name: &str| -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
        write_adapter(&d.join(format!("adapter-{name}")), cfg, &adapter);
        let out = d.join(format!("merged-{name}"));
        let o = vicugna(&[
            "lora",
            "merge",
            "--base",
            p(&d.join("base")),
            "--lora",
            p(&d.join(format!("adapter-{name}"))),
            "--out",
            p(&out),
            "--verify",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_model(&out)
    };
    let expect = |w: &[f32], a: &[f32], b: &[f32], rows: usize, cols: usize, scale: f32| -> Vec<f32> {
        let mut out = w.to_vec();
        for i in 0..rows {
            for j in 0..cols {
                let s: f32 = (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum();
                out[i * cols + j] += scale * s;
            }
        }
        out
    };
    let w = |name: &str| base.iter().find(|t| t.0 == name).unwrap().2.clone();
    for (cfg, scale, name) in [
        (
            serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}),
            2.0,
            "plain",
        ),
        (
            serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"]}),
            4.0,
            "rslora",
        ),
    ] {
        let got = merged_with(cfg, name);
        let qn = "model.layers.1.self_attn.q_proj.weight";
        assert_eq!(
            f32s(&got[qn].2),
            expect(&w(qn), &a_q, &b_q, 16, 16, scale),
            "{name} {qn}"
        );
        let dn = "model.layers.0.mlp.down_proj.weight";
        assert_eq!(
            f32s(&got[dn].2),
            expect(&w(dn), &a_d, &b_d, 16, 32, scale),
            "{name} {dn}"
        );
        let untouched = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(f32s(&got[untouched].2), w(untouched));
    }

    // Broken adapters: every problem at once, no output.
    let bad: Tensors = vec![
        (format!("{q}.lora_A.weight"), vec![r, 16], a_q.clone()),
        (format!("{down}.lora_A.weight"), vec![r, 8], grid(5, r * 8)),
        (format!("{down}.lora_B.weight"), vec![16, r], b_d.clone()),
        (
            "base_model.model.model.layers.0.mlp.nope.lora_A.weight".into(),
            vec![r, 16],
            a_q.clone(),
        ),
        (
            "base_model.model.model.layers.0.mlp.nope.lora_B.weight".into(),
            vec![16, r],
            b_q.clone(),
        ),
    ];
    write_adapter(&d.join("bad"), serde_json::json!({"r": r, "lora_alpha": 8}), &bad);
    let out = d.join("merged-bad");
    let o = vicugna(&[
        "lora",
        "merge",
        "--base",
        p(&d.join("base")),
        "--lora",
        p(&d.join("bad")),
        "--out",
        p(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "3 problems",
        "q_proj.lora_A.weight: has no",
        "down_proj.weight: base [16, 32] needs lora_A [4, 32]",
        "the base has no model.layers.0.mlp.nope.weight",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(!out.exists());
    write_adapter(
        &d.join("dora"),
        serde_json::json!({"r": r, "lora_alpha": 8, "use_dora": true}),
        &adapter,
    );
    let o = vicugna(&[
        "lora",
        "merge",
        "--base",
        p(&d.join("base")),
        "--lora",
        p(&d.join("dora")),
        "--out",
        p(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("adapter_config.json: use_dora: DoRA"), "{err}");
}

#[test]
fn convert_changes_the_dtype_of_an_hf_checkpoint() {
    let d = scratch("dtype");
    let base = llama(32, 16, 2, 13, 1.0);
    write_model(&d.join("f32"), &base, Float::F32, 3_000);
    let out = d.join("bf16");
    let o = vicugna(&[
        "convert",
        "--input",
        p(&d.join("f32")),
        "--output",
        p(&out),
        "--dtype",
        "bf16",
        "--verify",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_model(&out);
    for (n, s, v) in &base {
        let want: Vec<u16> = v.iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect();
        assert_eq!((&got[n].0, &got[n].1), (&"BF16".to_string(), s));
        assert_eq!(f16_bits(&got[n].2), want, "{n}");
    }
    assert!(std::fs::read_to_string(out.join("config.json"))
        .unwrap()
        .contains("bfloat16"));
    let o = vicugna(&["convert", "--input", p(&d.join("f32")), "--output", p(&d.join("x"))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("pass --dtype"), "{o:?}");
    let o = vicugna(&[
        "convert",
        "--input",
        p(&d.join("f32")),
        "--output",
        p(&d.join("x")),
        "--quant",
        "q4_0",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("ending in .gguf"), "{o:?}");
}

/// Greedy ids of `vicugna generate` on a model.
fn greedy(model: &Path, prompt: &str) -> Vec<u64> {
    let o = vicugna(&[
        "generate",
        "--model",
        p(model),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn the_default_model_goes_gguf_to_hf_to_gguf_and_still_speaks() {
    let gguf = vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("the default model is needed for this test: {e}"));
    let d = scratch("gguf");
    let (hf, f16, q8) = (d.join("hf"), d.join("model-f16.gguf"), d.join("model-q8_0.gguf"));
    for args in [
        vec![
            "convert",
            "--input",
            p(&gguf),
            "--output",
            p(&hf),
            "--dtype",
            "f16",
            "--verify",
        ],
        vec!["convert", "--input", p(&hf), "--output", p(&f16), "--verify"],
        vec![
            "convert",
            "--input",
            p(&hf),
            "--output",
            p(&q8),
            "--quant",
            "q8_0",
            "--verify",
        ],
    ] {
        let o = vicugna(&args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    // The HF directory holds a config, a tokenizer and the chat template.
    let tc = std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("<|im_start|>"), "{tc}");
    // The f16 GGUF holds exactly the HF directory's f16 weights (q/k permuted for
    // llama.cpp and back): the same greedy ids.
    let prompt = "The capital of France is";
    let want = greedy(&hf, prompt);
    assert_eq!(greedy(&f16, prompt), want);
    // Metadata a llama.cpp loader needs, and the quantized layout.
    let mut file = std::fs::File::open(&q8).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let md = &content.metadata;
    assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
    assert_eq!(md["tokenizer.ggml.tokens"].to_vec().unwrap().len(), 49152);
    assert!(md["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .contains("<|im_start|>"));
    let t = |n: &str| content.tensor_infos[n].ggml_dtype;
    assert_eq!(t("blk.0.attn_q.weight"), candle_core::quantized::GgmlDType::Q8_0);
    assert_eq!(t("blk.0.attn_norm.weight"), candle_core::quantized::GgmlDType::F32);
    let q8_ids = greedy(&q8, prompt);
    assert_eq!(q8_ids[..4], want[..4], "q8_0 {q8_ids:?} vs f16 {want:?}");
    // The output is not overwritten.
    let o = vicugna(&["convert", "--input", p(&hf), "--output", p(&q8), "--quant", "q8_0"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
}
