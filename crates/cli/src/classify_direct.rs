//! `--method score`, `channel` and `baseline`: decisions read from label
//! probabilities (of a local model, or of a classical classifier) rather than
//! generated. Both write the same results file, metrics and summary as the
//! generating methods, in input order.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use vicugna_engine::{EngineHandle, EngineOptions};
use vicugna_eval::classify::baseline::{Baseline, BaselineOptions};
use vicugna_eval::classify::local::{LocalBackend, LocalOptions};
use vicugna_eval::classify::output::{check_run_settings, sidecar};
use vicugna_eval::classify::parallel::par_map;
use vicugna_eval::classify::score::{self, Calibration, CalibrationFile, ScoreLine, ScoresFile, CONTENT_FREE_INPUTS};
use vicugna_eval::classify::{Backend, ClassifyError, Item, LabelSet, Lang, Prompts, Record, ResultsFile, RunSummary};

use super::{interrupted, read_labelled, report, CalibrateArg, ClassifyArgs, MethodArg, PromptStyleArg};
use crate::model_arg::Int8Arg;

/// Runs `--method score` or `--method baseline` over `items`.
pub(super) fn run(a: &ClassifyArgs, labels: &LabelSet, items: &[Item], lang: Lang) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping (Ctrl-C again to quit at once); rerun the same command to resume");
        });
    }
    match a.method() {
        MethodArg::Baseline => run_baseline(a, labels, items, lang),
        _ => run_score(a, labels, items, lang, &stop),
    }
}

fn record(item: &Item, names: &[String], label: usize, probs: &[f64], scores: Option<&[f64]>) -> Record {
    let map = |v: &[f64]| names.iter().cloned().zip(v.iter().copied()).collect::<BTreeMap<_, _>>();
    Record {
        id: item.id.clone(),
        text: item.text.clone(),
        label: Some(names[label].clone()),
        probs: map(probs),
        clues: String::new(),
        reasoning: String::new(),
        votes: Vec::new(),
        majority: Some(names[label].clone()),
        weighted: Some(names[label].clone()),
        gold: item.gold.map(|g| names[g].clone()),
        parse_failures: 0,
        demos: Vec::new(),
        scores: scores.map(map).unwrap_or_default(),
    }
}

fn bar(len: usize, done: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64).with_position(done as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} [{elapsed_precise}] {per_sec} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.reset_eta();
    bar
}

fn run_score(a: &ClassifyArgs, labels: &LabelSet, items: &[Item], lang: Lang, stop: &AtomicBool) -> Result<()> {
    let channel = matches!(a.method(), MethodArg::Channel);
    let method = if channel { "channel" } else { "score" };
    if a.api_base.is_some() {
        bail!(
            "--method {method} reads log-probabilities from a local model and does not work with --api-base; \
             use --method carp or vanilla through an API"
        );
    }
    let calibrate = match a.calibrate() {
        CalibrateArg::None => Calibration::None,
        CalibrateArg::Batch => Calibration::Batch,
        CalibrateArg::ContentFree => Calibration::ContentFree,
    };
    let names: Vec<String> = labels.names().iter().map(|s| s.to_string()).collect();
    let prompts = Prompts::new(labels.clone(), lang, a.task.clone(), a.max_words);
    let template = a
        .channel_template
        .clone()
        .unwrap_or_else(|| prompts.default_channel_template());
    if channel && !template.contains("{label}") && !template.contains("{description}") {
        bail!(
            "--channel-template {template:?} names no label: put {{label}} (or {{description}}) where the label goes, \
             e.g. \"This review is {{label}}.\""
        );
    }
    let statements: Vec<String> = (0..labels.len())
        .map(|i| prompts.channel_statement(&template, i))
        .collect();
    if channel {
        if let Some(i) = (1..statements.len()).find(|&i| statements[..i].contains(&statements[i])) {
            bail!(
                "--channel-template {template:?} gives label {:?} the same statement as another label: {:?}",
                labels.labels[i].name,
                statements[i]
            );
        }
    }
    let score_labels = |backend: &LocalBackend, text: &str| {
        if channel {
            backend.channel_labels(&prompts, &statements, text)
        } else {
            backend.score_labels(&prompts, text)
        }
    };
    let (out, done) = ResultsFile::open(&a.output)?;
    let scores_path = sidecar(&a.output, "scores.jsonl");
    let (scores_file, mut scored) = ScoresFile::open(&scores_path, labels.len())?;

    // A label's score sums log-probabilities over many tokens (the whole text,
    // for channel), where 8-bit activations' rounding adds up: on Gemma 3
    // 270M's K-quants it moved channel margins by 0.7 nats (median) from the
    // exact product, as much as many margins themselves. `--int8 auto` keeps
    // f32 activations here; `--int8 on` still asks for them.
    let mut model_args = a.model.clone();
    if model_args.int8 == Int8Arg::Auto {
        model_args.int8 = Int8Arg::Off;
    }
    let loaded = model_args.load()?;
    let engine = EngineHandle::start(
        loaded,
        EngineOptions {
            prefix_cache: !a.no_prefix_cache,
            prefix_cache_bytes: a.prefix_cache_mib << 20,
            ..EngineOptions::default()
        },
    );
    let mut backend = LocalBackend::new(engine.clone(), a.conv_template.as_deref(), LocalOptions::default())?;
    let plain = match a.prompt_style {
        PromptStyleArg::Plain => true,
        PromptStyleArg::Chat => false,
        PromptStyleArg::Auto => backend.looks_like_base_model(),
    };
    if plain {
        backend = LocalBackend::new(
            engine,
            a.conv_template.as_deref(),
            LocalOptions {
                plain_prompt: true,
                ..LocalOptions::default()
            },
        )?;
    }
    // The channel reads the text's own likelihood: always plain text.
    let style = if plain || channel { "plain" } else { "chat" };
    let mut settings = json!({
        "method": method,
        "calibrate": calibrate.name(),
        "prompt_style": style,
        "labels": labels.names(),
        "lang": lang.code(),
        "model": backend.model_id(),
        "task": prompts.task,
        "max_words": a.max_words,
    });
    if channel {
        settings["channel_template"] = json!(template);
    }
    if let Some(h) = &a.finetune_hash {
        settings["finetune"] = json!(h);
    }
    check_run_settings(&a.output, &settings, !done.is_empty() || !scored.is_empty())?;
    let done_ids: HashSet<&str> = done.iter().map(|r| r.id.as_str()).collect();
    let todo: Vec<&Item> = items
        .iter()
        .filter(|i| !done_ids.contains(i.id.as_str()) && !scored.contains_key(&i.id))
        .collect();
    eprintln!(
        "{} inputs ({} already labelled, {} already scored), method {method}, calibration {}, {} labels, \
         prompts in {} ({style}), model {}",
        items.len(),
        done_ids.len(),
        items.len() - done_ids.len() - todo.len(),
        calibrate.name(),
        labels.len(),
        lang.code(),
        backend.model_id()
    );
    if channel {
        eprintln!("label statements before each text: {template:?}");
    }

    let start = Instant::now();
    let before = backend.stats();
    let pb = bar(items.len(), items.len() - todo.len());
    let result = par_map(a.concurrency, &todo, stop, |_, item| {
        let logprobs = score_labels(&backend, &item.text)?;
        scores_file.append(&ScoreLine {
            id: item.id.clone(),
            logprobs: logprobs.clone(),
        })?;
        pb.inc(1);
        Ok(logprobs)
    });
    pb.finish_and_clear();
    let fresh = result.map_err(interrupted)?;
    for (item, lp) in todo.iter().zip(fresh) {
        scored.insert(item.id.clone(), lp);
    }

    // The bias: stored with the run, else computed now and stored.
    let cal_path = sidecar(&a.output, "calibration.json");
    let cal = match CalibrationFile::load(&cal_path, calibrate, &names) {
        Some(c) => {
            eprintln!(
                "calibration {} from {} ({} inputs)",
                calibrate.name(),
                cal_path.display(),
                c.inputs
            );
            c
        }
        None => {
            let (bias, inputs) = match calibrate {
                Calibration::None => (vec![0.0; names.len()], 0),
                Calibration::Batch => score::batch_bias(items.iter().filter_map(|i| scored.get(&i.id)), names.len()),
                Calibration::ContentFree => {
                    let cf: Vec<Vec<f64>> = CONTENT_FREE_INPUTS
                        .iter()
                        .map(|t| score_labels(&backend, t))
                        .collect::<std::result::Result<_, _>>()?;
                    (score::content_free_bias(&cf, names.len()), cf.len())
                }
            };
            let c = CalibrationFile {
                calibrate,
                labels: names.clone(),
                bias,
                inputs,
            };
            c.save(&cal_path)?;
            c
        }
    };

    let mut labelled = 0;
    for item in items.iter().filter(|i| !done_ids.contains(i.id.as_str())) {
        let lp = scored.get(&item.id).ok_or_else(|| {
            ClassifyError::Setting(format!(
                "input {:?} has no score (interrupted?); rerun to resume",
                item.id
            ))
        })?;
        let (label, probs) = score::decide(lp, &cal.bias);
        out.append(&record(item, &names, label, &probs, Some(lp)))?;
        labelled += 1;
    }
    let after = backend.stats();
    let summary = RunSummary {
        classified: labelled,
        seconds: start.elapsed().as_secs_f64(),
        stats: vicugna_eval::classify::BackendStats {
            prompt_tokens: after.prompt_tokens - before.prompt_tokens,
            completion_tokens: after.completion_tokens - before.completion_tokens,
            reused_tokens: after.reused_tokens - before.reused_tokens,
            parse_failures: 0,
        },
    };
    eprintln!(
        "scored {} inputs in {:.1} s: {:.3} items/s; prompt tokens {} (KV reused {}); calibration {} in {}",
        todo.len(),
        summary.seconds,
        if summary.seconds > 0.0 {
            todo.len() as f64 / summary.seconds
        } else {
            0.0
        },
        summary.stats.prompt_tokens,
        summary.stats.reused_tokens,
        calibrate.name(),
        cal_path.display()
    );
    report(a, labels, method, lang, &summary, &backend.model_id())
}

fn run_baseline(a: &ClassifyArgs, labels: &LabelSet, items: &[Item], lang: Lang) -> Result<()> {
    let Some(train_path) = &a.demos else {
        bail!("--method baseline trains on labelled examples: give them with --demos FILE (same layout as --input)");
    };
    if a.api_base.is_some() {
        bail!("--method baseline uses no language model; drop --api-base");
    }
    let train = read_labelled(a, train_path, labels, "a training example")?;
    let examples: Vec<(String, usize)> = train.iter().filter_map(|i| Some((i.text.clone(), i.gold?))).collect();
    let (out, done) = ResultsFile::open(&a.output)?;
    let settings = json!({
        "method": "baseline",
        "labels": labels.names(),
        "lang": lang.code(),
        "model": "char n-gram TF-IDF + logistic regression",
        "train": train_path.display().to_string(),
        "train_items": examples.len(),
    });
    check_run_settings(&a.output, &settings, !done.is_empty())?;
    let done_ids: HashSet<&str> = done.iter().map(|r| r.id.as_str()).collect();
    let todo: Vec<&Item> = items.iter().filter(|i| !done_ids.contains(i.id.as_str())).collect();
    let start = Instant::now();
    let model = Baseline::train(&examples, labels.len(), BaselineOptions::for_lang(lang == Lang::Zh))?;
    let trained = start.elapsed().as_secs_f64();
    let names: Vec<String> = labels.names().iter().map(|s| s.to_string()).collect();
    let texts: Vec<&str> = todo.iter().map(|i| i.text.as_str()).collect();
    let probs = model.predict(&texts);
    for (item, p) in todo.iter().zip(&probs) {
        let (label, _) = score::decide(
            &p.iter().map(|v| v.max(1e-300).ln()).collect::<Vec<_>>(),
            &vec![0.0; p.len()],
        );
        out.append(&record(item, &names, label, p, None))?;
    }
    let summary = RunSummary {
        classified: todo.len(),
        seconds: start.elapsed().as_secs_f64(),
        stats: Default::default(),
    };
    eprintln!(
        "baseline trained on {} examples in {:.2} s, labelled {} inputs in {:.2} s in all ({:.1} items/s)",
        examples.len(),
        trained,
        todo.len(),
        summary.seconds,
        summary.items_per_s()
    );
    report(
        a,
        labels,
        "baseline",
        lang,
        &summary,
        "char n-gram TF-IDF + logistic regression",
    )
}
