//! The accept loop and the life of one connection: pick, connect (with retries), relay.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::io::Io;
use super::{shutdown_listener, DataEvent, Shared};
use crate::backend::ActiveGuard;
use crate::relay::FirstMove;

/// One listening socket on this worker.
pub struct ListenerSlot<I: Io> {
    frontend: String,
    listener: I::Listener,
    /// The listener's fd, kept for `shutdown()`; owned by `listener`.
    fd: RawFd,
    closed: Cell<bool>,
}

impl<I: Io> ListenerSlot<I> {
    pub fn new(frontend: String, listener: std::net::TcpListener) -> std::io::Result<Self> {
        Ok(ListenerSlot {
            frontend,
            fd: listener.as_raw_fd(),
            listener: I::listener(listener)?,
            closed: Cell::new(false),
        })
    }

    pub fn close(&self) {
        if !self.closed.replace(true) {
            shutdown_listener(self.fd);
        }
    }
}

/// Backoff after EMFILE/ENFILE/ENOBUFS: long enough not to spin, short enough to recover fast.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(50);

pub async fn accept_loop<I: Io>(slot: Rc<ListenerSlot<I>>, shared: Arc<Shared>) {
    let mut resource_errors: u64 = 0;
    loop {
        let accepted = I::accept(&slot.listener).await;
        if slot.closed.get() {
            // Shut down for a reload or a stop; a connection accepted in the race is closed.
            return;
        }
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::ECONNABORTED) | Some(libc::EINTR) => {}
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS)
                    | Some(libc::ENOMEM) => {
                        // Log the first and then every 1000th, so a long fd shortage is seen
                        // but does not flood the journal.
                        if resource_errors % 1000 == 0 {
                            crate::warn!(
                                "frontend {}: accept failed: {e}; backing off (raise LimitNOFILE or max_connections?)",
                                slot.frontend
                            );
                        }
                        resource_errors += 1;
                        tokio::time::sleep(RESOURCE_BACKOFF).await;
                    }
                    _ => {
                        crate::warn!("frontend {}: accept failed: {e}", slot.frontend);
                        tokio::time::sleep(RESOURCE_BACKOFF).await;
                    }
                }
                continue;
            }
        };
        let max = shared.max_connections.load(Ordering::Relaxed);
        if shared.active.fetch_add(1, Ordering::Relaxed) >= max {
            shared.active.fetch_sub(1, Ordering::Relaxed);
            let snap = shared.published.load();
            if let Some(fe) = snap.frontend(&slot.frontend) {
                fe.state
                    .rejected_limit_total
                    .fetch_add(1, Ordering::Relaxed);
            }
            drop(stream);
            continue;
        }
        I::spawn(serve::<I>(stream, peer, slot.clone(), shared.clone()));
    }
}

/// Decrements the global open-connection count however `serve` ends.
struct OpenSlot<'a>(&'a Shared);

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve<I: Io>(
    client: I::Stream,
    peer: SocketAddr,
    slot: Rc<ListenerSlot<I>>,
    shared: Arc<Shared>,
) {
    let _open = OpenSlot(&shared);
    I::set_nodelay(&client);
    let snap = shared.published.load_full();
    let Some(fe) = snap.frontend(&slot.frontend).cloned() else {
        return;
    };
    drop(snap);
    fe.state.accepted_total.fetch_add(1, Ordering::Relaxed);
    fe.state.active.fetch_add(1, Ordering::Relaxed);
    let _fe_active = scopeguard(&fe.state.active);

    let cfg = &fe.config;
    let mut tried: Vec<usize> = Vec::new();
    for attempt in 0..=cfg.retries {
        let Some(idx) = fe.select(&peer, &tried) else {
            break;
        };
        let backend = &fe.backends[idx];
        let failure = match I::connect(backend.config.address, cfg.connect_timeout).await {
            Ok(server) => match I::first_move(&client, &server, cfg.connect_timeout).await {
                FirstMove::Relay => {
                    backend.state.record_connect_success();
                    let guard = ActiveGuard::new(backend.state.clone());
                    let epoch = guard.state().kill_epoch();
                    I::relay(
                        client,
                        server,
                        guard.state(),
                        epoch,
                        cfg.idle_timeout,
                        shared.relay_mode,
                    )
                    .await;
                    return;
                }
                // Nothing was relayed yet, so this counts as a failed connect and the client
                // is retried on another backend like any other.
                FirstMove::BackendFailed(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        crate::debug!(
            "frontend {}: connect to {} ({}) failed: {failure}",
            cfg.name,
            backend.config.name,
            backend.config.address
        );
        if attempt < cfg.retries {
            backend.state.retries_total.fetch_add(1, Ordering::Relaxed);
        }
        if backend
            .state
            .record_connect_failure(backend.config.health.error_limit)
        {
            backend.state.set_up(false);
            let _ = shared.events.send(DataEvent::PassiveDown {
                backend: backend.state.clone(),
                error: failure,
            });
        }
        tried.push(idx);
    }
    fe.state
        .rejected_no_backend_total
        .fetch_add(1, Ordering::Relaxed);
    I::abandon(&client);
}

/// Decrements an atomic counter on drop.
struct CounterGuard<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for CounterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn scopeguard(c: &std::sync::atomic::AtomicU64) -> CounterGuard<'_> {
    CounterGuard(c)
}
