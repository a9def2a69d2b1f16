//! `vicugna chat --api-base URL`: the terminal chat answered by a running
//! `vicugna serve` (the default model, greedy) instead of a model loaded by
//! the chat itself; FastChat's `!!` commands work the same, and an unknown
//! model or an unreachable server is a clear error.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const END: &str = " __END_OF_A_MESSAGE_47582648__\n";
const TIMEOUT: Duration = Duration::from_secs(600);

/// A `vicugna serve` on free ports, killed when dropped.
struct Server {
    child: Child,
    /// The `/v1` base URL.
    api: String,
    /// The served model's name.
    model: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() -> Server {
    vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("the default model is needed for these tests: {e}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["serve", "--port", "0", "--controller-port", "0", "--worker-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut server = Server {
        child,
        api: String::new(),
        model: String::new(),
    };
    let api = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("vicugna serve printed no API URL");
        if let Some(rest) = line.trim().strip_prefix("API:") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    server.api = if api.ends_with("/v1") { api } else { format!("{api}/v1") };
    let client = reqwest::blocking::Client::new();
    for _ in 0..600 {
        if let Ok(r) = client.get(format!("{}/models", server.api)).send() {
            if let Ok(v) = r.json::<Value>() {
                if let Some(id) = v["data"][0]["id"].as_str() {
                    server.model = id.to_string();
                    return server;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("vicugna serve listed no model within a minute");
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

impl Run {
    fn answers(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("[!OP:ASSISTANT]: "))
            .collect()
    }

    fn debug(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("debug line {l:?}: {e}")))
            .collect()
    }
}

/// `vicugna chat --style programmatic --temperature 0` with `args`, sending `messages`.
fn chat(args: &[&str], messages: &[&str]) -> Run {
    let input: String = messages.iter().map(|m| format!("{m}{END}")).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicugna"))
        .args(["chat", "--style", "programmatic", "--temperature", "0"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vicugna");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
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
fn chat_talks_to_a_running_server() {
    let server = serve();
    let api = server.api.as_str();

    // Answers stream from the server; the conversation's history goes with
    // each call; !!regen and !!reset work as with a local model.
    let run = chat(
        &["--api-base", api, "--max-new-tokens", "32", "--debug"],
        &[
            "What is the capital of France?",
            "!!regen",
            "And of Italy?",
            "!!reset",
            "Hello",
            "!!exit",
        ],
    );
    assert_eq!(run.code, Some(0), "{run}");
    let answers = run.answers();
    assert_eq!(answers.len(), 4, "{run}");
    assert!(answers[0].contains("Paris"), "{run}");
    assert_eq!(answers[0], answers[1], "greedy: !!regen gives the same answer\n{run}");
    let debug = run.debug();
    assert_eq!(debug.len(), 4, "{run}");
    assert_eq!(debug[0]["model"], server.model.as_str(), "{run}");
    assert_eq!(
        debug[1]["messages"].as_array().unwrap().len(),
        1,
        "regen re-asks the one message\n{run}"
    );
    let third = debug[2]["messages"].as_array().unwrap();
    assert_eq!(third.len(), 3, "history goes with the call\n{run}");
    assert_eq!(third[1]["content"], answers[1], "{run}");
    assert_eq!(
        debug[3]["messages"].as_array().unwrap().len(),
        1,
        "!!reset forgets\n{run}"
    );
    assert!(
        run.stdout.contains("resetting...\n") && run.stdout.ends_with("exit...\n"),
        "{run}"
    );
    assert!(
        run.stdout.starts_with("[!OP:USER]: What is the capital of France?\n"),
        "roles are named as for a model's own template\n{run}"
    );

    // --model with the served name works; another name is refused, listing the served ones.
    let named = chat(
        &["--api-base", api, "--model", &server.model, "--max-new-tokens", "4"],
        &["Hi"],
    );
    assert_eq!(named.code, Some(0), "{named}");
    assert_eq!(named.answers().len(), 1, "{named}");
    let unknown = chat(&["--api-base", api, "--model", "no-such-model"], &["Hi"]);
    assert_ne!(unknown.code, Some(0), "{unknown}");
    assert!(
        unknown.stderr.contains("does not serve model \"no-such-model\"") && unknown.stderr.contains(&server.model),
        "{unknown}"
    );
    assert!(!unknown.stderr.contains("panicked"), "{unknown}");
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let run = chat(&["--api-base", &url], &["Hi"]);
    assert_ne!(run.code, Some(0), "{run}");
    assert!(
        run.stderr.contains(&format!("cannot reach the server at {url}/v1")) && run.stderr.contains("vicugna serve"),
        "{run}"
    );
    assert!(!run.stderr.contains("panicked"), "{run}");
    let bad = chat(&["--api-base", "ftp://example"], &["Hi"]);
    assert!(bad.stderr.contains("only http and https"), "{bad}");
}
