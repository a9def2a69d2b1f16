//! The controller: knows which worker serves which model, from registrations and
//! heartbeats, and hands out worker addresses (FastChat's `controller.py`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use rand::Rng;
use serde_json::json;

use crate::control::{self, ControlAuth, WorkerHosts};
use crate::protocol::{
    code, Chunk, HeartBeat, HeartBeatReply, ModelList, RegisterWorker, WorkerAddress, WorkerAddressRequest,
    WorkerStatus,
};

/// How `/get_worker_address` picks among the workers of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchMethod {
    /// Random, weighted by each worker's speed.
    Lottery,
    /// The worker with the least `queue_length / speed` (FastChat's default).
    ShortestQueue,
}

impl std::str::FromStr for DispatchMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lottery" => Ok(Self::Lottery),
            "shortest_queue" => Ok(Self::ShortestQueue),
            other => Err(format!(
                "unknown dispatch method {other:?}; expected lottery or shortest_queue"
            )),
        }
    }
}

/// FastChat's `FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION` default.
pub const DEFAULT_HEART_BEAT_EXPIRATION: Duration = Duration::from_secs(90);

/// Controller settings.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub dispatch_method: DispatchMethod,
    /// A worker that has not sent a heartbeat for this long is dropped.
    pub heart_beat_expiration: Duration,
    /// The secret every call must carry, or none (FastChat interoperability).
    pub control: ControlAuth,
    /// Hosts workers may register from.
    pub allow_worker_hosts: WorkerHosts,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            dispatch_method: DispatchMethod::ShortestQueue,
            heart_beat_expiration: DEFAULT_HEART_BEAT_EXPIRATION,
            control: ControlAuth::default(),
            allow_worker_hosts: WorkerHosts::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct WorkerInfo {
    model_names: Vec<String>,
    speed: f64,
    queue_length: usize,
    check_heart_beat: bool,
    last_heart_beat: Instant,
    multimodal: bool,
}

/// The controller's state, shared by its handlers.
pub struct Controller {
    opts: ControllerOptions,
    workers: Mutex<HashMap<String, WorkerInfo>>,
    http: reqwest::Client,
}

impl Controller {
    /// A controller with no workers.
    pub fn new(opts: ControllerOptions) -> Arc<Self> {
        Arc::new(Controller {
            http: opts.control.client(None),
            opts,
            workers: Mutex::new(HashMap::new()),
        })
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, WorkerInfo>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks a worker for its status (5 s, as FastChat).
    async fn pull_status(&self, worker: &str) -> Option<WorkerStatus> {
        let r = self
            .http
            .post(format!("{worker}/worker_get_status"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Adds or refreshes a worker; pulls its status if none was given.
    /// `Err` (nothing registered, nothing requested) when the worker's URL is
    /// not an allowed http(s) address; `Ok(false)` when its status is unknown.
    pub async fn register(&self, mut reg: RegisterWorker) -> Result<bool, String> {
        reg.worker_name = self.opts.allow_worker_hosts.check(&reg.worker_name).inspect_err(|e| {
            eprintln!("controller: {e}");
        })?;
        if !reg.check_heart_beat && matches!(self.opts.control, ControlAuth::Secret(_)) {
            // FastChat's "never expire" lets one registration outlive its
            // worker forever; with a secret, every worker must keep beating.
            eprintln!(
                "controller: {} asked for check_heart_beat: false; it expires without heartbeats all the same",
                reg.worker_name
            );
            reg.check_heart_beat = true;
        }
        let status = match reg.worker_status {
            Some(s) => Some(s),
            None => self.pull_status(&reg.worker_name).await,
        };
        let Some(status) = status else {
            eprintln!(
                "controller: cannot get the status of {}; not registered",
                reg.worker_name
            );
            return Ok(false);
        };
        eprintln!(
            "controller: registered {} serving {:?}",
            reg.worker_name, status.model_names
        );
        self.workers().insert(
            reg.worker_name,
            WorkerInfo {
                model_names: status.model_names,
                speed: if status.speed > 0.0 { status.speed } else { 1.0 },
                queue_length: status.queue_length,
                check_heart_beat: reg.check_heart_beat,
                last_heart_beat: Instant::now(),
                multimodal: reg.multimodal,
            },
        );
        Ok(true)
    }

    /// Pulls every worker's status again; drops those that do not answer.
    pub async fn refresh_all(&self) {
        let names: Vec<(String, WorkerInfo)> = self.workers().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (name, info) in names {
            match self.pull_status(&name).await {
                Some(s) => {
                    if let Some(w) = self.workers().get_mut(&name) {
                        w.model_names = s.model_names;
                        w.queue_length = s.queue_length;
                        w.speed = if s.speed > 0.0 { s.speed } else { 1.0 };
                    }
                }
                None => {
                    eprintln!("controller: {name} does not answer; dropped");
                    let mut ws = self.workers();
                    if ws.get(&name).is_some_and(|w| w.last_heart_beat == info.last_heart_beat) {
                        ws.remove(&name);
                    }
                }
            }
        }
    }

    /// Model names served by at least one worker, sorted.
    pub fn list_models(&self, multimodal: Option<bool>) -> Vec<String> {
        let set: BTreeSet<String> = self
            .workers()
            .values()
            .filter(|w| multimodal.is_none_or(|m| w.multimodal == m))
            .flat_map(|w| w.model_names.iter().cloned())
            .collect();
        set.into_iter().collect()
    }

    /// A worker for `model`, or `""`; `exclude` are addresses the caller cannot use.
    pub fn worker_address(&self, model: &str, exclude: &[String]) -> String {
        let mut ws = self.workers();
        let mut cands: Vec<(&String, &mut WorkerInfo)> = ws
            .iter_mut()
            .filter(|(k, w)| w.model_names.iter().any(|m| m == model) && !exclude.contains(k))
            .collect();
        if cands.is_empty() {
            return String::new();
        }
        match self.opts.dispatch_method {
            DispatchMethod::Lottery => {
                let total: f64 = cands.iter().map(|(_, w)| w.speed).sum();
                let mut x = rand::rng().random::<f64>() * total;
                for (k, w) in &cands {
                    if x < w.speed {
                        return (*k).clone();
                    }
                    x -= w.speed;
                }
                cands.last().map(|(k, _)| (*k).clone()).unwrap_or_default()
            }
            DispatchMethod::ShortestQueue => {
                // Ties go to the name, so dispatch is deterministic.
                cands.sort_by(|a, b| {
                    let qa = a.1.queue_length as f64 / a.1.speed;
                    let qb = b.1.queue_length as f64 / b.1.speed;
                    qa.total_cmp(&qb).then_with(|| a.0.cmp(b.0))
                });
                let (k, w) = &mut cands[0];
                // Count the request now; the next heartbeat sets the true value.
                w.queue_length += 1;
                (*k).clone()
            }
        }
    }

    /// Records a heartbeat; `false` if the worker is unknown (it should register).
    pub fn heart_beat(&self, hb: &HeartBeat) -> bool {
        match self.workers().get_mut(&hb.worker_name) {
            Some(w) => {
                w.queue_length = hb.queue_length;
                w.last_heart_beat = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Drops workers whose last heartbeat is older than the expiration.
    pub fn remove_stale(&self) {
        let exp = self.opts.heart_beat_expiration;
        self.workers().retain(|name, w| {
            let keep = !w.check_heart_beat || w.last_heart_beat.elapsed() <= exp;
            if !keep {
                eprintln!("controller: no heartbeat from {name} for {exp:?}; dropped");
            }
            keep
        });
    }

    /// Sum of the status of every worker (FastChat's aggregate).
    pub async fn status(&self) -> WorkerStatus {
        let names: Vec<String> = self.workers().keys().cloned().collect();
        let mut models = BTreeSet::new();
        let (mut speed, mut queue) = (0.0, 0);
        for name in names {
            if let Some(s) = self.pull_status(&name).await {
                models.extend(s.model_names);
                speed += s.speed;
                queue += s.queue_length;
            }
        }
        WorkerStatus {
            model_names: models.into_iter().collect(),
            speed,
            queue_length: queue,
        }
    }
}

/// Runs the heartbeat sweeper: checks several times per expiration period, so a
/// dead worker is dropped within about 1⅓ expirations.
pub fn spawn_sweeper(c: Arc<Controller>) -> tokio::task::JoinHandle<()> {
    let period = (c.opts.heart_beat_expiration / 3).max(Duration::from_millis(100));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            c.remove_stale();
        }
    })
}

/// The controller's HTTP routes (and starts its sweeper).
pub fn router(c: Arc<Controller>) -> Router {
    spawn_sweeper(c.clone());
    let auth = c.opts.control.clone();
    Router::new()
        .route("/register_worker", post(register_worker))
        .route("/refresh_all_workers", post(refresh_all_workers))
        .route("/list_models", post(list_models))
        .route("/list_multimodal_models", post(list_multimodal_models))
        .route("/list_language_models", post(list_language_models))
        .route("/get_worker_address", post(get_worker_address))
        .route("/receive_heart_beat", post(receive_heart_beat))
        .route("/worker_generate_stream", post(worker_generate_stream))
        .route("/worker_get_status", post(worker_get_status))
        .route("/test_connection", get(|| async { Json("success") }))
        .method_not_allowed_fallback(control::method_not_allowed)
        .with_state(c)
        .layer(axum::middleware::from_fn(control::require_json))
        .layer(axum::middleware::from_fn_with_state(auth, control::require_secret))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(control::error_response(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            format!("invalid request body: {e}"),
        ))
    })
}

async fn register_worker(State(c): State<Arc<Controller>>, body: Bytes) -> Response {
    let reg: RegisterWorker = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    match c.register(reg).await {
        Ok(ok) => Json(json!(ok)).into_response(),
        Err(e) => control::error_response(
            axum::http::StatusCode::FORBIDDEN,
            "invalid_request_error",
            "worker_not_allowed",
            e,
        ),
    }
}

async fn refresh_all_workers(State(c): State<Arc<Controller>>) -> Json<serde_json::Value> {
    c.refresh_all().await;
    Json(json!(null))
}

async fn list_models(State(c): State<Arc<Controller>>) -> Json<ModelList> {
    Json(ModelList {
        models: c.list_models(None),
    })
}

async fn list_multimodal_models(State(c): State<Arc<Controller>>) -> Json<ModelList> {
    Json(ModelList {
        models: c.list_models(Some(true)),
    })
}

async fn list_language_models(State(c): State<Arc<Controller>>) -> Json<ModelList> {
    Json(ModelList {
        models: c.list_models(Some(false)),
    })
}

async fn get_worker_address(State(c): State<Arc<Controller>>, body: Bytes) -> Response {
    let req: WorkerAddressRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    Json(WorkerAddress {
        address: c.worker_address(&req.model, &req.exclude),
    })
    .into_response()
}

async fn receive_heart_beat(State(c): State<Arc<Controller>>, body: Bytes) -> Response {
    let hb: HeartBeat = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    Json(HeartBeatReply {
        exist: c.heart_beat(&hb),
    })
    .into_response()
}

async fn worker_get_status(State(c): State<Arc<Controller>>) -> Json<WorkerStatus> {
    Json(c.status().await)
}

/// Forwards a generation to a worker of the model (controllers can nest).
async fn worker_generate_stream(State(c): State<Arc<Controller>>, body: Bytes) -> Response {
    let model = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_default();
    let addr = c.worker_address(&model, &[]);
    if addr.is_empty() {
        let chunk = Chunk::error(code::CONTROLLER_NO_WORKER, format!("no worker serves model {model:?}"));
        return Body::from(chunk.to_wire()).into_response();
    }
    let sent = c
        .http
        .post(format!("{addr}/worker_generate_stream"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) => Body::from_stream(r.bytes_stream().map(|b| b.map_err(std::io::Error::other))).into_response(),
        Err(e) => {
            let chunk = Chunk::error(
                code::CONTROLLER_WORKER_TIMEOUT,
                format!("worker {addr} did not answer: {e}"),
            );
            Body::from(chunk.to_wire()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(models: &[&str], queue: usize) -> WorkerInfo {
        WorkerInfo {
            model_names: models.iter().map(|s| s.to_string()).collect(),
            speed: 1.0,
            queue_length: queue,
            check_heart_beat: true,
            last_heart_beat: Instant::now(),
            multimodal: false,
        }
    }

    #[test]
    fn shortest_queue_picks_the_least_loaded_and_counts_it() {
        let c = Controller::new(ControllerOptions::default());
        c.workers().insert("http://a".into(), info(&["m"], 2));
        c.workers().insert("http://b".into(), info(&["m"], 0));
        c.workers().insert("http://c".into(), info(&["other"], 0));
        assert_eq!(c.worker_address("m", &[]), "http://b");
        assert_eq!(c.worker_address("m", &[]), "http://b");
        // b now counts 2 like a; ties go by name.
        assert_eq!(c.worker_address("m", &[]), "http://a");
        assert_eq!(c.worker_address("m", &["http://a".into(), "http://b".into()]), "");
        assert_eq!(c.worker_address("nope", &[]), "");
        assert_eq!(c.list_models(None), ["m", "other"]);
    }

    #[test]
    fn lottery_only_returns_workers_of_the_model() {
        let c = Controller::new(ControllerOptions {
            dispatch_method: DispatchMethod::Lottery,
            ..ControllerOptions::default()
        });
        c.workers().insert("http://a".into(), info(&["m"], 0));
        c.workers().insert("http://b".into(), info(&["m"], 0));
        c.workers().insert("http://c".into(), info(&["x"], 0));
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            seen.insert(c.worker_address("m", &[]));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["http://a", "http://b"]);
    }

    #[test]
    fn stale_workers_are_dropped_and_heartbeats_say_so() {
        let c = Controller::new(ControllerOptions {
            heart_beat_expiration: Duration::from_millis(10),
            ..ControllerOptions::default()
        });
        c.workers().insert("http://a".into(), info(&["m"], 0));
        assert!(c.heart_beat(&HeartBeat {
            worker_name: "http://a".into(),
            queue_length: 3
        }));
        std::thread::sleep(Duration::from_millis(30));
        c.remove_stale();
        assert!(c.list_models(None).is_empty());
        assert!(!c.heart_beat(&HeartBeat {
            worker_name: "http://a".into(),
            queue_length: 0
        }));
    }
}
