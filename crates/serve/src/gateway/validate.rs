//! Request validation: every field of the OpenAI requests checked with a message
//! that names the field and says what was wrong, before anything reaches a worker.

use serde_json::{Map, Value};
use vicugna_chat::ChatMessage;

use super::error::ApiError;
use super::tools::{self, ToolSet};
use vicugna_engine::Constraint;

/// Most choices (`n` × prompts) one request may ask for.
pub const MAX_CHOICES: usize = 16;
/// Most stop sequences in one request.
pub const MAX_STOP: usize = 16;
/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most alternatives per token.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Default of the cap on `n × max_tokens` (all choices' tokens) of one request:
/// sixteen choices of a full 8K context.
pub const DEFAULT_MAX_REQUEST_TOKENS: usize = 131_072;
/// Default of the cap on the tokens of all inputs of one embeddings request.
pub const DEFAULT_MAX_EMBED_TOKENS: usize = 32_768;

/// What is to be continued.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// The input of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A chat; the worker (or its template) makes the prompt.
    Chat(Vec<ChatMessage>),
    /// Raw prompts, one choice group each.
    Prompts(Vec<PromptInput>),
}

/// A validated chat or completion request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub model: String,
    pub input: Input,
    /// `None`: as much as the context leaves (chat only).
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    /// -1 is off.
    pub top_k: i64,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    /// Alternatives per token when logprobs were asked for.
    pub logprobs: Option<usize>,
    pub echo: bool,
    /// Keep generating past EOS (vLLM's extension; for load tests).
    pub ignore_eos: bool,
    /// The answer must be one of these strings (vLLM's `guided_choice`).
    pub guided_choice: Option<Vec<String>>,
    /// The answer must match this regex (vLLM's `guided_regex`).
    pub guided_regex: Option<String>,
    /// The answer must be JSON this schema accepts (`response_format`
    /// json_schema, or vLLM's `guided_json`); the string "object" for json_object.
    pub guided_json: Option<Value>,
    /// Drops tokens below this fraction of the top one's probability.
    pub min_p: Option<f32>,
    /// (token id, bias) pairs from OpenAI's `logit_bias`.
    pub logit_bias: Vec<(u32, f32)>,
    /// The request's tools (chat only), when it has any.
    pub tools: Option<ToolSet>,
    /// The chat as HF templates take it (assistant `tool_calls`, `tool`
    /// messages, no generic tool prompt), when it has tools or tool calls:
    /// sent instead of `input` to a worker whose template renders tools.
    pub tool_messages: Option<Vec<ChatMessage>>,
    /// Shared by this request's choices, so a worker keeps them to a share of its batch.
    pub group: u64,
}

impl GenRequest {
    /// Choices to generate: `n` per prompt.
    pub fn choices(&self) -> usize {
        match &self.input {
            Input::Chat(_) => self.n,
            Input::Prompts(p) => p.len() * self.n,
        }
    }
}

/// Refuses a request whose choices may generate more than `limit` tokens in
/// all (`n × max_tokens`, times the prompts of a completion), naming the limit
/// and the values. A request without `max_tokens` is bounded by the context
/// at the worker.
pub fn check_cost(req: &GenRequest, limit: usize) -> Result<(), ApiError> {
    let Some(max) = req.max_tokens else { return Ok(()) };
    let choices = req.choices();
    let total = choices.saturating_mul(max);
    if total > limit {
        let per = match &req.input {
            Input::Prompts(p) if p.len() > 1 => format!("{} prompts × n = {}", p.len(), req.n),
            _ => format!("n = {}", req.n),
        };
        return Err(ApiError::bad_field(
            "max_tokens",
            format!(
                "{per} × max_tokens = {max} asks for up to {total} tokens; at most {limit} tokens per request are allowed (n × max_tokens, the server's --max-request-tokens)"
            ),
        ));
    }
    Ok(())
}

/// A validated embeddings request.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub model: String,
    pub input: Vec<PromptInput>,
    pub base64: bool,
}

/// Parses the body as a JSON object.
pub fn parse_json(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, got {}",
            type_name(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        let mut end = 57;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

/// Typed access to the fields of one request object.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// The value, with JSON `null` read as absent.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(ApiError::bad_field(
                name,
                format!("expected a string, got {}", type_name(v)),
            )),
        }
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::bad_field(
                name,
                format!("expected true or false, got {}", short(v)),
            )),
        }
    }

    fn number(&self, name: &str, default: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::bad_field(
                        name,
                        format!("must be between {lo} and {hi}, got {n}"),
                    ));
                }
                Ok(x)
            }
            Some(v) => Err(ApiError::bad_field(
                name,
                format!("expected a number, got {}", short(v)),
            )),
        }
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                None if n.as_u64().is_some() => Err(ApiError::bad_field(name, format!("{n} is too large"))),
                None => Err(ApiError::bad_field(name, format!("expected an integer, got {n}"))),
            },
            Some(v) => Err(ApiError::bad_field(
                name,
                format!("expected an integer, got {}", short(v)),
            )),
        }
    }

    fn model(&self) -> Result<String, ApiError> {
        match self.string("model")? {
            Some(m) if !m.trim().is_empty() => Ok(m),
            Some(_) => Err(ApiError::bad_field("model", "must not be empty")),
            None => Err(ApiError::bad_field("model", "is required")),
        }
    }

    /// Fields that ask for features this server does not have: refused, not ignored.
    fn unsupported(&self) -> Result<(), ApiError> {
        if let Some(v) = self.get("functions") {
            if v.as_array().is_none_or(|a| !a.is_empty()) {
                return Err(ApiError::bad_field(
                    "functions",
                    "the deprecated functions API is not supported; use tools",
                ));
            }
        }
        if let Some(v) = self.get("function_call") {
            if v != "none" && v != "auto" {
                return Err(ApiError::bad_field(
                    "function_call",
                    "the deprecated functions API is not supported; use tool_choice",
                ));
            }
        }
        if let Some(n) = self.integer("best_of")? {
            let want = self.integer("n")?.unwrap_or(1);
            if n != want {
                return Err(ApiError::bad_field(
                    "best_of",
                    format!("is not supported (it must equal n = {want}), got {n}"),
                ));
            }
        }
        if self.bool("use_beam_search", false)? {
            return Err(ApiError::bad_field("use_beam_search", "beam search is not supported"));
        }
        if self.string("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_field("suffix", "is not supported"));
        }
        Ok(())
    }

    /// The sampling and stopping fields chat and completions share.
    fn common(&self, model: String, input: Input, default_max: Option<usize>) -> Result<GenRequest, ApiError> {
        self.unsupported()?;
        let max_tokens = match self.integer("max_completion_tokens")?.or(self.integer("max_tokens")?) {
            None => default_max,
            Some(n) if n < 1 => {
                let name = if self.get("max_completion_tokens").is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(ApiError::bad_field(name, format!("must be at least 1, got {n}")));
            }
            Some(n) => Some(n as usize),
        };
        let n = match self.integer("n")? {
            None => 1,
            Some(n) if n < 1 => return Err(ApiError::bad_field("n", format!("must be at least 1, got {n}"))),
            Some(n) if n as usize > MAX_CHOICES => {
                return Err(ApiError::bad_field(
                    "n",
                    format!("must be at most {MAX_CHOICES}, got {n}"),
                ))
            }
            Some(n) => n as usize,
        };
        if let Input::Prompts(p) = &input {
            if p.len() * n > MAX_CHOICES {
                return Err(ApiError::bad_field(
                    "prompt",
                    format!(
                        "{} prompts × n = {n} asks for {} completions; at most {MAX_CHOICES} per request",
                        p.len(),
                        p.len() * n
                    ),
                ));
            }
        }
        let top_k = match self.integer("top_k")? {
            None => -1,
            Some(k) if k == -1 || k >= 0 => k,
            Some(k) => {
                return Err(ApiError::bad_field(
                    "top_k",
                    format!("must be -1 (off) or >= 0, got {k}"),
                ))
            }
        };
        let seed = self.integer("seed")?.map(|s| s as u64);
        let stream = self.bool("stream", false)?;
        let include_usage = match self.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => {
                if !stream {
                    return Err(ApiError::bad_field(
                        "stream_options",
                        "is only allowed when stream is true",
                    ));
                }
                Fields(o).bool("include_usage", false).map_err(|mut e| {
                    e.param = Some("stream_options.include_usage".into());
                    e.message = format!("stream_options.{}", e.message);
                    e
                })?
            }
            Some(v) => {
                return Err(ApiError::bad_field(
                    "stream_options",
                    format!("expected an object, got {}", type_name(v)),
                ))
            }
        };
        let repetition_penalty = self.number("repetition_penalty", 1.0, 0.0, f64::MAX)?;
        if repetition_penalty <= 0.0 {
            return Err(ApiError::bad_field(
                "repetition_penalty",
                format!("must be greater than 0, got {repetition_penalty}"),
            ));
        }
        Ok(GenRequest {
            model,
            input,
            max_tokens,
            temperature: self.number("temperature", 0.7, 0.0, 2.0)? as f32,
            top_p: self.number("top_p", 1.0, 0.0, 1.0)? as f32,
            top_k,
            n,
            stop: self.stop()?,
            stream,
            include_usage,
            presence_penalty: self.number("presence_penalty", 0.0, -2.0, 2.0)? as f32,
            frequency_penalty: self.number("frequency_penalty", 0.0, -2.0, 2.0)? as f32,
            repetition_penalty: repetition_penalty as f32,
            seed,
            logprobs: None,
            echo: false,
            ignore_eos: self.bool("ignore_eos", false)?,
            guided_choice: self.guided_choice()?,
            guided_regex: self.guided_regex()?,
            guided_json: self.guided_json()?,
            min_p: match self.get("min_p") {
                None => None,
                Some(_) => Some(self.number("min_p", 0.0, 0.0, 1.0)? as f32),
            },
            logit_bias: self.logit_bias()?,
            tools: None,
            tool_messages: None,
            group: uuid::Uuid::new_v4().as_u64_pair().0,
        })
    }

    fn guided_choice(&self) -> Result<Option<Vec<String>>, ApiError> {
        let items = match self.get("guided_choice") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(items)) if !items.is_empty() => items,
            Some(v) => {
                return Err(ApiError::bad_field(
                    "guided_choice",
                    format!("expected a non-empty list of strings, got {}", type_name(v)),
                ))
            }
        };
        if self.get("guided_regex").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_field(
                "guided_regex",
                "give either guided_choice or guided_regex, not both",
            ));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.iter().enumerate() {
            match v {
                Value::String(s) if !s.is_empty() => out.push(s.clone()),
                v => {
                    return Err(ApiError::bad_field(
                        format!("guided_choice[{i}]"),
                        format!("expected a non-empty string, got {}", type_name(v)),
                    ))
                }
            }
        }
        Ok(Some(out))
    }

    /// `response_format` (OpenAI) or `guided_json` (vLLM): a schema checked and
    /// compiled here, so a bad one is a 400 naming where it is wrong.
    fn guided_json(&self) -> Result<Option<Value>, ApiError> {
        let (field, schema) = match (self.get("response_format"), self.get("guided_json")) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_field(
                    "guided_json",
                    "give either response_format or guided_json, not both",
                ))
            }
            (Some(rf), None) => {
                let Value::Object(o) = rf else {
                    return Err(ApiError::bad_field(
                        "response_format",
                        format!("expected an object with a type, got {}", type_name(rf)),
                    ));
                };
                match o.get("type").and_then(Value::as_str) {
                    Some("text") => return Ok(None),
                    Some("json_object") => ("response_format", Value::String("object".into())),
                    Some("json_schema") => {
                        let schema = o
                            .get("json_schema")
                            .and_then(|j| j.get("schema"))
                            .filter(|s| !s.is_null())
                            .ok_or_else(|| ApiError::bad_field("response_format.json_schema.schema", "is required"))?;
                        ("response_format.json_schema.schema", schema.clone())
                    }
                    _ => {
                        return Err(ApiError::bad_field(
                            "response_format.type",
                            format!(
                                "expected \"text\", \"json_object\" or \"json_schema\", got {}",
                                o.get("type").map(short).unwrap_or_else(|| "nothing".into())
                            ),
                        ))
                    }
                }
            }
            (None, Some(Value::String(s))) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Object(_)) => ("guided_json", v),
                _ => return Err(ApiError::bad_field("guided_json", "expected a JSON schema (an object)")),
            },
            (None, Some(v @ Value::Object(_))) => ("guided_json", v.clone()),
            (None, Some(v)) => {
                return Err(ApiError::bad_field(
                    "guided_json",
                    format!("expected a JSON schema (an object), got {}", type_name(v)),
                ))
            }
            (None, None) => return Ok(None),
        };
        if self.get("guided_choice").is_some() || self.get("guided_regex").is_some() {
            return Err(ApiError::bad_field(
                field,
                "cannot be combined with guided_choice or guided_regex",
            ));
        }
        let constraint = match &schema {
            Value::String(_) => Constraint::JsonObject,
            s => Constraint::JsonSchema(s.clone()),
        };
        constraint.compile().map_err(|e| {
            let m = e.to_string();
            ApiError::bad_field(field, m.strip_prefix("invalid request: ").unwrap_or(&m))
        })?;
        Ok(Some(schema))
    }

    /// OpenAI's `logit_bias`: `{"token id": bias}`, each bias in [-100, 100].
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let map = match self.get("logit_bias") {
            None => return Ok(vec![]),
            Some(Value::Object(m)) => m,
            Some(v) => {
                return Err(ApiError::bad_field(
                    "logit_bias",
                    format!("expected an object mapping token ids to biases, got {}", type_name(v)),
                ))
            }
        };
        if map.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::bad_field(
                "logit_bias",
                format!("at most {MAX_LOGIT_BIAS} entries are allowed, got {}", map.len()),
            ));
        }
        let mut out = Vec::with_capacity(map.len());
        for (k, v) in map {
            let field = format!("logit_bias.{k}");
            let id: u32 = k
                .parse()
                .map_err(|_| ApiError::bad_field(&field, format!("{k:?} is not a token id")))?;
            let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                ApiError::bad_field(&field, format!("must be a number in [-100, 100], got {}", short(v)))
            })?;
            out.push((id, b as f32));
        }
        Ok(out)
    }

    fn guided_regex(&self) -> Result<Option<String>, ApiError> {
        match self.get("guided_regex") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(v) => Err(ApiError::bad_field(
                "guided_regex",
                format!("expected a non-empty string, got {}", type_name(v)),
            )),
        }
    }

    fn stop(&self) -> Result<Vec<String>, ApiError> {
        let list = match self.get("stop") {
            None => return Ok(vec![]),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                if items.len() > MAX_STOP {
                    return Err(ApiError::bad_field(
                        "stop",
                        format!("at most {MAX_STOP} stop sequences are allowed, got {}", items.len()),
                    ));
                }
                let mut out = Vec::with_capacity(items.len());
                for (i, s) in items.iter().enumerate() {
                    match s {
                        Value::String(s) => out.push(s.clone()),
                        v => {
                            return Err(ApiError::bad_field(
                                format!("stop[{i}]"),
                                format!("expected a string, got {}", type_name(v)),
                            ))
                        }
                    }
                }
                out
            }
            Some(v) => {
                return Err(ApiError::bad_field(
                    "stop",
                    format!("expected a string or an array of strings, got {}", type_name(v)),
                ))
            }
        };
        for (i, s) in list.iter().enumerate() {
            if s.is_empty() {
                return Err(ApiError::bad_field(format!("stop[{i}]"), "must not be empty"));
            }
        }
        Ok(list)
    }
}

/// Reads one message's `content`: a string, or a list of text parts.
fn message_content(i: usize, m: &Map<String, Value>) -> Result<String, ApiError> {
    let field = format!("messages[{i}].content");
    match m.get("content") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str);
                match (kind, p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => texts.push(t.to_string()),
                    (Some("image_url"), _) => {
                        return Err(ApiError::bad_field(
                            format!("{field}[{j}]"),
                            "images are not supported by this server",
                        ))
                    }
                    _ => {
                        return Err(ApiError::bad_field(
                            format!("{field}[{j}]"),
                            "expected {\"type\": \"text\", \"text\": \"...\"}",
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        None | Some(Value::Null) => Err(ApiError::bad_field(field, "is required")),
        Some(v) => Err(ApiError::bad_field(
            field,
            format!("expected a string or an array of text parts, got {}", type_name(v)),
        )),
    }
}

/// Validates `POST /v1/chat/completions`.
pub fn chat(body: &Map<String, Value>) -> Result<GenRequest, ApiError> {
    let f = Fields(body);
    let model = f.model()?;
    // The same chat for templates that render tool calls and results themselves.
    let mut native: Vec<ChatMessage> = Vec::new();
    let mut has_calls = false;
    let messages = match f.get("messages") {
        None => return Err(ApiError::bad_field("messages", "is required")),
        // FastChat accepts a bare string as one user message.
        Some(Value::String(s)) => {
            native.push(ChatMessage::new("user", s.clone()));
            vec![ChatMessage::new("user", s.clone())]
        }
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::bad_field("messages", "must contain at least one message"));
            }
            let mut out: Vec<ChatMessage> = Vec::with_capacity(items.len());
            // Ids of the last assistant message's tool calls not answered yet.
            let mut pending: Vec<String> = Vec::new();
            // Consecutive tool results, rendered as one user turn.
            let mut results: Vec<String> = Vec::new();
            let mut after_calls = false;
            for (i, item) in items.iter().enumerate() {
                let Value::Object(m) = item else {
                    return Err(ApiError::bad_field(
                        format!("messages[{i}]"),
                        format!("expected an object with role and content, got {}", type_name(item)),
                    ));
                };
                let role = match m.get("role") {
                    Some(Value::String(r)) => r.as_str(),
                    None | Some(Value::Null) => {
                        return Err(ApiError::bad_field(format!("messages[{i}].role"), "is required"))
                    }
                    Some(v) => {
                        return Err(ApiError::bad_field(
                            format!("messages[{i}].role"),
                            format!("expected a string, got {}", type_name(v)),
                        ))
                    }
                };
                let role = match role {
                    "system" | "user" | "assistant" | "tool" => role,
                    // OpenAI's newer name for the system role.
                    "developer" => "system",
                    "function" => {
                        return Err(ApiError::bad_field(
                            format!("messages[{i}].role"),
                            "role \"function\" (the deprecated functions API) is not supported; use tool messages",
                        ))
                    }
                    other => {
                        return Err(ApiError::bad_field(
                            format!("messages[{i}].role"),
                            format!("unknown role {:?} (expected system, user, assistant or tool)", other),
                        ))
                    }
                };
                if role == "tool" {
                    if !after_calls {
                        return Err(ApiError::bad_field(
                            format!("messages[{i}].role"),
                            "a tool message must follow an assistant message with tool_calls",
                        ));
                    }
                    let id = match m.get("tool_call_id") {
                        Some(Value::String(id)) => id,
                        _ => {
                            return Err(ApiError::bad_field(
                                format!("messages[{i}].tool_call_id"),
                                "is required (the id of the call this message answers)",
                            ))
                        }
                    };
                    let Some(k) = pending.iter().position(|p| p == id) else {
                        return Err(ApiError::bad_field(
                            format!("messages[{i}].tool_call_id"),
                            format!("{id:?} is not the id of an unanswered tool call of the assistant message before"),
                        ));
                    };
                    pending.remove(k);
                    let result = message_content(i, m)?;
                    let mut tool = ChatMessage::new("tool", result.clone());
                    tool.tool_call_id = Some(id.clone());
                    native.push(tool);
                    results.push(result);
                    continue;
                }
                if !pending.is_empty() {
                    return Err(ApiError::bad_field(
                        format!("messages[{i}]"),
                        format!(
                            "tool call {:?} of the assistant message before has no tool message answering it",
                            pending[0]
                        ),
                    ));
                }
                if !results.is_empty() {
                    out.push(ChatMessage::new("user", tools::render_results(&results)));
                    results.clear();
                }
                after_calls = false;
                let calls = match m.get("tool_calls").filter(|v| !v.is_null()) {
                    Some(v) if role == "assistant" => tools::message_calls(i, v)?,
                    Some(_) => {
                        return Err(ApiError::bad_field(
                            format!("messages[{i}].tool_calls"),
                            "only assistant messages have tool_calls",
                        ))
                    }
                    None => vec![],
                };
                if calls.is_empty() {
                    let content = message_content(i, m)?;
                    native.push(ChatMessage::new(role, content.clone()));
                    out.push(ChatMessage::new(role, content));
                    continue;
                }
                let text = match m.get("content") {
                    None | Some(Value::Null) => String::new(),
                    _ => message_content(i, m)?,
                };
                let rendered = tools::render_calls(&calls.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>());
                let content = if text.trim().is_empty() {
                    rendered
                } else {
                    format!("{text}\n{rendered}")
                };
                out.push(ChatMessage::new("assistant", content));
                let mut assistant = ChatMessage::new("assistant", text);
                assistant.tool_calls = Some(calls.iter().map(|(id, c)| tools::template_call(id, c)).collect());
                native.push(assistant);
                has_calls = true;
                pending = calls.into_iter().map(|(id, _)| id).collect();
                after_calls = true;
            }
            if let Some(id) = pending.first() {
                return Err(ApiError::bad_field(
                    "messages",
                    format!("tool call {id:?} of the last assistant message has no tool message answering it"),
                ));
            }
            if !results.is_empty() {
                out.push(ChatMessage::new("user", tools::render_results(&results)));
            }
            out
        }
        Some(v) => {
            return Err(ApiError::bad_field(
                "messages",
                format!("expected an array of messages, got {}", type_name(v)),
            ))
        }
    };
    let mut messages = messages;
    let tool_set = tools::parse(body)?;
    if let Some(t) = tool_set.as_ref().filter(|t| t.active()) {
        t.add_to(&mut messages);
    }
    let mut req = f.common(model, Input::Chat(messages), None)?;
    if let Some(t) = &tool_set {
        if let Some(re) = t.check_constraint()? {
            if req.guided_choice.is_some() || req.guided_regex.is_some() || req.guided_json.is_some() {
                return Err(ApiError::bad_field(
                    "tool_choice",
                    "a required or named tool call cannot be combined with response_format or guided decoding",
                ));
            }
            req.guided_regex = Some(re);
        }
    }
    if tool_set.is_some() || has_calls {
        req.tool_messages = Some(native);
    }
    req.tools = tool_set.filter(|t| t.active());
    let want = f.bool("logprobs", false)?;
    let top = match f.integer("top_logprobs")? {
        None => 0,
        Some(t) if (0..=MAX_TOP_LOGPROBS as i64).contains(&t) => t as usize,
        Some(t) => {
            return Err(ApiError::bad_field(
                "top_logprobs",
                format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {t}"),
            ))
        }
    };
    if f.get("top_logprobs").is_some() && !want {
        return Err(ApiError::bad_field("top_logprobs", "requires logprobs to be true"));
    }
    req.logprobs = want.then_some(top);
    Ok(req)
}

/// Reads a prompt that may be text, token ids, or a list of either.
fn prompts(field: &str, v: Option<&Value>) -> Result<Vec<PromptInput>, ApiError> {
    let ids = |i: Option<usize>, items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                let f = i.map_or(field.to_string(), |i| format!("{field}[{i}]"));
                ApiError::bad_field(f, "a list of tokens must hold non-negative integers")
            })
    };
    let out = match v {
        None => return Err(ApiError::bad_field(field, "is required")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::bad_field(field, "must not be empty"));
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => vec![PromptInput::Ids(ids(None, items)?)],
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => out.push(PromptInput::Text(s.clone())),
                    Value::Array(t) if !t.is_empty() => out.push(PromptInput::Ids(ids(Some(i), t)?)),
                    v => {
                        return Err(ApiError::bad_field(
                            format!("{field}[{i}]"),
                            format!("expected a string or a non-empty list of token ids, got {}", short(v)),
                        ))
                    }
                }
            }
            out
        }
        Some(v) => {
            return Err(ApiError::bad_field(
                field,
                format!(
                    "expected a string, a list of strings or token ids, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    for (i, p) in out.iter().enumerate() {
        if matches!(p, PromptInput::Text(t) if t.is_empty()) && field == "input" {
            return Err(ApiError::bad_field(format!("{field}[{i}]"), "must not be empty"));
        }
    }
    Ok(out)
}

/// Validates `POST /v1/completions`.
pub fn completion(body: &Map<String, Value>) -> Result<GenRequest, ApiError> {
    let f = Fields(body);
    let model = f.model()?;
    let input = Input::Prompts(prompts("prompt", f.get("prompt"))?);
    let mut req = f.common(model, input, Some(16))?;
    req.echo = f.bool("echo", false)?;
    req.logprobs = match f.integer("logprobs")? {
        None => None,
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::bad_field(
                "logprobs",
                format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ))
        }
    };
    Ok(req)
}

/// Validates `POST /v1/embeddings`.
pub fn embeddings(body: &Map<String, Value>) -> Result<EmbedRequest, ApiError> {
    let f = Fields(body);
    let model = f.model()?;
    let input = prompts("input", f.get("input"))?;
    if input.len() > 2048 {
        return Err(ApiError::bad_field(
            "input",
            format!("at most 2048 inputs per request, got {}", input.len()),
        ));
    }
    let base64 = match f.string("encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_field(
                "encoding_format",
                format!("expected \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    if f.get("dimensions").is_some() {
        return Err(ApiError::bad_field("dimensions", "is not supported by this model"));
    }
    Ok(EmbedRequest { model, input, base64 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat_err(v: Value) -> ApiError {
        chat(v.as_object().unwrap()).unwrap_err()
    }

    #[test]
    fn chat_defaults() {
        let v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let r = chat(v.as_object().unwrap()).unwrap();
        assert_eq!(r.n, 1);
        assert_eq!(r.max_tokens, None);
        assert!((r.temperature - 0.7).abs() < 1e-6);
        assert!(!r.stream && r.logprobs.is_none());
        assert_eq!(r.input, Input::Chat(vec![ChatMessage::new("user", "hi")]));
    }

    #[test]
    fn bad_chat_fields_name_the_field() {
        let base = |extra: Value| {
            let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let cases = [
            (json!({"messages": []}), "messages", "at least one"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
                "unknown role",
            ),
            (json!({"max_tokens": -1}), "max_tokens", "at least 1"),
            (json!({"temperature": 3}), "temperature", "between 0 and 2"),
            (json!({"n": 0}), "n", "at least 1"),
            (json!({"stop": vec!["x"; 100]}), "stop", "at most"),
            (json!({"top_p": "high"}), "top_p", "expected a number"),
            (json!({"top_logprobs": 3}), "top_logprobs", "requires logprobs"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
                "is required",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]}),
                "messages[0].role",
                "must follow",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "not": {}}}}}}}),
                "response_format.json_schema.schema",
                "`not`",
            ),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias.abc", "token id"),
            (json!({"logit_bias": {"5": 300}}), "logit_bias.5", "[-100, 100]"),
            (json!({"min_p": 2}), "min_p", "between 0 and 1"),
        ];
        for (extra, field, words) in cases {
            let e = chat_err(base(extra.clone()));
            assert_eq!(e.status, 400, "{extra}");
            assert_eq!(e.param.as_deref(), Some(field), "{extra}: {}", e.message);
            assert!(e.message.contains(words), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn n_times_max_tokens_over_the_cap_names_the_cap_and_the_values() {
        let r = chat(
            json!({"model": "m", "messages": "hi", "n": 16, "max_tokens": 9000})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let e = check_cost(&r, DEFAULT_MAX_REQUEST_TOKENS).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        for words in ["n = 16", "max_tokens = 9000", "144000", "131072"] {
            assert!(e.message.contains(words), "{words}: {}", e.message);
        }
        let r = chat(
            json!({"model": "m", "messages": "hi", "n": 16, "max_tokens": 8192})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert!(check_cost(&r, DEFAULT_MAX_REQUEST_TOKENS).is_ok());
        let r = completion(
            json!({"model": "m", "prompt": ["a", "b"], "n": 2, "max_tokens": 100})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let e = check_cost(&r, 399).unwrap_err();
        assert!(
            e.message.contains("2 prompts × n = 2") && e.message.contains("400"),
            "{}",
            e.message
        );
    }

    #[test]
    fn invalid_json_is_a_400() {
        let e = parse_json(b"{\"model\": ").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        assert!(parse_json(b"[1]").unwrap_err().message.contains("JSON object"));
    }

    #[test]
    fn completion_prompts_in_every_shape() {
        let p = |v: Value| completion(json!({"model": "m", "prompt": v}).as_object().unwrap()).map(|r| r.input);
        assert_eq!(
            p(json!("a")).unwrap(),
            Input::Prompts(vec![PromptInput::Text("a".into())])
        );
        assert_eq!(
            p(json!([1, 2])).unwrap(),
            Input::Prompts(vec![PromptInput::Ids(vec![1, 2])])
        );
        assert_eq!(
            p(json!(["a", [3]])).unwrap(),
            Input::Prompts(vec![PromptInput::Text("a".into()), PromptInput::Ids(vec![3])])
        );
        assert!(p(json!([])).is_err());
        assert!(p(json!([-1])).is_err());
        let r = completion(json!({"model": "m", "prompt": "x"}).as_object().unwrap()).unwrap();
        assert_eq!(r.max_tokens, Some(16));
    }
}
