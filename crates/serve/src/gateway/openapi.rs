//! The gateway's OpenAPI 3 document (served at `/openapi.json`).

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

/// The OpenAPI document.
pub fn document() -> Value {
    let sampling = json!({
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.7},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 1},
        "top_k": {"type": "integer", "description": "-1 or 0: off", "default": -1},
        "n": {"type": "integer", "minimum": 1, "maximum": super::validate::MAX_CHOICES, "default": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": super::validate::MAX_STOP}]},
        "stream": {"type": "boolean", "default": false},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "seed": {"type": "integer"},
        "user": {"type": "string"},
    });
    let mut chat = sampling.clone();
    chat["messages"] = json!({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                       "content": {"oneOf": [{"type": "string"}, {"type": "array"}]}}}});
    chat["logprobs"] = json!({"type": "boolean"});
    chat["top_logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": super::validate::MAX_TOP_LOGPROBS});
    let mut completion = sampling;
    completion["prompt"] = json!({"oneOf": [{"type": "string"}, {"type": "array"}]});
    completion["echo"] = json!({"type": "boolean"});
    completion["logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": super::validate::MAX_TOP_LOGPROBS});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "vicugna OpenAI-compatible API", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/models": {"get": op("List the models workers serve", None, "A list of models")},
            "/v1/models/{model}": {"get": op("One model", None, "The model")},
            "/v1/chat/completions": {"post": op("Chat completion (streaming with stream: true)", Some("ChatCompletionRequest"), "A chat completion, or SSE chunks")},
            "/v1/completions": {"post": op("Text completion (streaming with stream: true)", Some("CompletionRequest"), "A completion, or SSE chunks")},
            "/v1/embeddings": {"post": op("Embeddings (mean-pooled, L2-normalised)", Some("EmbeddingRequest"), "Embeddings")},
            "/health": {"get": {"summary": "200 when the controller answers and a worker is registered", "responses": {"200": {"description": "ok"}, "503": {"description": "unavailable"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": chat},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": completion},
                "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
                    "model": {"type": "string"},
                    "input": {"oneOf": [{"type": "string"}, {"type": "array"}]},
                    "encoding_format": {"enum": ["float", "base64"]}}},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": "string", "nullable": true}, "code": {"type": "string", "nullable": true}}}}},
            },
        },
    })
}
