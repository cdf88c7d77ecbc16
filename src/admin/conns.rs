//! Admin connections: how many are held, for how long, and which one goes when there are too
//! many, so that no client, however slow, silent or numerous, keeps /healthz and /metrics
//! from being answered.
//!
//! - Every connection must deliver its whole request head, and a runtime API write its body
//!   too, within [`HEAD_DEADLINE`] (not per read: a client trickling a byte a second is cut
//!   at the same time as a silent one), and its answer must be written within
//!   [`WRITE_DEADLINE`].
//! - At most [`MAX_CONNECTIONS`] are held, and only as many as the fd budget
//!   (`worker::budget`) leaves to the admin listener: 64 always, more only out of fds that no
//!   relayed connection was promised. A newcomer is never turned away: when the table is
//!   full the oldest connection still sending its head is closed to make room; only if every
//!   connection is past its head does the oldest one being answered go, and answers to
//!   `/healthz` and `/metrics` go last of all. That ordering is the reserve for monitoring.
//! - Closing never waits: no `SO_LINGER`, no reading until the client hangs up. Whatever the
//!   client had already sent is drained without blocking so that the close is a FIN, not a
//!   reset, for every well-behaved client.
//!
//! Memory is bounded: per connection one task with a 1 KiB read buffer, the parser's state
//! (at most [`head::MAX_HELD`]), a write's body (at most [`super::api::MAX_BODY`], read only
//! once its head passed the checks) and a table entry.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::api::{self, WriteResult};
use super::head::{HeadError, HeadParser, Progress, Request};
use super::{route, AdminState, Response};
use crate::worker::local::Op;

/// The whole request head must arrive within this, counted from the accept.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(3);
/// Writing the answer must finish within this.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Admin connections held at once, at most (the fd budget may allow fewer).
pub const MAX_CONNECTIONS: usize = 4096;
/// Bytes already sent by a client after its head that are drained before the close.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Where a connection is in its life; the order is the eviction order (first goes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    /// Still sending its request head.
    Reading,
    /// Being answered: the status page, /status, an error.
    Answering,
    /// Being answered on /healthz or /metrics.
    Monitoring,
}

/// Open connections by (tier, accept order). Dropping a connection's sender tells its task
/// to close it.
#[derive(Default)]
struct Table {
    next_id: u64,
    conns: BTreeMap<(Tier, u64), oneshot::Sender<()>>,
}

type TableRef = Arc<Mutex<Table>>;

fn lock(t: &TableRef) -> MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl Table {
    /// Closes the first connection in eviction order, if it is at most `tier`.
    fn evict(&mut self, up_to: Tier) -> bool {
        match self.conns.first_key_value() {
            Some((&(tier, _), _)) if tier <= up_to => self.conns.pop_first().is_some(),
            _ => false,
        }
    }
}

/// A connection's entry in the table; removed when the connection's task ends.
struct Slot {
    table: TableRef,
    key: (Tier, u64),
}

impl Slot {
    /// Moves the connection to `tier`; false if it was evicted meanwhile.
    fn promote(&mut self, tier: Tier) -> bool {
        let mut t = lock(&self.table);
        let Some(tx) = t.conns.remove(&self.key) else {
            return false;
        };
        self.key.0 = tier;
        t.conns.insert(self.key, tx);
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table).conns.remove(&self.key);
    }
}

/// Accepts admin connections, one task each, for the life of the process or until an upgrade
/// hands the listener to the new process ([`AdminState::stop_accepting`]).
pub async fn accept_loop(listener: TcpListener, state: Arc<AdminState>) {
    let table: TableRef = Arc::default();
    loop {
        let accepted = tokio::select! {
            biased;
            // An upgrade's new process serves: it accepts on this socket from now on.
            () = state.stop_accepting.notified() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                let local = state
                    .shared
                    .local
                    .record(Op::Accept, &e, || "admin listener".to_string());
                // Out of fds: an idle admin connection is worth less than the one waiting in
                // the queue, which is likely a monitoring request. Otherwise back off instead
                // of spinning on the error.
                let fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if fds && lock(&table).evict(Tier::Reading) {
                    state.ops.admin_evicted.fetch_add(1, Ordering::Relaxed);
                    // Lets the evicted task run and close its socket before the next accept.
                    tokio::task::yield_now().await;
                } else {
                    if !local {
                        crate::warn!("admin: accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let cap = state.shared.admin_connections.load(Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut evicted = false;
        let slot = {
            let mut t = lock(&table);
            // Above the cap (lowered by a reload), close as many as it takes.
            while t.conns.len() >= cap.clamp(1, MAX_CONNECTIONS) && t.evict(Tier::Monitoring) {
                state.ops.admin_evicted.fetch_add(1, Ordering::Relaxed);
                evicted = true;
            }
            let key = (Tier::Reading, t.next_id);
            t.next_id += 1;
            t.conns.insert(key, tx);
            Slot {
                table: table.clone(),
                key,
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let (mut stream, peer) = stream;
            let mut slot = slot;
            tokio::select! {
                // Evicted: dropping the stream closes it.
                _ = rx => {}
                () = serve(&mut stream, peer, &state, &mut slot) => {}
            }
        });
        if evicted {
            // At the cap, a burst of accepts would otherwise evict a connection before its
            // task has read the request already waiting in its socket. Yielding lets every
            // new task read once first; a monitoring request then has its whole head and has
            // moved out of the tier that is evicted first.
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Debug)]
enum ReadError {
    Head(HeadError),
    /// The client went away or the read failed before a whole head arrived.
    Closed,
}

async fn serve(
    stream: &mut TcpStream,
    peer: std::net::SocketAddr,
    state: &Arc<AdminState>,
    slot: &mut Slot,
) {
    let deadline = tokio::time::Instant::now() + HEAD_DEADLINE;
    let head = tokio::time::timeout_at(deadline, read_head(stream)).await;
    let (response, head_only, tier) = match head {
        Err(_elapsed) => (
            Response::text("408 Request Timeout", "request timeout"),
            false,
            Tier::Answering,
        ),
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::Head(HeadError::TooLarge))) => (
            Response::text("431 Request Header Fields Too Large", "request too large"),
            false,
            Tier::Answering,
        ),
        Ok(Err(ReadError::Head(HeadError::Malformed))) => (
            Response::text("400 Bad Request", "bad request"),
            false,
            Tier::Answering,
        ),
        Ok(Ok((req, early))) if api::is_write(&req) => {
            let response = match api::check_write_head(&req, peer, state) {
                Err(refused) => refused,
                Ok(len) => {
                    match tokio::time::timeout_at(deadline, read_body(stream, early, len)).await {
                        Err(_elapsed) => api::refuse(
                            state,
                            WriteResult::BadRequest,
                            "408 Request Timeout",
                            "the request body did not arrive in time",
                        ),
                        Ok(None) => return,
                        Ok(Some(body)) => {
                            // Past its body: from here it is being answered, not read.
                            if !slot.promote(Tier::Answering) {
                                return;
                            }
                            route(&req, &body, peer, state).await
                        }
                    }
                }
            };
            (response, false, Tier::Answering)
        }
        Ok(Ok((req, _))) => {
            let monitoring = matches!(req.path.as_str(), "/healthz" | "/metrics")
                || req.path.starts_with("/ready");
            let tier = if monitoring {
                Tier::Monitoring
            } else {
                Tier::Answering
            };
            if req.path == "/metrics" {
                // Out of the tier evicted first while it waits, as if already answering.
                if !slot.promote(tier) {
                    return;
                }
                // Rendered on the metrics thread: this one (the control thread) only waits.
                state.exporter.fresh().await;
            }
            (
                route(&req, &[], peer, state).await,
                req.method == "HEAD",
                tier,
            )
        }
    };
    if !slot.promote(tier) {
        return;
    }
    let write = async {
        stream.write_all(&response.bytes(head_only)).await?;
        stream.shutdown().await
    };
    if let Ok(Ok(())) = tokio::time::timeout(WRITE_DEADLINE, write).await {
        drain(stream);
    }
}

/// Reads a body of `len` bytes (at most `api::MAX_BODY`, checked before), `early` being what
/// arrived with the head. `None` if the client went away first.
async fn read_body(stream: &mut TcpStream, early: Vec<u8>, len: usize) -> Option<Vec<u8>> {
    let mut body = early;
    body.truncate(len);
    body.reserve_exact(len - body.len());
    let mut chunk = [0u8; 1024];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some(body)
}

/// Reads until the blank line that ends the head; returns the head and whatever arrived
/// after it in the same read (the start of a body).
async fn read_head(stream: &mut TcpStream) -> Result<(Request, Vec<u8>), ReadError> {
    let mut parser = HeadParser::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(if parser.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Head(HeadError::Malformed)
            });
        }
        match parser.feed(&chunk[..n]) {
            Progress::NeedMore => {}
            Progress::Done { request, consumed } => {
                let rest = chunk[consumed.min(n)..n].to_vec();
                return Ok((request, rest));
            }
            Progress::Failed(e) => return Err(ReadError::Head(e)),
        }
    }
}

/// Reads, without waiting, what the client has already sent (a body we did not ask for, the
/// rest of an oversized head), so that closing does not reset the connection before the
/// client has read the answer.
fn drain(stream: &TcpStream) {
    let mut sink = [0u8; 4096];
    let mut left = DRAIN_LIMIT;
    while left > 0 {
        match stream.try_read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_takes_the_oldest_reader_then_answers_and_monitoring_last() {
        let mut t = Table::default();
        let mut rxs = Vec::new();
        for key in [
            (Tier::Monitoring, 0),
            (Tier::Answering, 1),
            (Tier::Reading, 3),
            (Tier::Reading, 2),
        ] {
            let (tx, rx) = oneshot::channel();
            t.conns.insert(key, tx);
            rxs.push((key, rx));
        }
        let mut order = Vec::new();
        while let Some((&key, _)) = t.conns.first_key_value() {
            assert!(t.evict(Tier::Monitoring));
            order.push(key);
        }
        let want = [
            (Tier::Reading, 2),
            (Tier::Reading, 3),
            (Tier::Answering, 1),
            (Tier::Monitoring, 0),
        ];
        assert_eq!(order, want);
        // An evicted connection's task sees its sender gone.
        for (_, mut rx) in rxs {
            assert!(rx.try_recv().is_err());
        }
    }

    #[test]
    fn out_of_fds_only_a_reader_is_evicted() {
        let mut t = Table::default();
        let (tx, _rx) = oneshot::channel();
        t.conns.insert((Tier::Monitoring, 0), tx);
        assert!(!t.evict(Tier::Reading));
        assert_eq!(t.conns.len(), 1);
    }
}
