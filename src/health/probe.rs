//! The active probe: HAProxy's "Layer4 check", a TCP connect with a timeout.
//!
//! It runs on the control thread's plain tokio runtime (epoll), never on io_uring: dropping
//! a timed-out `tokio::net` connect closes its socket at once, while a dropped io_uring
//! connect keeps its fd until the kernel gives up on the SYN (see DESIGN.md).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpSocket;
use tokio::time::Instant;

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
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        matches!(self, CheckResult::Passed)
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
    fn check(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = CheckOutcome> + Send;
}

/// The Layer4 check: connect, then close at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpCheck;

impl HealthCheck for TcpCheck {
    async fn check(&self, addr: SocketAddr, timeout: Duration) -> CheckOutcome {
        let start = Instant::now();
        let result = match tokio::time::timeout(timeout, connect(addr)).await {
            Ok(Ok(())) => CheckResult::Passed,
            // The kernel's own SYN timeout (only reached with a very long `timeout`).
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ETIMEDOUT) => CheckResult::Timeout,
            Ok(Err(e)) if crate::worker::local::is_local_error(&e) => {
                CheckResult::LocalError(e.raw_os_error().unwrap_or(libc::EMFILE))
            }
            Ok(Err(e)) => CheckResult::ConnectionProblem(os_error_text(&e)),
            // Dropping the connect future closed its socket: nothing is left behind.
            Err(_) => CheckResult::Timeout,
        };
        CheckOutcome {
            result,
            duration: start.elapsed(),
        }
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<()> {
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
    drop(stream);
    Ok(())
}

/// "Connection refused" rather than "Connection refused (os error 111)": the text HAProxy
/// puts in `info: "..."`.
fn os_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listening_port_passes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let o = TcpCheck
            .check(l.local_addr().unwrap(), Duration::from_secs(5))
            .await;
        assert_eq!(o.result, CheckResult::Passed);
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connection_problem_in_the_os_words() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let o = TcpCheck.check(addr, Duration::from_secs(5)).await;
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
