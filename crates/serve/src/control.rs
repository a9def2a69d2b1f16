//! Guarding the control plane and the HTTP surface: the shared secret every
//! FastChat-protocol call carries, the hosts a worker may register from, the
//! JSON content type that keeps browsers' simple requests (CSRF) out, and
//! OpenAI-style bodies for the errors these produce.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest control secret accepted: guessing it must be out of reach.
pub const MIN_SECRET_CHARS: usize = 16;

/// How long a connection may take to send a request's headers (and how long an
/// idle keep-alive connection is kept) before it is closed. Longer than the
/// usual clients' own idle limits (httpx 5 s, Node 4 s), so they drop a
/// connection before the server does instead of racing it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(8);

/// How long a control-plane client keeps an idle connection: shorter than the
/// servers' [`HEADER_READ_TIMEOUT`], so a client never reuses a connection the
/// server is closing.
pub const CLIENT_POOL_IDLE: Duration = Duration::from_secs(2);

/// The secret shared by the controller, workers and gateway, sent as
/// `Authorization: Bearer <secret>`.
#[derive(Clone)]
pub struct ControlSecret {
    text: Arc<str>,
    digest: [u8; 32],
}

impl std::fmt::Debug for ControlSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlSecret(<redacted>)")
    }
}

impl ControlSecret {
    /// A secret from text; refuses short ones and ones no header can carry.
    pub fn new(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.chars().count() < MIN_SECRET_CHARS {
            return Err(format!(
                "the control secret must be at least {MIN_SECRET_CHARS} characters long, got {}",
                text.chars().count()
            ));
        }
        if !text.chars().all(|c| c.is_ascii_graphic()) {
            return Err("the control secret must be printable ASCII without spaces".to_string());
        }
        Ok(ControlSecret {
            digest: Sha256::digest(text.as_bytes()).into(),
            text: text.into(),
        })
    }

    /// A fresh random secret (256 bits, hex).
    pub fn random() -> Self {
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::new(&hex).unwrap_or_else(|_| unreachable!("64 hex digits are a valid secret"))
    }

    /// Whether `given` is this secret. Both sides are hashed first, so the time
    /// taken depends neither on where they differ nor on their lengths.
    pub fn matches(&self, given: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        bool::from(self.digest.ct_eq(&d))
    }

    fn header(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.text))
            .unwrap_or_else(|_| unreachable!("checked to be printable ASCII"));
        v.set_sensitive(true);
        v
    }
}

/// Whether two secrets (API keys) are equal, in time that does not depend on
/// where they differ or on their lengths.
pub fn same_secret(a: &str, b: &str) -> bool {
    let da: [u8; 32] = Sha256::digest(a.as_bytes()).into();
    let db: [u8; 32] = Sha256::digest(b.as_bytes()).into();
    bool::from(da.ct_eq(&db))
}

/// How the control plane (controller, worker) authenticates its callers.
#[derive(Debug, Clone)]
pub enum ControlAuth {
    /// Every call must carry the secret; vicugna clients send it.
    Secret(ControlSecret),
    /// No secret (FastChat interoperability): whoever reaches the port may
    /// register workers and generate. Only by explicit choice.
    Open,
}

impl Default for ControlAuth {
    /// A random secret nobody else knows: give every part the same one.
    fn default() -> Self {
        ControlAuth::Secret(ControlSecret::random())
    }
}

impl ControlAuth {
    /// Auth with the secret `text` (see [`ControlSecret::new`]).
    pub fn secret(text: &str) -> Result<Self, String> {
        ControlSecret::new(text).map(ControlAuth::Secret)
    }

    /// An HTTP client for control-plane calls: sends the secret on every
    /// request, and drops idle connections before the server would.
    pub fn client(&self, timeout: Option<Duration>) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if let ControlAuth::Secret(s) = self {
            headers.insert(header::AUTHORIZATION, s.header());
        }
        let mut b = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(CLIENT_POOL_IDLE);
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b.build().unwrap_or_default()
    }
}

/// An OpenAI-style error response: `{"error": {message, type, param, code}}`.
pub fn error_response(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// Middleware for the controller's and the worker's routes: refuses calls
/// without the control secret (401).
pub async fn require_secret(State(auth): State<ControlAuth>, req: Request, next: Next) -> Response {
    if let ControlAuth::Secret(secret) = &auth {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let msg = match given {
            None => {
                "this is vicugna's control plane: calls need the control secret \
                     (`Authorization: Bearer <secret>`, set with --control-secret or --control-secret-file)"
            }
            Some(g) if !secret.matches(g) => "the control secret is not valid",
            Some(_) => return next.run(req).await,
        };
        return error_response(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_control_secret",
            msg,
        );
    }
    next.run(req).await
}

/// Whether a content type is JSON (`application/json`, optionally with
/// parameters, or a `+json` type).
fn is_json(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Middleware: a request that carries a body must say it is JSON (415
/// otherwise). Browsers send `text/plain` and form types cross-origin without
/// asking (no preflight); JSON they only send after a CORS preflight, which
/// the server refuses unless the origin is allowed.
pub async fn require_json(req: Request, next: Next) -> Response {
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let sends_data = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if sends_data && has_body {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        if !ct.is_some_and(is_json) {
            let got = ct.map_or("none".to_string(), |c| format!("`{c}`"));
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                format!("the request body must be JSON sent with `Content-Type: application/json` (got {got})"),
            );
        }
    }
    next.run(req).await
}

/// The 405 answer, with a body saying which methods the path takes.
pub async fn method_not_allowed(req: Request) -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// One entry of `--allow-worker-hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    /// An address range (an address alone is a /32 or /128).
    Net(IpAddr, u8),
    /// A host name, compared case-insensitively.
    Name(String),
}

/// The hosts workers may register from (`--allow-worker-hosts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHosts {
    rules: Vec<HostRule>,
}

impl Default for WorkerHosts {
    /// Loopback only: 127.0.0.0/8, ::1 and localhost.
    fn default() -> Self {
        WorkerHosts::parse("127.0.0.0/8,::1,localhost").unwrap_or_else(|_| unreachable!("valid built-in list"))
    }
}

impl std::str::FromStr for WorkerHosts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        WorkerHosts::parse(s)
    }
}

impl WorkerHosts {
    /// A comma-separated list of addresses, CIDR ranges (`10.0.0.0/8`) and host names.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let item = item.trim_start_matches('[').trim_end_matches(']');
            let rule = match item.split_once('/') {
                Some((ip, bits)) => {
                    let ip: IpAddr = ip
                        .parse()
                        .map_err(|_| format!("--allow-worker-hosts: {item:?} is not an address range"))?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    let bits: u8 = bits.parse().ok().filter(|&b| b <= max).ok_or_else(|| {
                        format!("--allow-worker-hosts: {item:?}: the prefix length must be 0..={max}")
                    })?;
                    HostRule::Net(ip, bits)
                }
                None => match item.parse::<IpAddr>() {
                    Ok(ip) => HostRule::Net(ip, if ip.is_ipv4() { 32 } else { 128 }),
                    Err(_) => {
                        if !item.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                            return Err(format!("--allow-worker-hosts: {item:?} is not a host name or address"));
                        }
                        HostRule::Name(item.to_ascii_lowercase())
                    }
                },
            };
            rules.push(rule);
        }
        if rules.is_empty() {
            return Err("--allow-worker-hosts: the list is empty".into());
        }
        Ok(WorkerHosts { rules })
    }

    /// Adds the host of `url` (a worker this process started itself).
    pub fn allow_host_of(&mut self, url: &str) {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string));
        if let Some(h) = host {
            if let Ok(extra) = WorkerHosts::parse(&h) {
                self.rules.extend(extra.rules);
            }
        }
    }

    fn allows(&self, host: &Host) -> bool {
        self.rules.iter().any(|r| match (r, host) {
            (HostRule::Name(n), Host::Name(h)) => n == h,
            (HostRule::Net(net, bits), Host::Ip(ip)) => in_net(*ip, *net, *bits),
            _ => false,
        })
    }

    /// Checks a worker's URL: http(s), a host on the list, never a link-local
    /// or unspecified address. Returns the URL without a trailing slash.
    pub fn check(&self, url: &str) -> Result<String, String> {
        let refuse = |why: &str| {
            Err(format!(
                "worker URL {url:?} refused: {why} (the controller accepts http(s) workers on the hosts of --allow-worker-hosts)"
            ))
        };
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) => u,
            Err(e) => return refuse(&format!("not a URL ({e})")),
        };
        if !matches!(parsed.scheme(), "http" | "https") {
            return refuse(&format!("the scheme must be http or https, not {:?}", parsed.scheme()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return refuse("credentials in the URL are not allowed");
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return refuse("a query or fragment is not allowed");
        }
        let host = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Host::Ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Host::Ip(ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip))),
            Some(url::Host::Domain(d)) => Host::Name(d.to_ascii_lowercase()),
            None => return refuse("it has no host"),
        };
        if let Host::Ip(ip) = host {
            let link_local = match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
            if link_local || ip.is_unspecified() || ip.is_multicast() {
                return refuse("link-local, unspecified and multicast addresses are never workers");
            }
        }
        if !self.allows(&host) {
            return refuse("its host is not in --allow-worker-hosts");
        }
        Ok(url.trim_end_matches('/').to_string())
    }
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits as u32) };
            (u32::from(a) & mask) == (u32::from(n) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits as u32) };
            (u128::from(a) & mask) == (u128::from(n) & mask)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_and_refuse_short_ones() {
        let s = ControlSecret::new("0123456789abcdef").unwrap();
        assert!(s.matches("0123456789abcdef"));
        assert!(!s.matches("0123456789abcdeg"));
        assert!(!s.matches(""));
        assert!(ControlSecret::new("short").unwrap_err().contains("at least 16"));
        assert!(ControlSecret::new("with a space inside it").is_err());
        assert!(format!("{s:?}").contains("redacted"));
        let (a, b) = (ControlSecret::random(), ControlSecret::random());
        assert!(!a.matches(&b.text));
    }

    #[test]
    fn worker_hosts_default_to_loopback() {
        let h = WorkerHosts::default();
        for ok in [
            "http://127.0.0.1:21002",
            "http://127.3.4.5:1/",
            "https://localhost:9",
            "http://[::1]:80",
        ] {
            assert!(h.check(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("file:///etc/passwd", "scheme"),
            ("http://169.254.169.254/latest", "link-local"),
            ("http://10.0.0.5:21002", "--allow-worker-hosts"),
            ("http://example.com:80", "--allow-worker-hosts"),
            ("gopher://127.0.0.1:70", "scheme"),
            ("http://u:p@127.0.0.1:1", "credentials"),
            ("not a url", "not a URL"),
        ] {
            let e = h.check(bad).unwrap_err();
            assert!(e.contains(why) && e.contains("--allow-worker-hosts"), "{bad}: {e}");
        }
        let wide = WorkerHosts::parse("10.0.0.0/8, gpu1.lan, 0.0.0.0/0").unwrap();
        assert!(wide.check("http://10.1.2.3:21002").is_ok());
        assert!(wide.check("http://GPU1.lan:21002").is_ok());
        assert!(
            wide.check("http://169.254.169.254").is_err(),
            "link-local even under /0"
        );
        assert!(WorkerHosts::parse("10.0.0.0/40").is_err());
        assert!(WorkerHosts::parse("").is_err());
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.x+json",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
