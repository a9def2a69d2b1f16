//! `vicugna bench`: load time, prefill and decode speed, peak memory — the numbers
//! `bench/vs-llamacpp.sh` compares against llama.cpp.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use vicugna_engine::{EngineHandle, EngineOptions, Event, GenerateRequest, KvDType, Prompt};

use crate::model_arg::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per sequence (EOS ignored).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Measure the JSON-schema constraint instead: decode speed of one sequence
    /// with and without a 20-property schema in the same run (alternating,
    /// 3 runs each), the schema's compile time and the first step's cost.
    #[arg(long)]
    json_schema: bool,
}

/// The benchmark schema: 20 properties of every supported scalar kind.
fn bench_schema() -> serde_json::Value {
    let mut props = serde_json::Map::new();
    for i in 0..20 {
        let p = match i % 5 {
            0 => json!({"type": "string", "maxLength": 24}),
            1 => json!({"type": "integer"}),
            2 => json!({"enum": ["low", "medium", "high"]}),
            3 => json!({"type": "boolean"}),
            _ => json!({"type": "number"}),
        };
        props.insert(format!("field_{i:02}"), p);
    }
    let names: Vec<String> = props.keys().cloned().collect();
    json!({"type": "object", "properties": props, "required": names, "additionalProperties": false})
}

/// `--json-schema`: constrained against plain decoding on the same engine.
fn run_schema(a: BenchArgs) -> Result<()> {
    let schema = bench_schema();
    let t0 = Instant::now();
    vicugna_engine::Constraint::JsonSchema(schema.clone()).compile()?;
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    let loaded = a.model.load()?;
    let vocab = loaded.model.vocab_size();
    let engine = EngineHandle::start(
        loaded,
        EngineOptions {
            max_batch: 1,
            prefix_cache: false,
            ..Default::default()
        },
    );
    let prompt = "Fill in this record of a city as JSON with fields field_00 to field_19:\n";
    // (time to first token s, decode tokens/s, tokens)
    let run = |constrained: bool| -> Result<(f64, f64, usize)> {
        let mut req = GenerateRequest::new(Prompt::Text(prompt.into()), a.gen_tokens);
        if constrained {
            req.constraint = Some(vicugna_engine::Constraint::JsonSchema(schema.clone()));
        } else {
            req.stop.ignore_eos = true;
        }
        let started = Instant::now();
        let mut s = engine.submit(req)?;
        let (mut first, mut tokens) = (None, 0usize);
        while let Some(ev) = s.next_blocking() {
            match ev {
                Event::Token { .. } => {
                    tokens += 1;
                    first.get_or_insert_with(Instant::now);
                }
                Event::Done { .. } => break,
                Event::Error(e) => bail!(e),
                Event::Prompt { .. } => {}
            }
        }
        let end = Instant::now();
        let first = first.unwrap_or(end);
        let decode = (tokens.saturating_sub(1)) as f64 / (end - first).as_secs_f64().max(1e-9);
        Ok(((first - started).as_secs_f64(), decode, tokens))
    };
    run(false)?; // warm-up
    let (mut plain, mut with) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        plain.push(run(false)?);
        with.push(run(true)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let plain_tok_s = median(&mut plain.iter().map(|r| r.1).collect());
    let with_tok_s = median(&mut with.iter().map(|r| r.1).collect());
    let plain_ttft = median(&mut plain.iter().map(|r| r.0).collect());
    let with_ttft = median(&mut with.iter().map(|r| r.0).collect());
    let tokens = with.iter().map(|r| r.2).max().unwrap_or(0);
    let ratio = with_tok_s / plain_tok_s;
    if a.json {
        println!(
            "{}",
            json!({"vocab": vocab, "properties": 20, "schema_compile_ms": compile_ms,
                   "plain_decode_tok_s": plain_tok_s, "constrained_decode_tok_s": with_tok_s, "ratio": ratio,
                   "plain_first_token_s": plain_ttft, "constrained_first_token_s": with_ttft,
                   "constrained_tokens": tokens})
        );
    } else {
        println!("schema          20 properties, vocabulary {vocab}");
        println!("compile         {compile_ms:.1} ms (regex + DFA)");
        println!(
            "first token     {:.1} ms plain, {:.1} ms constrained (+{:.1} ms: compile and first vocabulary scan)",
            plain_ttft * 1e3,
            with_ttft * 1e3,
            (with_ttft - plain_ttft) * 1e3
        );
        println!("decode          {plain_tok_s:.1} tokens/s plain, {with_tok_s:.1} tokens/s constrained ({tokens} tokens of JSON)");
        println!("ratio           {ratio:.3} (constrained / plain)");
    }
    Ok(())
}

const FILLER: &str = "The history of the city is long and varied. Merchants came from the coast \
with salt and cloth, and the river carried their boats inland past farms and mills. ";

/// Peak resident memory of this process, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Bytes of the model's weight files: the GGUF file, or a directory's safetensors.
fn weight_file_bytes(path: &std::path::Path) -> u64 {
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if path.is_file() {
        return size(path);
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .map(|p| size(&p))
                .sum()
        })
        .unwrap_or(0)
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.json_schema {
        return run_schema(a);
    }
    if a.prompt_tokens == 0 || a.gen_tokens < 2 || a.batch == 0 {
        bail!("--prompt-tokens must be >= 1, --gen-tokens >= 2 and --batch >= 1");
    }
    let loaded = a.model.load()?;
    let load_s = loaded.load_seconds;
    let base: Vec<u32> = match &loaded.tokenizer {
        Some(t) => t.encode(&FILLER.repeat(a.prompt_tokens / 16 + 1), false)?,
        None => (0..a.prompt_tokens as u32).map(|i| 3 + i % 200).collect(),
    };
    if base.len() < a.prompt_tokens {
        bail!("could not build a {}-token prompt", a.prompt_tokens);
    }
    let vocab = loaded.model.vocab_size() as u32;
    let activations = if loaded.model.int8_activations() { "int8" } else { "f32" };
    let kv_cache = match loaded.model.kv_dtype() {
        KvDType::F32 => "f32",
        KvDType::F16 => "f16",
    };
    let engine = EngineHandle::start(
        loaded,
        EngineOptions {
            max_batch: a.batch,
            // Measures the model, not the cache.
            prefix_cache: false,
            ..Default::default()
        },
    );
    let info = engine.info();
    // One short prompt and a decode step first, as llama.cpp's benchmark does, so
    // first-call costs (the weights' pages faulted in from the file, the helper
    // threads starting) are not charged to the timed prefill.
    let mut warm = GenerateRequest::new(Prompt::Ids(base[..a.prompt_tokens.min(8)].to_vec()), 2);
    warm.stop.ignore_eos = true;
    for mut s in engine.submit_together(vec![warm])? {
        while let Some(ev) = s.next_blocking() {
            match ev {
                Event::Done { .. } => break,
                Event::Error(e) => bail!(e),
                _ => {}
            }
        }
    }
    let started = Instant::now();
    let reqs = (0..a.batch)
        .map(|b| {
            let mut prompt = base[..a.prompt_tokens].to_vec();
            // Different sequences, so the batch is not one sequence repeated.
            prompt[0] = (prompt[0] + b as u32) % vocab;
            let mut req = GenerateRequest::new(Prompt::Ids(prompt), a.gen_tokens);
            req.stop.ignore_eos = true;
            req
        })
        .collect();
    // Queued at once, so they start in the same step and decode in lockstep:
    // prefill ends at the first token, and the rest is decoding of all of them.
    // (Submitted one by one, the engine started stepping on the first request
    // and the others joined later, so their prefill counted as decode time.)
    let mut streams = engine.submit_together(reqs)?;
    let mut first_token_at = None;
    let mut tokens = 0usize;
    for s in streams.iter_mut() {
        while let Some(ev) = s.next_blocking() {
            match ev {
                Event::Token { .. } => {
                    tokens += 1;
                    first_token_at.get_or_insert_with(Instant::now);
                }
                Event::Done { .. } => break,
                Event::Error(e) => bail!(e),
                Event::Prompt { .. } => {}
            }
        }
    }
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    let prefill_s = (first - started).as_secs_f64();
    let decode_s = (end - first).as_secs_f64();
    // The first token of every sequence comes out of the prefill pass.
    let decoded = tokens - a.batch;
    let prefill_tok_s = (a.prompt_tokens * a.batch) as f64 / prefill_s;
    let decode_tok_s = decoded as f64 / decode_s;
    let rss = peak_rss_mib();
    // What the memory bound allows: the model file, every sequence's KV cache at
    // full length, and 100 MiB for everything else (on a warm engine a 512-token
    // prompt's activations take ~30 MiB of it at the 1B shape).
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let file_mib = mib(weight_file_bytes(&info.path) as f64);
    let kv_mib = mib((info.kv_bytes_per_token * (a.prompt_tokens + a.gen_tokens) * a.batch) as f64);
    let bound_mib = file_mib + kv_mib + 100.0;
    if a.json {
        println!(
            "{}",
            json!({
                "model": info.path.display().to_string(), "format": info.format, "activations": activations,
                "kv_cache": kv_cache,
                "load_s": load_s, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                "batch": a.batch, "threads": a.model.threads, "warmup": true, "prefill_tok_s": prefill_tok_s,
                "decode_tok_s": decode_tok_s, "peak_rss_mib": rss, "model_file_mib": file_mib,
                "kv_cache_mib": kv_mib, "rss_bound_mib": bound_mib,
                "weight_bytes_per_token": info.weight_bytes_per_token,
                "weight_macs_per_token": info.weight_macs_per_token,
            })
        );
    } else {
        println!(
            "model           {} ({}, {activations} activations, {kv_cache} KV cache)",
            info.path.display(),
            info.format
        );
        println!("load            {:.3} s", load_s);
        println!(
            "prefill         {:.1} tokens/s ({} x {} tokens)",
            prefill_tok_s, a.batch, a.prompt_tokens
        );
        println!(
            "decode          {:.1} tokens/s ({} sequence{})",
            decode_tok_s,
            a.batch,
            if a.batch == 1 { "" } else { "s, total" }
        );
        println!(
            "peak RSS        {:.1} MiB (bound {:.1} = file {:.1} + KV cache {:.1} + 100)",
            rss, bound_mib, file_mib, kv_mib
        );
        println!("weights/token   {:.1} MB", info.weight_bytes_per_token as f64 / 1e6);
    }
    Ok(())
}
