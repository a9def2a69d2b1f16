//! The three faces of `vicugna chat` (FastChat's `ChatIO` classes): how a
//! message is read and how an answer is shown.

use std::borrow::Cow;
use std::io::{self, BufRead, IsTerminal, Read, Write};

use anyhow::Result;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::{Hinter, HistoryHinter};
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Cmd, Config, Context, Editor, EventHandler, Helper, KeyCode, KeyEvent, Modifiers};

use super::live::LiveMarkdown;

/// The end of a message in the programmatic style, exactly FastChat's.
pub const END_OF_MESSAGE: &str = " __END_OF_A_MESSAGE_47582648__\n";

/// The chat commands, offered for completion.
const COMMANDS: &[&str] = &["!!exit", "!!reset", "!!remove", "!!regen", "!!save", "!!load"];

/// How the chat talks to its user.
pub trait ChatIo {
    /// Reads the next message; `None` at the end of input.
    fn read_message(&mut self, role: &str) -> Result<Option<String>>;
    /// An answer from `role` starts.
    fn start_answer(&mut self, role: &str) -> Result<()>;
    /// The answer so far is `text`, of which `delta` is new.
    fn stream(&mut self, text: &str, delta: &str) -> Result<()>;
    /// Time passed with no new text (lets the rich style redraw).
    fn tick(&mut self, _text: &str) -> Result<()> {
        Ok(())
    }
    /// The answer is complete (or was stopped) at `text`.
    fn end_answer(&mut self, text: &str) -> Result<()>;
    /// Shows a whole past message (after `!!remove`, `!!regen`, `!!load`).
    fn print_message(&mut self, role: &str, text: &str) -> Result<()>;
    /// A status line ("resetting...", notices).
    fn notice(&mut self, text: &str) -> Result<()> {
        let mut out = io::stdout().lock();
        writeln!(out, "{text}")?;
        out.flush()?;
        Ok(())
    }
}

/// Writes and flushes.
fn put(s: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()
}

/// The part of `delta` to print, given that `text` (ending in `delta`) is
/// shown without its leading whitespace.
fn visible_delta<'a>(text: &str, delta: &'a str) -> &'a str {
    let before = &text[..text.len() - delta.len()];
    if before.trim_start().is_empty() {
        delta.trim_start()
    } else {
        delta
    }
}

/// Completion of `!!` commands and hints from history (FastChat's rich style
/// has both).
struct ChatHelper {
    hinter: HistoryHinter,
}

impl Completer for ChatHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let typed = &line[..pos];
        if !typed.starts_with("!!") || typed.contains(' ') {
            return Ok((0, Vec::new()));
        }
        let found = COMMANDS
            .iter()
            .filter(|c| c.starts_with(typed))
            .map(|c| Pair {
                display: c.to_string(),
                replacement: c.to_string(),
            })
            .collect();
        Ok((0, found))
    }
}

impl Hinter for ChatHelper {
    type Hint = String;

    fn hint(&self, line: &str, pos: usize, ctx: &Context<'_>) -> Option<String> {
        self.hinter.hint(line, pos, ctx)
    }
}

impl Highlighter for ChatHelper {
    fn highlight_hint<'h>(&self, hint: &'h str) -> Cow<'h, str> {
        Cow::Owned(format!("\x1b[2m{hint}\x1b[0m"))
    }
}

impl Validator for ChatHelper {}
impl Helper for ChatHelper {}

/// Reads lines: with the line editor (history, editing) when stdin is a
/// terminal, else plainly from stdin.
enum LineReader {
    Editor(Box<Editor<ChatHelper, DefaultHistory>>),
    Plain(io::StdinLock<'static>),
}

/// What one read gave.
enum Line {
    Text(String),
    /// Ctrl-C at the prompt.
    Interrupted,
    Eof,
}

impl LineReader {
    fn new(multiline: bool) -> Result<Self> {
        if !io::stdin().is_terminal() {
            return Ok(LineReader::Plain(io::stdin().lock()));
        }
        let config = Config::builder()
            .auto_add_history(true)
            .history_ignore_space(true)
            .build();
        let mut editor: Editor<ChatHelper, DefaultHistory> = Editor::with_config(config)?;
        editor.set_helper(Some(ChatHelper {
            hinter: HistoryHinter::new(),
        }));
        if multiline {
            // Esc+Enter (sent as Alt+Enter) breaks the line, as in FastChat.
            editor.bind_sequence(
                KeyEvent(KeyCode::Enter, Modifiers::ALT),
                EventHandler::Simple(Cmd::Newline),
            );
        }
        Ok(LineReader::Editor(Box::new(editor)))
    }

    fn is_editor(&self) -> bool {
        matches!(self, LineReader::Editor(_))
    }

    fn read(&mut self, prompt: &str, styled: &str) -> Result<Line> {
        match self {
            LineReader::Editor(editor) => match editor.readline(&(prompt, styled)) {
                Ok(line) => Ok(Line::Text(line)),
                Err(ReadlineError::Interrupted) => Ok(Line::Interrupted),
                Err(ReadlineError::Eof) => Ok(Line::Eof),
                Err(e) => Err(e.into()),
            },
            LineReader::Plain(stdin) => {
                put(prompt)?;
                let mut line = String::new();
                if stdin.read_line(&mut line)? == 0 {
                    return Ok(Line::Eof);
                }
                if line.ends_with('\n') {
                    line.pop();
                    if line.ends_with('\r') {
                        line.pop();
                    }
                }
                Ok(Line::Text(line))
            }
        }
    }

    /// Reads one message; Ctrl-C at the prompt clears it and asks again.
    /// `multiline`: read lines until end of input (Ctrl-D on an empty line),
    /// FastChat's simple multiline mode.
    fn read_message(&mut self, prompt: &str, styled: &str, multiline: bool) -> Result<Option<String>> {
        loop {
            let first = match self.read(prompt, styled)? {
                Line::Text(t) => t,
                Line::Eof => return Ok(None),
                Line::Interrupted => {
                    put("(Ctrl-C stops an answer; type !!exit or press Ctrl-D to quit)\n")?;
                    continue;
                }
            };
            if !multiline {
                return Ok(Some(first));
            }
            // Simple multiline: lines until Ctrl-D (end of input) on an empty line.
            let mut lines = vec![first.trim().to_string()];
            while let Line::Text(t) = self.read("", "")? {
                lines.push(t.trim().to_string());
            }
            return Ok(Some(lines.join("\n")));
        }
    }
}

/// Plain streaming text, FastChat's simple style.
pub struct SimpleIo {
    reader: LineReader,
    multiline: bool,
}

impl SimpleIo {
    pub fn new(multiline: bool) -> Result<Self> {
        Ok(SimpleIo {
            reader: LineReader::new(false)?,
            multiline,
        })
    }
}

impl ChatIo for SimpleIo {
    fn read_message(&mut self, role: &str) -> Result<Option<String>> {
        let prompt = if self.multiline {
            format!("{role} [ctrl-d/z on empty line to end]: ")
        } else {
            format!("{role}: ")
        };
        self.reader.read_message(&prompt, &prompt, self.multiline)
    }

    fn start_answer(&mut self, role: &str) -> Result<()> {
        Ok(put(&format!("{role}: "))?)
    }

    fn stream(&mut self, text: &str, delta: &str) -> Result<()> {
        Ok(put(visible_delta(text, delta))?)
    }

    fn end_answer(&mut self, _text: &str) -> Result<()> {
        Ok(put("\n")?)
    }

    fn print_message(&mut self, role: &str, text: &str) -> Result<()> {
        Ok(put(&format!("{role}: {text}\n"))?)
    }
}

/// Markdown rendered live, line editing with history and `!!` completion:
/// FastChat's rich style.
pub struct RichIo {
    reader: LineReader,
    multiline: bool,
    live: Option<LiveMarkdown>,
    /// stdout is a terminal (else answers stream as plain text).
    terminal: bool,
}

impl RichIo {
    pub fn new(multiline: bool) -> Result<Self> {
        let reader = LineReader::new(multiline)?;
        if multiline && reader.is_editor() {
            put("(Esc+Enter or Alt+Enter starts a new line; Enter sends)\n")?;
        }
        Ok(RichIo {
            reader,
            multiline,
            live: None,
            terminal: io::stdout().is_terminal(),
        })
    }

    fn role_line(&self, role: &str) -> String {
        let role = role.replace('/', "|");
        if self.terminal {
            format!("\x1b[1m{role}:\x1b[0m\n")
        } else {
            format!("{role}:\n")
        }
    }
}

impl ChatIo for RichIo {
    fn read_message(&mut self, role: &str) -> Result<Option<String>> {
        let prompt = format!("{role}: ");
        let styled = format!("\x1b[1m{role}:\x1b[0m ");
        // The editor takes Esc+Enter for new lines; plain stdin reads
        // FastChat's simple way (until end of input).
        let multiline = self.multiline && !self.reader.is_editor();
        self.reader.read_message(&prompt, &styled, multiline)
    }

    fn start_answer(&mut self, role: &str) -> Result<()> {
        put(&self.role_line(role))?;
        self.live = self.terminal.then(LiveMarkdown::new);
        Ok(())
    }

    fn stream(&mut self, text: &str, delta: &str) -> Result<()> {
        match &mut self.live {
            Some(live) => live.update(text.trim_start(), &mut io::stdout().lock())?,
            None => put(visible_delta(text, delta))?,
        }
        Ok(())
    }

    fn tick(&mut self, text: &str) -> Result<()> {
        if let Some(live) = &mut self.live {
            live.tick(text.trim_start(), &mut io::stdout().lock())?;
        }
        Ok(())
    }

    fn end_answer(&mut self, text: &str) -> Result<()> {
        match self.live.take() {
            Some(mut live) => live.finish(text.trim_start(), &mut io::stdout().lock())?,
            None => put("\n")?,
        }
        Ok(put("\n")?)
    }

    fn print_message(&mut self, role: &str, text: &str) -> Result<()> {
        self.start_answer(role)?;
        self.end_answer(text)
    }
}

/// FastChat's programmatic style, for scripts: a message is everything up to
/// [`END_OF_MESSAGE`]; each message and answer is printed as
/// `[!OP:ROLE]: text`.
pub struct ProgrammaticIo<R> {
    input: R,
}

impl<R: Read> ProgrammaticIo<R> {
    pub fn new(input: R) -> Self {
        ProgrammaticIo { input }
    }
}

/// Reads bytes up to and including `end`; `None` at the end of input before
/// `end` was seen.
pub fn read_until_marker(input: &mut impl Read, end: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(end) {
        match input.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => buf.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(buf.len() - end.len());
    Ok(Some(buf))
}

impl<R: Read> ChatIo for ProgrammaticIo<R> {
    fn read_message(&mut self, role: &str) -> Result<Option<String>> {
        let Some(bytes) = read_until_marker(&mut self.input, END_OF_MESSAGE.as_bytes())? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        put(&format!("[!OP:{role}]: {text}\n"))?;
        Ok(Some(text))
    }

    fn start_answer(&mut self, role: &str) -> Result<()> {
        Ok(put(&format!("[!OP:{role}]: "))?)
    }

    fn stream(&mut self, text: &str, delta: &str) -> Result<()> {
        Ok(put(visible_delta(text, delta))?)
    }

    fn end_answer(&mut self, _text: &str) -> Result<()> {
        Ok(put("\n")?)
    }

    fn print_message(&mut self, role: &str, text: &str) -> Result<()> {
        Ok(put(&format!("[!OP:{role}]: {text}\n"))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_ends_a_message() {
        let mut input: &[u8] =
            b"Hello\nworld __END_OF_A_MESSAGE_47582648__\n!!exit __END_OF_A_MESSAGE_47582648__\nrest";
        let end = END_OF_MESSAGE.as_bytes();
        assert_eq!(read_until_marker(&mut input, end).unwrap().unwrap(), b"Hello\nworld");
        assert_eq!(read_until_marker(&mut input, end).unwrap().unwrap(), b"!!exit");
        assert_eq!(
            read_until_marker(&mut input, end).unwrap(),
            None,
            "no marker: end of input"
        );
    }

    #[test]
    fn leading_whitespace_of_an_answer_is_not_shown() {
        assert_eq!(visible_delta(" ", " "), "");
        assert_eq!(visible_delta(" Hi", "Hi"), "Hi");
        assert_eq!(visible_delta(" Hi there", " there"), " there");
        assert_eq!(visible_delta("\n Hi", " Hi"), "Hi");
    }

    #[test]
    fn commands_complete() {
        let helper = ChatHelper {
            hinter: HistoryHinter::new(),
        };
        let history = DefaultHistory::new();
        let ctx = Context::new(&history);
        let (_, found) = helper.complete("!!re", 4, &ctx).unwrap();
        let names: Vec<_> = found.iter().map(|p| p.replacement.as_str()).collect();
        assert_eq!(names, ["!!reset", "!!remove", "!!regen"]);
        assert!(helper.complete("hello", 5, &ctx).unwrap().1.is_empty());
    }
}
