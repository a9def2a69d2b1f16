//! The gateway's OpenAPI 3 document (served at `/openapi.json`). It is also
//! what the schema fuzzing test (tests/fuzz_openapi.rs) generates requests
//! from, so its constraints say what the server accepts, no looser.

use serde_json::{json, Value};

fn error_responses() -> Value {
    let err = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let with = |d: &str| {
        let mut e = err.clone();
        e["description"] = json!(d);
        e
    };
    json!({
        "400": with("A field is invalid; the message names it and says why."),
        "401": with("Missing or unknown API key (when the server has --api-keys)."),
        "404": with("No worker has ever served this model."),
        "413": with("The request body is too large."),
        "429": with("Every worker of the model is full; see the Retry-After header."),
        "502": with("A worker failed while answering."),
        "503": with("No worker serves the model now, or the controller is unreachable."),
    })
}

fn op(summary: &str, request: Option<&str>, ok: &str) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({"description": ok, "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "string", "description": "`data: {json}` events, then `data: [DONE]`"}}
    }});
    let mut o = json!({"summary": summary, "responses": responses, "security": [{"bearer": []}, {}]});
    if let Some(schema) = request {
        o["requestBody"] = json!({"required": true, "content": {"application/json": {
            "schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    }
    o
}

/// A prompt or embeddings input: text, texts, token ids, or lists of token ids.
fn prompt(non_empty_text: bool) -> Value {
    let text = if non_empty_text {
        json!({"type": "string", "minLength": 1})
    } else {
        json!({"type": "string"})
    };
    let ids = json!({"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": u32::MAX}});
    json!({"anyOf": [
        text,
        {"type": "array", "minItems": 1, "maxItems": 2048, "items": text},
        ids,
        {"type": "array", "minItems": 1, "maxItems": 2048, "items": ids},
    ]})
}

/// A JSON request body of the page's API.
fn page_op(summary: &str, request: Option<Value>, ok: &str) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({"description": ok});
    responses["404"] = json!({"description": "The conversation has expired (or never was), or the model is not served.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    responses["429"] = json!({"description": "Too many messages or votes from this address; see Retry-After.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let mut o = json!({"summary": summary, "tags": ["web page"], "responses": responses});
    if let Some(schema) = request {
        o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema}}});
    }
    o
}

/// The page's own API (`/api/*`), absent with `--no-page`.
fn page_paths() -> Value {
    let session_id = json!({"type": "string", "maxLength": 64});
    let message = json!({"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}});
    json!({
        "/api/config": {"get": page_op("The page's limits", None, "Limits")},
        "/api/models": {"get": page_op("The served models, for the page's pickers", None, "Model names")},
        "/api/session": {"post": page_op("A new conversation: chat (one model), arena (two hidden at random) or side_by_side (two picked)",
            Some(json!({"type": "object", "required": ["mode"], "properties": {
                "mode": {"enum": ["chat", "arena", "side_by_side"]},
                "models": {"type": "array", "maxItems": 2, "items": {"type": "string"}}}})),
            "The session id (and the models, except in the anonymous arena)")},
        "/api/chat": {"post": page_op("One side's answer, streamed as chat completion chunks; in the anonymous arena they name the model `model A` / `model B`",
            Some(json!({"type": "object", "required": ["session_id", "messages"], "properties": {
                "session_id": session_id, "side": {"type": "integer", "minimum": 0, "maximum": 1},
                "messages": {"type": "array", "minItems": 1, "items": message},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                "max_tokens": {"type": "integer", "minimum": 1}}})),
            "SSE chunks")},
        "/api/vote": {"post": page_op("A vote: upvote/downvote/flag in a chat, leftvote/rightvote/tievote/bothbad_vote in the arena (reveals the names)",
            Some(json!({"type": "object", "required": ["session_id", "type"], "properties": {
                "session_id": session_id,
                "type": {"enum": ["upvote", "downvote", "flag", "leftvote", "rightvote", "tievote", "bothbad_vote"]}}})),
            "Recorded; the model names")},
        "/api/leaderboard": {"get": page_op("Ratings from the anonymous arena's votes (flagged addresses left out)", None, "The leaderboard")},
    })
}

/// `response_format`: free text, any JSON object, or JSON a schema accepts,
/// enforced while decoding.
fn response_format() -> Value {
    json!({"anyOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"enum": ["json_schema"]},
            "json_schema": {"type": "object", "required": ["name", "schema"], "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "schema": {"type": "object", "description": "A JSON schema: objects, enums, strings (pattern, maxLength), \
                    numbers, integers, booleans, arrays (minItems, maxItems), $defs/$ref without recursion, anyOf; \
                    other keywords are refused with a 400 naming them"},
                "strict": {"type": "boolean"}}}}},
    ], "description": "Structured output, enforced by the decoder"})
}

/// The OpenAPI document.
pub fn document() -> Value {
    let sampling = json!({
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.7},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": i32::MAX, "description": "-1 or 0: off", "default": -1},
        "n": {"type": "integer", "minimum": 1, "maximum": super::validate::MAX_CHOICES, "default": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": super::validate::MAX_STOP}]},
        "stream": {"type": "boolean", "default": false},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "minimum": 0, "exclusiveMinimum": true},
        "seed": {"type": "integer", "minimum": 0, "maximum": i64::MAX},
        "user": {"type": "string"},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1,
            "description": "Drops tokens below this fraction of the most likely token's probability; 0 is off"},
        "logit_bias": {"type": "object", "maxProperties": super::validate::MAX_LOGIT_BIAS,
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "Token id (a decimal string) → bias added to its logit; -100 bans the token, 100 forces it"},
        "response_format": response_format(),
    });
    let mut chat = sampling.clone();
    let text_part = json!({"type": "object", "required": ["type", "text"],
        "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}});
    let call = json!({"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": {"type": "string"}, "type": {"enum": ["function"]},
        "function": {"type": "object", "required": ["name", "arguments"], "properties": {
            "name": {"type": "string"}, "arguments": {"type": "string", "description": "The arguments as a JSON text"}}}}});
    chat["messages"] = json!({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                       "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
                       "tool_calls": {"type": "array", "items": call,
                           "description": "An assistant message's tool calls, answered by the `tool` messages after it"},
                       "tool_call_id": {"type": "string", "description": "A `tool` message: the id of the call it answers"}}}});
    chat["tools"] = json!({"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "description": {"type": "string"},
            "parameters": {"type": "object", "description": "The arguments' JSON schema (the subset response_format takes)"},
            "strict": {"type": "boolean"}}}}},
        "description": "Functions the model may call; calls come back in message.tool_calls (streamed as delta.tool_calls) with finish_reason tool_calls"});
    chat["tool_choice"] = json!({"anyOf": [
        {"enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}],
        "description": "auto (default with tools): the model decides; none: no calls; required or a named function: \
            a call is decoded under a constraint, so its name exists and its arguments match the function's schema"});
    chat["logprobs"] = json!({"type": "boolean"});
    chat["top_logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": super::validate::MAX_TOP_LOGPROBS});
    let mut completion = sampling;
    completion["prompt"] = prompt(false);
    completion["echo"] = json!({"type": "boolean"});
    completion["logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": super::validate::MAX_TOP_LOGPROBS});
    let mut model_op = op("One model", None, "The model");
    model_op["parameters"] = json!([{"name": "model", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {"title": "vicugna OpenAI-compatible API", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/models": {"get": op("List the models workers serve", None, "A list of models")},
            "/v1/models/{model}": {"get": model_op},
            "/v1/chat/completions": {"post": op("Chat completion (streaming with stream: true)", Some("ChatCompletionRequest"), "A chat completion, or SSE chunks")},
            "/v1/completions": {"post": op("Text completion (streaming with stream: true)", Some("CompletionRequest"), "A completion, or SSE chunks")},
            "/v1/embeddings": {"post": op("Embeddings (mean-pooled, L2-normalised)", Some("EmbeddingRequest"), "Embeddings")},
            "/health": {"get": {"summary": "200 when the controller answers and a worker is registered", "responses": {"200": {"description": "ok"}, "503": {"description": "unavailable"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/docs": {"get": {"summary": "This document as an interactive page: endpoints, schemas, and a form to send requests", "responses": {"200": {"description": "HTML"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": chat},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": completion},
                "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
                    "model": {"type": "string"},
                    "input": prompt(true),
                    "encoding_format": {"enum": ["float", "base64"]}}},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": "string", "nullable": true}, "code": {"type": "string", "nullable": true}}}}},
            },
        },
    });
    if let (Some(paths), Value::Object(page)) = (doc["paths"].as_object_mut(), page_paths()) {
        paths.extend(page);
    }
    doc
}

const DOCS_HTML: &str = include_str!("docs/index.html");
const DOCS_JS: &str = include_str!("docs/docs.js");
const DOCS_CSS: &str = include_str!("docs/docs.css");

/// `/docs`: an interactive page built from [`document`] in the browser, its
/// assets inside the binary (no CDN), served with or without the web page.
pub fn docs_router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    use axum::response::IntoResponse;
    use axum::routing::get;
    fn asset(text: &'static str, content_type: &'static str) -> axum::response::Response {
        ([("content-type", content_type), ("cache-control", "no-cache")], text).into_response()
    }
    axum::Router::new()
        .route("/docs", get(|| async { asset(DOCS_HTML, "text/html; charset=utf-8") }))
        .route("/docs/", get(|| async { asset(DOCS_HTML, "text/html; charset=utf-8") }))
        .route(
            "/docs/docs.js",
            get(|| async { asset(DOCS_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/docs/docs.css",
            get(|| async { asset(DOCS_CSS, "text/css; charset=utf-8") }),
        )
}
