//! `vicugna classify`: label a corpus with CARP (or vanilla / chain-of-thought
//! prompting) on a local model or through an OpenAI-compatible API, writing one
//! JSON line per input as it goes, resumable, with metrics when gold labels exist.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use vicugna_engine::{EngineHandle, EngineOptions};
use vicugna_eval::classify::api::{ApiBackend, ApiOptions};
use vicugna_eval::classify::demos::{self, DemoCache, DemoSelect, Workers};
use vicugna_eval::classify::local::{LocalBackend, LocalOptions};
use vicugna_eval::classify::output::{check_run_settings, rewrite_in_order, sidecar, write_atomic};
use vicugna_eval::classify::{
    classify_items, plot, read_items, Backend, ClassifyError, Demo, Fields, InputFormat, Item, LabelSet, Lang, Method,
    Metrics, Prompts, ResultsFile, RunOptions, VoteRule,
};

use crate::model_arg::ModelArgs;

#[path = "classify_direct.rs"]
mod direct;
#[path = "classify_finetune.rs"]
mod finetune;

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// Labels: a comma-separated list, or a file with one `label: description` per line.
    #[arg(long)]
    labels: String,
    /// Texts to classify: .jsonl, .csv, .tsv (header row), or one text per line.
    #[arg(long)]
    input: PathBuf,
    /// Input layout, when the file name does not tell.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// The field (JSONL key or CSV column) holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// The field holding the gold label (default: `label` when present).
    #[arg(long)]
    gold_field: Option<String>,
    /// Results, one JSON line per input; an existing file is resumed.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Use an OpenAI-compatible API at this URL (e.g. http://127.0.0.1:8000/v1) with --model NAME.
    #[arg(long)]
    api_base: Option<String>,
    /// Bearer key for --api-base (default: $OPENAI_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// --api-base: parse the label out of free text instead of asking for
    /// `{"label": one of --labels}` as a JSON schema (`response_format`), which
    /// vicugna's server enforces while decoding. A server that answers 400 to
    /// response_format is asked in free text anyway, with one warning.
    #[arg(long)]
    free_text: bool,
    /// carp (the default), cot and vanilla generate an answer; score reads each
    /// label's probability after the prompt (local model, zero-shot; see
    /// --calibrate; the default with --finetune); channel reads how likely the
    /// text is after a sentence stating each label (--channel-template; local
    /// model, zero-shot, calibrated like score): the most accurate zero-shot
    /// method on the README's held-out benchmarks (score and channel use f32
    /// activations unless --int8 on: their sums of log-probabilities are
    /// sensitive to 8-bit rounding); baseline trains character
    /// n-gram TF-IDF + logistic regression on --demos (no language model), to
    /// see whether a model earns its cost on your data.
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
    /// --method score and channel: the per-label bias subtracted before the decision.
    /// batch (the default, best on the held-out benchmarks in the README):
    /// each label's mean log-probability over all inputs of the run, kept in
    /// <output>.calibration.json so a resumed run labels alike; content-free:
    /// the labels' probabilities for `N/A`-style inputs (Zhao et al. 2021);
    /// none. Batch also measured best after --finetune (BBC, 40 items: 0.62
    /// against 0.43 uncalibrated).
    #[arg(long, value_enum)]
    calibrate: Option<CalibrateArg>,
    /// Labelled items (same layout and fields as --input) to fine-tune a LoRA
    /// adapter on before labelling: the labelling prompt as the user turn, the
    /// label as the answer, loss on the label only. The adapter (PEFT format,
    /// usable with --lora anywhere) and its loss curve go to <output>.lora/; a
    /// rerun with the same settings reuses it. Labels with --method score or vanilla.
    #[arg(long)]
    finetune: Option<PathBuf>,
    /// Passes over the --finetune items.
    #[arg(long, default_value_t = 2.0)]
    finetune_epochs: f64,
    /// Peak learning rate of --finetune (cosine schedule, 5% warmup).
    #[arg(long, default_value_t = 2e-3)]
    finetune_lr: f64,
    /// LoRA rank of --finetune (alpha is twice the rank; q_proj and v_proj adapted).
    #[arg(long, default_value_t = 8)]
    finetune_lora_r: usize,
    /// Layers --finetune adapts: the last N, or all. The layers below run once
    /// per item, not in every step: a step of 8 BBC items on the default model
    /// took 5.5 s with its last 6 layers of 30, 8.7 s with 9, 27-33 s with all.
    /// Measured with 400 items, 2 epochs, 2 cores: BBC (default model) 0.91
    /// with 6 layers, 0.90 with 9; Chinese reviews (Gemma 3 270M, 18 layers)
    /// 0.82 with 6, 0.87 with 9; 13-16 minutes of training each.
    #[arg(long, value_name = "N|all", default_value = "9")]
    finetune_layers: FinetuneLayers,
    /// --method score: prompt as a chat turn (instruction-tuned models) or as
    /// plain text (base models); auto picks plain for a model without a chat
    /// template or whose file name names no instruction/chat tuning.
    #[arg(long, value_enum, default_value = "auto")]
    prompt_style: PromptStyleArg,
    /// --method channel: the sentence stating a label, placed before the text;
    /// `{label}` is the label's name, `{description}` its description from the
    /// --labels file. Default: "<Task> is {label}." from --task (Chinese:
    /// "<task>是{label}。"), e.g. "The topic of a news article is {label}.".
    #[arg(long)]
    channel_template: Option<String>,
    /// Prompt language; auto detects Chinese from the inputs.
    #[arg(long, value_enum, default_value = "auto")]
    lang: LangArg,
    /// What is decided, e.g. "the overall sentiment of a product review".
    #[arg(long)]
    task: Option<String>,
    /// Demonstrations per prompt (few-shot); needs --demos.
    #[arg(long, default_value_t = 0)]
    shots: usize,
    /// Labelled examples to draw demonstrations from (same layout as --input).
    #[arg(long)]
    demos: Option<PathBuf>,
    /// How demonstrations are chosen.
    #[arg(long, value_enum, default_value = "knn")]
    demo_select: DemoSelectArg,
    /// Where the demonstrations' generated clues and reasoning are cached (default: <output>.demos.jsonl).
    #[arg(long)]
    demo_cache: Option<PathBuf>,
    /// Answers per input; more than one samples at --temperature and votes.
    #[arg(long, default_value_t = 1)]
    votes: usize,
    /// Which vote decides the label.
    #[arg(long, value_enum, default_value = "weighted")]
    vote: VoteArg,
    /// Sampling temperature of votes.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Inputs in flight at once (the engine batches their requests).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Texts are clipped to this many words (characters for Chinese).
    #[arg(long, default_value_t = 200)]
    max_words: usize,
    /// Demonstrations are dropped (least similar first) until the prompt fits.
    #[arg(long, default_value_t = 1536)]
    max_prompt_tokens: usize,
    /// Tokens for the clues and for the reasoning.
    #[arg(long, default_value_t = 48)]
    clue_tokens: usize,
    #[arg(long, default_value_t = 96)]
    reasoning_tokens: usize,
    /// Classify only the first N inputs.
    #[arg(long)]
    limit: Option<usize>,
    /// A FastChat conversation template instead of the model's own chat template.
    #[arg(long)]
    conv_template: Option<String>,
    /// Turn off the engine's prefix KV-cache reuse (for comparison).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Memory for finished requests' KV caches kept for prefix reuse, in MiB.
    #[arg(long, default_value_t = 512)]
    prefix_cache_mib: usize,
    /// Also write a JSON summary (items/s, token counts, metrics) here.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// The settings hash of the --finetune adapter in use, kept with the run's settings.
    #[arg(skip)]
    finetune_hash: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Jsonl,
    Csv,
    Tsv,
    Lines,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MethodArg {
    Vanilla,
    Cot,
    Carp,
    Score,
    Channel,
    Baseline,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CalibrateArg {
    None,
    Batch,
    ContentFree,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum PromptStyleArg {
    Auto,
    Chat,
    Plain,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LangArg {
    Auto,
    En,
    Zh,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DemoSelectArg {
    Random,
    Knn,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum VoteArg {
    Majority,
    Weighted,
}

fn input_format(path: &std::path::Path, f: Option<FormatArg>) -> InputFormat {
    match f {
        Some(FormatArg::Jsonl) => InputFormat::Jsonl,
        Some(FormatArg::Csv) => InputFormat::Csv,
        Some(FormatArg::Tsv) => InputFormat::Tsv,
        Some(FormatArg::Lines) => InputFormat::Lines,
        None => InputFormat::from_path(path),
    }
}

/// Labelled items from `path` (demonstrations, training examples), read with
/// the run's fields and format; each must have a gold label (`what` names the
/// item in the error: "a demonstration", "a training example").
fn read_labelled(a: &ClassifyArgs, path: &std::path::Path, labels: &LabelSet, what: &str) -> Result<Vec<Item>> {
    let fields = Fields {
        text: a.text_field.clone(),
        gold: a.gold_field.clone(),
    };
    let items = read_items(path, input_format(path, a.format), &fields, labels)?;
    if let Some(bad) = items.iter().find(|i| i.gold.is_none()) {
        return Err(ClassifyError::input(path, bad.line, format!("{what} needs a gold label")).into());
    }
    Ok(items)
}

impl ClassifyArgs {
    /// The method: as given, else score with --finetune, else carp.
    fn method(&self) -> MethodArg {
        self.method.unwrap_or(if self.finetune.is_some() {
            MethodArg::Score
        } else {
            MethodArg::Carp
        })
    }

    /// The calibration: as given, else batch (best measured, with --finetune too).
    fn calibrate(&self) -> CalibrateArg {
        self.calibrate.unwrap_or(CalibrateArg::Batch)
    }
}

pub fn run(mut a: ClassifyArgs) -> Result<()> {
    if a.votes == 0 || a.concurrency == 0 {
        bail!("--votes and --concurrency must be at least 1");
    }
    if a.shots > 0 && a.demos.is_none() {
        bail!(
            "--shots {} needs --demos FILE (labelled examples to draw demonstrations from)",
            a.shots
        );
    }
    let labels = LabelSet::from_arg(&a.labels)?;
    let fields = Fields {
        text: a.text_field.clone(),
        gold: a.gold_field.clone(),
    };
    let mut items = read_items(&a.input, input_format(&a.input, a.format), &fields, &labels)?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    if matches!(a.method(), MethodArg::Score | MethodArg::Channel) && a.shots > 0 {
        bail!(
            "--method score and channel are zero-shot: drop --shots (or use --method carp or vanilla for \
             few-shot prompts)"
        );
    }
    if matches!(a.method(), MethodArg::Score | MethodArg::Channel | MethodArg::Baseline) && a.votes > 1 {
        bail!("--votes applies to generated answers; --method score, channel and baseline decide once per input");
    }
    if a.channel_template.is_some() && !matches!(a.method(), MethodArg::Channel) {
        bail!("--channel-template is for --method channel");
    }
    let pool: Vec<Item> = match (&a.demos, a.shots) {
        (Some(path), k) if k > 0 => read_labelled(&a, path, &labels, "a demonstration")?,
        _ => Vec::new(),
    };
    let lang = match a.lang {
        LangArg::En => Lang::En,
        LangArg::Zh => Lang::Zh,
        LangArg::Auto => Lang::detect(items.iter().take(100).map(|i| i.text.as_str())),
    };
    // The default model (SmolLM2) cannot read Chinese: Chinese work gets Gemma 3 270M.
    if lang == Lang::Zh
        && a.model.model == "default"
        && a.api_base.is_none()
        && !matches!(a.method(), MethodArg::Baseline)
    {
        eprintln!(
            "note: Chinese prompts: using gemma3-270m (Gemma 3 270M, multilingual) instead of the default \
             English model; --model chooses another"
        );
        a.model.model = "gemma3-270m".into();
    }
    if let Some(train) = a.finetune.clone() {
        if !matches!(a.method(), MethodArg::Score | MethodArg::Vanilla) {
            bail!(
                "--finetune trains the model to answer the labelling prompt with the label; label with \
                 --method score (the default with --finetune) or vanilla"
            );
        }
        if a.shots > 0 {
            bail!("--finetune labels zero-shot (the examples are learned, not shown): drop --shots");
        }
        let prompts = Prompts::new(labels.clone(), lang, a.task.clone(), a.max_words);
        let tuned = finetune::prepare(&a, &train, &labels, &prompts)?;
        a.model.lora = Some(tuned.dir);
        a.conv_template = tuned.conv_template;
        // Labelling prompts in the format the adapter was trained in.
        a.prompt_style = PromptStyleArg::Chat;
        a.finetune_hash = Some(tuned.hash);
    }
    let method = match a.method() {
        MethodArg::Vanilla => Method::Vanilla,
        MethodArg::Cot => Method::Cot,
        MethodArg::Carp => Method::Carp,
        MethodArg::Score | MethodArg::Channel | MethodArg::Baseline => return direct::run(&a, &labels, &items, lang),
    };
    let prompts = Prompts::new(labels.clone(), lang, a.task.clone(), a.max_words);

    // Resume: skip inputs already in the results file.
    let (out, done) = ResultsFile::open(&a.output)?;
    let done_ids: HashSet<&str> = done.iter().map(|r| r.id.as_str()).collect();
    let todo: Vec<Item> = items
        .iter()
        .filter(|i| !done_ids.contains(i.id.as_str()))
        .cloned()
        .collect();
    let backend: Box<dyn Backend> = match &a.api_base {
        Some(base) => {
            let key = a.api_key.clone().or_else(|| std::env::var("OPENAI_API_KEY").ok());
            let opts = ApiOptions {
                temperature: a.temperature,
                schema: !a.free_text,
                ..ApiOptions::default()
            };
            let mut backend = ApiBackend::new(base, &a.model.model, key, opts)?;
            // No --model: the server's model, when it serves exactly one (its
            // name is the file's, e.g. SmolLM2-135M-Instruct.Q4_1, hard to guess).
            if a.model.model == "default" {
                backend.use_only_served_model()?;
            }
            Box::new(backend)
        }
        None => {
            let loaded = a.model.load()?;
            let engine = EngineHandle::start(
                loaded,
                EngineOptions {
                    prefix_cache: !a.no_prefix_cache,
                    prefix_cache_bytes: a.prefix_cache_mib << 20,
                    ..EngineOptions::default()
                },
            );
            let opts = LocalOptions {
                temperature: a.temperature,
                clue_tokens: a.clue_tokens,
                reasoning_tokens: a.reasoning_tokens,
                ..LocalOptions::default()
            };
            Box::new(LocalBackend::new(engine, a.conv_template.as_deref(), opts)?)
        }
    };
    let settings = json!({
        "method": method.name(),
        "labels": labels.names(),
        "lang": lang.code(),
        "model": backend.model_id(),
        "shots": a.shots,
        "demo_select": format!("{:?}", a.demo_select).to_lowercase(),
        "votes": a.votes,
        "vote": format!("{:?}", a.vote).to_lowercase(),
        "task": prompts.task,
    });
    let mut settings = settings;
    if let Some(h) = &a.finetune_hash {
        settings["finetune"] = json!(h);
    }
    check_run_settings(&a.output, &settings, !done.is_empty())?;
    eprintln!(
        "{} inputs ({} already in {}), method {}, {} labels, prompts in {}, model {}",
        items.len(),
        items.len() - todo.len(),
        a.output.display(),
        method.name(),
        labels.len(),
        lang.code(),
        backend.model_id()
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // First Ctrl-C: finish the lines being written and stop; second: leave at once.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping (Ctrl-C again to quit at once); rerun the same command to resume");
        });
    }

    // Demonstrations for the inputs still to do.
    let mut per_item: Vec<Vec<Demo>> = vec![Vec::new(); todo.len()];
    if a.shots > 0 && !todo.is_empty() {
        let phase_bar = ProgressBar::new(0);
        phase_bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let progress = |name: &str, n: usize, total: usize| {
            phase_bar.set_message(name.to_string());
            phase_bar.set_length(total as u64);
            phase_bar.set_position(n as u64);
        };
        let select = match a.demo_select {
            DemoSelectArg::Random => DemoSelect::Random,
            DemoSelectArg::Knn => DemoSelect::Knn,
        };
        let workers = Workers {
            threads: a.concurrency,
            stop: &stop,
            progress: &progress,
        };
        let chosen =
            demos::choose(backend.as_ref(), &pool, &todo, a.shots, select, a.seed, &workers).map_err(interrupted)?;
        let mut needed: Vec<usize> = chosen.iter().flatten().copied().collect();
        needed.sort_unstable();
        needed.dedup();
        let cache_path = a
            .demo_cache
            .clone()
            .unwrap_or_else(|| sidecar(&a.output, "demos.jsonl"));
        let cache = DemoCache::open(&cache_path)?;
        let explained: HashMap<usize, Demo> =
            demos::explain(backend.as_ref(), &prompts, &pool, &needed, &cache, &workers).map_err(interrupted)?;
        phase_bar.finish_and_clear();
        for (slot, idx) in per_item.iter_mut().zip(&chosen) {
            *slot = idx.iter().map(|d| explained[d].clone()).collect();
        }
    }

    let bar = ProgressBar::new(items.len() as u64).with_position((items.len() - todo.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} [{elapsed_precise}] {per_sec} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.reset_eta();
    let opts = RunOptions {
        method,
        votes: a.votes,
        rule: match a.vote {
            VoteArg::Majority => VoteRule::Majority,
            VoteArg::Weighted => VoteRule::Weighted,
        },
        threads: a.concurrency,
        seed: a.seed,
        max_prompt_tokens: a.max_prompt_tokens,
    };
    let work: Vec<(Item, Vec<Demo>)> = todo.into_iter().zip(per_item).collect();
    let on_record = |r: &vicugna_eval::classify::Record| {
        bar.set_message(r.label.clone().unwrap_or_else(|| "(unparsed)".into()));
        bar.inc(1);
    };
    let summary = classify_items(backend.as_ref(), &prompts, &opts, &work, &out, &stop, &on_record);
    bar.finish_and_clear();
    let summary = summary.map_err(interrupted)?;
    // Records were appended as they finished; the finished file reads in input order.
    drop(out);
    let order: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    rewrite_in_order(&a.output, &order)?;
    let s = summary.stats;
    eprintln!(
        "classified {} inputs in {:.1} s: {:.3} items/s; prompt tokens {} (KV reused {}), generated {}, \
         parse failures {} (inputs left without a label)",
        summary.classified,
        summary.seconds,
        summary.items_per_s(),
        s.prompt_tokens,
        s.reused_tokens,
        s.completion_tokens,
        s.parse_failures
    );

    report(&a, &labels, method.name(), lang, &summary, &backend.model_id())
}

/// Prints and writes the metrics over every record in the results file (old and
/// new), the confusion matrix and the --summary-json.
pub(crate) fn report(
    a: &ClassifyArgs,
    labels: &LabelSet,
    method: &str,
    lang: Lang,
    summary: &vicugna_eval::classify::RunSummary,
    model: &str,
) -> Result<()> {
    let s = summary.stats;
    // Metrics over every record in the results file, old and new.
    let (_, all) = ResultsFile::open(&a.output)?;
    let names: Vec<String> = labels.names().iter().map(|s| s.to_string()).collect();
    let pairs: Vec<(usize, Option<usize>)> = all
        .iter()
        .filter_map(|r| {
            let g = labels.index(r.gold.as_deref()?)?;
            Some((g, r.label.as_deref().and_then(|l| labels.index(l))))
        })
        .collect();
    let mut summary_json = json!({
        "method": method,
        "model": model,
        "lang": lang.code(),
        "items": summary.classified,
        "seconds": summary.seconds,
        "items_per_s": summary.items_per_s(),
        "prompt_tokens": s.prompt_tokens,
        "reused_tokens": s.reused_tokens,
        "completion_tokens": s.completion_tokens,
        "parse_failures": s.parse_failures,
        "records": all.len(),
    });
    if !pairs.is_empty() {
        let m = Metrics::compute(&names, &pairs);
        println!("{}", m.table());
        let metrics_path = sidecar(&a.output, "metrics.json");
        // Which model and method made these labels, beside the numbers.
        let mut mj = serde_json::to_value(&m)?;
        if let Some(o) = mj.as_object_mut() {
            o.insert("model".into(), json!(model));
            o.insert("method".into(), json!(method));
        }
        write_atomic(&metrics_path, serde_json::to_string_pretty(&mj)?.as_bytes())?;
        let png = sidecar(&a.output, "confusion.png");
        let title = format!(
            "{} — {}",
            method,
            a.input.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
        );
        match plot::confusion_png(&m, &title, &png) {
            Ok(()) => eprintln!(
                "metrics: {}, confusion matrix: {}",
                metrics_path.display(),
                png.display()
            ),
            Err(e) => eprintln!("warning: {e}"),
        }
        summary_json["metrics"] = serde_json::to_value(&m)?;
    }
    if let Some(p) = &a.summary_json {
        write_atomic(p, serde_json::to_string_pretty(&summary_json)?.as_bytes())
            .with_context(|| format!("--summary-json {}", p.display()))?;
    }
    Ok(())
}

/// An interrupted run exits with 130 after saying how to resume.
fn interrupted(e: ClassifyError) -> anyhow::Error {
    if matches!(e, ClassifyError::Interrupted) {
        eprintln!("interrupted; the results so far are saved, rerun the same command to resume");
        std::process::exit(130);
    }
    e.into()
}

/// `--finetune-layers`: the last N layers, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FinetuneLayers(pub Option<usize>);

impl std::str::FromStr for FinetuneLayers {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "all" {
            return Ok(FinetuneLayers(None));
        }
        match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(FinetuneLayers(Some(n))),
            _ => Err(format!("expected a number of layers (at least 1) or all, got {s:?}")),
        }
    }
}
