//! `vicugna classify --finetune TRAIN`: trains a LoRA adapter on labelled items
//! before labelling, so a small model learns the user's labels rather than
//! guessing them zero-shot.
//!
//! Each labelled item becomes a one-turn conversation: the user turn is the
//! very prompt labelling uses (the vanilla instruction and the input), the
//! assistant turn is the label marker and the label. The trainer's loss masks
//! cover only assistant turns, so the loss falls on the label (the marker
//! before it is the same on every item and costs nothing to learn). The
//! adapter is written in PEFT format beside the output (`<output>.lora/`), with
//! `finetune.json` holding the settings and their hash: a rerun with the same
//! settings reuses the adapter, other settings retrain it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use vicugna_eval::classify::output::sidecar;
use vicugna_eval::classify::{LabelSet, Method, Prompts};
use vicugna_train::lora::LoraConfig;
use vicugna_train::optim::AdamWConfig;
use vicugna_train::trainer::{Length, Mode, Precision, Progress, TrainConfig, Trainer};

use super::{read_labelled, ClassifyArgs};

/// The settings file in the adapter directory.
const SETTINGS_FILE: &str = "finetune.json";

/// A trained (or reused) adapter and how to prompt the model it adapts.
pub(super) struct Tuned {
    /// The PEFT adapter directory.
    pub dir: PathBuf,
    /// The conversation template the adapter was trained in (None: the model's own).
    pub conv_template: Option<String>,
    /// The settings hash, kept with the labelling run's settings.
    pub hash: String,
}

/// FNV-1a, 64 bits: a hash that stays the same across builds and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Trains the adapter for `a.finetune` (or finds it trained with the same settings).
pub(super) fn prepare(a: &ClassifyArgs, train_path: &Path, labels: &LabelSet, prompts: &Prompts) -> Result<Tuned> {
    if a.api_base.is_some() {
        bail!("--finetune trains a local model; it does not work with --api-base");
    }
    if a.model.lora.is_some() {
        bail!("--finetune trains its own adapter; drop --lora (or drop --finetune to label with that adapter)");
    }
    if a.finetune_epochs.is_nan() || a.finetune_epochs <= 0.0 {
        bail!("--finetune-epochs must be above 0 (got {})", a.finetune_epochs);
    }
    if a.finetune_lr.is_nan() || a.finetune_lr <= 0.0 {
        bail!("--finetune-lr must be above 0 (got {})", a.finetune_lr);
    }
    a.model.apply_threads();
    let model = vicugna_engine::default_model::resolve_model_arg(Some(&a.model.model), &mut |m| eprintln!("{m}"))?;

    let train = read_labelled(a, train_path, labels, "a training example")?;
    if train.is_empty() {
        bail!("--finetune {}: no labelled items to train on", train_path.display());
    }

    // A base model (no chat template) is trained and prompted in FastChat's
    // `raw` template, which adds nothing around the turns: closest to the plain
    // prompts base models score best with. Labelling then uses the same template.
    let (tok, _) = vicugna_train::mask::tokenizer_and_format(&model, a.conv_template.as_deref())?;
    let conv_template = match &a.conv_template {
        Some(t) => Some(t.clone()),
        None if tok.chat_template().is_none() => Some("raw".to_string()),
        None => None,
    };

    let train_bytes = std::fs::read(train_path).with_context(|| format!("--finetune {}", train_path.display()))?;
    let settings = json!({
        "model": model.display().to_string(),
        "train": train_path.display().to_string(),
        "train_hash": format!("{:016x}", fnv1a(&train_bytes)),
        "train_items": train.len(),
        "labels": labels.names(),
        "lang": prompts.lang.code(),
        "task": prompts.task,
        "max_words": a.max_words,
        "text_field": a.text_field,
        "conv_template": conv_template,
        "epochs": a.finetune_epochs,
        "lr": a.finetune_lr,
        "lora_r": a.finetune_lora_r,
        "layers": a.finetune_layers.0,
        "seed": a.seed,
    });
    let hash = format!("{:016x}", fnv1a(settings.to_string().as_bytes()));
    let dir = sidecar(&a.output, "lora");
    let settings_path = dir.join(SETTINGS_FILE);
    let adapter = dir.join("adapter_model.safetensors");
    let old_hash = std::fs::read_to_string(&settings_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["hash"].as_str().map(str::to_string));
    let tuned = Tuned {
        dir: dir.clone(),
        conv_template: conv_template.clone(),
        hash: hash.clone(),
    };
    match &old_hash {
        Some(h) if *h == hash && adapter.exists() => {
            eprintln!(
                "reusing the fine-tuned adapter in {} (same settings, hash {hash}); delete it to train again",
                dir.display()
            );
            return Ok(tuned);
        }
        Some(h) if *h == hash => {} // interrupted with these settings: the trainer resumes.
        Some(_) => {
            eprintln!("{} was trained with other settings; training it again", dir.display());
            for f in [
                "adapter_model.safetensors",
                "adapter_config.json",
                "loss.png",
                SETTINGS_FILE,
            ] {
                let _ = std::fs::remove_file(dir.join(f));
            }
            let ck = vicugna_train::checkpoint::checkpoints_dir(&dir);
            if ck.exists() {
                std::fs::remove_dir_all(&ck).with_context(|| format!("removing {}", ck.display()))?;
            }
        }
        None => {}
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // The conversations: the labelling prompt, then the label.
    let mut data = String::new();
    for item in &train {
        let Some(g) = item.gold else { continue };
        let user = prompts.user_message(Method::Vanilla, &[], &item.text);
        let answer = format!("{}{}", prompts.label_marker(), prompts.label_choice(g));
        data.push_str(
            &json!({"id": item.id, "conversations": [
                {"from": "human", "value": user},
                {"from": "gpt", "value": answer},
            ]})
            .to_string(),
        );
        data.push('\n');
    }
    let data_path = dir.join("train.jsonl");
    vicugna_train::data::write_atomic(&data_path, data.as_bytes())?;
    vicugna_train::data::write_atomic(
        &settings_path,
        serde_json::to_string_pretty(&json!({"hash": hash, "settings": settings}))?.as_bytes(),
    )?;

    let lora = LoraConfig {
        r: a.finetune_lora_r,
        lora_alpha: 2.0 * a.finetune_lora_r as f64,
        lora_dropout: 0.05,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        layers_to_transform: None,
    }
    .validated()?;
    let cfg = TrainConfig {
        model,
        data: data_path,
        output: dir.clone(),
        mode: Mode::Lora(lora),
        precision: Precision::F32,
        length: Length::Epochs(a.finetune_epochs),
        lr: a.finetune_lr,
        warmup_ratio: 0.05,
        adam: AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        // Small micro-batches: items differ in length, and padding costs compute.
        micro_batch: 4,
        grad_accum: 2,
        max_grad_norm: 1.0,
        max_len: a.max_prompt_tokens + 64,
        packing: false,
        seed: a.seed,
        eval_ratio: 0.0,
        eval_data: None,
        eval_steps: 0,
        save_steps: 25,
        save_total_limit: 1,
        resume: true,
        gradient_checkpointing: false,
        lora_last_layers: a.finetune_layers.0,
        template: conv_template.clone(),
        system: None,
    };
    // SIGINT/SIGTERM: finish the step, checkpoint, stop; a rerun resumes.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let started = Instant::now();
    let mut trainer = Trainer::new(cfg).map_err(|e| match e {
        // The trainer's flag is this command's --finetune-layers.
        vicugna_train::error::TrainError::BadSetting {
            name: "--lora-last-layers",
            message,
        } => anyhow::anyhow!("invalid setting --finetune-layers: {message} (or --finetune-layers all)"),
        e => e.into(),
    })?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "fine-tuning {bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last_line = Instant::now();
    let summary = trainer.run(&stop, &mut |p| match p {
        Progress::Started {
            total_steps,
            start_step,
            train_samples,
            trainable_params,
            ..
        } => {
            // Said on stderr even when it is not a terminal (the bar is hidden then).
            bar.suspend(|| {
                eprintln!(
                    "fine-tuning a LoRA adapter ({trainable_params} parameters) on {train_samples} labelled items, \
                 {} epochs, steps {start_step}..{total_steps}, into {}",
                    a.finetune_epochs,
                    dir.display()
                )
            });
            bar.set_length(total_steps as u64);
            bar.set_position(start_step as u64);
            bar.reset_eta();
        }
        Progress::Step {
            step, loss, seconds, ..
        } => {
            // No terminal (a log file): a line every 10 steps, or every 30 s
            // when steps are slow, instead of the bar.
            if bar.is_hidden() && (step % 10 == 0 || last_line.elapsed().as_secs() >= 30) {
                last_line = Instant::now();
                eprintln!("fine-tuning step {step}: loss {loss:.4} ({seconds:.1} s/step)");
            }
            bar.set_message(format!("loss {loss:.4}"));
            bar.set_position(step as u64);
        }
        Progress::Eval { .. } | Progress::Checkpoint { .. } => {}
    })?;
    bar.finish_and_clear();
    if summary.stopped {
        eprintln!(
            "fine-tuning stopped at step {} by a signal; checkpoint saved in {}. Rerun the same command to resume.",
            summary.steps,
            dir.display()
        );
        std::process::exit(130);
    }
    let seconds = started.elapsed().as_secs_f64();
    // The time is kept with the settings: benchmarks report it.
    vicugna_train::data::write_atomic(
        &settings_path,
        serde_json::to_string_pretty(&json!({"hash": hash, "settings": settings, "train_seconds": seconds}))?
            .as_bytes(),
    )?;
    eprintln!(
        "fine-tuned in {:.1} s: {} steps, final loss {}; adapter and loss curve (loss.png) in {}",
        seconds,
        summary.steps,
        summary.final_train_loss.map_or("-".into(), |l| format!("{l:.4}")),
        dir.display()
    );
    Ok(tuned)
}
