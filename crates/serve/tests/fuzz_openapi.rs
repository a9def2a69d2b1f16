//! Schema fuzzing: schemathesis (from PyPI, in a venv under target/) sends
//! requests generated from `/openapi.json` — valid ones, boundary cases and
//! invalid ones — to a real `vicugna serve` with the default model, and no
//! answer may be a 5xx; afterwards the server process is still running and
//! still answers. Generations are kept short by lowering `max_tokens` and `n`
//! in the copy of the schema the fuzzer reads. Outside CI the test skips when
//! Python, PyPI or the `vicugna` binary is missing; with CI=true it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The schemathesis release the test was written against (its CLI changed in 4.0).
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Test cases per operation and phase: about a minute on two cores.
const MAX_EXAMPLES: &str = "20";

fn need<T>(what: Result<T, String>) -> Option<T> {
    match what {
        Ok(p) => Some(p),
        Err(m) if in_ci() => panic!("{m}"),
        Err(m) => {
            eprintln!("skipping: {m}");
            None
        }
    }
}

fn vicugna_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("vicugna"));
    match bin {
        Some(b) if b.exists() => Ok(b),
        _ => Err("the vicugna binary is missing beside the tests (cargo build -p vicugna-cli)".into()),
    }
}

/// `schemathesis` in its own venv under target/ (made once; its dependencies
/// do not mix with the FastChat venv's pydantic 1).
fn schemathesis() -> Result<PathBuf, String> {
    let dir = target_dir().join("schemathesis-venv");
    let st = dir.join("bin/schemathesis");
    let ready = dir.join(".ready");
    if ready.exists() {
        return Ok(st);
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("python3 -m venv failed (install python3-venv)".into());
    }
    let ok = Command::new(dir.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            SCHEMATHESIS,
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err(format!("pip install {SCHEMATHESIS} failed"));
    }
    std::fs::write(&ready, "").map_err(|e| e.to_string())?;
    Ok(st)
}

/// `vicugna serve`, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `vicugna serve` on free ports; returns it with the API's URL.
fn serve(bin: &Path, log_dir: &Path) -> (Server, String) {
    let mut child = Command::new(bin)
        .args(["serve", "--port", "0", "--controller-port", "0", "--worker-port", "0"])
        // Two names, so that the page's arena can start.
        .args(["--model", "default", "--model-names", "fuzz-a,fuzz-b"])
        .arg("--log-dir")
        .arg(log_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("vicugna serve printed no API URL");
        if let Some(rest) = line.trim().strip_prefix("web page:") {
            break rest.trim().trim_end_matches('/').to_string();
        }
    };
    (server, url)
}

/// The served schema made for fuzzing this server: wherever a request has
/// `max_tokens` it is required and at most 8, `n` at most 2 (the fuzzer stays
/// inside them for valid cases and steps just past them for invalid ones), so
/// every generation is short; `model` is one of the served names, so that
/// most requests reach the model rather than stop at a 404.
fn fuzz_schema(mut doc: Value, models: &[Value]) -> Value {
    fn walk(v: &mut Value, models: &[Value]) {
        match v {
            Value::Object(m) => {
                let mut needs_tokens = false;
                if let Some(p) = m.get_mut("properties").and_then(Value::as_object_mut) {
                    if let Some(t) = p.get_mut("max_tokens") {
                        t["maximum"] = json!(8);
                        needs_tokens = true;
                    }
                    if let Some(n) = p.get_mut("n") {
                        n["maximum"] = json!(2);
                    }
                    if let Some(model) = p.get_mut("model") {
                        model["enum"] = json!(models);
                    }
                }
                if needs_tokens {
                    let req = m.entry("required").or_insert_with(|| json!([]));
                    if let Some(r) = req.as_array_mut() {
                        r.push(json!("max_tokens"));
                    }
                }
                m.values_mut().for_each(|x| walk(x, models));
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, models)),
            _ => {}
        }
    }
    walk(&mut doc, models);
    doc
}

#[test]
fn openapi_fuzzing_finds_no_server_error() {
    let Some(bin) = need(vicugna_bin()) else { return };
    let Some(st) = need(schemathesis()) else { return };
    model_path();
    let work = target_dir().join(format!("fuzz-openapi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let (mut server, url) = serve(&bin, &work.join("logs"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (doc, models): (Value, Value) = rt.block_on(async {
        eventually(Duration::from_secs(60), "the model is served", || async {
            let Ok(r) = http().get(format!("{url}/v1/models")).send().await else {
                return false;
            };
            let v: Value = r.json().await.unwrap_or_default();
            v["data"].as_array().is_some_and(|d| !d.is_empty())
        })
        .await;
        let models: Value = http()
            .get(format!("{url}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let doc = http()
            .get(format!("{url}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (doc, models)
    });
    let names: Vec<Value> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    let schema = work.join("openapi.json");
    std::fs::write(&schema, serde_json::to_vec_pretty(&fuzz_schema(doc, &names)).unwrap()).unwrap();

    let t0 = Instant::now();
    let mut fuzz = Command::new(&st)
        .arg("run")
        .arg(&schema)
        .args(["--url", &url])
        .args(["--checks", "not_a_server_error"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", "23", "--workers", "2", "--request-timeout", "60"])
        .arg("--report-dir")
        .arg(work.join("report"))
        .current_dir(&work)
        // Files, not pipes: a full pipe would stall the fuzzer.
        .stdout(std::fs::File::create(work.join("stdout.txt")).unwrap())
        .stderr(std::fs::File::create(work.join("stderr.txt")).unwrap())
        .spawn()
        .unwrap();
    // A bound on the whole run, so a hang fails instead of blocking CI.
    let status = loop {
        if let Some(s) = fuzz.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let _ = fuzz.kill();
            panic!("schemathesis did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let read = |f: &str| std::fs::read_to_string(work.join(f)).unwrap_or_default();
    let text = format!("{}\n{}", read("stdout.txt"), read("stderr.txt"));
    eprintln!("schemathesis ran for {:.0?}:\n{text}", t0.elapsed());
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "vicugna serve exited during fuzzing"
    );
    assert!(status.success(), "schemathesis found failures:\n{text}");
    assert!(!text.contains("Server error"), "{text}");

    // Still serving after all that.
    let (s, r) = rt.block_on(async {
        let models: Value = http()
            .get(format!("{url}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let model = models["data"][0]["id"].clone();
        post(
            &format!("{url}/v1/chat/completions"),
            &json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        )
        .await
    });
    assert_eq!(s, 200, "{r}");
    assert!(server.0.try_wait().unwrap().is_none());
    drop(server);
    let _ = std::fs::remove_dir_all(&work);
}
