//! The relay: bytes both ways between a client and its backend until both directions end.
//!
//! Each direction reads into an owned buffer and writes all of it to the other side; at EOF it
//! shuts the other side's write half, so a half-close travels end to end. The connection ends
//! when both directions have ended, or when the watchdog fires (idle timeout, the backend's
//! kill switch, or a forced stop).
//!
//! Cancellation rule: an in-flight tokio-uring op that is dropped is not cancelled and keeps
//! its fd. So nothing here drops a pending read or write: to end a connection early the
//! watchdog calls `shutdown(Both)` on both sockets, which completes every pending op, and the
//! pumps then return on their own.

pub mod epoll;
pub mod ops;
pub mod splice;

use std::cell::Cell;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_uring::net::TcpStream;

use crate::backend::BackendState;

/// Per-read buffer size: large enough that bulk transfers need few syscalls.
pub(crate) const BUF_SIZE: usize = 64 * 1024;

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions reached EOF (or an error) on their own.
    Done,
    IdleTimeout,
    /// The backend was marked down with `shutdown-sessions`, or drained past its limit.
    Killed,
}

/// Moves bytes from `from` to `to` until EOF, then half-closes `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    last_activity: &Cell<Instant>,
    bytes: &AtomicU64,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(BUF_SIZE);
    loop {
        let (res, b) = from.read(buf).await;
        buf = b;
        let n = res?;
        if n == 0 {
            break;
        }
        last_activity.set(Instant::now());
        let (res, b) = to.write_all(buf).await;
        buf = b;
        res?;
        buf.clear();
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Half-close: the peer sees EOF; ENOTCONN here only means it is already gone.
    let _ = to.shutdown(Shutdown::Write);
    Ok(())
}

/// Relays until both directions end; see the module docs for how it stops early.
pub async fn relay(
    client: Rc<TcpStream>,
    server: Rc<TcpStream>,
    backend: &BackendState,
    kill_epoch: u64,
    idle_timeout: Duration,
) -> RelayEnd {
    let (client, server) = (&*client, &*server);
    let last_activity = Cell::new(Instant::now());
    let both = async {
        let up = async {
            if pump(client, server, &last_activity, &backend.bytes_in_total)
                .await
                .is_err()
            {
                // A reset on one side ends the other direction too.
                end_both(client, server);
            }
        };
        let down = async {
            if pump(server, client, &last_activity, &backend.bytes_out_total)
                .await
                .is_err()
            {
                end_both(client, server);
            }
        };
        tokio::join!(up, down);
    };
    tokio::pin!(both);

    tokio::select! {
        biased;
        _ = &mut both => RelayEnd::Done,
        why = watchdog(&last_activity, idle_timeout, backend, kill_epoch) => {
            end_both(client, server);
            // Every pending op completes now; wait for them rather than drop them.
            both.await;
            why
        }
    }
}

/// Shuts both sockets down: every op pending on them (reads, writes, readiness polls)
/// completes at once, which is how a connection is ended without dropping an op in flight.
pub(crate) fn end_both(client: &TcpStream, server: &TcpStream) {
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// What happened first on a freshly connected pair, before any byte was relayed.
#[derive(Debug)]
pub enum FirstMove {
    /// The client spoke first, or the backend sent data, or the wait ran out: relay.
    Relay,
    /// The backend closed or reset the connection before either side sent a byte. Nothing
    /// reached the backend's application, so the client can safely be retried elsewhere
    /// (a backend that died with this connection still in its accept queue looks like this).
    BackendFailed(io::Error),
}

/// Waits, up to `limit`, for the first sign of life on a new connection (io_uring).
///
/// Both waits are readiness polls that consume nothing. The loser's poll stays in flight,
/// holding its own `Rc` of the stream, until that socket becomes readable or is shut down,
/// which every way a relay ends brings about; so nothing leaks.
pub async fn first_move(
    client: &Rc<TcpStream>,
    server: &Rc<TcpStream>,
    limit: Duration,
) -> FirstMove {
    // The common case for client-speaks-first protocols: the request is already waiting.
    if ops::has_spoken(client.as_raw_fd()) {
        return FirstMove::Relay;
    }
    let readable = (libc::POLLIN | libc::POLLRDHUP) as u32;
    let from_client = ops::poll_ready(client, readable);
    let from_server = ops::poll_ready(server, readable);
    tokio::select! {
        biased;
        _ = from_client => FirstMove::Relay,
        r = from_server => match r {
            Err(e) => FirstMove::BackendFailed(e),
            Ok(_) => ops::peek_first_byte(server.as_raw_fd()),
        },
        _ = tokio::time::sleep(limit) => FirstMove::Relay,
    }
}

/// Resolves when the connection must end early: silent for `idle_timeout` in both
/// directions, or its backend's kill switch flipped after `kill_epoch`.
pub(crate) async fn watchdog(
    last_activity: &Cell<Instant>,
    idle_timeout: Duration,
    backend: &BackendState,
    kill_epoch: u64,
) -> RelayEnd {
    loop {
        let deadline = last_activity.get() + idle_timeout;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if last_activity.get() + idle_timeout <= Instant::now() {
                    return RelayEnd::IdleTimeout;
                }
            }
            _ = backend.killed_after(kill_epoch) => return RelayEnd::Killed,
        }
    }
}
