//! `vicugna data …`: preparing ShareGPT-format training data.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vicugna_train::clean::{self, CleanOptions, FilterOptions, Report};
use vicugna_train::data::{self, Loaded, Sample};
use vicugna_train::mask::{self, Masker};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// HTML → markdown; drop empty, too short, duplicate and out-of-order conversations.
    Clean(CleanArgs),
    /// Cut conversations longer than --max-tokens at turn boundaries (model's tokenizer).
    Split(SplitArgs),
    /// Keep or drop conversations by language or regex.
    Filter(FilterArgs),
    /// Counts of samples, turns, characters and tokens; a length histogram PNG.
    Stats(StatsArgs),
    /// A seeded random sample of N conversations.
    Sample(SampleArgs),
    /// Concatenate several data files.
    Merge(MergeArgs),
    /// A seeded split into train and test files.
    TrainTestSplit(TrainTestArgs),
    /// Print a conversation; --show-mask prints every token and whether it is trained on.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct InOut {
    /// Input: ShareGPT JSON array, JSONL, or Alpaca-style records.
    #[arg(long)]
    input: PathBuf,
    /// Output file (a .jsonl name writes JSON lines).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args, Debug)]
pub struct CleanArgs {
    #[command(flatten)]
    io: InOut,
    /// Drop conversations with fewer characters than this in all.
    #[arg(long, default_value_t = 16)]
    min_chars: usize,
    /// Drop conversations with fewer turns than this.
    #[arg(long, default_value_t = 2)]
    min_turns: usize,
    /// Leave HTML as it is.
    #[arg(long)]
    keep_html: bool,
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    #[command(flatten)]
    io: InOut,
    /// Model whose tokenizer counts tokens (HF directory, .gguf or `default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// Longest conversation kept in one piece, in tokens.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Tokens added per turn for role names and separators.
    #[arg(long, default_value_t = 6)]
    overhead: usize,
}

#[derive(Args, Debug)]
pub struct FilterArgs {
    #[command(flatten)]
    io: InOut,
    /// Keep only these languages (comma-separated ISO codes: en,zh).
    #[arg(long, value_delimiter = ',')]
    lang: Vec<String>,
    /// Drop these languages.
    #[arg(long, value_delimiter = ',')]
    skip_lang: Vec<String>,
    /// Keep only conversations with a turn matching this regex.
    #[arg(long)]
    regex: Option<String>,
    /// Drop conversations with a turn matching this regex.
    #[arg(long)]
    skip_regex: Option<String>,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(long)]
    input: PathBuf,
    /// Count tokens with this model's tokenizer and chat template (HF dir, .gguf or `default`).
    #[arg(long)]
    model: Option<String>,
    /// FastChat template name (default: the model's own chat template).
    #[arg(long)]
    template: Option<String>,
    /// Write a histogram of conversation lengths (tokens with --model, else characters) as PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    io: InOut,
    /// How many conversations.
    #[arg(long)]
    n: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Input files, in order (repeat --input).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args, Debug)]
pub struct TrainTestArgs {
    #[command(flatten)]
    io: InOut,
    /// Where the test part goes.
    #[arg(long)]
    test_output: PathBuf,
    /// Fraction of conversations in the test part.
    #[arg(long, default_value_t = 0.1)]
    test_ratio: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(long)]
    input: PathBuf,
    /// Which conversation (0-based position).
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Which conversation, by id (instead of --index).
    #[arg(long)]
    id: Option<String>,
    /// Print every token with its label mask (needs the model's tokenizer).
    #[arg(long)]
    show_mask: bool,
    /// Model whose tokenizer and chat template render the conversation.
    #[arg(long, default_value = "default")]
    model: String,
    /// FastChat template name (default: the model's own chat template).
    #[arg(long)]
    template: Option<String>,
    /// Replace the template's system message.
    #[arg(long)]
    system: Option<String>,
    /// Cut the token sequence at this length, as training would.
    #[arg(long)]
    max_len: Option<usize>,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Clean(a) => {
            let samples = load(&a.io.input)?;
            let opts = CleanOptions {
                min_chars: a.min_chars,
                min_turns: a.min_turns,
                html_to_markdown: !a.keep_html,
            };
            let (out, report) = clean::clean(samples, &opts);
            save(&a.io.output, &out)?;
            print_report("clean", &report);
        }
        DataCommand::Split(a) => {
            let samples = load(&a.io.input)?;
            let (tok, _) = tokenizer(&a.model, None)?;
            let mut count = |s: &str| -> vicugna_train::Result<usize> { Ok(tok.encode(s, false)?.len()) };
            let (out, report) = clean::split_long(samples, a.max_tokens, a.overhead, &mut count)?;
            save(&a.io.output, &out)?;
            print_report("split", &report);
        }
        DataCommand::Filter(a) => {
            let langs = |v: &[String]| -> Result<Vec<whatlang::Lang>> {
                v.iter().map(|c| Ok(clean::lang_code(c.trim())?)).collect()
            };
            let re = |r: &Option<String>, flag: &str| -> Result<Option<regex::Regex>> {
                r.as_deref()
                    .map(|r| regex::Regex::new(r).with_context(|| format!("{flag} {r:?} is not a valid regex")))
                    .transpose()
            };
            let opts = FilterOptions {
                keep_lang: langs(&a.lang)?,
                skip_lang: langs(&a.skip_lang)?,
                keep_regex: re(&a.regex, "--regex")?,
                skip_regex: re(&a.skip_regex, "--skip-regex")?,
            };
            let samples = load(&a.io.input)?;
            let (out, report) = clean::filter(samples, &opts);
            save(&a.io.output, &out)?;
            print_report("filter", &report);
        }
        DataCommand::Stats(a) => stats(a)?,
        DataCommand::Sample(a) => {
            let samples = load(&a.io.input)?;
            let n = samples.len();
            let out = clean::sample(samples, a.n, a.seed);
            save(&a.io.output, &out)?;
            eprintln!("sample: {} of {n} conversations (seed {})", out.len(), a.seed);
        }
        DataCommand::Merge(a) => {
            let mut all = Vec::new();
            for p in &a.input {
                let s = load(p)?;
                eprintln!("merge: {} conversations from {}", s.len(), p.display());
                all.extend(s);
            }
            save(&a.output, &all)?;
            eprintln!("merge: {} conversations written to {}", all.len(), a.output.display());
        }
        DataCommand::TrainTestSplit(a) => {
            let samples = load(&a.io.input)?;
            let (train, test) = clean::train_test_split(samples, a.test_ratio, a.seed)?;
            save(&a.io.output, &train)?;
            save(&a.test_output, &test)?;
            eprintln!(
                "train-test-split: {} train, {} test (seed {})",
                train.len(),
                test.len(),
                a.seed
            );
        }
        DataCommand::Inspect(a) => inspect(a)?,
    }
    Ok(())
}

/// Loads a data file, warning about a cut-off tail.
fn load(path: &Path) -> Result<Vec<Sample>> {
    let Loaded {
        samples,
        format,
        broken_tail,
    } = data::load(path)?;
    if let Some(t) = broken_tail {
        eprintln!(
            "warning: {} is cut off: {} whole records recovered; the unfinished record at byte {} ({} bytes) \
             was skipped ({})",
            path.display(),
            samples.len(),
            t.offset,
            t.bytes,
            t.message
        );
    }
    if format == "alpaca" {
        eprintln!(
            "note: {} holds Alpaca records; converted to conversations",
            path.display()
        );
    }
    Ok(samples)
}

fn save(path: &Path, samples: &[Sample]) -> Result<()> {
    data::save(path, samples)?;
    Ok(())
}

fn print_report(what: &str, r: &Report) {
    let mut line = format!("{what}: kept {} of {}", r.kept, r.input);
    if !r.dropped.is_empty() {
        let d: Vec<String> = r.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!("; dropped {}", d.join(", ")));
    }
    if !r.changed.is_empty() {
        let c: Vec<String> = r.changed.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!("; {}", c.join(", ")));
    }
    eprintln!("{line}");
}

fn tokenizer(
    model: &str,
    template: Option<&str>,
) -> Result<(vicugna_engine::tokenizer::Tokenizer, vicugna_chat::ChatFormat)> {
    let path = vicugna_engine::default_model::resolve_model_arg(Some(model), &mut |m| eprintln!("{m}"))?;
    Ok(mask::tokenizer_and_format(&path, template)?)
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn stats(a: StatsArgs) -> Result<()> {
    let samples = load(&a.input)?;
    let turns: usize = samples.iter().map(|s| s.conversations.len()).sum();
    let role = |r: data::Role| {
        samples
            .iter()
            .flat_map(|s| &s.conversations)
            .filter(|t| data::Role::of(&t.from) == Some(r))
            .count()
    };
    let (user, assistant) = (role(data::Role::User), role(data::Role::Assistant));
    let chars: Vec<usize> = samples
        .iter()
        .map(|s| s.conversations.iter().map(|t| t.value.chars().count()).sum())
        .collect();
    let mut out = serde_json::json!({
        "samples": samples.len(),
        "turns": turns,
        "user_turns": user,
        "assistant_turns": assistant,
        "characters": chars.iter().sum::<usize>(),
    });
    let mut lengths = chars.clone();
    let mut unit = "characters";
    if let Some(m) = &a.model {
        let (tok, format) = tokenizer(m, a.template.as_deref())?;
        let masker = Masker::new(&format, &tok, None);
        let (mut toks, mut labelled, mut failed) = (Vec::with_capacity(samples.len()), 0usize, 0usize);
        for s in &samples {
            match masker.encode(s, None) {
                Ok(e) => {
                    labelled += e.label_count();
                    toks.push(e.ids.len());
                }
                Err(_) => failed += 1,
            }
        }
        let mut sorted = toks.clone();
        sorted.sort_unstable();
        out["template"] = format.name().into();
        out["tokens"] = sorted.iter().sum::<usize>().into();
        out["assistant_tokens"] = labelled.into();
        out["tokens_per_sample"] = serde_json::json!({
            "mean": sorted.iter().sum::<usize>() as f64 / sorted.len().max(1) as f64,
            "median": percentile(&sorted, 0.5),
            "p90": percentile(&sorted, 0.9),
            "max": sorted.last().copied().unwrap_or(0),
        });
        out["unrenderable_samples"] = failed.into();
        lengths = toks;
        unit = "tokens";
    }
    if let Some(p) = &a.plot {
        let title = format!("{} conversations: {unit} per conversation", lengths.len());
        vicugna_train::plot::histogram(p, &lengths, 40, &title, unit)?;
        out["plot"] = p.display().to_string().into();
    }
    if a.json {
        println!("{out}");
    } else {
        let pretty = serde_json::to_string_pretty(&out)?;
        println!("{pretty}");
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let samples = load(&a.input)?;
    let sample = match &a.id {
        Some(id) => samples
            .iter()
            .find(|s| &s.id == id)
            .with_context(|| format!("{}: no conversation with id {id:?}", a.input.display()))?,
        None => match samples.get(a.index) {
            Some(s) => s,
            None => bail!(
                "{}: --index {} is out of range ({} conversations)",
                a.input.display(),
                a.index,
                samples.len()
            ),
        },
    };
    if !a.show_mask {
        println!("id: {}", sample.id);
        for t in &sample.conversations {
            println!("--- {}\n{}", t.from, t.value);
        }
        return Ok(());
    }
    let (tok, format) = tokenizer(&a.model, a.template.as_deref())?;
    let masker = Masker::new(&format, &tok, a.system.as_deref());
    let enc = masker.encode(sample, a.max_len)?;
    println!("id: {}  template: {}", sample.id, format.name());
    print!("{}", mask::show_mask(&enc, &tok));
    Ok(())
}
