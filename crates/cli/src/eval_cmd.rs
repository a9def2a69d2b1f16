//! `vicugna eval`: answers to benchmark questions, an LLM judge and the
//! results tables, in FastChat's `llm_judge` file layouts (MT-bench,
//! Vicuna-80).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use vicugna_eval::answer::{self, AnswerOptions};
use vicugna_eval::client::{Listing, OpenAiChat, RetryPolicy};
use vicugna_eval::judge::{self, JudgeOptions, MatchInputs, Mode};
use vicugna_eval::pool::Progress;
use vicugna_eval::review::{self, ReviewJob};
use vicugna_eval::show::{self, Results, ShowOptions};
use vicugna_eval::{chart, load_questions, ChatModel, QuestionId};

use crate::eval_local::LocalChat;
use crate::model_arg::ModelArgs;

/// `vicugna eval …`
#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Answer a question file with a model (an OpenAI-compatible API, or a local model).
    Answer(AnswerArgs),
    /// Judge answers with an LLM judge (FastChat's MT-bench judge).
    Judge(JudgeArgs),
    /// Print the results tables of a judgment (or review) file and chart them.
    Show(ShowArgs),
    /// Review two models' answers with the original Vicuna-80 reviewer (score pairs).
    Review(ReviewArgs),
}

/// Where a model is reached: an API, or loaded here.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// API key (default: $OPENAI_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Retries of a failed call (connection errors, 429, 5xx), with exponential backoff.
    #[arg(long, default_value_t = 15)]
    max_retries: u32,
    /// Concurrent calls.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Local model: FastChat template to format prompts with (default: the model's own).
    #[arg(long)]
    conv_template: Option<String>,
    /// Local model: CPU threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Local model: 8-bit activations in quantized products, auto, on or off
    /// (see `vicugna serve --help`).
    #[arg(long, value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    int8: crate::model_arg::Int8Arg,
    /// Local model: attention cache element type, auto, f32 or f16 (see `vicugna serve --help`).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::model_arg::KvCacheArg,
}

#[derive(Args, Debug)]
pub struct AnswerArgs {
    /// Question file (FastChat layout: question_id, category, turns).
    #[arg(long)]
    questions: PathBuf,
    /// The model's name in the answer file (and its file name).
    #[arg(long)]
    model_id: String,
    /// OpenAI-compatible API base (e.g. http://127.0.0.1:8000/v1). Without it,
    /// --model is a local model.
    #[arg(long)]
    api_base: Option<String>,
    /// With --api-base: the API's model name (default: --model-id). Without:
    /// a model directory, .gguf file, or `default`.
    #[arg(long)]
    model: Option<String>,
    /// Conversations per question.
    #[arg(long, default_value_t = 1)]
    num_choices: usize,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// One temperature for all questions (default: FastChat's per category).
    #[arg(long)]
    force_temperature: Option<f32>,
    /// A system message sent before each conversation.
    #[arg(long)]
    system: Option<String>,
    /// Output (default: answers/<model-id>.jsonl).
    #[arg(long)]
    answer_file: Option<PathBuf>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Single,
    PairwiseBaseline,
    PairwiseAll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Constrain {
    /// When the judge is a vicugna server or a local model.
    Auto,
    /// Always (the server must accept vLLM's guided_choice / guided_regex).
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct JudgeArgs {
    #[arg(long, value_enum, default_value = "single")]
    mode: ModeArg,
    /// The judge: an API model name with --judge-api-base, else a local model (path or `default`).
    #[arg(long)]
    judge_model: String,
    /// OpenAI-compatible API base of the judge.
    #[arg(long)]
    judge_api_base: Option<String>,
    /// Judge prompts (FastChat's judge_prompts.jsonl layout).
    #[arg(long)]
    judge_prompts: PathBuf,
    /// Question file.
    #[arg(long)]
    questions: PathBuf,
    /// Folder of answer files, one per model (<model>.jsonl).
    #[arg(long)]
    answers: PathBuf,
    /// Reference answers for math, reasoning and coding: a file, or a folder
    /// holding <judge-model>.jsonl (FastChat's reference_answer/).
    #[arg(long)]
    ref_answers: Option<PathBuf>,
    /// Output (default: model_judgment/<judge>_single.jsonl or _pair.jsonl).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Baseline model for pairwise-baseline.
    #[arg(long, default_value = "gpt-3.5-turbo")]
    baseline: String,
    /// Judge only these models (default: every answer file).
    #[arg(long, num_args = 1..)]
    model_list: Option<Vec<String>>,
    /// Only the first N questions.
    #[arg(long)]
    first_n: Option<usize>,
    /// Most tokens per judge reply.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Force a readable verdict with constrained decoding when the judge's reply has none.
    #[arg(long, value_enum, default_value = "auto")]
    constrain: Constrain,
    /// Ask for each verdict as JSON under a schema (`response_format`):
    /// single {"explanation", "rating": integer 1..10}, pairwise {"explanation",
    /// "verdict": "A" | "B" | "tie"}. A vicugna server or local model enforces
    /// it, so every verdict is readable on the first ask; it is written into
    /// the judgment as FastChat's judges write theirs (`Rating: [[7]]`, `[[A]]`),
    /// so score and winner are read alike. Off by default: FastChat's prompts
    /// ask for free text, and published MT-bench scores were judged that way.
    #[arg(long)]
    schema_verdicts: bool,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    yes: bool,
    /// Print how many judge calls and prompt tokens it would spend, and stop.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Judgment file (FastChat's model_judgment layout).
    #[arg(long, required_unless_present = "reviews", conflicts_with = "reviews")]
    judgments: Option<PathBuf>,
    /// Vicuna-80 review files: print the total-score table instead.
    #[arg(long, num_args = 1..)]
    reviews: Option<Vec<PathBuf>>,
    /// Pairwise: count only matches against this model, and leave it out (FastChat's pairwise-baseline).
    #[arg(long)]
    baseline: Option<String>,
    /// Only these models.
    #[arg(long, num_args = 1..)]
    model_list: Option<Vec<String>>,
    /// Question file, for the categories of judgments that do not carry one.
    #[arg(long)]
    questions: Option<PathBuf>,
    /// Chart of score per category per model (.png or .svg; default: beside the judgments, .png).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Do not write a chart.
    #[arg(long, conflicts_with = "chart")]
    no_chart: bool,
    /// Print the numbers as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ReviewArgs {
    /// Question file (Vicuna-80: question_id, text, category; or FastChat's turns layout).
    #[arg(long)]
    questions: PathBuf,
    /// Two answer files: assistant 1 (the baseline), then assistant 2.
    #[arg(long, num_args = 2, required = true)]
    answers: Vec<PathBuf>,
    /// Names of the two assistants (default: the answer file names).
    #[arg(long, num_args = 2)]
    names: Option<Vec<String>>,
    /// The reviewer: an API model name with --api-base, else a local model.
    #[arg(long)]
    reviewer_model: String,
    /// OpenAI-compatible API base of the reviewer.
    #[arg(long)]
    api_base: Option<String>,
    /// Reviewer prompts (FastChat's table/prompt.jsonl layout; default: vicugna's own).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Output (default: reviews/review_<name1>_<name2>.jsonl).
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, default_value_t = 0.2)]
    temperature: f32,
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    #[arg(long, value_enum, default_value = "auto")]
    constrain: Constrain,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    yes: bool,
    /// Print how many calls and prompt tokens it would spend, and stop.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    api: ApiArgs,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Answer(a) => run_answer(a),
        EvalCommand::Judge(a) => run_judge(a),
        EvalCommand::Show(a) => run_show(a),
        EvalCommand::Review(a) => run_review(a),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
struct Bar {
    bar: Option<ProgressBar>,
    what: &'static str,
}

impl Bar {
    fn new(what: &'static str) -> Self {
        Bar { bar: None, what }
    }
}

impl Progress for Bar {
    fn start(&mut self, total: usize) {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} ({eta} left) {wide_msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(self.what);
        self.bar = Some(bar);
    }

    fn advance(&mut self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
            b.inc(1);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The model to talk to: an API client, or a local model when no API base is given.
fn connect(
    api_base: Option<&str>,
    model: &str,
    api: &ApiArgs,
    constrain: Constrain,
) -> Result<(Box<dyn ChatModel>, String)> {
    match api_base {
        Some(base) => {
            let key = api.api_key.clone().or_else(|| std::env::var("OPENAI_API_KEY").ok());
            let retry = RetryPolicy {
                max_retries: api.max_retries,
                ..RetryPolicy::default()
            };
            let client = OpenAiChat::new(base, model, key, retry)?;
            let owner = match client.listing() {
                Listing::Served { owner } => Some(owner),
                Listing::NotServed { models } => {
                    bail!(
                        "{}: model {model:?} is not served there (models: {})",
                        client.base(),
                        models.join(", ")
                    )
                }
                Listing::Unknown => None,
            };
            let guided = match constrain {
                Constrain::On => true,
                Constrain::Off => false,
                // Only a server known to take guided_choice gets it: OpenAI rejects unknown fields.
                Constrain::Auto => owner.as_deref() == Some("vicugna"),
            };
            Ok((Box::new(client.with_guided(guided)), model.to_string()))
        }
        None => {
            let args = ModelArgs {
                model: model.to_string(),
                dtype: vicugna_engine::WeightDType::Auto,
                threads: api.threads,
                lora: None,
                int8: api.int8,
                kv_cache: api.kv_cache,
            };
            let local = LocalChat::load(&args, api.conv_template.as_deref())?;
            let name = local.name();
            eprintln!("loaded {}", local.describe());
            Ok((Box::new(local), name))
        }
    }
}

fn run_answer(a: AnswerArgs) -> Result<()> {
    let questions = load_questions(&a.questions)?;
    let path = a
        .answer_file
        .clone()
        .unwrap_or_else(|| PathBuf::from("answers").join(format!("{}.jsonl", a.model_id)));
    let model_name = match (&a.api_base, &a.model) {
        (Some(_), m) => m.clone().unwrap_or_else(|| a.model_id.clone()),
        (None, Some(m)) => m.clone(),
        (None, None) => bail!("give --api-base URL (answer through an API) or --model PATH|default (a local model)"),
    };
    let (model, _) = connect(a.api_base.as_deref(), &model_name, &a.api, Constrain::Off)?;
    let opts = AnswerOptions {
        model_id: a.model_id.clone(),
        num_choices: a.num_choices,
        max_tokens: a.max_tokens,
        force_temperature: a.force_temperature,
        system: a.system.clone(),
        parallel: a.api.parallel,
    };
    eprintln!(
        "answering {} questions with {} → {}",
        questions.len(),
        model.describe(),
        path.display()
    );
    let s = answer::generate_answers(model.as_ref(), &questions, &path, &opts, &mut Bar::new("answer"))?;
    println!(
        "{}: {} answered now, {} kept from before, {} failed",
        s.path.display(),
        s.answered,
        s.kept,
        s.failed
    );
    if s.failed > 0 {
        bail!(
            "{} questions failed (recorded as errors); run the same command again to retry them",
            s.failed
        );
    }
    Ok(())
}

/// A file name part from a model name or path (`/m/x.gguf` → `x`).
fn file_stem_of(model: &str) -> String {
    let p = Path::new(model);
    let stem = if model.contains('/') || model.ends_with(".gguf") {
        p.file_stem().and_then(|s| s.to_str()).unwrap_or(model)
    } else {
        model
    };
    stem.chars()
        .map(|c| if c == '/' || c == '\\' { '_' } else { c })
        .collect()
}

/// Reads reference answers: a file, or a folder's <judge>.jsonl (or its only file).
fn load_references(path: &Path, judge: &str) -> Result<BTreeMap<QuestionId, answer::AnswerRecord>> {
    if path.is_file() {
        return Ok(answer::load_answer_file(path)?);
    }
    let mut all = answer::load_answer_dir(path)?;
    if let Some(r) = all.remove(judge) {
        return Ok(r);
    }
    if all.len() == 1 {
        return Ok(all.into_values().next().expect("one entry"));
    }
    bail!(
        "{}: no {judge}.jsonl among the reference answers ({}); pass the file itself",
        path.display(),
        all.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

fn confirm(yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    eprint!("Press Enter to confirm (or give --yes)...");
    std::io::stderr().flush()?;
    let mut line = String::new();
    let n = std::io::stdin().lock().read_line(&mut line)?;
    if n == 0 {
        bail!("not confirmed (standard input closed); give --yes to run without asking");
    }
    Ok(())
}

fn run_judge(a: JudgeArgs) -> Result<()> {
    let mode = match a.mode {
        ModeArg::Single => Mode::Single,
        ModeArg::PairwiseBaseline => Mode::PairwiseBaseline,
        ModeArg::PairwiseAll => Mode::PairwiseAll,
    };
    let mut questions = load_questions(&a.questions)?;
    if let Some(n) = a.first_n {
        questions.truncate(n);
    }
    let prompts = vicugna_eval::prompt::load_judge_prompts(&a.judge_prompts)?;
    let answers = answer::load_answer_dir(&a.answers)?;
    if answers.is_empty() {
        bail!("{}: no answer files (<model>.jsonl)", a.answers.display());
    }
    let models: Vec<String> = match &a.model_list {
        Some(l) => l.clone(),
        None => answers.keys().cloned().collect(),
    };
    let judge_label = file_stem_of(&a.judge_model);
    let references = match &a.ref_answers {
        Some(p) => Some(load_references(p, &judge_label)?),
        None => None,
    };
    let matches = judge::make_matches(&MatchInputs {
        mode,
        questions: &questions,
        models: &models,
        answers: &answers,
        references: references.as_ref(),
        prompts: &prompts,
        baseline: Some(a.baseline.as_str()),
    })?;
    let output = a.output.clone().unwrap_or_else(|| {
        let kind = if mode == Mode::Single { "single" } else { "pair" };
        PathBuf::from("model_judgment").join(format!("{judge_label}_{kind}.jsonl"))
    });
    let (_, plan) = judge::plan(&matches, &output, &judge_label)?;
    let stats = json!({
        "mode": mode.as_str(),
        "judge": judge_label,
        "baseline": (mode == Mode::PairwiseBaseline).then_some(&a.baseline),
        "model_list": models,
        "total_num_questions": questions.len(),
        "total_num_matches": matches.len(),
        "already_judged": plan.done,
        "judge_calls": plan.calls,
        "prompt_tokens_estimate": plan.prompt_tokens_estimate(),
        "output_path": output,
    });
    eprintln!("Stats:\n{}", serde_json::to_string_pretty(&stats)?);
    if a.dry_run {
        println!(
            "dry run: {} matches to judge ({} already judged), {} judge calls, about {} prompt tokens ({} characters)",
            plan.matches,
            plan.done,
            plan.calls,
            plan.prompt_tokens_estimate(),
            plan.prompt_chars
        );
        return Ok(());
    }
    if plan.matches == 0 {
        println!("{}: every match is already judged", output.display());
        return Ok(());
    }
    confirm(a.yes)?;
    let (judge_model, _) = connect(a.judge_api_base.as_deref(), &a.judge_model, &a.api, a.constrain)?;
    let force_verdict = a.constrain != Constrain::Off;
    if force_verdict && !judge_model.supports_guide() && a.judge_api_base.is_some() {
        eprintln!(
            "note: the judge server is not vicugna; verdicts are not forced (give --constrain on for a vLLM server)"
        );
    }
    let opts = JudgeOptions {
        judge_name: judge_label,
        max_tokens: a.max_tokens,
        parallel: a.api.parallel,
        force_verdict,
        schema_verdicts: a.schema_verdicts,
    };
    let s = judge::run_judge(judge_model.as_ref(), &matches, &output, &opts, &mut Bar::new("judge"))?;
    println!(
        "{}: {} judged now, {} failed, {} verdicts unreadable, {} forced by constrained decoding",
        s.path.display(),
        s.judged,
        s.failed,
        s.unparsed,
        s.forced
    );
    if s.failed > 0 {
        bail!(
            "{} judge calls failed (recorded as errors); run the same command again to retry them",
            s.failed
        );
    }
    Ok(())
}

fn run_show(a: ShowArgs) -> Result<()> {
    if let Some(files) = &a.reviews {
        let totals = files
            .iter()
            .map(|f| review::review_totals(f))
            .collect::<Result<Vec<_>, _>>()?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&totals)?);
        } else {
            print!("{}", review::render_totals(&totals));
        }
        return Ok(());
    }
    let path = a.judgments.clone().context("give --judgments FILE")?;
    let mut opts = ShowOptions {
        model_list: a.model_list.clone(),
        baseline: a.baseline.clone(),
        categories: BTreeMap::new(),
    };
    if let Some(q) = &a.questions {
        opts.categories = load_questions(q)?
            .into_iter()
            .map(|q| (q.question_id, q.category))
            .collect();
    }
    let results = show::show(&path, &opts)?;
    let by_category = match &results {
        Results::Single(s) => &s.by_category,
        Results::Pairwise(p) => &p.by_category,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("Input file: {}", path.display());
        print!("{}", show::render(&results));
        print!("{}", show::render_categories(by_category));
    }
    if a.no_chart {
        return Ok(());
    }
    let categories = show::category_names(by_category);
    if categories.is_empty() {
        eprintln!("no chart: the judgments carry no categories (give --questions)");
        return Ok(());
    }
    let chart_path = a.chart.clone().unwrap_or_else(|| path.with_extension("png"));
    let series: Vec<(String, Vec<Option<f64>>)> = by_category
        .iter()
        .map(|(m, per)| (m.clone(), categories.iter().map(|c| per.get(c).copied()).collect()))
        .collect();
    let (title, y_label, y_max) = match &results {
        Results::Single(_) => ("Score per category", "mean score (1-10)", 10.0),
        Results::Pairwise(_) => ("Adjusted win rate per category", "win rate (ties count half)", 1.0),
    };
    chart::draw_bar_chart(
        &chart_path,
        &chart::BarChart {
            title,
            y_label,
            y_max,
            categories: &categories,
            series: &series,
        },
    )?;
    eprintln!("chart: {}", chart_path.display());
    Ok(())
}

fn run_review(a: ReviewArgs) -> Result<()> {
    let questions = load_questions(&a.questions)?;
    let prompts = match &a.prompts {
        Some(p) => review::load_review_prompts(p)?,
        None => review::builtin_prompts(),
    };
    let names: Vec<String> = match &a.names {
        Some(n) => n.clone(),
        None => a
            .answers
            .iter()
            .map(|p| {
                let s = p.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
                s.strip_prefix("answer_").unwrap_or(s).to_string()
            })
            .collect(),
    };
    let a1 = review::load_review_answers(&a.answers[0])?;
    let a2 = review::load_review_answers(&a.answers[1])?;
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("reviews").join(format!("review_{}_{}.jsonl", names[0], names[1])));
    let mut job = ReviewJob {
        questions: &questions,
        model_1: (&names[0], &a1),
        model_2: (&names[1], &a2),
        prompts: &prompts,
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        parallel: a.api.parallel,
        force_verdict: a.constrain != Constrain::Off,
    };
    let (calls, chars) = review::review_plan(&job, &output)?;
    eprintln!(
        "{} reviews to make ({} vs {}) → {}, about {} prompt tokens",
        calls,
        names[0],
        names[1],
        output.display(),
        chars.div_ceil(4)
    );
    if a.dry_run {
        println!(
            "dry run: {calls} reviewer calls, about {} prompt tokens ({chars} characters)",
            chars.div_ceil(4)
        );
        return Ok(());
    }
    if calls > 0 {
        confirm(a.yes)?;
        let (reviewer, _) = connect(a.api_base.as_deref(), &a.reviewer_model, &a.api, a.constrain)?;
        job.force_verdict &= reviewer.supports_guide();
        let s = review::run_review(reviewer.as_ref(), &job, &output, &mut Bar::new("review"))?;
        eprintln!(
            "{}: {} reviewed, {} failed, {} without readable scores",
            s.path.display(),
            s.reviewed,
            s.failed,
            s.unparsed
        );
        if s.failed > 0 {
            bail!(
                "{} reviewer calls failed; run the same command again to retry them",
                s.failed
            );
        }
    }
    print!("{}", review::render_totals(&[review::review_totals(&output)?]));
    Ok(())
}
