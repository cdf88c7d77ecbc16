//! The runtime API, JSON over HTTP under `/api/`: read the state of every frontend and
//! backend, set a backend ready / drain / maint, change its weight, enable or disable a
//! frontend. Endpoints and examples: docs/operations.md.
//!
//! Reads are served here from the published snapshot. Writes are checked here (who may
//! write, what the body says) and then applied by the control loop (`admin::runtime`), which
//! answers before the response is written: a 200 means the new snapshot is published.
//!
//! Who may write: with `[admin] token_file` set, whoever sends `Authorization: Bearer TOKEN`
//! (401 otherwise). Without a token, peers on loopback when the admin listener itself is on
//! loopback; anyone else gets 403, so that a listener opened to the network
//! (`allow_public`) serves status and metrics but never changes anything without a token.
//! A browser on another site cannot write either: a write must be `application/json` (a
//! cross-site form or `no-cors` fetch cannot send that without a preflight, which this
//! server never grants) and an `Origin`, if sent, must be this listener's own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::head::Request;
use super::runtime::{Action, Refused};
use super::{AdminState, Response};
use crate::backend::{AdminMode, BackendRef, FrontendSnap};

/// Largest request body accepted (a write is a few dozen bytes).
pub const MAX_BODY: usize = 4096;
/// How long a write waits for the control loop (it is busy only for a reload's bind).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What became of a write, for `ringlb_admin_writes_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Ok,
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
}

impl WriteResult {
    pub const ALL: [WriteResult; 7] = [
        WriteResult::Ok,
        WriteResult::BadRequest,
        WriteResult::Unauthorized,
        WriteResult::Forbidden,
        WriteResult::NotFound,
        WriteResult::Conflict,
        WriteResult::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WriteResult::Ok => "ok",
            WriteResult::BadRequest => "bad_request",
            WriteResult::Unauthorized => "unauthorized",
            WriteResult::Forbidden => "forbidden",
            WriteResult::NotFound => "not_found",
            WriteResult::Conflict => "conflict",
            WriteResult::TooLarge => "too_large",
        }
    }
}

/// Writes by result, in [`WriteResult::ALL`]'s order.
#[derive(Debug, Default)]
pub struct WriteCounts([AtomicU64; 7]);

impl WriteCounts {
    pub fn record(&self, r: WriteResult) {
        if let Some(i) = WriteResult::ALL.iter().position(|&x| x == r) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, r: WriteResult) -> u64 {
        WriteResult::ALL
            .iter()
            .position(|&x| x == r)
            .map_or(0, |i| self.0[i].load(Ordering::Relaxed))
    }
}

pub fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Whether `req` is a write (a body is read for it).
pub fn is_write(req: &Request) -> bool {
    is_api(&req.path) && req.method == "POST"
}

/// A JSON error answer: `{"error": "..."}`.
pub fn error(status: &'static str, message: &str) -> Response {
    json_response(status, &json!({ "error": message }))
}

fn json_response(status: &'static str, v: &impl Serialize) -> Response {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    Response::new(status, "application/json", body)
}

/// Counts a refused write and answers it.
pub fn refuse(state: &AdminState, r: WriteResult, status: &'static str, msg: &str) -> Response {
    state.ops.admin_writes.record(r);
    error(status, msg)
}

/// Checks a write's head before its body is read: how long the body is, who sends it.
/// `Err` is the answer (already counted).
pub fn check_write_head(
    req: &Request,
    peer: SocketAddr,
    state: &AdminState,
) -> Result<usize, Response> {
    if req.transfer_encoding {
        return Err(refuse(
            state,
            WriteResult::BadRequest,
            "411 Length Required",
            "send the body with Content-Length (no Transfer-Encoding)",
        ));
    }
    let Some(len) = req.content_length else {
        return Err(refuse(
            state,
            WriteResult::BadRequest,
            "411 Length Required",
            "a write needs a JSON body with Content-Length",
        ));
    };
    if len > MAX_BODY {
        return Err(refuse(
            state,
            WriteResult::TooLarge,
            "413 Content Too Large",
            &format!("body of {len} bytes is over the limit of {MAX_BODY}"),
        ));
    }
    authorize(req, peer, state)?;
    let json = req
        .content_type
        .as_deref()
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(refuse(
            state,
            WriteResult::BadRequest,
            "415 Unsupported Media Type",
            "a write must be sent as Content-Type: application/json",
        ));
    }
    Ok(len)
}

fn authorize(req: &Request, peer: SocketAddr, state: &AdminState) -> Result<(), Response> {
    if let Some(origin) = &req.origin {
        let own = req.host.as_deref().map(|h| format!("http://{h}"));
        if own.as_deref() != Some(origin.as_str()) {
            return Err(refuse(
                state,
                WriteResult::Forbidden,
                "403 Forbidden",
                &format!("a write from the page of another site ({origin}) is refused"),
            ));
        }
    }
    match &state.token {
        Some(token) => {
            let sent = req
                .authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .map(str::trim);
            match sent {
                Some(t) if equal_in_constant_time(t.as_bytes(), token.0.as_bytes()) => Ok(()),
                Some(_) => Err(unauthorized(
                    state,
                    "the bearer token is not the admin token",
                )),
                None => Err(unauthorized(
                    state,
                    "writes need Authorization: Bearer TOKEN (the token in admin.token_file)",
                )),
            }
        }
        None if state.loopback && is_loopback(peer) => Ok(()),
        None if state.loopback => Err(refuse(
            state,
            WriteResult::Forbidden,
            "403 Forbidden",
            &format!(
                "writes are allowed from loopback only, not from {}",
                peer.ip()
            ),
        )),
        None => Err(refuse(
            state,
            WriteResult::Forbidden,
            "403 Forbidden",
            "the admin listener is not on loopback and no admin.token_file is set: \
             runtime API writes are refused (set token_file to allow them with a bearer token)",
        )),
    }
}

/// Whether `peer` may write without a token (the status page shows its buttons then).
pub fn writes_without_token(peer: SocketAddr, state: &AdminState) -> bool {
    state.token.is_none() && state.loopback && is_loopback(peer)
}

fn unauthorized(state: &AdminState, msg: &str) -> Response {
    let mut r = refuse(state, WriteResult::Unauthorized, "401 Unauthorized", msg);
    r.extra_header = Some("WWW-Authenticate: Bearer realm=\"ringlb\"");
    r
}

fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the path names.
enum Target<'a> {
    All,
    /// `POST /api/upgrade`: the binary upgrade (`crate::upgrade`).
    Upgrade,
    Frontend(&'a str),
    Backend(&'a str, &'a str),
}

fn target(path: &str) -> Option<Target<'_>> {
    let rest = path.strip_prefix("/api")?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        [] | ["state"] => Some(Target::All),
        ["upgrade"] => Some(Target::Upgrade),
        ["frontends", f] => Some(Target::Frontend(f)),
        ["backends", f, b] => Some(Target::Backend(f, b)),
        _ => None,
    }
}

const ROUTES: &str = "try GET /api/state, GET|POST /api/frontends/NAME, \
                      GET|POST /api/backends/FRONTEND/BACKEND, POST /api/upgrade";

/// Answers an `/api/...` request; `body` is the write's body (empty for reads).
pub async fn handle(req: &Request, body: &[u8], state: &AdminState) -> Response {
    let Some(t) = target(&req.path) else {
        if req.method == "POST" {
            state.ops.admin_writes.record(WriteResult::NotFound);
        }
        return error("404 Not Found", &format!("no such endpoint: {ROUTES}"));
    };
    match req.method.as_str() {
        "GET" | "HEAD" => read(&t, state),
        "POST" => write(&t, body, state).await,
        _ => {
            let mut r = error(
                "405 Method Not Allowed",
                "use GET to read and POST to write",
            );
            r.allow = Some("GET, HEAD, POST");
            r
        }
    }
}

fn read(t: &Target<'_>, state: &AdminState) -> Response {
    let snap = state.published.load();
    let listeners = state.ops.listeners();
    let fe_json = |fe: &FrontendSnap| frontend_json(fe, &listeners);
    match *t {
        Target::Upgrade => {
            let mut r = error(
                "405 Method Not Allowed",
                "POST /api/upgrade (body {}) starts a binary upgrade",
            );
            r.allow = Some("POST");
            r
        }
        Target::All => {
            let fronts: Vec<Value> = snap
                .config
                .frontends
                .iter()
                .filter_map(|f| snap.frontend(&f.name))
                .map(|f| fe_json(f))
                .collect();
            json_response("200 OK", &json!({ "frontends": fronts }))
        }
        Target::Frontend(name) => match snap.frontend(name) {
            Some(fe) => json_response("200 OK", &fe_json(fe)),
            None => error("404 Not Found", &format!("no frontend \"{name}\"")),
        },
        Target::Backend(f, b) => match snap
            .frontend(f)
            .and_then(|fe| fe.backends.iter().find(|x| x.config.name == b))
        {
            Some(be) => json_response("200 OK", &backend_json(be)),
            None => error(
                "404 Not Found",
                &format!("frontend \"{f}\" has no backend \"{b}\""),
            ),
        },
    }
}

pub fn frontend_json(fe: &FrontendSnap, listeners: &[(String, SocketAddr)]) -> Value {
    let listen: Vec<String> = listeners
        .iter()
        .filter(|(f, _)| *f == fe.config.name)
        .map(|(_, a)| a.to_string())
        .collect();
    json!({
        "name": fe.config.name,
        "enabled": !fe.state.disabled.load(Ordering::Relaxed),
        "listen": listen,
        "balance": fe.config.balance.as_str(),
        "active": fe.state.active(),
        "backends": fe.backends.iter().map(backend_json).collect::<Vec<_>>(),
    })
}

pub fn backend_json(b: &BackendRef) -> Value {
    let s = &b.state;
    let configured = s
        .peek_runtime_weight()
        .map_or(b.config.weight, |w| w.configured);
    json!({
        "name": b.config.name,
        "address": b.config.address.to_string(),
        "state": s.admin_mode().as_str(),
        "health": if s.is_up() { "up" } else { "down" },
        "backup": b.config.backup,
        "pool": b.config.pool,
        "weight": b.config.weight,
        "configured_weight": configured,
        "active": s.active.load(Ordering::Relaxed),
    })
}

/// Parses a write's body into what the control loop applies.
fn parse_action(t: &Target<'_>, body: &[u8]) -> Result<Action, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Object(map) = v else {
        return Err("body must be a JSON object".into());
    };
    match *t {
        Target::All => Err(format!("nothing to write at /api/state: {ROUTES}")),
        Target::Upgrade => match map.keys().next() {
            None => Ok(Action::Upgrade),
            Some(k) => Err(format!(
                "unknown field \"{k}\": an upgrade takes an empty object {{}}"
            )),
        },
        Target::Frontend(f) => {
            for k in map.keys() {
                if k != "enabled" {
                    return Err(format!(
                        "unknown field \"{k}\": a frontend takes \"enabled\""
                    ));
                }
            }
            match map.get("enabled") {
                Some(Value::Bool(enabled)) => Ok(Action::Frontend {
                    frontend: f.to_string(),
                    enabled: *enabled,
                }),
                Some(other) => Err(format!("\"enabled\" must be true or false, not {other}")),
                None => Err("give {\"enabled\": true} or {\"enabled\": false}".into()),
            }
        }
        Target::Backend(f, b) => {
            for k in map.keys() {
                if k != "state" && k != "weight" {
                    return Err(format!(
                        "unknown field \"{k}\": a backend takes \"state\" and \"weight\""
                    ));
                }
            }
            let mode = match map.get("state") {
                None => None,
                Some(Value::String(s)) => Some(AdminMode::parse(s).ok_or_else(|| {
                    format!("state \"{s}\" is not one of \"ready\", \"drain\", \"maint\"")
                })?),
                Some(other) => return Err(format!("\"state\" must be a string, not {other}")),
            };
            let weight = match map.get("weight") {
                None => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(w) if w <= u64::from(u32::MAX) => Some(w as u32),
                    _ => {
                        return Err(format!(
                            "weight {n} is out of range: 1 to {}",
                            super::runtime::MAX_WEIGHT
                        ))
                    }
                },
                Some(other) => return Err(format!("\"weight\" must be a number, not {other}")),
            };
            if mode.is_none() && weight.is_none() {
                return Err("give \"state\" and/or \"weight\"".into());
            }
            Ok(Action::Backend {
                frontend: f.to_string(),
                backend: b.to_string(),
                mode,
                weight,
            })
        }
    }
}

async fn write(t: &Target<'_>, body: &[u8], state: &AdminState) -> Response {
    let action = match parse_action(t, body) {
        Ok(a) => a,
        Err(msg) => return refuse(state, WriteResult::BadRequest, "400 Bad Request", &msg),
    };
    let action_is_upgrade = action == Action::Upgrade;
    let (reply, answer) = oneshot::channel();
    let sent = state
        .commands
        .try_send(super::runtime::Request { action, reply });
    if sent.is_err() {
        return refuse(
            state,
            WriteResult::Conflict,
            "503 Service Unavailable",
            "too many writes waiting, or ringlb is stopping; try again",
        );
    }
    let wait = if action_is_upgrade {
        // The control loop answers once the new process serves or has failed.
        crate::upgrade::READY_TIMEOUT + APPLY_TIMEOUT
    } else {
        APPLY_TIMEOUT
    };
    let result = match tokio::time::timeout(wait, answer).await {
        Ok(Ok(r)) => r,
        _ => {
            return refuse(
                state,
                WriteResult::Conflict,
                "503 Service Unavailable",
                "the control loop did not answer (stopping?)",
            )
        }
    };
    match result {
        Ok(()) if action_is_upgrade => {
            state.ops.admin_writes.record(WriteResult::Ok);
            let pid = state.ops.upgraded_to.load(Ordering::Relaxed);
            json_response(
                "200 OK",
                &json!({ "upgraded": true, "pid": pid, "old_pid": std::process::id() }),
            )
        }
        Ok(()) => {
            state.ops.admin_writes.record(WriteResult::Ok);
            read(t, state)
        }
        Err(Refused::NotFound(m)) => refuse(state, WriteResult::NotFound, "404 Not Found", &m),
        Err(Refused::BadRequest(m)) => {
            refuse(state, WriteResult::BadRequest, "400 Bad Request", &m)
        }
        Err(Refused::Conflict(m)) => refuse(state, WriteResult::Conflict, "409 Conflict", &m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_target() -> Target<'static> {
        Target::Backend("web", "api3")
    }

    #[test]
    fn a_backend_write_takes_state_and_weight_and_nothing_else() {
        let a = parse_action(&backend_target(), br#"{"state":"drain","weight":5}"#).unwrap();
        assert_eq!(
            a,
            Action::Backend {
                frontend: "web".into(),
                backend: "api3".into(),
                mode: Some(AdminMode::Drain),
                weight: Some(5)
            }
        );
        for (body, want) in [
            (&br#"{"state":"sleep"}"#[..], "\"sleep\" is not one of"),
            (br#"{"weight":-1}"#, "out of range"),
            (br#"{"weight":"5"}"#, "must be a number"),
            (br#"{"wieght":5}"#, "unknown field \"wieght\""),
            (br#"{}"#, "give \"state\""),
            (br#"[1]"#, "JSON object"),
            (br#"{"state":"#, "not JSON"),
        ] {
            let e = parse_action(&backend_target(), body).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn paths_name_all_a_frontend_or_a_backend() {
        assert!(matches!(target("/api/state"), Some(Target::All)));
        assert!(matches!(
            target("/api/frontends/web"),
            Some(Target::Frontend("web"))
        ));
        assert!(matches!(
            target("/api/backends/web/api3"),
            Some(Target::Backend("web", "api3"))
        ));
        assert!(target("/api/backends/web").is_none());
        assert!(target("/api/x/y/z/w").is_none());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(equal_in_constant_time(b"abc", b"abc"));
        assert!(!equal_in_constant_time(b"abc", b"abd"));
        assert!(!equal_in_constant_time(b"ab", b"abc"));
    }
}
