//! The active probe: HAProxy's "Layer4 check", a TCP connect with a timeout, and the results
//! of every kind of check (the application checks in [`super::app`] speak on the connection
//! this module opens).
//!
//! It runs on the control thread's plain tokio runtime (epoll), never on io_uring: dropping
//! a timed-out `tokio::net` connect closes its socket at once, while a dropped io_uring
//! connect keeps its fd until the kernel gives up on the SYN (see DESIGN.md).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::config::{Health, Probe};

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    /// The connect completed.
    Passed,
    /// No answer within the timeout.
    Timeout,
    /// The connect failed; the OS's words for why, like "Connection refused".
    ConnectionProblem(String),
    /// The probe could not even be made: this host is out of fds or memory (the errno).
    /// Neither a pass nor a failure: it never counts against the backend.
    LocalError(i32),
    /// An application check got the answer it wanted.
    AppPassed(Layer),
    /// Connected, but no complete answer within the timeout.
    AppTimeout(Layer),
    /// A well-formed answer that says the service is not well: an HTTP status outside
    /// `expect_status`, a Redis error, a PostgreSQL or MySQL error code. `info` is the
    /// server's words (printable, shortened).
    WrongStatus { code: Option<String>, info: String },
    /// An answer that is not what the protocol says: garbage, cut short, too long.
    InvalidResponse(Layer, String),
}

/// HAProxy's layer words: Layer6 for the TLS hello check, Layer7 for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    L6,
    L7,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::L6 => "Layer6",
            Layer::L7 => "Layer7",
        })
    }
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        matches!(self, CheckResult::Passed | CheckResult::AppPassed(_))
    }
}

/// The `reason: ...` part of HAProxy's transition line.
impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Passed => f.write_str("Layer4 check passed"),
            CheckResult::Timeout => f.write_str("Layer4 timeout"),
            CheckResult::ConnectionProblem(info) => {
                write!(f, "Layer4 connection problem, info: \"{info}\"")
            }
            CheckResult::LocalError(code) => write!(
                f,
                "local error (not the backend's), info: \"{}\"",
                nix::errno::Errno::from_raw(*code).desc()
            ),
            CheckResult::AppPassed(layer) => write!(f, "{layer} check passed"),
            CheckResult::AppTimeout(layer) => write!(f, "{layer} timeout"),
            CheckResult::WrongStatus { code, info } => {
                f.write_str("Layer7 wrong status")?;
                if let Some(code) = code {
                    write!(f, ", code: {code}")?;
                }
                write!(f, ", info: \"{info}\"")
            }
            CheckResult::InvalidResponse(layer, info) => {
                write!(f, "{layer} invalid response, info: \"{info}\"")
            }
        }
    }
}

/// A result and how long the check took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub result: CheckResult,
    pub duration: Duration,
}

/// Checks whether a backend can take connections.
pub trait HealthCheck: Send + Sync + 'static {
    /// One check of `addr` within `h.timeout`, speaking as `h.probe` says.
    fn check(&self, addr: SocketAddr, h: &Health) -> impl Future<Output = CheckOutcome> + Send;
}

/// The check every backend's checker runs: the Layer4 connect for `kind = "tcp"`, else the
/// application exchange of [`super::app`] on the connection it opens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checker;

impl HealthCheck for Checker {
    async fn check(&self, addr: SocketAddr, h: &Health) -> CheckOutcome {
        match &h.probe {
            Probe::Tcp => TcpCheck.check(addr, h).await,
            probe => super::app::check(addr, h.timeout, probe, h.send_proxy).await,
        }
    }
}

/// The Layer4 check: connect, then close at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpCheck;

impl HealthCheck for TcpCheck {
    async fn check(&self, addr: SocketAddr, h: &Health) -> CheckOutcome {
        let start = Instant::now();
        let result = match connect_within(addr, start + h.timeout).await {
            Ok(stream) => {
                drop(stream);
                CheckResult::Passed
            }
            Err(failed) => failed,
        };
        CheckOutcome {
            result,
            duration: start.elapsed(),
        }
    }
}

/// The Layer4 step of every check: a connected stream by `deadline`, or the Layer4 (or
/// local) result that ends the check.
pub(super) async fn connect_within(
    addr: SocketAddr,
    deadline: Instant,
) -> Result<TcpStream, CheckResult> {
    match tokio::time::timeout_at(deadline, connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        // The kernel's own SYN timeout (only reached with a very long `timeout`).
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ETIMEDOUT) => Err(CheckResult::Timeout),
        Ok(Err(e)) if crate::worker::local::is_local_error(&e) => Err(CheckResult::LocalError(
            e.raw_os_error().unwrap_or(libc::EMFILE),
        )),
        Ok(Err(e)) => Err(CheckResult::ConnectionProblem(os_error_text(&e))),
        // Dropping the connect future closed its socket: nothing is left behind.
        Err(_) => Err(CheckResult::Timeout),
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let stream = socket.connect(addr).await?;
    // Close with a reset rather than a FIN, as HAProxy does for its checks: a check every
    // two seconds per backend would otherwise leave a TIME_WAIT socket (and an ephemeral
    // port) behind every time. A zero linger never blocks the close.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    Ok(stream)
}

/// "Connection refused" rather than "Connection refused (os error 111)": the text HAProxy
/// puts in `info: "..."`.
pub(super) fn os_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::machine::test_health;

    #[tokio::test]
    async fn a_listening_port_passes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let o = TcpCheck
            .check(l.local_addr().unwrap(), &test_health(true))
            .await;
        assert_eq!(o.result, CheckResult::Passed);
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connection_problem_in_the_os_words() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let o = TcpCheck.check(addr, &test_health(true)).await;
        assert_eq!(
            o.result,
            CheckResult::ConnectionProblem("Connection refused".into())
        );
        assert_eq!(
            o.result.to_string(),
            "Layer4 connection problem, info: \"Connection refused\""
        );
    }
}
