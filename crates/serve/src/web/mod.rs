//! The web page at `/` (chat, anonymous and named arena, leaderboard) and the
//! small API behind it. Answers stream through the gateway's own
//! `/v1/chat/completions`; `/api/chat` wraps it to apply the page's limits,
//! remember each conversation's state and log it when the answer ends.

pub mod log;
pub mod proxy;
pub mod session;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::gateway::error::ApiError;
use crate::gateway::{generate, validate, Gateway};
use crate::leaderboard::{self, Battle, Leaderboard, Winner};
use log::{now_tstamp, ConvLog};
pub use proxy::IpNet;
use session::{Mode, Session, Sessions};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const MARKED_JS: &str = include_str!("assets/vendor/marked.umd.js");

/// Settings of the page.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// Where the daily conversation logs go; None logs nothing.
    pub log_dir: Option<PathBuf>,
    /// Longest user message, in characters (FastChat: 12000).
    pub max_input_chars: usize,
    /// User turns per conversation (FastChat: 50).
    pub max_turns: usize,
    /// Messages per minute from one address; 0 = no limit.
    pub rate_limit_per_minute: usize,
    /// Votes per hour from one address; 0 = no limit. An address over it is
    /// flagged and its votes leave the leaderboard.
    pub vote_limit_per_hour: usize,
    /// Proxies whose forwarded-for headers are believed; empty: none, the
    /// TCP peer is the client.
    pub trusted_proxies: Vec<IpNet>,
    /// Serve the page and its API at all.
    pub enabled: bool,
}

impl Default for WebOptions {
    fn default() -> Self {
        WebOptions {
            log_dir: None,
            max_input_chars: 12_000,
            max_turns: 50,
            rate_limit_per_minute: 30,
            vote_limit_per_hour: DEFAULT_VOTE_LIMIT,
            trusted_proxies: Vec::new(),
            enabled: true,
        }
    }
}

/// Votes per hour from one address by default: a person reading two answers
/// per round casts far fewer; a script voting for its favourite casts more.
pub const DEFAULT_VOTE_LIMIT: usize = 30;

/// Events per address in a sliding window.
struct RateWindow {
    limit: usize,
    window: Duration,
    seen: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl RateWindow {
    fn new(limit: usize, window: Duration) -> Self {
        RateWindow {
            limit,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event from `ip`; `Err(seconds to wait)` when over the limit
    /// (the refused event is not counted).
    fn hit(&self, ip: &str) -> Result<(), u64> {
        if self.limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let window = self.window;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 10_000 {
            seen.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let q = seen.entry(ip.to_string()).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
            q.pop_front();
        }
        if q.len() >= self.limit {
            return Err(q
                .front()
                .map(|t| window.saturating_sub(now.duration_since(*t)).as_secs() + 1)
                .unwrap_or(window.as_secs()));
        }
        q.push_back(now);
        Ok(())
    }
}

/// A computed leaderboard and the (battles, flagged addresses) counts it is of.
type CachedBoard = ((usize, usize), Arc<Leaderboard>);

/// The page's state inside the gateway.
pub struct Web {
    opts: WebOptions,
    log: Option<ConvLog>,
    sessions: Mutex<Sessions>,
    rate: RateWindow,
    votes: RateWindow,
    /// Addresses that went over the vote limit (from the logs at start, then as caught).
    flagged: Mutex<HashSet<String>>,
    /// Every arena vote so far (from the logs at start, then as cast).
    battles: Mutex<Vec<Battle>>,
    /// The last leaderboard, keyed by (battles, flagged addresses) counts.
    cached: Mutex<Option<CachedBoard>>,
}

impl Web {
    /// The page's state; reads earlier votes from the log directory.
    pub fn new(opts: WebOptions) -> Web {
        let mut battles = Vec::new();
        let mut flagged = HashSet::new();
        let log = opts.log_dir.as_ref().and_then(|dir| match ConvLog::open(dir) {
            Ok(l) => {
                match leaderboard::read_battles(dir) {
                    Ok(b) => {
                        battles = b.battles;
                        flagged = b.flagged;
                    }
                    Err(e) => eprintln!("vicugna: earlier votes not read: {e}"),
                }
                Some(l)
            }
            Err(e) => {
                eprintln!("vicugna: conversations will not be logged: {e}");
                None
            }
        });
        Web {
            rate: RateWindow::new(opts.rate_limit_per_minute, Duration::from_secs(60)),
            votes: RateWindow::new(opts.vote_limit_per_hour, Duration::from_secs(3600)),
            opts,
            log,
            sessions: Mutex::new(Sessions::default()),
            flagged: Mutex::new(flagged),
            battles: Mutex::new(battles),
            cached: Mutex::new(None),
        }
    }

    fn write_log(&self, row: &Value) {
        if let Some(l) = &self.log {
            if let Err(e) = l.append(row) {
                eprintln!(
                    "vicugna: could not write to the conversation log in {}: {e}",
                    l.dir().display()
                );
            }
        }
    }

    /// Counts a message from `ip`; an error with the wait when over the limit.
    fn check_rate(&self, ip: &str) -> Result<(), ApiError> {
        self.rate.hit(ip).map_err(|wait| {
            rate_limited(
                format!(
                    "Too many messages: the limit is {} per minute from one address. Try again in {wait} s.",
                    self.opts.rate_limit_per_minute
                ),
                wait,
            )
        })
    }

    /// Counts a vote from `ip`. Over the limit the vote is refused and the
    /// address flagged (once, in memory and in the log), which takes its
    /// votes off the leaderboard.
    fn check_vote_rate(&self, ip: &str) -> Result<(), ApiError> {
        let Err(wait) = self.votes.hit(ip) else {
            return Ok(());
        };
        let limit = self.opts.vote_limit_per_hour;
        let newly = self
            .flagged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip.to_string());
        if newly {
            self.write_log(&json!({
                "tstamp": now_tstamp(), "type": leaderboard::FLAG_ROW, "ip": ip,
                "reason": format!("more than {limit} votes in an hour"),
            }));
        }
        let minutes = wait.div_ceil(60);
        Err(rate_limited(
            format!(
                "Too many votes: the limit is {limit} per hour from one address, so this vote was not counted, and the votes from this address are left out of the leaderboard. Try again in {minutes} min."
            ),
            wait,
        ))
    }
}

fn rate_limited(message: String, wait: u64) -> ApiError {
    let mut e = ApiError::overloaded(message);
    e.code = Some("rate_limited".into());
    e.kind = "rate_limit_exceeded";
    e.retry_after = Some(wait);
    e
}

/// The page's routes (merged into the gateway's router).
pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/", get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }))
        .route(
            "/static/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/static/style.css",
            get(|| async { asset(STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/static/marked.umd.js",
            get(|| async { asset(MARKED_JS, "text/javascript; charset=utf-8") }),
        )
        .route("/api/config", get(config))
        .route("/api/models", get(models))
        .route("/api/session", post(new_session))
        .route("/api/chat", post(chat))
        .route("/api/vote", post(vote))
        .route("/api/leaderboard", get(get_leaderboard))
}

fn asset(text: &'static str, content_type: &'static str) -> Response {
    ([("content-type", content_type), ("cache-control", "no-cache")], text).into_response()
}

/// Splits a request into its client address (see [`proxy::client_ip`]) and body.
fn split(g: &Gateway, req: Request) -> (String, Body) {
    let (parts, body) = req.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    (
        proxy::client_ip(&parts.headers, peer, &g.web.opts.trusted_proxies),
        body,
    )
}

async fn config(State(g): State<Arc<Gateway>>) -> Response {
    let o = &g.web.opts;
    Json(json!({
        "max_input_chars": o.max_input_chars,
        "max_turns": o.max_turns,
        "rate_limit_per_minute": o.rate_limit_per_minute,
        "vote_limit_per_hour": o.vote_limit_per_hour,
        "logging": g.web.log.is_some(),
    }))
    .into_response()
}

/// `GET /api/models`: the served models, for the page's pickers. The page
/// does not use `/v1/models`, which needs a key when the API has `--api-keys`.
async fn models(State(g): State<Arc<Gateway>>) -> Response {
    match g.list_models().await {
        Ok(mut m) => {
            m.sort();
            Json(json!({"models": m})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(g: &Gateway, body: Body) -> Result<T, ApiError> {
    let bytes = g.read_body(body).await?;
    let obj = validate::parse_json(&bytes)?;
    serde_json::from_value(Value::Object(obj)).map_err(|e| ApiError::bad_request(format!("bad request: {e}")))
}

#[derive(Deserialize)]
struct SessionRequest {
    mode: Mode,
    #[serde(default)]
    models: Vec<String>,
}

/// `POST /api/session`: a new conversation. The anonymous arena picks two
/// different models at random and keeps their names until the vote.
async fn new_session(State(g): State<Arc<Gateway>>, body: Body) -> Response {
    let r = async {
        let req: SessionRequest = read_json(&g, body).await?;
        let served = g.list_models().await?;
        let models = match req.mode {
            Mode::Chat | Mode::Named => {
                let want = if req.mode == Mode::Chat { 1 } else { 2 };
                if req.models.len() != want {
                    return Err(ApiError::bad_field("models", format!("give {want} model name(s)")));
                }
                for m in &req.models {
                    if !served.contains(m) {
                        return Err(ApiError::model_not_found(m, &served));
                    }
                }
                req.models
            }
            Mode::Anony => {
                if served.len() < 2 {
                    return Err(ApiError::unavailable(format!(
                        "The arena needs at least two models, and this server serves {} ({}). Serve more, e.g. `vicugna serve --model-names a,b`.",
                        served.len(),
                        served.join(", ")
                    )));
                }
                let mut rng = rand::rng();
                let mut pair: Vec<String> = served.choose_multiple(&mut rng, 2).cloned().collect();
                // Either may be on the left.
                pair.shuffle(&mut rng);
                pair
            }
        };
        let anony = req.mode == Mode::Anony;
        let id = g.web.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(Session::new(req.mode, models.clone()));
        Ok(Json(json!({
            "session_id": id,
            "models": if anony { Value::Null } else { json!(models) },
        }))
        .into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
struct ChatRequest {
    session_id: String,
    #[serde(default)]
    side: usize,
    messages: Vec<Message>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u64>,
}

#[derive(Deserialize, serde::Serialize, Clone)]
struct Message {
    role: String,
    content: String,
}

fn session_gone() -> ApiError {
    let mut e = ApiError::bad_request("This conversation has expired. Press Clear (or New round) to start a new one.");
    e.status = StatusCode::NOT_FOUND;
    e.code = Some("session_expired".into());
    e
}

/// `POST /api/chat`: one answer of one side of a session, streamed as
/// `/v1/chat/completions` SSE; logged when it ends.
async fn chat(State(g): State<Arc<Gateway>>, req: Request) -> Response {
    let (ip, body) = split(&g, req);
    let r = async {
        let req: ChatRequest = read_json(&g, body).await?;
        let o = &g.web.opts;
        if req.messages.last().is_none_or(|m| m.role != "user") {
            return Err(ApiError::bad_field("messages", "the last message must be the user's"));
        }
        // Every role: a system message (or a made-up assistant one) is as
        // much work for the model as the user's.
        let last = req.messages.len() - 1;
        for (i, m) in req.messages.iter().enumerate() {
            let chars = m.content.chars().count();
            if chars <= o.max_input_chars {
                continue;
            }
            let limit = o.max_input_chars;
            return Err(ApiError::bad_field(
                "messages",
                if i == last {
                    format!("Your message is {chars} characters long; the limit is {limit}. Please shorten it.")
                } else {
                    format!(
                        "messages[{i}] ({}) is {chars} characters long; the limit is {limit} for every message.",
                        m.role
                    )
                },
            ));
        }
        // A user and an assistant message per turn, and one system message.
        let most = 2 * o.max_turns + 1;
        if req.messages.len() > most {
            return Err(ApiError::bad_field(
                "messages",
                format!(
                    "{} messages; the limit is {most} ({} turns). Press Clear (or New round) to start a new one.",
                    req.messages.len(),
                    o.max_turns
                ),
            ));
        }
        let turns = req.messages.iter().filter(|m| m.role == "user").count();
        if turns > o.max_turns {
            return Err(ApiError::bad_field(
                "messages",
                format!(
                    "This conversation has reached the limit of {} turns. Press Clear (or New round) to start a new one.",
                    o.max_turns
                ),
            ));
        }
        let (model, conv_id, hidden) = {
            let mut s = g.web.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let sess = s.get_mut(&req.session_id).ok_or_else(session_gone)?;
            let model = sess
                .models
                .get(req.side)
                .cloned()
                .ok_or_else(|| ApiError::bad_field("side", "must be 0 or 1"))?;
            if sess.mode == Mode::Anony && sess.voted {
                return Err(ApiError::bad_request("This battle is over. Press New round to start another."));
            }
            // In the anonymous arena nothing before the vote may name the
            // models: the answer's chunks and errors say `model A` / `model B`.
            let hidden = (sess.mode == Mode::Anony).then(|| Anonymize {
                alias: SIDE_ALIASES[req.side.min(1)],
                names: sess.models.clone(),
            });
            (model, sess.conv_ids[req.side].clone(), hidden)
        };
        g.web.check_rate(&ip)?;
        let mut openai = json!({"model": model, "messages": req.messages, "stream": true});
        for (k, v) in [("temperature", req.temperature), ("top_p", req.top_p)] {
            if let Some(v) = v {
                openai[k] = json!(v);
            }
        }
        if let Some(m) = req.max_tokens {
            openai["max_tokens"] = json!(m);
        }
        let start = now_tstamp();
        let resp = generate::chat_completions(State(g.clone()), Body::from(openai.to_string())).await;
        if resp.status() != StatusCode::OK {
            return Ok(match hidden {
                Some(h) => h.error_response(resp).await,
                None => resp,
            });
        }
        let turn = Turn {
            session_id: req.session_id,
            side: req.side,
            model,
            conv_id,
            messages: req.messages,
            gen_params: json!({"temperature": req.temperature, "top_p": req.top_p, "max_new_tokens": req.max_tokens}),
            start,
            ip,
        };
        Ok(relay(g.clone(), resp, turn, hidden))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// How each side of an anonymous battle is called before the vote.
const SIDE_ALIASES: [&str; 2] = ["model A", "model B"];

/// Hides an anonymous battle's model names in what goes to the browser.
struct Anonymize {
    /// This side's name for the browser.
    alias: &'static str,
    /// The battle's real names, side by side.
    names: Vec<String>,
}

impl Anonymize {
    /// `text` with each real name replaced by its side's alias (longest name
    /// first, so that `smol` does not eat into `smol-b`).
    fn hide(&self, text: &str) -> String {
        let mut pairs: Vec<(&str, &str)> = self
            .names
            .iter()
            .zip(SIDE_ALIASES)
            .map(|(n, a)| (n.as_str(), a))
            .filter(|(n, _)| !n.is_empty())
            .collect();
        pairs.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
        let mut out = text.to_string();
        for (name, alias) in pairs {
            out = out.replace(name, alias);
        }
        out
    }

    /// One SSE event with the `model` field set to the alias and the names
    /// hidden in any error message.
    fn event(&self, event: &str) -> String {
        let Some(data) = event.trim().strip_prefix("data:") else {
            return event.to_string();
        };
        let Ok(mut v) = serde_json::from_str::<Value>(data.trim()) else {
            // `[DONE]`; anything else that is not JSON is passed on hidden.
            return self.hide(event);
        };
        if v.get("model").is_some() {
            v["model"] = json!(self.alias);
        }
        if let Some(m) = v.pointer_mut("/error/message") {
            if let Some(text) = m.as_str() {
                *m = json!(self.hide(text));
            }
        }
        format!("data: {v}\n\n")
    }

    /// An error answer (small JSON) with the names hidden.
    async fn error_response(&self, resp: Response) -> Response {
        let (mut parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
        let text = self.hide(&String::from_utf8_lossy(&bytes));
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        Response::from_parts(parts, Body::from(text))
    }
}

/// What is needed to log an answer once it ends.
struct Turn {
    session_id: String,
    side: usize,
    model: String,
    conv_id: String,
    messages: Vec<Message>,
    gen_params: Value,
    start: f64,
    ip: String,
}

/// FastChat's `Conversation.dict()` for a finished turn.
fn conv_state(t: &Turn, answer: &str) -> Value {
    let mut messages: Vec<Value> = t.messages.iter().map(|m| json!([m.role, m.content])).collect();
    messages.push(json!(["assistant", answer]));
    let system = t
        .messages
        .iter()
        .find(|m| m.role == "system")
        .map(|m| m.content.clone())
        .unwrap_or_default();
    json!({
        "template_name": "openai",
        "system_message": system,
        "roles": ["user", "assistant"],
        "messages": messages,
        "offset": 0,
        "conv_id": t.conv_id,
        "model_name": t.model,
    })
}

/// Passes the SSE stream through while reading the answer from it (with the
/// model names hidden in an anonymous battle); logs the turn when the stream
/// ends, or when the reader goes away (Stop).
fn relay(g: Arc<Gateway>, resp: Response, turn: Turn, hidden: Option<Anonymize>) -> Response {
    let (parts, body) = resp.into_parts();
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        // Bytes, not text: a piece may end inside a character.
        let mut pending: Vec<u8> = Vec::new();
        let mut answer = String::new();
        let mut finish: Option<String> = None;
        let mut error: Option<String> = None;
        while let Some(piece) = stream.next().await {
            let Ok(piece) = piece else { break };
            pending.extend_from_slice(&piece);
            // Whole events only, so that each can be rewritten.
            let mut out = String::new();
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let bytes: Vec<u8> = pending.drain(..end + 2).collect();
                let event = String::from_utf8_lossy(&bytes);
                match &hidden {
                    Some(h) => out.push_str(&h.event(&event)),
                    None => out.push_str(&event),
                }
                let Some(data) = event.trim().strip_prefix("data:") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                    continue;
                };
                if let Some(e) = v.pointer("/error/message").and_then(Value::as_str) {
                    error = Some(e.to_string());
                }
                if let Some(c) = v.pointer("/choices/0/delta/content").and_then(Value::as_str) {
                    answer.push_str(c);
                }
                if let Some(f) = v.pointer("/choices/0/finish_reason").and_then(Value::as_str) {
                    finish = Some(f.to_string());
                }
            }
            if out.is_empty() {
                continue;
            }
            if tx.send(Bytes::from(out)).await.is_err() {
                finish = Some("stopped_by_user".into());
                break;
            }
        }
        if error.is_some() && answer.is_empty() {
            return;
        }
        let state = conv_state(&turn, &answer);
        let finish_t = now_tstamp();
        g.web.write_log(&json!({
            "tstamp": finish_t,
            "type": "chat",
            "model": turn.model,
            "gen_params": turn.gen_params,
            "start": turn.start,
            "finish": finish_t,
            "finish_reason": finish,
            "state": state,
            "ip": turn.ip,
        }));
        let mut s = g.web.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sess) = s.get_mut(&turn.session_id) {
            sess.states[turn.side] = Some(state);
            sess.answered_turns[turn.side] = turn.messages.iter().filter(|m| m.role == "user").count();
        }
    });
    Response::from_parts(
        parts,
        Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>)),
    )
}

#[derive(Deserialize)]
struct VoteRequest {
    session_id: String,
    #[serde(rename = "type")]
    kind: String,
}

/// `POST /api/vote`: upvote/downvote/flag on a chat answer, or
/// leftvote/rightvote/tievote/bothbad_vote on an arena round. Answers the
/// model names (revealed after an anonymous vote) and the new battle count.
async fn vote(State(g): State<Arc<Gateway>>, req: Request) -> Response {
    let (ip, body) = split(&g, req);
    let r = async {
        let req: VoteRequest = read_json(&g, body).await?;
        let (row, battle, models) = {
            let mut s = g.web.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let sess = s.get_mut(&req.session_id).ok_or_else(session_gone)?;
            let tstamp = now_tstamp();
            match sess.mode {
                Mode::Chat => {
                    if !["upvote", "downvote", "flag"].contains(&req.kind.as_str()) {
                        return Err(ApiError::bad_field(
                            "type",
                            "must be upvote, downvote or flag in the chat",
                        ));
                    }
                    let state = sess.states[0]
                        .clone()
                        .ok_or_else(|| ApiError::bad_request("There is no answer to vote on yet."))?;
                    g.web.check_vote_rate(&ip)?;
                    let row =
                        json!({"tstamp": tstamp, "type": req.kind, "model": sess.models[0], "state": state, "ip": ip});
                    (row, None, sess.models.clone())
                }
                Mode::Anony | Mode::Named => {
                    let Some(winner) = Winner::from_vote(&req.kind) else {
                        return Err(ApiError::bad_field(
                            "type",
                            "must be leftvote, rightvote, tievote or bothbad_vote in the arena",
                        ));
                    };
                    let (Some(sa), Some(sb)) = (sess.states[0].clone(), sess.states[1].clone()) else {
                        return Err(ApiError::bad_request(
                            "Wait until both models have answered, then vote.",
                        ));
                    };
                    let turn = sess.answered_turns[0];
                    if turn != sess.answered_turns[1] {
                        return Err(ApiError::bad_request(
                            "Wait until both models have answered, then vote.",
                        ));
                    }
                    if sess.voted_turn == Some(turn) {
                        return Err(ApiError::bad_request("You have already voted on this round."));
                    }
                    // A refused vote leaves the round open, to vote later.
                    g.web.check_vote_rate(&ip)?;
                    sess.voted_turn = Some(turn);
                    let anony = sess.mode == Mode::Anony;
                    sess.voted = true;
                    // As FastChat: anonymous votes log empty public names, the
                    // real ones are in the states.
                    let public = if anony { json!(["", ""]) } else { json!(sess.models) };
                    let row =
                        json!({"tstamp": tstamp, "type": req.kind, "models": public, "states": [sa, sb], "ip": ip});
                    let battle = Battle {
                        model_a: sess.models[0].clone(),
                        model_b: sess.models[1].clone(),
                        winner,
                        anony,
                        tstamp,
                        ip: ip.clone(),
                    };
                    (row, Some(battle), sess.models.clone())
                }
            }
        };
        g.web.write_log(&row);
        let mut total = None;
        if let Some(b) = battle {
            let mut all = g.web.battles.lock().unwrap_or_else(|p| p.into_inner());
            all.push(b);
            total = Some(all.len());
        }
        Ok(Json(json!({"ok": true, "models": models, "battles": total})).into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /api/leaderboard`: ratings from the anonymous arena's votes (named
/// side-by-side votes are logged but, as in FastChat, not rated), without
/// the votes of flagged addresses, as `vicugna leaderboard`.
async fn get_leaderboard(State(g): State<Arc<Gateway>>) -> Response {
    let flagged = g.web.flagged.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (battles, all) = {
        let all = g.web.battles.lock().unwrap_or_else(|p| p.into_inner());
        (leaderboard::counted(&all, &flagged, false, false), all.len())
    };
    let n = (all, flagged.len());
    let cached = g.web.cached.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let board = match cached {
        Some((k, b)) if k == n => b,
        _ => {
            let b = tokio::task::spawn_blocking(move || {
                Leaderboard::compute(
                    &battles,
                    leaderboard::elo::DEFAULT_ROUNDS,
                    leaderboard::elo::DEFAULT_SEED,
                )
            })
            .await;
            match b {
                Ok(b) => {
                    let b = Arc::new(b);
                    *g.web.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((n, b.clone()));
                    b
                }
                Err(e) => return ApiError::internal(format!("leaderboard failed: {e}")).into_response(),
            }
        }
    };
    Json(json!(*board)).into_response()
}
