//! `vicugna train`: full or LoRA fine-tuning with checkpoints, resume and a loss curve.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use vicugna_train::lora::LoraConfig;
use vicugna_train::optim::AdamWConfig;
use vicugna_train::trainer::{Length, Mode, Precision, Progress, TrainConfig, Trainer};

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    Full,
    Lora,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeArg {
    /// Continue from the newest valid checkpoint in --output, if any.
    Auto,
    /// Start from step 0 (fails if --output already holds checkpoints).
    Never,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base model: HF directory, .gguf (dequantized to f32 for training) or `default`.
    #[arg(long, default_value = "default")]
    model: String,
    /// Training conversations (ShareGPT JSON/JSONL or Alpaca records).
    #[arg(long)]
    data: PathBuf,
    /// Output directory: checkpoints, then the adapter (LoRA) or model (full), and loss.png.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "lora")]
    mode: ModeArg,
    /// Optimizer steps to take (instead of --epochs).
    #[arg(long, conflicts_with = "epochs")]
    max_steps: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<f64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Fraction of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.03)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f64,
    /// Conversations (or packed rows) per micro-batch.
    #[arg(long, default_value_t = 1)]
    micro_batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Longest token sequence; longer conversations are cut.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Pack several conversations into each row of --max-len tokens instead of padding.
    #[arg(long)]
    packing: bool,
    /// Recompute each block in the backward pass (less memory, ~1/3 more compute).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Storage of the frozen base weights (LoRA): bf16 halves their memory; arithmetic, adapters and
    /// optimizer state stay f32. Full fine-tuning is f32 only.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Hold out this fraction of the data for eval loss.
    #[arg(long, default_value_t = 0.0)]
    eval_ratio: f64,
    /// A separate eval file (instead of --eval-ratio).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Eval loss every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    eval_steps: usize,
    /// Checkpoint every N steps (0: only at the end and on SIGTERM).
    #[arg(long, default_value_t = 50)]
    save_steps: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    save_total_limit: usize,
    #[arg(long, value_enum, default_value = "auto")]
    resume: ResumeArg,
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f32,
    /// Comma-separated module names, or all-linear.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_target_modules: Vec<String>,
    /// Adapt only the last N decoder layers (PEFT's layers_to_transform). The
    /// layers below are frozen: their output is computed once per sample and
    /// kept in memory (4 bytes x hidden size per token of the data; the run says
    /// how much), so each step runs only the last N layers.
    #[arg(long, value_name = "N")]
    lora_last_layers: Option<usize>,
    /// FastChat template name (default: the model's own chat template, else one matched from the
    /// model's name; a base model with neither, such as gemma3-270m, needs one named).
    #[arg(long)]
    template: Option<String>,
    /// Replace the template's system message.
    #[arg(long)]
    system: Option<String>,
    /// CPU threads (default: all cores). Bit-identical resume needs the same count: the checkpoint records
    /// it, and resuming with another count warns and continues.
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar; one line per step.
    #[arg(long)]
    plain: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    if let Some(t) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
    }
    let model = vicugna_engine::default_model::resolve_model_arg(Some(&a.model), &mut |m| eprintln!("{m}"))?;
    let mode = match a.mode {
        ModeArg::Full => Mode::Full,
        ModeArg::Lora => Mode::Lora(
            LoraConfig {
                r: a.lora_r,
                lora_alpha: a.lora_alpha,
                lora_dropout: a.lora_dropout,
                target_modules: a.lora_target_modules.clone(),
                layers_to_transform: None,
            }
            .validated()?,
        ),
    };
    let length = match (a.max_steps, a.epochs) {
        (Some(n), _) => Length::Steps(n),
        (None, Some(e)) => Length::Epochs(e),
        (None, None) => Length::Epochs(1.0),
    };
    if a.resume == ResumeArg::Never && vicugna_train::checkpoint::checkpoints_dir(&a.output).exists() {
        bail!(
            "{} already holds checkpoints; use --resume auto or another --output",
            a.output.display()
        );
    }
    let cfg = TrainConfig {
        model,
        data: a.data,
        output: a.output,
        mode,
        precision: match a.dtype {
            DTypeArg::F32 => Precision::F32,
            DTypeArg::Bf16 => Precision::Bf16,
        },
        length,
        lr: a.lr,
        warmup_ratio: a.warmup_ratio,
        adam: AdamWConfig {
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: a.adam_eps,
            weight_decay: a.weight_decay,
        },
        micro_batch: a.micro_batch,
        grad_accum: a.grad_accum,
        max_grad_norm: a.max_grad_norm,
        max_len: a.max_len,
        packing: a.packing,
        seed: a.seed,
        eval_ratio: a.eval_ratio,
        eval_data: a.eval_data,
        eval_steps: a.eval_steps,
        save_steps: a.save_steps,
        save_total_limit: a.save_total_limit,
        resume: a.resume == ResumeArg::Auto,
        gradient_checkpointing: a.gradient_checkpointing,
        lora_last_layers: a.lora_last_layers,
        template: a.template,
        system: a.system,
    };
    // SIGTERM/SIGINT: finish the current step, checkpoint, exit.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let mut trainer = Trainer::new(cfg)?;
    let bar = ProgressBar::new(0);
    if a.plain {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let plain = a.plain;
    // The hidden bar of --plain would swallow its println.
    let say = |bar: &ProgressBar, line: String| {
        if plain {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut last_eval = None;
    let summary = trainer.run(&stop, &mut |p| match p {
        Progress::Started {
            total_steps,
            start_step,
            train_samples,
            eval_samples,
            trainable_params,
            notes,
        } => {
            for n in notes {
                if n.starts_with("warning:") {
                    say(&bar, n);
                } else {
                    say(&bar, format!("note: {n}"));
                }
            }
            say(
                &bar,
                format!(
                "training {trainable_params} parameters on {train_samples} conversations ({eval_samples} held out), \
                 steps {start_step}..{total_steps}"
                ),
            );
            bar.set_length(total_steps as u64);
            bar.set_position(start_step as u64);
            bar.reset_eta();
        }
        Progress::Step {
            step,
            loss,
            lr,
            grad_norm,
            input_tokens,
            seconds,
            ..
        } => {
            let tps = input_tokens as f64 / seconds.max(1e-9);
            let eval = last_eval.map(|l: f32| format!("  eval {l:.4}")).unwrap_or_default();
            let msg = format!("loss {loss:.4}{eval}  lr {lr:.2e}  |g| {grad_norm:.3}  {tps:.0} tok/s");
            if plain {
                eprintln!("step {step}: {msg}");
            }
            bar.set_message(msg);
            bar.set_position(step as u64);
        }
        Progress::Eval { step, loss } => {
            last_eval = Some(loss);
            say(&bar, format!("step {step}: eval loss {loss:.4}"));
        }
        Progress::Checkpoint { step, path } => {
            if plain {
                eprintln!("step {step}: checkpoint {}", path.display());
            }
        }
    })?;
    bar.finish_and_clear();
    if summary.stopped {
        eprintln!(
            "stopped at step {} by a signal; checkpoint saved. Run the same command with --resume auto to continue.",
            summary.steps
        );
        std::process::exit(143);
    }
    eprintln!(
        "done: {} steps, final train loss {}, {:.0} trained tokens/s; wrote {}",
        summary.steps,
        summary.final_train_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.tokens_per_second,
        summary.output.display()
    );
    if let Some((s, l)) = summary.eval_loss.last() {
        eprintln!("eval loss at step {s}: {l:.4}");
    }
    Ok(())
}
