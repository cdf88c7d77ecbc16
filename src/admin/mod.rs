//! The admin listener: `GET /metrics` (Prometheus), `GET /status` (JSON), `GET /` (the status
//! page), `GET /healthz`. Served from the control thread's tokio runtime.
//!
//! It speaks just enough HTTP/1.1 for Prometheus, curl and a browser: one request per
//! connection (`Connection: close`), no request bodies. Each connection is its own task with
//! a deadline for the request head and a size cap, and the number of connections is capped,
//! so a slow, silent or malformed client costs one task and one fd, never the control loop.
//!
//! - [`ops`]: what the control loop records for us (reloads, listeners, draining backends).
//! - [`status`]: the status model behind `/status` and the page.
//! - [`page`]: the HTML page.

pub mod ops;
pub mod page;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use crate::backend::Published;
use crate::metrics::Exporter;
use crate::server::{Server, StartError};
use crate::worker::Shared;
use ops::OpsState;

/// The whole request head must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Writing the response must finish within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// Everything the admin handlers read; shared with the control loop.
pub struct AdminState {
    pub published: Published,
    pub shared: Arc<Shared>,
    pub ops: Arc<OpsState>,
    pub exporter: Arc<Exporter>,
}

/// Sets up metrics and, unless disabled in the config, binds the admin listener. Call on the
/// control thread's runtime right after [`Server::start`]. Logs
/// `admin listening on ADDR` once bound.
pub fn start(server: &Server) -> Result<Arc<AdminState>, StartError> {
    let ops = Arc::new(OpsState::new(server.bound_addresses()));
    let exporter = Arc::new(Exporter::new(
        server.published.clone(),
        server.shared.clone(),
        ops.clone(),
    ));
    let state = Arc::new(AdminState {
        published: server.published.clone(),
        shared: server.shared.clone(),
        ops,
        exporter: exporter.clone(),
    });
    tokio::spawn(crate::metrics::upkeep(exporter));
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
    crate::info!("admin listening on {bound}");
    tokio::spawn(accept_loop(listener, state.clone()));
    Ok(state)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn accept_loop(listener: TcpListener, state: Arc<AdminState>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                crate::warn!("admin: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            serve(stream, &state).await;
            drop(permit);
        });
    }
}

/// The parts of a request we route on.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
}

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    Malformed,
    /// The client went away before sending a whole head.
    Closed,
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

    fn text(status: &'static str, body: &str) -> Self {
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

async fn serve(mut stream: TcpStream, state: &AdminState) {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await;
    let (response, head_only) = match head {
        Err(_) => (
            Response::text("408 Request Timeout", "request timeout"),
            false,
        ),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::TooLarge)) => (
            Response::text("431 Request Header Fields Too Large", "request too large"),
            false,
        ),
        Ok(Err(HeadError::Malformed)) => (Response::text("400 Bad Request", "bad request"), false),
        Ok(Ok(req)) => (route(&req, state), req.method == "HEAD"),
    };
    let write = async {
        stream.write_all(&response.bytes(head_only)).await?;
        stream.shutdown().await?;
        // Read what the client may still send (a body we did not want) so that closing
        // does not reset the connection before it has read our answer.
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

/// Reads until the blank line that ends the head; anything after it is ignored.
async fn read_head(stream: &mut TcpStream) -> Result<Request, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Malformed
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            return parse_head(&buf[..end]);
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

/// Parses `METHOD SP TARGET SP HTTP/1.x`; headers are not needed for routing.
fn parse_head(head: &[u8]) -> Result<Request, HeadError> {
    if head.len() > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Malformed)?;
    let line = text.lines().next().ok_or(HeadError::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(HeadError::Malformed);
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

fn route(req: &Request, state: &AdminState) -> Response {
    let known = matches!(req.path.as_str(), "/" | "/status" | "/metrics" | "/healthz");
    if !known {
        return Response::text(
            "404 Not Found",
            "not found: try /, /status, /metrics or /healthz",
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
            state.exporter.render(),
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
        _ => {
            if state.ops.stopping.load(Ordering::Relaxed) {
                Response::text("503 Service Unavailable", "stopping")
            } else {
                Response::text("200 OK", "ok")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_get_is_parsed_and_the_query_is_ignored() {
        let r = parse_head(b"GET /status?x=1 HTTP/1.1\r\nHost: a").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/status");
    }

    #[test]
    fn garbage_request_lines_are_malformed() {
        for bad in [
            &b"GET"[..],
            b"GET /",
            b"get / HTTP/1.1",
            b"GET status HTTP/1.1",
            b"GET / SPDY/3",
            b"GET / HTTP/1.1 extra",
            b"\xff\xfe / HTTP/1.1",
        ] {
            assert_eq!(parse_head(bad), Err(HeadError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_end_of_the_head_is_found_with_either_line_ending() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
