//! The OpenAI-compatible gateway (FastChat's `openai_api_server`): validates
//! requests, finds workers through the controller and turns their chunk streams
//! into OpenAI responses. It also serves the web page ([`crate::web`]).

pub mod dispatch;
pub mod error;
pub mod generate;
pub mod openapi;
pub mod tools;
pub mod validate;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::control::{self, ControlAuth};
use crate::metrics::GatewayMetrics;
use crate::protocol::WorkerStatus;
use dispatch::DispatchState;
use error::ApiError;

/// FastChat's `FASTCHAT_WORKER_API_TIMEOUT` default.
pub const DEFAULT_WORKER_TIMEOUT: Duration = Duration::from_secs(100);
/// FastChat's `FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE`.
const EMBEDDING_BATCH: usize = 4;
/// Bytes drained from an oversized body before answering 413, so the client
/// gets the answer instead of a reset connection.
const MAX_DRAIN: usize = 256 << 20;

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub controller_address: String,
    /// When set, `/v1/*`, the page's `/api/*` and `/metrics` need
    /// `Authorization: Bearer <one of these>` (see `public_page`, `public_metrics`).
    pub api_keys: Option<Vec<String>>,
    /// With `api_keys`: the page's `/api/*` stays open to anyone.
    pub public_page: bool,
    /// With `api_keys`: `/metrics` stays open to anyone.
    pub public_metrics: bool,
    /// Origins browsers may call the API from (CORS); empty: none but the
    /// gateway's own.
    pub allow_origins: Vec<String>,
    /// The control secret sent to the controller and workers.
    pub control: ControlAuth,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Longest wait for a worker's next chunk.
    pub worker_timeout: Duration,
    /// The web page's limits and log directory.
    pub web: crate::web::WebOptions,
    /// Most tokens one generation request may ask for: `n × max_tokens` (400 above).
    pub max_request_tokens: usize,
    /// Most tokens of all inputs of one embeddings request (400 above).
    pub max_embed_tokens: usize,
    /// Parse special-token strings typed in chat message contents as control
    /// tokens, as FastChat does (default: they are encoded as text).
    pub parse_special_tokens_in_content: bool,
}

impl GatewayOptions {
    /// Defaults for a gateway in front of `controller_address`.
    pub fn new(controller_address: &str) -> Self {
        GatewayOptions {
            controller_address: controller_address.trim_end_matches('/').to_string(),
            api_keys: None,
            public_page: false,
            public_metrics: false,
            allow_origins: Vec::new(),
            control: ControlAuth::default(),
            max_body_bytes: 8 << 20,
            worker_timeout: DEFAULT_WORKER_TIMEOUT,
            web: crate::web::WebOptions::default(),
            max_request_tokens: validate::DEFAULT_MAX_REQUEST_TOKENS,
            max_embed_tokens: validate::DEFAULT_MAX_EMBED_TOKENS,
            parse_special_tokens_in_content: false,
        }
    }
}

/// The gateway's state.
pub struct Gateway {
    opts: GatewayOptions,
    http: reqwest::Client,
    metrics: GatewayMetrics,
    dispatch: Mutex<DispatchState>,
    pub(crate) web: crate::web::Web,
}

/// Counts a request in flight while alive.
pub(crate) struct InFlight(Arc<Gateway>);

impl InFlight {
    fn new(g: Arc<Gateway>) -> Self {
        g.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(g)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gateway {
    /// A gateway with empty caches.
    pub fn new(opts: GatewayOptions) -> Arc<Self> {
        Arc::new(Gateway {
            web: crate::web::Web::new(opts.web.clone()),
            http: opts.control.client(None),
            opts,
            metrics: GatewayMetrics::default(),
            dispatch: Mutex::new(DispatchState::default()),
        })
    }

    /// Reads the body up to the limit; 413 beyond it.
    pub(crate) async fn read_body(&self, body: Body) -> Result<Vec<u8>, ApiError> {
        let limit = self.opts.max_body_bytes;
        let mut out = Vec::new();
        let mut seen = 0usize;
        let mut stream = body.into_data_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
            seen += piece.len();
            if seen > limit {
                if seen > MAX_DRAIN {
                    break;
                }
                continue;
            }
            out.extend_from_slice(&piece);
        }
        if seen > limit {
            return Err(ApiError::too_large(limit));
        }
        Ok(out)
    }
}

/// The gateway's HTTP routes.
pub fn router(g: Arc<Gateway>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/engines/{model}/embeddings", post(engine_embeddings));
    let page = if g.opts.web.enabled {
        crate::web::router()
    } else {
        Router::new()
    };
    let cors = cors_layer(&g.opts.allow_origins);
    let app = Router::new()
        .merge(v1)
        .merge(page)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .merge(openapi::docs_router())
        .fallback(|| async { ApiError::bad_request("no such endpoint").with_status(StatusCode::NOT_FOUND) })
        .method_not_allowed_fallback(control::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(control::require_json))
        .layer(axum::middleware::from_fn_with_state(g.clone(), auth))
        .with_state(g);
    match cors {
        // Outermost: a preflight is answered before the key is asked for.
        Some(c) => app.layer(c),
        None => app,
    }
}

/// CORS for the listed origins only (`*` for any); none without a list, so
/// browsers keep other sites' pages from reading the API's answers.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list: Vec<axum::http::HeaderValue> = origins
            .iter()
            .filter_map(|o| axum::http::HeaderValue::from_str(o.trim().trim_end_matches('/')).ok())
            .collect();
        AllowOrigin::list(list)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE])
            .max_age(Duration::from_secs(600)),
    )
}

/// Which paths need an API key: the OpenAI API, the page's API and the
/// metrics (each of the last two can be opened); the page's own files and
/// `/health` stay public, so the page can load and ask for the key.
fn needs_key(opts: &GatewayOptions, path: &str) -> bool {
    if path.starts_with("/v1/") || path == "/v1" {
        true
    } else if path.starts_with("/api/") {
        !opts.public_page
    } else if path == "/metrics" {
        !opts.public_metrics
    } else {
        false
    }
}

impl ApiError {
    fn with_status(mut self, s: StatusCode) -> Self {
        self.status = s;
        self
    }
}

async fn auth(State(g): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    if let Some(keys) = g
        .opts
        .api_keys
        .as_ref()
        .filter(|_| needs_key(&g.opts, req.uri().path()))
    {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let err = match given {
            None => Some("no API key given: send `Authorization: Bearer <key>`"),
            Some(k) if !keys.iter().fold(false, |hit, x| hit | control::same_secret(x, k)) => {
                Some("the API key is not valid")
            }
            Some(_) => None,
        };
        if let Some(msg) = err {
            g.metrics.count_request(req.uri().path(), 401);
            return ApiError::unauthorized(msg).into_response();
        }
    }
    next.run(req).await
}

fn model_card(id: &str) -> Value {
    json!({
        "id": id, "object": "model", "created": 0, "owned_by": "vicugna",
        "root": id, "parent": null, "permission": [],
    })
}

async fn list_models(State(g): State<Arc<Gateway>>) -> Response {
    let r = match g.list_models().await {
        Ok(models) => {
            let data: Vec<Value> = models.iter().map(|m| model_card(m)).collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => e.into_response(),
    };
    g.metrics.count_request("/v1/models", r.status().as_u16());
    r
}

async fn get_model(State(g): State<Arc<Gateway>>, Path(model): Path<String>) -> Response {
    match g.list_models().await {
        Ok(models) if models.contains(&model) => Json(model_card(&model)).into_response(),
        Ok(models) => ApiError::model_not_found(&model, &models).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn embeddings(State(g): State<Arc<Gateway>>, body: Body) -> Response {
    let r = g
        .clone()
        .embed(body, None)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    g.metrics.count_request("/v1/embeddings", r.status().as_u16());
    r
}

async fn engine_embeddings(State(g): State<Arc<Gateway>>, Path(model): Path<String>, body: Body) -> Response {
    let r = g
        .clone()
        .embed(body, Some(model))
        .await
        .unwrap_or_else(IntoResponse::into_response);
    g.metrics.count_request("/v1/embeddings", r.status().as_u16());
    r
}

impl Gateway {
    async fn embed(self: Arc<Self>, body: Body, engine: Option<String>) -> Result<Response, ApiError> {
        let _in_flight = InFlight::new(self.clone());
        let started = Instant::now();
        let bytes = self.read_body(body).await?;
        let mut obj = validate::parse_json(&bytes)?;
        if let Some(m) = engine {
            obj.entry("model").or_insert(json!(m));
        }
        let req = validate::embeddings(&obj)?;
        let mut data = Vec::with_capacity(req.input.len());
        let mut tokens = 0u64;
        for batch in req.input.chunks(EMBEDDING_BATCH) {
            let input: Vec<Value> = batch
                .iter()
                .map(|p| match p {
                    validate::PromptInput::Text(t) => json!(t),
                    validate::PromptInput::Ids(ids) => json!(ids),
                })
                .collect();
            let mut params = json!({"model": req.model, "input": input});
            if req.base64 {
                params["encoding_format"] = json!("base64");
            }
            let v = self.call_worker(&req.model, "/worker_get_embeddings", &params).await?;
            let vectors = v
                .get("embedding")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if vectors.len() != batch.len() {
                return Err(ApiError::worker_failed(format!(
                    "the worker returned {} embeddings for {} inputs",
                    vectors.len(),
                    batch.len()
                )));
            }
            tokens += v.get("token_num").and_then(Value::as_u64).unwrap_or(0);
            if tokens > self.opts.max_embed_tokens as u64 {
                return Err(ApiError::bad_field(
                    "input",
                    format!(
                        "the inputs have more than {} tokens in all; at most {} per request are allowed (the server's --embed-max-request-tokens)",
                        self.opts.max_embed_tokens, self.opts.max_embed_tokens
                    ),
                ));
            }
            for e in vectors {
                data.push(json!({"object": "embedding", "embedding": e, "index": data.len()}));
            }
        }
        self.metrics.prompt_tokens.fetch_add(tokens, Ordering::Relaxed);
        self.metrics.request_duration.observe(started.elapsed().as_secs_f64());
        Ok(Json(json!({
            "object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    }
}

async fn health(State(g): State<Arc<Gateway>>) -> Response {
    match g.list_models().await {
        Ok(models) if !models.is_empty() => Json(json!({"status": "ok", "models": models})).into_response(),
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": "no worker is registered with the controller"})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": e.message})),
        )
            .into_response(),
    }
}

async fn metrics(State(g): State<Arc<Gateway>>) -> Response {
    let queue = g
        .controller::<WorkerStatus>("/worker_get_status", &json!({}), Duration::from_secs(2))
        .await
        .ok()
        .map(|s| s.queue_length);
    ([("content-type", "text/plain; version=0.0.4")], g.metrics.render(queue)).into_response()
}
