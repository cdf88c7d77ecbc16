//! Application checks: connect as the Layer4 check does, then speak the kind's exchange
//! ([`super::proto`]) on that connection, all within the check's one timeout.
//!
//! Each check is a future on the control thread's tokio runtime, like the Layer4 check: no
//! thread per probe, no probe waiting on another. A check owns one socket, which it closes
//! (with a reset, see `probe::connect`) when it ends for any reason, the timeout included:
//! the timeout drops the future and the socket with it. It reads at most
//! [`proto::READ_CAP`] bytes in at most [`MAX_READS`] reads, so a hostile or broken backend
//! costs a bounded amount of memory and CPU per check.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::https;
use super::probe::{connect_within, os_error_text, CheckOutcome, CheckResult, Layer};
use super::proto::{End, Exchange, READ_CAP};
use crate::config::{Probe, ProxyVersion};

/// Reads per check. An answer dribbled in tiny pieces is judged again after each piece;
/// this bounds that work (16 KiB judged at most 256 times) and such an answer fails.
pub const MAX_READS: usize = 256;

/// One application check of `addr`; with `send_proxy`, the connection starts with a PROXY
/// header that names no client (see `relay::proxy::local_header`).
pub async fn check(
    addr: SocketAddr,
    timeout: Duration,
    probe: &Probe,
    send_proxy: Option<ProxyVersion>,
) -> CheckOutcome {
    let start = Instant::now();
    let deadline = start + timeout;
    let result = match (
        Exchange::new(probe, addr),
        connect_within(addr, deadline).await,
    ) {
        (_, Err(layer4)) => layer4,
        // `Tcp` has no exchange: the connect was the check.
        (None, Ok(_)) => CheckResult::Passed,
        (Some(ex), Ok(mut stream)) => match proxy_first(&mut stream, send_proxy, deadline).await {
            Err(failed) => failed,
            Ok(()) => match probe {
                Probe::Http(h) if h.tls => {
                    let name = https::server_name(h.host.as_deref(), addr.ip());
                    match tokio::time::timeout_at(deadline, https::handshake(stream, name)).await {
                        Err(_) => CheckResult::AppTimeout(Layer::L6),
                        Ok(Err(failed)) => failed,
                        Ok(Ok(mut tls)) => exchange(&mut tls, &ex, deadline).await,
                    }
                }
                _ => exchange(&mut stream, &ex, deadline).await,
            },
        },
    };
    CheckOutcome {
        result,
        duration: start.elapsed(),
    }
}

/// Sends the PROXY header before anything else (TLS included), when the backend wants one.
async fn proxy_first<S: AsyncWrite + Unpin>(
    stream: &mut S,
    send_proxy: Option<ProxyVersion>,
    deadline: Instant,
) -> Result<(), CheckResult> {
    let Some(version) = send_proxy else {
        return Ok(());
    };
    let header = crate::relay::proxy::local_header(version);
    match tokio::time::timeout_at(deadline, stream.write_all(&header)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(CheckResult::ConnectionProblem(os_error_text(&e))),
        Err(_) => Err(CheckResult::Timeout),
    }
}

async fn exchange<S>(stream: &mut S, ex: &Exchange<'_>, deadline: Instant) -> CheckResult
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout_at(deadline, talk(stream, ex)).await {
        Ok(r) => r,
        Err(_) => CheckResult::AppTimeout(ex.layer),
    }
}

async fn talk<S>(stream: &mut S, ex: &Exchange<'_>) -> CheckResult
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !ex.request.is_empty() {
        if let Err(e) = stream.write_all(&ex.request).await {
            return CheckResult::ConnectionProblem(os_error_text(&e));
        }
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..MAX_READS {
        let room = (READ_CAP - got.len()).min(chunk.len());
        let n = match stream.read(&mut chunk[..room]).await {
            Ok(n) => n,
            // TLS without close_notify at the end (many servers): the end all the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            // A reset mid-answer: HAProxy words socket errors at any step as Layer4.
            Err(e) => return CheckResult::ConnectionProblem(os_error_text(&e)),
        };
        got.extend_from_slice(&chunk[..n]);
        let end = if n == 0 {
            End::Closed
        } else if got.len() >= READ_CAP {
            End::Full
        } else {
            End::More
        };
        if let Some(verdict) = ex.judge(&got, end) {
            return verdict;
        }
        if end != End::More {
            return ex.undecided(&got, end);
        }
    }
    CheckResult::InvalidResponse(
        ex.layer,
        format!(
            "answer dribbled in more than {MAX_READS} pieces ({} bytes)",
            got.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HttpProbe, StatusRange};
    use std::io::{Read, Write};

    fn http() -> Probe {
        Probe::Http(HttpProbe {
            method: "GET".into(),
            path: "/health".into(),
            host: Some("svc.example".into()),
            expect_status: StatusRange::DEFAULT,
            expect_body: None,
            tls: false,
        })
    }

    /// A one-connection server that reads the request and answers with `answer`.
    fn serve_once(answer: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).unwrap();
            req.truncate(n);
            let _ = s.write_all(&answer);
            req
        });
        (addr, t)
    }

    #[tokio::test]
    async fn an_http_check_sends_the_configured_request_and_reads_the_status() {
        let (addr, t) = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n".to_vec());
        let o = check(addr, Duration::from_secs(5), &http(), None).await;
        assert_eq!(
            o.result.to_string(),
            "Layer7 wrong status, code: 503, info: \"Service Unavailable\""
        );
        let req = String::from_utf8(t.join().unwrap()).unwrap();
        assert!(
            req.starts_with("GET /health HTTP/1.1\r\nHost: svc.example\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_still_a_layer4_problem() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let o = check(addr, Duration::from_secs(5), &Probe::Redis, None).await;
        assert_eq!(
            o.result,
            CheckResult::ConnectionProblem("Connection refused".into())
        );
    }

    #[tokio::test]
    async fn an_endless_answer_stops_at_the_read_cap() {
        let (addr, _t) = serve_once(vec![b'x'; 1 << 20]);
        let o = check(addr, Duration::from_secs(5), &Probe::Redis, None).await;
        assert_eq!(
            o.result.to_string(),
            format!("Layer7 invalid response, info: \"no complete answer in the first {READ_CAP} bytes\"")
        );
    }
}
