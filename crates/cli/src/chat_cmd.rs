//! `vicugna chat`: the interactive terminal chat, as `fastchat.serve.cli`.
//!
//! Three styles (`--style`): `simple` streams plain text, `rich` renders
//! markdown live with a line editor (history, `!!` completion), and
//! `programmatic` speaks FastChat's script protocol (messages end with
//! ` __END_OF_A_MESSAGE_47582648__`, output lines are `[!OP:ROLE]: text`).
//! Commands: `!!exit` (or an empty message, or end of input), `!!reset`,
//! `!!remove`, `!!regen`, `!!save FILE`, `!!load FILE` (FastChat's JSON layout).
//! Ctrl-C during an answer stops it and keeps the session. When the
//! conversation outgrows the context, the oldest turns are dropped with a notice.
//!
//! With `--api-base URL` the model is not loaded here: the conversation goes
//! to a running OpenAI-compatible server (`vicugna serve`) as streaming
//! `/chat/completions` calls, and `--model` names the server's model.

#[path = "chat/context.rs"]
mod context;
#[path = "chat/interrupt.rs"]
mod interrupt;
#[path = "chat/io.rs"]
mod io;
#[path = "chat/live.rs"]
mod live;
#[path = "chat/remote.rs"]
mod remote;

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use vicugna_chat::{match_template, ChatFormat, ChatMessage, FormatSource, SavedConversation, MODEL_TEMPLATE_NAME};
use vicugna_engine::tokenizer::Tokenizer;
use vicugna_engine::{EngineHandle, Event, GenerateRequest, Prompt, SamplingParams, StopRules};

use crate::model_arg::ModelArgs;
use io::{ChatIo, ProgrammaticIo, RichIo, SimpleIo};

/// How the chat looks.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Plain streaming text.
    Simple,
    /// Markdown rendered live; line editing, history and `!!` completion.
    Rich,
    /// For scripts: messages end with ` __END_OF_A_MESSAGE_47582648__`,
    /// output lines are `[!OP:ROLE]: text`.
    Programmatic,
}

#[derive(Args, Debug)]
#[command(after_help = "Commands: !!exit (or an empty message), !!reset, !!remove, !!regen, \
                        !!save FILE, !!load FILE. Ctrl-C during an answer stops it.")]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// simple streams plain text; rich renders markdown with line editing; programmatic is for scripts.
    #[arg(long, value_enum, default_value = "simple")]
    style: Style,
    /// Messages of several lines: simple ends one with Ctrl-D on an empty line, rich breaks lines with Esc+Enter.
    #[arg(long)]
    multiline: bool,
    /// Conversation template by name (see `vicugna template list`); default: the model's own chat template, else one matched from the model's name.
    #[arg(long)]
    conv_template: Option<String>,
    /// System message replacing the template's.
    #[arg(long)]
    conv_system_msg: Option<String>,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Above 1 discourages repeating tokens already seen; 1 is off (FastChat's --repetition_penalty works too).
    #[arg(long, alias = "repetition_penalty", default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Forget each exchange: every message starts a new conversation.
    #[arg(long)]
    no_history: bool,
    /// After each answer, print the template, the prompt, the answer and tokens/s.
    #[arg(long)]
    debug: bool,
    /// Same seed, same answers.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the conversation within this many tokens (default and most: the model's context length).
    #[arg(long)]
    context_length: Option<usize>,
    /// Talk to a running OpenAI-compatible server at this URL (e.g. http://127.0.0.1:8000/v1)
    /// instead of loading a model here; --model then names the server's model
    /// (default: its only one).
    #[arg(long)]
    api_base: Option<String>,
    /// Bearer key for --api-base (default: $OPENAI_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
}

pub fn run(a: ChatArgs) -> Result<()> {
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: 0,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        seed: a.seed,
        ..SamplingParams::greedy()
    };
    // Checked before the model loads, so a typo costs no time.
    GenerateRequest {
        sampling: sampling.clone(),
        ..GenerateRequest::new(Prompt::Ids(vec![0]), a.max_new_tokens)
    }
    .validate()?;
    if let Some(name) = &a.conv_template {
        ChatFormat::named(name)?;
    }
    if let Some(base) = &a.api_base {
        return run_remote(&a, base, sampling);
    }

    let engine = a.model.start()?;
    let tok = engine
        .tokenizer()
        .with_context(|| format!("{} has no tokenizer: chat needs one", engine.info().path.display()))?;
    let (format, source) = choose_format(&engine, tok, a.conv_template.as_deref())?;
    let model_context = engine.info().context_length;
    let context = match a.context_length {
        Some(n) if n < 2 => bail!("--context-length must be at least 2"),
        Some(n) => n.min(model_context),
        None => model_context,
    };

    let mut io = make_io(&a)?;
    if a.style != Style::Programmatic {
        let why = match source {
            FormatSource::Explicit => "chosen",
            FormatSource::Model => "from the model",
            FormatSource::Matched => "matched from the model's name",
            FormatSource::Default => {
                "default: the model has no chat template and its name matches no FastChat \
                 template. It may be a base model (e.g. gemma3-270m), which continues text \
                 rather than answering; choose a template with --conv-template"
            }
        };
        eprintln!(
            "{}: template {} ({why}), context {context} tokens. \
             Commands: !!exit !!reset !!remove !!regen !!save FILE !!load FILE; Ctrl-C stops an answer.",
            engine.info().name,
            format.name(),
        );
    }
    interrupt::install();

    let mut chat = Chat {
        backend: Backend::Local { engine: &engine, tok },
        format,
        system: a.conv_system_msg.clone(),
        messages: Vec::new(),
        context,
        max_new_tokens: a.max_new_tokens,
        sampling,
        debug: a.debug,
    };
    chat.run(io.as_mut(), !a.no_history)
}

fn make_io(a: &ChatArgs) -> Result<Box<dyn ChatIo>> {
    Ok(match a.style {
        Style::Simple => Box::new(SimpleIo::new(a.multiline)?),
        Style::Rich => Box::new(RichIo::new(a.multiline)?),
        Style::Programmatic => Box::new(ProgrammaticIo::new(std::io::stdin().lock())),
    })
}

/// `--api-base`: the same session, answered by a server.
fn run_remote(a: &ChatArgs, base: &str, sampling: SamplingParams) -> Result<()> {
    // `--model` keeps its local default; here that means "the server's only model".
    let model = (a.model.model != "default").then_some(a.model.model.as_str());
    let api_key = a.api_key.clone().or_else(|| std::env::var("OPENAI_API_KEY").ok());
    let remote = remote::Remote::connect(base, model, api_key)?;
    // The server applies the model's own template, which this side never
    // sees: a stand-in for it names the roles USER/ASSISTANT on screen and
    // the template "model's chat template" in `!!save` files
    // (`--conv-template` names one instead).
    const SERVER_TEMPLATE: &str = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let (format, _) = ChatFormat::select_with_source(
        a.conv_template.as_deref(),
        Some((SERVER_TEMPLATE, "", "")),
        &remote.model,
    )?;
    let mut io = make_io(a)?;
    if a.style != Style::Programmatic {
        eprintln!(
            "{} at {}. Commands: !!exit !!reset !!remove !!regen !!save FILE !!load FILE; Ctrl-C stops an answer.",
            remote.model, remote.base
        );
    }
    interrupt::install();
    let mut chat = Chat {
        backend: Backend::Remote(remote),
        format,
        system: a.conv_system_msg.clone(),
        messages: Vec::new(),
        context: a.context_length.unwrap_or(usize::MAX),
        max_new_tokens: a.max_new_tokens,
        sampling,
        debug: a.debug,
    };
    chat.run(io.as_mut(), !a.no_history)
}

/// Picks the prompt format: `--conv-template`, else the model's own chat
/// template, else FastChat's matching on the model's path (or its name),
/// else the default template.
fn choose_format(engine: &EngineHandle, tok: &Tokenizer, name: Option<&str>) -> Result<(ChatFormat, FormatSource)> {
    let info = engine.info();
    let path = info.path.display().to_string();
    let key = if match_template(&path).is_none() && match_template(&info.name).is_some() {
        info.name.clone()
    } else {
        path
    };
    let model_template = tok
        .chat_template()
        .map(|src| (src, tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or("")));
    ChatFormat::select_with_source(name, model_template, &key)
        .context("the model's chat template does not work here; name one with --conv-template")
}

/// Where answers come from.
enum Backend<'a> {
    /// A model loaded in this process.
    Local {
        engine: &'a EngineHandle,
        tok: &'a Tokenizer,
    },
    /// An OpenAI-compatible server (`--api-base`).
    Remote(remote::Remote),
}

/// One chat session.
struct Chat<'a> {
    backend: Backend<'a>,
    format: ChatFormat,
    /// `--conv-system-msg`, or the one loaded from a file.
    system: Option<String>,
    /// Alternating user and assistant messages.
    messages: Vec<ChatMessage>,
    context: usize,
    max_new_tokens: usize,
    sampling: SamplingParams,
    debug: bool,
}

/// How an answer ended.
enum Answer {
    Done(String),
    /// Ctrl-C, or an engine error (already reported).
    Stopped,
}

impl Chat<'_> {
    fn run(&mut self, io: &mut dyn ChatIo, history: bool) -> Result<()> {
        let start_system = self.system.clone();
        let start_format = self.format.clone();
        loop {
            if !history {
                self.messages.clear();
            }
            let (user, assistant) = self.format.role_names();
            let input = io.read_message(&user)?;
            let Some(input) = input else {
                io.notice("exit...")?;
                return Ok(());
            };
            let command = input.trim();
            let message = match command {
                "" | "!!exit" => {
                    io.notice("exit...")?;
                    return Ok(());
                }
                "!!reset" => {
                    io.notice("resetting...")?;
                    self.messages.clear();
                    self.system = start_system.clone();
                    self.format = start_format.clone();
                    continue;
                }
                "!!remove" => {
                    io.notice("removing last message...")?;
                    if self.messages.is_empty() {
                        io.notice("No messages to remove.")?;
                    } else {
                        self.pop_role("assistant");
                        self.pop_role("user");
                        self.reprint(io)?;
                    }
                    continue;
                }
                "!!regen" => {
                    io.notice("regenerating last message...")?;
                    if self.messages.is_empty() {
                        io.notice("No messages to regenerate.")?;
                        continue;
                    }
                    self.pop_role("assistant");
                    match self.messages.last() {
                        Some(m) if m.role == "user" => {
                            // As FastChat: shown with the message, then re-asked.
                            self.reprint(io)?;
                            self.messages.pop().map(|m| m.content).unwrap_or_default()
                        }
                        _ => {
                            io.notice("No user message to regenerate from.")?;
                            continue;
                        }
                    }
                }
                c if c == "!!save" || c.starts_with("!!save ") => {
                    match c.split_once(' ').map(|(_, f)| f.trim()).filter(|f| !f.is_empty()) {
                        Some(file) => self.save(io, file)?,
                        None => io.notice("usage: !!save <filename>")?,
                    }
                    continue;
                }
                c if c == "!!load" || c.starts_with("!!load ") => {
                    match c.split_once(' ').map(|(_, f)| f.trim()).filter(|f| !f.is_empty()) {
                        Some(file) => self.load(io, file)?,
                        None => io.notice("usage: !!load <filename>")?,
                    }
                    continue;
                }
                _ => input,
            };
            self.messages.push(ChatMessage::new("user", message));
            match self.answer(io, &assistant)? {
                Answer::Done(text) => self.messages.push(ChatMessage::new("assistant", text)),
                Answer::Stopped => {
                    // As FastChat: the unfinished exchange is forgotten.
                    self.pop_role("user");
                }
            }
        }
    }

    /// Removes the last message if it has this role.
    fn pop_role(&mut self, role: &str) {
        if self.messages.last().is_some_and(|m| m.role == role) {
            self.messages.pop();
        }
    }

    /// Shows the whole conversation again.
    fn reprint(&self, io: &mut dyn ChatIo) -> Result<()> {
        let (user, assistant) = self.format.role_names();
        for m in &self.messages {
            io.print_message(if m.role == "user" { &user } else { &assistant }, &m.content)?;
        }
        Ok(())
    }

    /// Streams the answer to the conversation so far.
    fn answer(&mut self, io: &mut dyn ChatIo, role: &str) -> Result<Answer> {
        let (engine, tok) = match &self.backend {
            Backend::Local { engine, tok } => (*engine, *tok),
            Backend::Remote(_) => return self.answer_remote(io, role),
        };
        let format = &self.format;
        let system = self.system.as_deref();
        let add_special = format.add_special_tokens();
        let fit = context::fit(
            &mut self.messages,
            self.context,
            self.max_new_tokens,
            &|m| format.render(m, system).map_err(anyhow::Error::from),
            &|p| tok.encode(p, add_special).map_err(anyhow::Error::from),
        )?;
        if fit.dropped_turns > 0 {
            io.notice(&format!(
                "(the conversation outgrew the {}-token context: dropped the oldest {} turn{})",
                self.context,
                fit.dropped_turns,
                if fit.dropped_turns == 1 { "" } else { "s" }
            ))?;
        }
        if fit.cut_tokens > 0 {
            io.notice(&format!(
                "(the message is too long for the {}-token context: its first {} tokens are left out)",
                self.context, fit.cut_tokens
            ))?;
        }
        let prompt_tokens = fit.ids.len();
        let mut req = GenerateRequest::new(Prompt::Ids(fit.ids), fit.max_new_tokens);
        req.sampling = self.sampling.clone();
        req.stop = StopRules {
            stop_strings: format.stop_strings(),
            stop_token_ids: format.stop_token_ids(),
            ignore_eos: false,
        };
        // The ids already hold what the template wrote (BOS included).
        req.add_special_tokens = false;

        let started = Instant::now();
        let mut stream = match engine.submit(req) {
            Ok(s) => s,
            Err(e) => {
                io.notice(&format!("error: {e}"))?;
                return Ok(Answer::Stopped);
            }
        };
        let guard = interrupt::answering();
        io.start_answer(role)?;
        // The engine's stream blocks; a forwarding thread lets this one wake
        // up for Ctrl-C and redraws. Dropping `rx` ends the thread at the next
        // event, and with it the stream, which cancels the request.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Some(event) = stream.next_blocking() {
                let last = matches!(event, Event::Done { .. } | Event::Error(_));
                if tx.send(event).is_err() || last {
                    break;
                }
            }
        });
        let mut text = String::new();
        let mut completion_tokens = 0;
        let outcome = loop {
            if interrupt::cancelled() {
                break None;
            }
            match rx.recv_timeout(Duration::from_millis(30)) {
                Ok(Event::Token { text: delta, .. }) => {
                    completion_tokens += 1;
                    text.push_str(&delta);
                    if !delta.is_empty() {
                        io.stream(&text, &delta)?;
                    }
                }
                Ok(Event::Done { text: rest, usage, .. }) => {
                    text.push_str(&rest);
                    if !rest.is_empty() {
                        io.stream(&text, &rest)?;
                    }
                    completion_tokens = usage.completion_tokens;
                    break Some(Ok(()));
                }
                Ok(Event::Error(e)) => break Some(Err(e)),
                Ok(Event::Prompt { .. }) => {}
                Err(RecvTimeoutError::Timeout) => io.tick(&text)?,
                Err(RecvTimeoutError::Disconnected) => break Some(Err("the engine stopped".to_string())),
            }
        };
        drop(rx);
        let seconds = started.elapsed().as_secs_f64();
        io.end_answer(&text)?;
        drop(guard);
        match outcome {
            None => {
                io.notice("stopped generation.")?;
                Ok(Answer::Stopped)
            }
            Some(Err(e)) => {
                io.notice(&format!("error: {e}"))?;
                Ok(Answer::Stopped)
            }
            Some(Ok(())) => {
                let text = text.trim().to_string();
                if self.debug {
                    let speed = if seconds > 0.0 {
                        (completion_tokens as f64 / seconds * 100.0).round() / 100.0
                    } else {
                        0.0
                    };
                    let msg = json!({
                        "conv_template": self.format.name(),
                        "prompt": fit.prompt,
                        "outputs": text,
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "speed (token/s)": speed,
                    });
                    io.notice(&format!("\n{msg}\n"))?;
                }
                Ok(Answer::Done(text))
            }
        }
    }

    /// Streams the server's answer (`--api-base`); the server applies the
    /// template and refuses conversations beyond its context.
    fn answer_remote(&mut self, io: &mut dyn ChatIo, role: &str) -> Result<Answer> {
        let Backend::Remote(remote) = &self.backend else {
            unreachable!("answer_remote is called for a remote backend only")
        };
        let body = remote.body(
            self.system.as_deref(),
            &self.messages,
            &remote::RemoteSampling {
                temperature: self.sampling.temperature,
                top_p: self.sampling.top_p,
                repetition_penalty: self.sampling.repetition_penalty,
                max_tokens: self.max_new_tokens,
                seed: self.sampling.seed,
            },
        );
        let started = Instant::now();
        let guard = interrupt::answering();
        io.start_answer(role)?;
        // The HTTP stream blocks; as for the engine, a thread forwards it.
        // Dropping `rx` ends the thread at the next piece, which closes the
        // connection and so cancels the answer on the server.
        let (tx, rx) = mpsc::channel();
        {
            let (remote, body) = (remote.clone(), body.clone());
            std::thread::spawn(move || remote.stream(&body, &tx));
        }
        {
            let mut text = String::new();
            let mut pieces = 0;
            let outcome = loop {
                if interrupt::cancelled() {
                    break None;
                }
                match rx.recv_timeout(Duration::from_millis(30)) {
                    Ok(remote::Piece::Text(delta)) => {
                        pieces += 1;
                        text.push_str(&delta);
                        io.stream(&text, &delta)?;
                    }
                    Ok(remote::Piece::Done(tokens)) => break Some(Ok(tokens.unwrap_or(pieces))),
                    Ok(remote::Piece::Error(e)) => break Some(Err(e)),
                    Err(RecvTimeoutError::Timeout) => io.tick(&text)?,
                    Err(RecvTimeoutError::Disconnected) => {
                        break Some(Err("the stream ended without an answer".into()))
                    }
                }
            };
            drop(rx);
            let seconds = started.elapsed().as_secs_f64();
            io.end_answer(&text)?;
            drop(guard);
            match outcome {
                None => {
                    io.notice("stopped generation.")?;
                    Ok(Answer::Stopped)
                }
                Some(Err(e)) => {
                    io.notice(&format!("error: {e}"))?;
                    Ok(Answer::Stopped)
                }
                Some(Ok(completion_tokens)) => {
                    let text = text.trim().to_string();
                    if self.debug {
                        let speed = if seconds > 0.0 {
                            (completion_tokens as f64 / seconds * 100.0).round() / 100.0
                        } else {
                            0.0
                        };
                        let msg = json!({
                            "api_base": remote.base,
                            "model": remote.model,
                            "messages": body["messages"],
                            "outputs": text,
                            "completion_tokens": completion_tokens,
                            "speed (token/s)": speed,
                        });
                        io.notice(&format!("\n{msg}\n"))?;
                    }
                    Ok(Answer::Done(text))
                }
            }
        }
    }

    /// `!!save FILE`: FastChat's `conv.dict()` JSON (`.json` added when the
    /// name has no dot).
    fn save(&self, io: &mut dyn ChatIo, file: &str) -> Result<()> {
        let file = if file.contains('.') {
            file.to_string()
        } else {
            format!("{file}.json")
        };
        io.notice(&format!("saving... {file}"))?;
        let saved = self.format.to_saved(&self.messages, self.system.as_deref())?;
        let text = serde_json::to_string(&saved)?;
        if let Err(e) = std::fs::write(&file, text) {
            io.notice(&format!("could not save {file}: {e}"))?;
        }
        Ok(())
    }

    /// `!!load FILE`: reads FastChat's layout; the file's template is used
    /// when it names one (as FastChat does), the current one otherwise.
    fn load(&mut self, io: &mut dyn ChatIo, file: &str) -> Result<()> {
        let mut file = file.to_string();
        if !Path::new(&file).exists() {
            if !file.ends_with(".json") && Path::new(&format!("{file}.json")).exists() {
                file.push_str(".json");
            } else {
                io.notice(&format!("file not found: {file}"))?;
                return Ok(());
            }
        }
        io.notice(&format!("loading... {file}"))?;
        let saved: SavedConversation = match std::fs::read_to_string(&file)
            .map_err(anyhow::Error::from)
            .and_then(|t| serde_json::from_str(&t).map_err(anyhow::Error::from))
        {
            Ok(s) => s,
            Err(e) => {
                io.notice(&format!(
                    "could not load {file}: {e} (expected FastChat's conversation JSON)"
                ))?;
                return Ok(());
            }
        };
        if saved.template_name != self.format.name() {
            if saved.template_name == MODEL_TEMPLATE_NAME {
                io.notice(&format!(
                    "(the file used a model's own chat template; continuing with {})",
                    self.format.name()
                ))?;
            } else {
                match ChatFormat::named(&saved.template_name) {
                    Ok(f) => {
                        io.notice(&format!("(using the file's template {})", saved.template_name))?;
                        self.format = f;
                    }
                    Err(e) => io.notice(&format!("({e}; continuing with {})", self.format.name()))?,
                }
            }
        }
        let default = self.format.default_system_message().unwrap_or("");
        self.system = (saved.system_message != default).then(|| saved.system_message.clone());
        self.messages = ChatFormat::saved_messages(&saved);
        self.reprint(io)
    }
}
