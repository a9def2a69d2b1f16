//! `vicugna serve` (controller, one worker and the OpenAI gateway on this
//! machine), and `vicugna controller|worker|api` to run the parts separately.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::TcpListener;
use vicugna_engine::{EngineHandle, EngineOptions};
use vicugna_serve::{
    listener_url, os_signal, shutdown_channel, ControlAuth, ControllerOptions, DispatchMethod, GatewayOptions,
    Shutdown, WebOptions, Worker, WorkerHosts, WorkerOptions,
};

use crate::model_arg::ModelArgs;

/// Settings of the worker part, shared by `serve` and `worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerPartArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Names to serve the model under, comma-separated (default: the file or directory name).
    #[arg(long, value_delimiter = ',')]
    model_names: Option<Vec<String>>,
    /// A FastChat conversation template to use instead of the model's own chat template.
    #[arg(long)]
    conv_template: Option<String>,
    /// A Jinja chat template file to use instead of the model's own (as vLLM's
    /// `--chat-template`), e.g. one that renders `tools`.
    #[arg(long, value_name = "FILE", conflicts_with = "conv_template")]
    chat_template: Option<std::path::PathBuf>,
    /// Requests decoded together in the engine's batch.
    #[arg(long, default_value_t = 16)]
    limit_worker_concurrency: usize,
    /// Requests that may wait for a batch slot; beyond this the API answers 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Send a stream chunk every N tokens.
    #[arg(long, default_value_t = 1)]
    stream_interval: usize,
    /// Seconds between heartbeats [env FASTCHAT_WORKER_HEART_BEAT_INTERVAL, default 45].
    #[arg(long)]
    heart_beat_interval: Option<f64>,
    /// Embeddings: cut inputs longer than the context instead of pooling chunks.
    #[arg(long)]
    embed_in_truncate: bool,
    /// Embeddings: most tokens of one input (0: the model's context length, also the most).
    #[arg(long, default_value_t = 0)]
    embed_max_input_tokens: usize,
    /// Embeddings: most tokens of all inputs of one request together.
    #[arg(long, default_value_t = vicugna_serve::worker::DEFAULT_EMBED_MAX_REQUEST_TOKENS)]
    embed_max_request_tokens: usize,
    /// Prompt tokens run per engine step while other requests share it (a long
    /// prompt is prefilled in slices this big so decoding and short requests keep moving).
    #[arg(long, default_value_t = EngineOptions::default().step_token_budget)]
    step_token_budget: usize,
}

/// The control plane's secret, shared by `serve`, `controller`, `worker` and `api`.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// The secret every controller and worker call must carry; give the same one to every part [env VICUGNA_CONTROL_SECRET].
    #[arg(long, value_name = "SECRET")]
    control_secret: Option<String>,
    /// A file whose first line is the control secret.
    #[arg(long, value_name = "FILE", conflicts_with = "control_secret")]
    control_secret_file: Option<PathBuf>,
    /// No control secret, so that FastChat's own controller, workers and API server can join. INSECURE: anyone who reaches the controller or worker ports can then register workers (and receive prompts) and generate.
    #[arg(long, conflicts_with_all = ["control_secret", "control_secret_file"])]
    insecure_fastchat_compat: bool,
}

/// Where the control secret comes from when no flag gives it.
const CONTROL_SECRET_ENV: &str = "VICUGNA_CONTROL_SECRET";

impl ControlArgs {
    /// The control plane's auth for the part `what`; `serve` (`generate`)
    /// makes a random secret when none is given, the separate parts refuse to start.
    fn auth(&self, what: &str, generate: bool) -> Result<ControlAuth> {
        let env = std::env::var(CONTROL_SECRET_ENV).ok().filter(|s| !s.trim().is_empty());
        if self.insecure_fastchat_compat {
            if env.is_some() {
                anyhow::bail!(
                    "vicugna {what}: --insecure-fastchat-compat turns the control secret off, but {CONTROL_SECRET_ENV} sets one; unset one of them"
                );
            }
            eprintln!(
                "vicugna {what}: WARNING: --insecure-fastchat-compat: the control plane takes calls without a secret. \
                 Anyone who can reach the controller or worker ports can register workers (and so receive prompts \
                 and answer clients) and generate. Use it only on a network you trust."
            );
            return Ok(ControlAuth::Open);
        }
        let (text, from) = if let Some(s) = &self.control_secret {
            (s.clone(), "--control-secret".to_string())
        } else if let Some(f) = &self.control_secret_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the control secret file {}", f.display()))?;
            (
                t.lines().next().unwrap_or("").to_string(),
                format!("--control-secret-file {}", f.display()),
            )
        } else if let Some(e) = env {
            (e, CONTROL_SECRET_ENV.to_string())
        } else if generate {
            return Ok(ControlAuth::default());
        } else {
            anyhow::bail!(
                "vicugna {what}: no control secret. The controller, workers and API must share one: give it with \
                 --control-secret SECRET, --control-secret-file FILE or {CONTROL_SECRET_ENV} (e.g. from `openssl rand -hex 32`), \
                 or run every part with --insecure-fastchat-compat to let FastChat parts in without one"
            )
        };
        ControlAuth::secret(&text).map_err(|e| anyhow::anyhow!("vicugna {what}: {from}: {e}"))
    }
}

/// The API's HTTP policy, shared by `serve` and `api`.
#[derive(Args, Debug, Clone)]
pub struct ApiHttpArgs {
    /// Web origins allowed to call the API from a browser (CORS), comma-separated, e.g. https://app.example.com; `*` for any. Default: none.
    #[arg(long, value_delimiter = ',')]
    allow_origins: Option<Vec<String>>,
    /// With --api-keys: leave the web page's /api/* open to anyone (the page otherwise asks for a key).
    #[arg(long)]
    public_page: bool,
    /// With --api-keys: leave /metrics open to anyone.
    #[arg(long)]
    public_metrics: bool,
}

impl ApiHttpArgs {
    fn apply(&self, o: &mut GatewayOptions) {
        o.allow_origins = self
            .allow_origins
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        o.public_page = self.public_page;
        o.public_metrics = self.public_metrics;
    }
}

/// Settings of the web page, shared by `serve` and `api`.
#[derive(Args, Debug, Clone)]
pub struct WebArgs {
    /// Where the page's conversation and vote logs go, one JSONL file per day [default: $VICUGNA_HOME/logs].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Do not log the page's conversations and votes.
    #[arg(long, conflicts_with = "log_dir")]
    no_log: bool,
    /// Do not serve the web page (and its /api endpoints) at all.
    #[arg(long)]
    no_page: bool,
    /// Longest message the page accepts, in characters.
    #[arg(long, default_value_t = 12_000)]
    max_input_chars: usize,
    /// User turns per conversation on the page.
    #[arg(long, default_value_t = 50)]
    max_turns: usize,
    /// Messages per minute the page accepts from one address (0 = no limit).
    #[arg(long, default_value_t = 30)]
    rate_limit: usize,
    /// Votes per hour the page accepts from one address (0 = no limit); an
    /// address over it is flagged and its votes leave the leaderboard.
    #[arg(long, default_value_t = vicugna_serve::web::DEFAULT_VOTE_LIMIT)]
    vote_limit: usize,
    /// Reverse proxies (IPs or CIDR blocks, comma-separated) whose
    /// X-Forwarded-For / Forwarded / X-Real-IP / CF-Connecting-IP headers name
    /// the page's client; from any other peer those headers are ignored.
    #[arg(long, value_delimiter = ',')]
    trusted_proxies: Vec<vicugna_serve::web::IpNet>,
}

impl WebArgs {
    fn options(&self) -> Result<WebOptions> {
        let log_dir = if self.no_log || self.no_page {
            None
        } else {
            let dir = match &self.log_dir {
                Some(d) => d.clone(),
                None => vicugna_engine::default_model::vicugna_home().join("logs"),
            };
            // Fail at start, not at the first vote, when the directory is unusable.
            vicugna_serve::web::log::ConvLog::open(&dir)?;
            Some(std::path::absolute(&dir).unwrap_or(dir))
        };
        Ok(WebOptions {
            log_dir,
            max_input_chars: self.max_input_chars.max(1),
            max_turns: self.max_turns.max(1),
            rate_limit_per_minute: self.rate_limit,
            vote_limit_per_hour: self.vote_limit,
            trusted_proxies: self.trusted_proxies.clone(),
            enabled: !self.no_page,
        })
    }
}

fn say_page(url: &str, web: &WebOptions) {
    if !web.enabled {
        return;
    }
    say(&format!("  web page:   {url}/"));
    match &web.log_dir {
        Some(d) => say(&format!("  logs:       {}", d.display())),
        None => say("  logs:       off"),
    }
}

/// `vicugna serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    worker: WorkerPartArgs,
    #[command(flatten)]
    web: WebArgs,
    /// The control secret (default: a random one per run, known only to this process).
    #[command(flatten)]
    control: ControlArgs,
    #[command(flatten)]
    http: ApiHttpArgs,
    /// Hosts other workers may register from: addresses, CIDR ranges and names, comma-separated (this process's own worker is always allowed).
    #[arg(long, default_value = "127.0.0.0/8,::1,localhost")]
    allow_worker_hosts: WorkerHosts,
    /// Address to bind every part to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port of the OpenAI-compatible API.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Port of the controller.
    #[arg(long, default_value_t = 21001)]
    controller_port: u16,
    /// Port of the worker.
    #[arg(long, default_value_t = 21002)]
    worker_port: u16,
    /// How the controller picks a worker: shortest_queue or lottery.
    #[arg(long, default_value = "shortest_queue")]
    dispatch_method: DispatchMethod,
    /// Seconds without a heartbeat before the controller drops a worker [env FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION, default 90].
    #[arg(long)]
    heart_beat_expiration: Option<f64>,
    /// Accept only these API keys (comma-separated), as `Authorization: Bearer KEY`.
    #[arg(long, value_delimiter = ',')]
    api_keys: Option<Vec<String>>,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mb: usize,
    /// Most tokens one request may ask for in all, n × max_tokens (400 above).
    #[arg(long, default_value_t = vicugna_serve::gateway::validate::DEFAULT_MAX_REQUEST_TOKENS)]
    max_request_tokens: usize,
    /// Parse chat-template special tokens (`<|im_end|>`, ...) typed in chat
    /// message contents as control tokens, as FastChat does. By default they are
    /// encoded as plain text, so a message cannot close its turn or open a system
    /// turn. `/v1/completions` prompts are the caller's whole prompt and always
    /// parse them.
    #[arg(long)]
    parse_special_tokens_in_content: bool,
    /// Seconds in-flight requests get to finish after Ctrl-C/SIGTERM.
    #[arg(long, default_value_t = 10.0)]
    grace_seconds: f64,
}

/// `vicugna controller`.
#[derive(Args, Debug)]
pub struct ControllerArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 21001)]
    port: u16,
    /// shortest_queue or lottery.
    #[arg(long, default_value = "shortest_queue")]
    dispatch_method: DispatchMethod,
    /// Seconds without a heartbeat before a worker is dropped [env FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION, default 90].
    #[arg(long)]
    heart_beat_expiration: Option<f64>,
    #[arg(long, default_value_t = 10.0)]
    grace_seconds: f64,
    #[command(flatten)]
    control: ControlArgs,
    /// Hosts workers may register from: addresses, CIDR ranges (10.0.0.0/8) and names, comma-separated.
    #[arg(long, default_value = "127.0.0.0/8,::1,localhost")]
    allow_worker_hosts: WorkerHosts,
}

/// `vicugna worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    worker: WorkerPartArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 21002)]
    port: u16,
    /// How the controller and gateway reach this worker (default http://HOST:PORT).
    #[arg(long)]
    worker_address: Option<String>,
    #[arg(long, default_value = "http://127.0.0.1:21001")]
    controller_address: String,
    /// Do not register with the controller.
    #[arg(long)]
    no_register: bool,
    #[arg(long, default_value_t = 10.0)]
    grace_seconds: f64,
    #[command(flatten)]
    control: ControlArgs,
}

/// `vicugna api`.
#[derive(Args, Debug)]
pub struct ApiArgs {
    #[command(flatten)]
    web: WebArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[arg(long, default_value = "http://127.0.0.1:21001")]
    controller_address: String,
    /// Accept only these API keys (comma-separated).
    #[arg(long, value_delimiter = ',')]
    api_keys: Option<Vec<String>>,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mb: usize,
    /// Most tokens one request may ask for in all, n × max_tokens (400 above).
    #[arg(long, default_value_t = vicugna_serve::gateway::validate::DEFAULT_MAX_REQUEST_TOKENS)]
    max_request_tokens: usize,
    /// Embeddings: most tokens of all inputs of one request together.
    #[arg(long, default_value_t = vicugna_serve::gateway::validate::DEFAULT_MAX_EMBED_TOKENS)]
    embed_max_request_tokens: usize,
    /// Parse chat-template special tokens (`<|im_end|>`, ...) typed in chat
    /// message contents as control tokens, as FastChat does. By default they are
    /// encoded as plain text, so a message cannot close its turn or open a system
    /// turn. `/v1/completions` prompts are the caller's whole prompt and always
    /// parse them.
    #[arg(long)]
    parse_special_tokens_in_content: bool,
    /// Seconds to wait for a worker's next chunk [env FASTCHAT_WORKER_API_TIMEOUT, default 100].
    #[arg(long)]
    worker_timeout: Option<f64>,
    #[arg(long, default_value_t = 10.0)]
    grace_seconds: f64,
    #[command(flatten)]
    control: ControlArgs,
    #[command(flatten)]
    http: ApiHttpArgs,
}

/// A duration from a flag, else an environment variable, else a default.
fn seconds(flag: Option<f64>, env: &str, default: Duration) -> Result<Duration> {
    let v = match flag {
        Some(v) => Some(v),
        None => match std::env::var(env) {
            Ok(s) => Some(
                s.trim()
                    .parse::<f64>()
                    .with_context(|| format!("{env}={s:?} is not a number"))?,
            ),
            Err(_) => None,
        },
    };
    match v {
        Some(v) if v.is_finite() && v > 0.0 => Ok(Duration::from_secs_f64(v)),
        Some(v) => anyhow::bail!("{env}: seconds must be > 0, got {v}"),
        None => Ok(default),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn bind(host: &str, port: u16, what: &str, flag: &str) -> Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port} for the {what} (choose another with {flag})"))
}

/// A shutdown signal fired by Ctrl-C or SIGTERM.
fn signal_shutdown() -> (Shutdown, tokio::task::JoinHandle<()>) {
    let (trigger, shutdown) = shutdown_channel();
    let h = tokio::spawn(async move {
        os_signal().await;
        eprintln!("vicugna: shutting down (in-flight requests may finish)");
        trigger.fire();
        // A second signal exits at once.
        os_signal().await;
        std::process::exit(130);
    });
    (shutdown, h)
}

impl WorkerPartArgs {
    fn start_engine(&self) -> Result<EngineHandle> {
        let loaded = self.model.load()?;
        Ok(EngineHandle::start(
            loaded,
            EngineOptions {
                max_batch: self.limit_worker_concurrency.max(1),
                step_token_budget: self.step_token_budget.max(1),
                ..EngineOptions::default()
            },
        ))
    }

    fn options(&self, engine: &EngineHandle, worker_address: &str, controller_address: &str) -> Result<WorkerOptions> {
        let names = self
            .model_names
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| vec![vicugna_serve::worker::default_model_name(engine)]);
        let mut o = WorkerOptions::new(worker_address, controller_address, names);
        o.conv_template = self.conv_template.clone();
        if let Some(path) = &self.chat_template {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--chat-template: cannot read {}", path.display()))?;
            o.chat_template = Some(text);
        }
        o.limit_worker_concurrency = self.limit_worker_concurrency.max(1);
        o.max_queue = self.max_queue;
        o.stream_interval = self.stream_interval.max(1);
        o.heart_beat_interval = seconds(
            self.heart_beat_interval,
            "FASTCHAT_WORKER_HEART_BEAT_INTERVAL",
            vicugna_serve::worker::DEFAULT_HEART_BEAT_INTERVAL,
        )?;
        o.embed_in_truncate = self.embed_in_truncate;
        o.embed_max_input_tokens = self.embed_max_input_tokens;
        o.embed_max_request_tokens = self.embed_max_request_tokens.max(1);
        Ok(o)
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn grace(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() && s >= 0.0 { s } else { 10.0 })
}

/// `vicugna serve`: everything on one machine.
pub fn run_serve(a: ServeArgs) -> Result<()> {
    let web = a.web.options()?;
    let engine = a.worker.start_engine()?;
    let expiration = seconds(
        a.heart_beat_expiration,
        "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION",
        vicugna_serve::controller::DEFAULT_HEART_BEAT_EXPIRATION,
    )?;
    let grace = grace(a.grace_seconds);
    let control = a.control.auth("serve", true)?;
    runtime()?.block_on(async move {
        let cl = bind(&a.host, a.controller_port, "controller", "--controller-port").await?;
        let wl = bind(&a.host, a.worker_port, "worker", "--worker-port").await?;
        let gl = bind(&a.host, a.port, "API", "--port").await?;
        let (curl, wurl, gurl) = (listener_url(&cl)?, listener_url(&wl)?, listener_url(&gl)?);
        let mut opts = a.worker.options(&engine, &wurl, &curl)?;
        opts.control = control.clone();
        let worker = Worker::new(engine, opts)?;
        let mut allow_worker_hosts = a.allow_worker_hosts.clone();
        allow_worker_hosts.allow_host_of(&wurl);
        let (shutdown, sig) = signal_shutdown();
        let controller = tokio::spawn(vicugna_serve::run_controller(
            cl,
            ControllerOptions {
                dispatch_method: a.dispatch_method,
                heart_beat_expiration: expiration,
                control: control.clone(),
                allow_worker_hosts,
            },
            shutdown.clone(),
            grace,
        ));
        let models = worker.options().model_names.join(", ");
        let format = worker.format_name().to_string();
        let worker_task = tokio::spawn(vicugna_serve::run_worker(wl, worker, shutdown.clone(), grace));
        let mut gopts = GatewayOptions::new(&curl);
        gopts.control = control.clone();
        a.http.apply(&mut gopts);
        gopts.api_keys = a.api_keys.clone().filter(|k| !k.is_empty());
        gopts.max_body_bytes = a.max_body_mb.max(1) << 20;
        gopts.max_request_tokens = a.max_request_tokens.max(1);
        gopts.max_embed_tokens = a.worker.embed_max_request_tokens.max(1);
        gopts.parse_special_tokens_in_content = a.parse_special_tokens_in_content;
        gopts.web = web.clone();
        let gateway = tokio::spawn(vicugna_serve::run_gateway(gl, gopts, shutdown.clone(), grace));
        say(&format!("vicugna serve: model {models} (prompt format: {format})"));
        say(&format!(
            "  API:        {gurl}/v1  (OpenAI-compatible; docs at {gurl}/openapi.json)"
        ));
        say(&format!("  controller: {curl}"));
        say(&format!("  worker:     {wurl}"));
        say_page(&gurl, &web);
        say("Press Ctrl-C to stop.");
        let (g, w, c) = tokio::join!(gateway, worker_task, controller);
        sig.abort();
        for (what, r) in [("API", g), ("worker", w), ("controller", c)] {
            r.context("server task failed")?
                .with_context(|| format!("the {what} server failed"))?;
        }
        say("vicugna serve: stopped");
        Ok(())
    })
}

/// `vicugna controller`.
pub fn run_controller(a: ControllerArgs) -> Result<()> {
    let expiration = seconds(
        a.heart_beat_expiration,
        "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION",
        vicugna_serve::controller::DEFAULT_HEART_BEAT_EXPIRATION,
    )?;
    let control = a.control.auth("controller", false)?;
    runtime()?.block_on(async move {
        let l = bind(&a.host, a.port, "controller", "--port").await?;
        say(&format!("vicugna controller: {}", listener_url(&l)?));
        let (shutdown, sig) = signal_shutdown();
        let opts = ControllerOptions {
            dispatch_method: a.dispatch_method,
            heart_beat_expiration: expiration,
            control,
            allow_worker_hosts: a.allow_worker_hosts.clone(),
        };
        vicugna_serve::run_controller(l, opts, shutdown, grace(a.grace_seconds)).await?;
        sig.abort();
        Ok(())
    })
}

/// `vicugna worker`.
pub fn run_worker(a: WorkerArgs) -> Result<()> {
    // Before loading the model: a missing secret is a quick error.
    let control = a.control.auth("worker", false)?;
    let engine = a.worker.start_engine()?;
    runtime()?.block_on(async move {
        let l = bind(&a.host, a.port, "worker", "--port").await?;
        let url = listener_url(&l)?;
        let address = match &a.worker_address {
            Some(addr) => addr.clone(),
            None => {
                if a.host == "0.0.0.0" || a.host == "::" {
                    eprintln!("vicugna worker: listening on all interfaces; other hosts need --worker-address to reach it (registering {url})");
                }
                url.clone()
            }
        };
        let mut opts = a.worker.options(&engine, &address, &a.controller_address)?;
        opts.register = !a.no_register;
        opts.control = control;
        let worker = Worker::new(engine, opts)?;
        say(&format!(
            "vicugna worker: {url} serving {} (prompt format: {}), controller {}",
            worker.options().model_names.join(", "),
            worker.format_name(),
            a.controller_address
        ));
        let (shutdown, sig) = signal_shutdown();
        vicugna_serve::run_worker(l, worker, shutdown, grace(a.grace_seconds)).await?;
        sig.abort();
        Ok(())
    })
}

/// `vicugna api`.
pub fn run_api(a: ApiArgs) -> Result<()> {
    let mut opts = GatewayOptions::new(&a.controller_address);
    opts.control = a.control.auth("api", false)?;
    a.http.apply(&mut opts);
    opts.api_keys = a.api_keys.clone().filter(|k| !k.is_empty());
    opts.max_body_bytes = a.max_body_mb.max(1) << 20;
    opts.max_request_tokens = a.max_request_tokens.max(1);
    opts.max_embed_tokens = a.embed_max_request_tokens.max(1);
    opts.parse_special_tokens_in_content = a.parse_special_tokens_in_content;
    opts.web = a.web.options()?;
    opts.worker_timeout = seconds(
        a.worker_timeout,
        "FASTCHAT_WORKER_API_TIMEOUT",
        vicugna_serve::gateway::DEFAULT_WORKER_TIMEOUT,
    )?;
    runtime()?.block_on(async move {
        let l = bind(&a.host, a.port, "API", "--port").await?;
        let url = listener_url(&l)?;
        say(&format!(
            "vicugna api: {url}/v1 (OpenAI-compatible), controller {}",
            a.controller_address
        ));
        say_page(&url, &opts.web);
        let (shutdown, sig) = signal_shutdown();
        vicugna_serve::run_gateway(l, opts, shutdown, grace(a.grace_seconds)).await?;
        sig.abort();
        Ok(())
    })
}
