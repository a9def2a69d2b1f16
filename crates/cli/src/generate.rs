//! `vicugna generate`: one prompt in, streamed text out.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use vicugna_chat::HfChatTemplate;
use vicugna_engine::{Event, GenerateRequest, Prompt, StopRules};

use crate::model_arg::{ModelArgs, SamplingArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long, conflicts_with_all = ["prompt_ids", "prompt_file"], required_unless_present_any = ["prompt_ids", "prompt_file"])]
    prompt: Option<String>,
    /// Read the prompt text from this file.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt_file: Option<std::path::PathBuf>,
    /// The prompt as token ids, e.g. 5,17,42.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Stop at this token id (repeatable).
    #[arg(long)]
    stop_token_id: Vec<u32>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Include the prompt in the output.
    #[arg(long)]
    echo: bool,
    /// Report each token's logprob and this many alternatives (with --json).
    #[arg(long)]
    logprobs: Option<usize>,
    /// Drop the oldest prompt tokens if the prompt does not fit the context.
    #[arg(long)]
    truncate: bool,
    /// Print one JSON object (ids, text, finish_reason, usage) instead of streaming.
    #[arg(long)]
    json: bool,
}

pub fn run(mut a: GenerateArgs) -> Result<()> {
    if let Some(path) = &a.prompt_file {
        a.prompt = Some(std::fs::read_to_string(path).with_context(|| format!("--prompt-file {}", path.display()))?);
    }
    let engine = a.model.start()?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) if a.chat => {
            let tok = engine.tokenizer().context("--chat needs a model with a tokenizer")?;
            let Some(src) = tok.chat_template() else {
                bail!("--chat: {} has no chat template", engine.info().path.display());
            };
            let tpl = HfChatTemplate::new(src, tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or(""))?;
            let msgs = [vicugna_chat::ChatMessage::new("user", text)];
            Prompt::Text(tpl.render(&msgs, true)?)
        }
        (Some(text), _) => Prompt::Text(text.clone()),
        (None, Some(ids)) => Prompt::Ids(ids.clone()),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let mut req = GenerateRequest::new(prompt, a.max_new_tokens);
    req.sampling = a.sampling.params();
    req.stop = StopRules {
        stop_strings: a.stop.clone(),
        stop_token_ids: a.stop_token_id.clone(),
        ignore_eos: a.ignore_eos,
    };
    req.echo = a.echo;
    req.logprobs = a.logprobs;
    req.truncate_left = a.truncate;
    // A chat-rendered prompt already holds its special tokens.
    req.add_special_tokens = !a.chat;
    if a.json {
        let out = engine.generate(req)?;
        let logprobs: Vec<_> = out
            .logprobs
            .iter()
            .map(|l| json!({"id": l.id, "token": l.text, "logprob": l.logprob,
                "top": l.top.iter().map(|(id, t, lp)| json!({"id": id, "token": t, "logprob": lp})).collect::<Vec<_>>()}))
            .collect();
        let mut obj = json!({
            "ids": out.ids,
            "text": out.text,
            "finish_reason": out.finish_reason.as_str(),
            "usage": {"prompt_tokens": out.usage.prompt_tokens, "completion_tokens": out.usage.completion_tokens},
        });
        if a.logprobs.is_some() {
            obj["logprobs"] = json!(logprobs);
        }
        if let Some(p) = out.prompt_text {
            obj["prompt"] = json!(p);
        }
        println!("{obj}");
        return Ok(());
    }
    let mut stream = engine.submit(req)?;
    let mut stdout = std::io::stdout().lock();
    while let Some(ev) = stream.next_blocking() {
        match ev {
            Event::Prompt { text, .. } => write!(stdout, "{text}")?,
            Event::Token { text, .. } => write!(stdout, "{text}")?,
            Event::Done { text, .. } => {
                writeln!(stdout, "{text}")?;
                break;
            }
            Event::Error(e) => bail!(e),
        }
        stdout.flush()?;
    }
    Ok(())
}
