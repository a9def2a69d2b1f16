//! `vicugna classify --finetune` end to end on the real binary, with a tiny
//! random llama (SmolLM2's tokenizer and chat template, 2 layers of width 64,
//! written by the test) so that training takes seconds: an arbitrary
//! keyword → label mapping no model could guess is learned (accuracy after
//! fine-tuning above before), the PEFT adapter lands beside the output with its
//! loss curve, a rerun reuses it without training, and the same adapter
//! labels alike through `--lora`.

mod common;
use common::Scratch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

const HIDDEN: usize = 64;
const INTER: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const VOCAB: usize = 49152;

/// A seeded random matrix (a 64-bit LCG, so the model is the same on every run).
fn random(rows: usize, cols: usize, std: f32, seed: &mut u64) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Uniform in [-1, 1) has std 1/sqrt(3).
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * std * 1.732
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// Writes the tiny llama: config, random weights, SmolLM2's tokenizer files.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-smol");
    std::fs::create_dir_all(&model).unwrap();
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/smollm2-tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(tok.join(f), model.join(f)).unwrap();
    }
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": true,
        "rope_theta": 10000.0, "torch_dtype": "float32",
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let mut seed = 7u64;
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        random(VOCAB, HIDDEN, 0.1, &mut seed),
    );
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    w.insert("model.norm.weight".into(), ones(HIDDEN));
    let s = 1.0 / (HIDDEN as f32).sqrt();
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
            ("mlp.gate_proj", INTER, HIDDEN),
            ("mlp.up_proj", INTER, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTER),
        ] {
            w.insert(format!("{p}.{name}.weight"), random(rows, cols, s, &mut seed));
        }
        w.insert(format!("{p}.input_layernorm.weight"), ones(HIDDEN));
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones(HIDDEN));
    }
    candle_core::safetensors::save(&w, model.join("model.safetensors")).unwrap();
    model
}

/// Labelled sentences whose label is set by a made-up word in them.
fn write_items(path: &Path, n: usize, seed: usize) {
    let subjects = [
        "The memo",
        "My neighbour",
        "The committee",
        "A short note",
        "The old manual",
        "The visitor",
    ];
    let verbs = [
        "mentioned",
        "repeated",
        "wrote about",
        "underlined",
        "quoted",
        "circled",
    ];
    let ends = [
        "before lunch.",
        "in the margin.",
        "twice.",
        "near the end.",
        "on Tuesday.",
        "in bold.",
    ];
    let mut text = String::new();
    for i in 0..n {
        let (label, word) = if i % 2 == 0 {
            ("alpha", "zorplin")
        } else {
            ("beta", "quibbet")
        };
        let k = i * 7 + seed * 3;
        let t = format!(
            "{} {} the word {word} {}",
            subjects[k % 6],
            verbs[(k / 6 + seed) % 6],
            ends[(k / 3 + i) % 6]
        );
        text.push_str(&format!(
            "{}\n",
            json!({"id": format!("s{seed}-{i}"), "text": t, "label": label})
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn classify(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .arg("classify")
        .args(["--labels", "alpha,beta", "--threads", "2"])
        .args(args)
        .output()
        .expect("run vicugna classify")
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn labels(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["label"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn accuracy(out: &Path) -> f64 {
    let m: Value = serde_json::from_str(&std::fs::read_to_string(out.with_extension("metrics.json")).unwrap()).unwrap();
    m["accuracy"].as_f64().unwrap()
}

#[test]
fn finetune_learns_the_labels_saves_a_reusable_adapter_and_serves_it_with_lora() {
    let dir = Scratch::new("classify-finetune", "learn");
    let model = tiny_model(&dir);
    let model = model.to_str().unwrap();
    let (train, test) = (dir.join("train.jsonl"), dir.join("test.jsonl"));
    write_items(&train, 8, 1);
    write_items(&test, 8, 2);
    let test_s = test.to_str().unwrap();

    // Before: the untrained model cannot know which made-up word means which label.
    let before = dir.join("before.jsonl");
    let o = classify(&[
        "--input",
        test_s,
        "--output",
        before.to_str().unwrap(),
        "--model",
        model,
        "--method",
        "score",
        "--calibrate",
        "none",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let acc_before = accuracy(&before);

    let out = dir.join("tuned.jsonl");
    let tuned_args = [
        "--input",
        test_s,
        "--output",
        out.to_str().unwrap(),
        "--model",
        model,
        "--finetune",
        train.to_str().unwrap(),
        // One step an epoch (8 items); a random model needs a high rate.
        "--finetune-epochs",
        "40",
        "--finetune-lr",
        "0.05",
        // Two layers: adapt both (the default adapts the last 9).
        "--finetune-layers",
        "all",
    ];
    let o = classify(&tuned_args);
    assert!(o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("fine-tuning a LoRA adapter"), "{}", show(&o));
    let acc_after = accuracy(&out);
    assert!(
        acc_after > acc_before && acc_after >= 0.75,
        "accuracy before fine-tuning {acc_before}, after {acc_after}\n{}",
        show(&o)
    );
    let lora = dir.join("tuned.lora");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "finetune.json",
    ] {
        assert!(lora.join(f).is_file(), "{} missing", lora.join(f).display());
    }
    let metrics: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tuned.metrics.json")).unwrap()).unwrap();
    assert!(metrics["model"].as_str().unwrap().contains("tuned.lora"), "{metrics}");
    let tuned_labels = labels(&out);
    assert_eq!(tuned_labels.len(), 8);

    // A rerun with the same settings reuses the adapter: no training.
    let o = classify(&tuned_args);
    assert!(o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("reusing the fine-tuned adapter"), "{}", show(&o));
    assert!(!err.contains("fine-tuning a LoRA adapter"), "{}", show(&o));
    assert_eq!(labels(&out), tuned_labels);

    // The adapter is an ordinary PEFT adapter: --lora labels alike.
    let served = dir.join("served.jsonl");
    let o = classify(&[
        "--input",
        test_s,
        "--output",
        served.to_str().unwrap(),
        "--model",
        model,
        "--lora",
        lora.to_str().unwrap(),
        "--method",
        "score",
        "--calibrate",
        "batch",
        "--prompt-style",
        "chat",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(labels(&served), tuned_labels);
}

#[test]
fn finetune_with_a_generating_method_or_shots_is_a_clear_error() {
    let dir = Scratch::new("classify-finetune", "errors");
    let train = dir.join("train.jsonl");
    write_items(&train, 4, 1);
    let t = train.to_str().unwrap();
    let out = dir.join("o.jsonl");
    for (extra, needle) in [
        (vec!["--method", "carp"], "--method score"),
        (vec!["--finetune-epochs", "0"], "--finetune-epochs"),
        (
            vec!["--finetune-layers", "0"],
            "expected a number of layers (at least 1) or all",
        ),
    ] {
        let mut args = vec!["--input", t, "--output", out.to_str().unwrap(), "--finetune", t];
        args.extend(extra);
        let o = classify(&args);
        assert!(!o.status.success(), "{}", show(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains(needle), "{}", show(&o));
    }
    // More layers than the model has: said in this command's terms.
    let model = tiny_model(&dir);
    let o = classify(&[
        "--input",
        t,
        "--output",
        out.to_str().unwrap(),
        "--finetune",
        t,
        "--model",
        model.to_str().unwrap(),
        "--finetune-layers",
        "3",
    ]);
    assert!(!o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--finetune-layers: must be between 1 and the model's 2 layers (got 3)"),
        "{}",
        show(&o)
    );
}
