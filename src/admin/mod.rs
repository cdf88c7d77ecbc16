//! The admin listener: `GET /metrics` (Prometheus), `GET /status` (JSON), `GET /` (the status
//! page), `GET /healthz`, and the runtime API under `/api/`. Served from the control thread's
//! tokio runtime.
//!
//! It speaks just enough HTTP/1.1 for Prometheus, curl and a browser: one request per
//! connection (`Connection: close`), request bodies only for runtime API writes (at most
//! [`api::MAX_BODY`] bytes, with `Content-Length`). How many connections are held, their
//! deadlines and which one is closed when there are too many is [`conns`]' business; the
//! request head is parsed by [`head`]. A hand-written server rather than a crate: it is small,
//! and its limits (one deadline for the whole request, bounded parser state, eviction order)
//! are the point of it.
//!
//! - [`conns`]: the accept loop, per-connection deadlines, eviction.
//! - [`head`]: the incremental request-head parser.
//! - [`history`]: the last minutes of counters, for the page's rates and charts.
//! - [`api`]: the runtime API's HTTP side: routes, who may write, JSON in and out.
//! - [`runtime`]: the runtime API's changes, applied on the control loop.
//! - [`statefile`]: `[admin] state_file`, the runtime state kept across restarts.
//! - [`ops`]: what the control loop records for us (reloads, listeners, draining backends).
//! - [`status`]: the status model behind `/status` and the page.
//! - [`page`]: the HTML page.

pub mod api;
pub mod conns;
pub mod head;
pub mod history;
pub mod ops;
pub mod page;
pub mod runtime;
pub mod statefile;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

use crate::backend::Published;
use crate::config::Token;
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
    /// Whether the admin listener is on a loopback address (writes without a token are
    /// allowed only then, and only from loopback peers).
    pub loopback: bool,
    /// The bearer token runtime API writes must present, if `admin.token_file` is set.
    pub token: Option<Token>,
    /// Where runtime changes are saved (`admin.state_file`), as configured at start.
    pub state_file: Option<std::path::PathBuf>,
    /// Runtime API writes, to the control loop.
    pub commands: mpsc::Sender<runtime::Request>,
    /// The last minutes of counters (rates and charts).
    pub history: Arc<history::History>,
    /// The admin listener's fd with its configured address, for a binary upgrade to pass on
    /// (`crate::upgrade`). The number only: the accept loop owns the listener and closes it
    /// only when [`AdminState::stop_accepting`] rings, after the upgrade's new process has
    /// it.
    pub handoff: Option<(SocketAddr, std::os::fd::RawFd)>,
    /// Rung when an upgrade's new process serves: the accept loop stops (the new process
    /// accepts on the same socket from then on).
    pub stop_accepting: tokio::sync::Notify,
}

/// How many runtime API writes may wait for the control loop at once; more are answered 503.
const PENDING_WRITES: usize = 64;

/// Sets up metrics and, unless disabled in the config, binds the admin listener. Call on the
/// control thread's runtime right after [`Server::start`]. Logs
/// `admin listening on ADDR (up to N connections at once)` once bound. The receiver is for
/// the control loop: it applies runtime API writes (see [`runtime::apply`]).
///
/// `passed` is the admin listener an upgrading ringlb passed: used if `admin.listen` names its
/// address (or its configured address, for port 0), else closed.
pub fn start(
    server: &Server,
    passed: Option<(crate::upgrade::Entry, socket2::Socket)>,
) -> Result<(Arc<AdminState>, mpsc::Receiver<runtime::Request>), StartError> {
    let ops = Arc::new(OpsState::new(server.bound_addresses()));
    let exporter = Arc::new(
        Exporter::new(server.published.clone(), server.shared.clone(), ops.clone())
            .with_discovery(server.discovery_stats.clone()),
    );
    let admin = &server.config.admin;
    let (commands, rx) = mpsc::channel(PENDING_WRITES);
    let passed = match (passed, admin.listen) {
        (Some((entry, socket)), Some(addr)) if entry.bound == addr || entry.configured == addr => {
            Some((entry, socket))
        }
        (Some((entry, _)), _) => {
            crate::info!(
                "{}: admin.listen no longer names it; closing it and binding {}",
                entry.what(),
                admin
                    .listen
                    .map_or("nothing".to_string(), |a| a.to_string())
            );
            None
        }
        (None, _) => None,
    };
    if let Some(addr) = admin.listen {
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
    }
    let listener = match (admin.listen, passed) {
        (Some(addr), Some((entry, socket))) => Some(
            adopt(socket)
                .map_err(|source| StartError::Admin { addr, source })
                .map(|l| (entry.configured, l))?,
        ),
        (Some(addr), None) => Some((
            addr,
            bind(addr).map_err(|source| StartError::Admin { addr, source })?,
        )),
        (None, _) => None,
    };
    let handoff = listener
        .as_ref()
        .map(|(configured, l)| (*configured, std::os::fd::AsRawFd::as_raw_fd(l)));
    let state = Arc::new(AdminState {
        published: server.published.clone(),
        shared: server.shared.clone(),
        ops,
        exporter: exporter.clone(),
        bound: std::sync::OnceLock::new(),
        loopback: admin.listen.is_some_and(|a| a.ip().is_loopback()),
        token: admin.token.clone(),
        state_file: admin.state_file.clone(),
        commands,
        history: Arc::default(),
        handoff,
        stop_accepting: tokio::sync::Notify::new(),
    });
    if let Err(e) = crate::metrics::spawn_renderer(&exporter) {
        crate::error!(
            "cannot start the metrics thread ({e}): /metrics renders on the control thread"
        );
    }
    tokio::spawn(history::run(
        state.history.clone(),
        server.published.clone(),
    ));
    let Some((addr, listener)) = listener else {
        crate::info!("admin listener disabled (admin.listen is empty)");
        return Ok((state, rx));
    };
    let bound = listener.local_addr().unwrap_or(addr);
    let _ = state.bound.set(bound);
    let cap = server.shared.admin_connections.load(Ordering::Relaxed);
    crate::info!("admin listening on {bound} (up to {cap} connections at once)");
    let writes = match (&state.token, state.loopback) {
        (Some(_), _) => "runtime API writes need the bearer token from admin.token_file",
        (None, true) => "runtime API writes allowed from loopback",
        (None, false) => "runtime API writes refused: not on loopback and no admin.token_file",
    };
    crate::info!("admin: {writes}");
    tokio::spawn(conns::accept_loop(listener, state.clone()));
    Ok((state, rx))
}

/// The admin listener an upgrading ringlb passed (checked to be a TCP listener on its address).
fn adopt(socket: socket2::Socket) -> std::io::Result<TcpListener> {
    crate::worker::listener::owners::register_own(&socket);
    let listener: std::net::TcpListener = socket.into();
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
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

pub struct Response {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// An `Allow` header, for a 405.
    allow: Option<&'static str>,
    /// One more header line (without its line ending), e.g. `WWW-Authenticate`.
    extra_header: Option<&'static str>,
}

impl Response {
    fn new(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
            allow: None,
            extra_header: None,
        }
    }

    fn text(status: &'static str, body: impl std::fmt::Display) -> Self {
        Response::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}{}\r\n",
            self.status,
            self.content_type,
            self.body.len(),
            self.allow.map_or(String::new(), |a| format!("Allow: {a}\r\n")),
            self.extra_header.map_or(String::new(), |h| format!("{h}\r\n")),
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

async fn route(
    req: &head::Request,
    body: &[u8],
    peer: SocketAddr,
    state: &Arc<AdminState>,
) -> Response {
    if api::is_api(&req.path) {
        return api::handle(req, body, state).await;
    }
    let known = matches!(req.path.as_str(), "/" | "/status" | "/metrics" | "/healthz")
        || req.path == "/ready"
        || req.path.starts_with("/ready/");
    if !known {
        return Response::text(
            "404 Not Found",
            "not found: try /, /status, /metrics, /healthz, /ready, /ready/FRONTEND or /api/state",
        );
    }
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::text("405 Method Not Allowed", "method not allowed");
        r.allow = Some("GET, HEAD");
        return r;
    }
    match req.path.as_str() {
        "/metrics" => Response::new(
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            state.exporter.text().as_bytes(),
        ),
        "/status" | "/" => {
            // Built and serialised on a blocking-pool thread: a large config (50 frontends of
            // 20 backends is about 1 MB of JSON) never holds up the control loop's reloads,
            // discovery updates and runtime API writes.
            let page = req.path == "/";
            let writes = page && api::writes_without_token(peer, state);
            let st = state.clone();
            let built = tokio::task::spawn_blocking(move || {
                let s = status::build(&st.published.load(), &st.shared, &st.ops, &st.history);
                if page {
                    page::render(&s, writes).into_bytes()
                } else {
                    let mut body = serde_json::to_vec_pretty(&s).unwrap_or_default();
                    body.push(b'\n');
                    body
                }
            })
            .await;
            match (built, page) {
                (Ok(body), true) => Response::new("200 OK", "text/html; charset=utf-8", body),
                (Ok(body), false) => Response::new("200 OK", "application/json", body),
                (Err(e), _) => {
                    crate::error!("admin: building {} failed: {e}", req.path);
                    Response::text("500 Internal Server Error", "status unavailable")
                }
            }
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
