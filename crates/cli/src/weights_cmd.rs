//! `vicugna delta apply|make`, `vicugna lora merge`, `vicugna convert`: whole-checkpoint
//! jobs of the weights crate, with progress bars in bytes/s.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use vicugna_weights::delta::{self, JobOptions, JobReport};
use vicugna_weights::{parse_size, Float, Progress};

/// FastChat's flag names (`--base-model-path`, `--delta-path`, `--target-model-path`)
/// are accepted too.
#[derive(Subcommand, Debug)]
pub enum DeltaCommand {
    /// Rebuild released weights: target = base + delta (FastChat's apply_delta).
    Apply {
        /// Base model directory (HF layout, safetensors).
        #[arg(long, alias = "base-model-path")]
        base: PathBuf,
        /// Delta directory (HF layout); its config and tokenizer files are copied.
        #[arg(long, alias = "delta-path")]
        delta: PathBuf,
        /// Output directory (must not exist).
        #[arg(long, alias = "target-model-path")]
        target: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Make a delta: delta = target - base (FastChat's make_delta).
    Make {
        /// Base model directory.
        #[arg(long, alias = "base-model-path")]
        base: PathBuf,
        /// Fine-tuned model directory; its config and tokenizer files are copied.
        #[arg(long, alias = "target-model-path")]
        target: PathBuf,
        /// Output directory for the delta (must not exist).
        #[arg(long, alias = "delta-path")]
        delta: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Output options shared by the checkpoint writers.
#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Output dtype: f32, f16 or bf16 (default: keep the input's).
    #[arg(long)]
    dtype: Option<String>,
    /// Largest output shard, e.g. 5GB, 500MB, 2GiB.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Re-read the output and check every tensor's checksum before it is put in place.
    #[arg(long)]
    verify: bool,
}

impl OutputArgs {
    fn options(&self) -> Result<JobOptions> {
        let dtype = match &self.dtype {
            None => None,
            Some(s) => Some(Float::parse(s).ok_or_else(|| anyhow!("--dtype {s:?}: expected f32, f16 or bf16"))?),
        };
        let max_shard_bytes = parse_size(&self.max_shard_size).ok_or_else(|| {
            anyhow!(
                "--max-shard-size {:?}: expected a size like 5GB, 500MB or 2GiB",
                self.max_shard_size
            )
        })?;
        Ok(JobOptions {
            dtype,
            max_shard_bytes,
            verify: self.verify,
        })
    }
}

/// Progress on stderr; indicatif hides the bar when stderr is not a terminal.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    pub fn new() -> Self {
        Bar { bar: Mutex::new(None) }
    }
}

impl Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("a valid template"),
        );
        bar.set_message(phase.to_string());
        *self.bar.lock().unwrap() = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = self.bar.lock().unwrap().as_ref() {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}

/// Peak resident memory of this process in bytes (VmHWM).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

fn report(what: &str, out: &std::path::Path, r: &JobReport, started: Instant) {
    eprintln!(
        "{what}: wrote {} tensors, {:.1} MB in {} shard(s) to {} in {:.1}s, peak RSS {:.0} MB{}",
        r.tensors,
        r.bytes as f64 / 1e6,
        r.shards,
        out.display(),
        started.elapsed().as_secs_f64(),
        peak_rss_bytes() as f64 / 1e6,
        if r.verified {
            "; every tensor's checksum verified on disk"
        } else {
            ""
        }
    );
}

pub fn run_delta(cmd: DeltaCommand) -> Result<()> {
    let started = Instant::now();
    let bar = Bar::new();
    match cmd {
        DeltaCommand::Apply {
            base,
            delta,
            target,
            out,
        } => {
            let r = delta::apply(&base, &delta, &target, &out.options()?, &bar)?;
            report("delta apply", &target, &r, started);
        }
        DeltaCommand::Make {
            base,
            target,
            delta,
            out,
        } => {
            let r = delta::make(&base, &target, &delta, &out.options()?, &bar)?;
            report("delta make", &delta, &r, started);
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Merge a PEFT LoRA adapter into its base model (peft's merge_and_unload).
    Merge {
        /// Base model directory (HF layout, safetensors).
        #[arg(long)]
        base: PathBuf,
        /// Adapter directory: adapter_config.json + adapter_model.safetensors.
        #[arg(long)]
        lora: PathBuf,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
}

pub fn run_lora(cmd: LoraCommand) -> Result<()> {
    let started = Instant::now();
    let LoraCommand::Merge {
        base,
        lora,
        out,
        output,
    } = cmd;
    let r = vicugna_weights::lora::merge(&base, &lora, &out, &output.options()?, &Bar::new())?;
    report("lora merge", &out, &r, started);
    Ok(())
}

/// Convert between HF safetensors and GGUF, change dtype, quantize.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long)]
    input: PathBuf,
    /// An output directory (HF safetensors) or a file ending in .gguf (must not exist).
    #[arg(long)]
    output: PathBuf,
    /// Quantize a GGUF output: q8_0, q4_0, q4_k, or q4_k_m (llama.cpp's recipe: Q4_K with Q6_K for the output matrix and some attn_v / ffn_down); norms stay f32.
    #[arg(long)]
    quant: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
}

pub fn run_convert(a: ConvertArgs) -> Result<()> {
    use vicugna_weights::convert::{convert, ConvertOptions, Quant};
    let started = Instant::now();
    let quant = match &a.quant {
        None => None,
        Some(s) => Some(Quant::parse(s).ok_or_else(|| anyhow!("--quant {s:?}: expected q8_0, q4_0, q4_k or q4_k_m"))?),
    };
    let opts = ConvertOptions {
        job: a.out.options()?,
        quant,
    };
    let r = convert(&a.input, &a.output, &opts, &Bar::new())?;
    report("convert", &a.output, &r, started);
    Ok(())
}
