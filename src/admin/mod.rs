//! The admin listener: `GET /metrics` (Prometheus), `GET /status` (JSON), `GET /` (the status
//! page), `GET /healthz`. Served from the control thread's tokio runtime.
//!
//! It speaks just enough HTTP/1.1 for Prometheus, curl and a browser: one request per
//! connection (`Connection: close`), no request bodies. How many connections are held, their
//! deadlines and which one is closed when there are too many is [`conns`]' business; the
//! request head is parsed by [`head`].
//!
//! - [`conns`]: the accept loop, per-connection deadlines, eviction.
//! - [`head`]: the incremental request-head parser.
//! - [`ops`]: what the control loop records for us (reloads, listeners, draining backends).
//! - [`status`]: the status model behind `/status` and the page.
//! - [`page`]: the HTML page.

pub mod conns;
pub mod head;
pub mod ops;
pub mod page;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};

use crate::backend::Published;
use crate::metrics::Exporter;
use crate::server::{Server, StartError};
use crate::worker::Shared;
use ops::OpsState;

/// Listen queue: room for a burst of connects while the accept loop catches up, so that a
/// flood does not push a monitoring client into SYN retransmits (a second or more).
const BACKLOG: u32 = 4096;

/// Everything the admin handlers read; shared with the control loop.
pub struct AdminState {
    pub published: Published,
    pub shared: Arc<Shared>,
    pub ops: Arc<OpsState>,
    pub exporter: Arc<Exporter>,
    /// The address the admin listener is bound to, once it is (port 0 resolved).
    pub bound: std::sync::OnceLock<SocketAddr>,
}

/// Sets up metrics and, unless disabled in the config, binds the admin listener. Call on the
/// control thread's runtime right after [`Server::start`]. Logs
/// `admin listening on ADDR (up to N connections at once)` once bound.
pub fn start(server: &Server) -> Result<Arc<AdminState>, StartError> {
    let ops = Arc::new(OpsState::new(server.bound_addresses()));
    let exporter = Arc::new(
        Exporter::new(server.published.clone(), server.shared.clone(), ops.clone())
            .with_discovery(server.discovery_stats.clone()),
    );
    let state = Arc::new(AdminState {
        published: server.published.clone(),
        shared: server.shared.clone(),
        ops,
        exporter: exporter.clone(),
        bound: std::sync::OnceLock::new(),
    });
    if let Err(e) = crate::metrics::spawn_renderer(&exporter) {
        crate::error!(
            "cannot start the metrics thread ({e}): /metrics renders on the control thread"
        );
    }
    let admin = &server.config.admin;
    let Some(addr) = admin.listen else {
        crate::info!("admin listener disabled (admin.listen is empty)");
        return Ok(state);
    };
    // Validation already refuses this; checked again because the admin listener exposes
    // everything about the pool.
    if !addr.ip().is_loopback() && !admin.allow_public {
        return Err(StartError::Admin {
            addr,
            source: std::io::Error::other(
                "not a loopback address and admin.allow_public is not set",
            ),
        });
    }
    let listener = bind(addr).map_err(|source| StartError::Admin { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let _ = state.bound.set(bound);
    let cap = server.shared.admin_connections.load(Ordering::Relaxed);
    crate::info!("admin listening on {bound} (up to {cap} connections at once)");
    tokio::spawn(conns::accept_loop(listener, state.clone()));
    Ok(state)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // Another process on the admin address (or a wildcard over it) is named, not shared.
    crate::worker::listener::refuse_if_taken(addr)?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG)?;
    crate::worker::listener::owners::register_own(&listener);
    Ok(listener)
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    allow: bool,
}

impl Response {
    fn new(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
            allow: false,
        }
    }

    fn text(status: &'static str, body: impl std::fmt::Display) -> Self {
        Response::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
            self.status,
            self.content_type,
            self.body.len(),
            if self.allow { "Allow: GET, HEAD\r\n" } else { "" },
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// `/ready`: 200 when every frontend is ready, `/ready/NAME`: 200 when that one is (see
/// `announce::is_ready`); 503 with the reason otherwise, 404 for an unknown frontend.
fn readiness(path: &str, state: &AdminState) -> Response {
    let snap = state.published.load();
    let stopping = state.ops.stopping.load(Ordering::Relaxed);
    let not_ready = |name: &str| {
        Response::text(
            "503 Service Unavailable",
            if stopping {
                format!("frontend {name}: not ready: stopping")
            } else {
                format!("frontend {name}: not ready: no backend is available")
            },
        )
    };
    match path.strip_prefix("/ready/") {
        Some(name) => match snap.frontend(name) {
            None => Response::text("404 Not Found", format!("no frontend named \"{name}\"")),
            Some(fe) if crate::announce::is_ready(fe, stopping) => {
                Response::text("200 OK", format!("frontend {name}: ready"))
            }
            Some(_) => not_ready(name),
        },
        None => {
            for fc in &snap.config.frontends {
                if let Some(fe) = snap.frontend(&fc.name) {
                    if !crate::announce::is_ready(fe, stopping) {
                        return not_ready(&fc.name);
                    }
                }
            }
            Response::text("200 OK", "ready")
        }
    }
}

fn route(req: &head::Request, state: &AdminState) -> Response {
    let known = matches!(req.path.as_str(), "/" | "/status" | "/metrics" | "/healthz")
        || req.path == "/ready"
        || req.path.starts_with("/ready/");
    if !known {
        return Response::text(
            "404 Not Found",
            "not found: try /, /status, /metrics, /healthz, /ready or /ready/FRONTEND",
        );
    }
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::text("405 Method Not Allowed", "method not allowed");
        r.allow = true;
        return r;
    }
    match req.path.as_str() {
        "/metrics" => Response::new(
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            state.exporter.text().as_bytes(),
        ),
        "/status" => {
            let s = status::build(&state.published.load(), &state.shared, &state.ops);
            let mut body = serde_json::to_vec_pretty(&s).unwrap_or_default();
            body.push(b'\n');
            Response::new("200 OK", "application/json", body)
        }
        "/" => {
            let s = status::build(&state.published.load(), &state.shared, &state.ops);
            Response::new("200 OK", "text/html; charset=utf-8", page::render(&s))
        }
        p if p == "/ready" || p.starts_with("/ready/") => readiness(p, state),
        _ => {
            if state.ops.stopping.load(Ordering::Relaxed) {
                Response::text("503 Service Unavailable", "stopping")
            } else {
                Response::text("200 OK", "ok")
            }
        }
    }
}
