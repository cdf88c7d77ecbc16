//! The accept loop and the life of one connection: accept -> pick -> connect -> relay.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::conns::{Registration, Timeouts};
use super::gate::Reason;
use super::io::Io;
use super::local::Op;
use super::queue::Pick;
use super::{hedge, route, shutdown_listener, Shared};
use crate::backend::{per_worker, ActiveGuard, FrontendSnap};
use crate::balance::pools::DEFAULT_POOL;
use crate::connlog::{self, ConnectFailed};
use crate::relay::{self, ops::ConnectError, FirstMove};

/// One listening socket on this worker.
pub struct ListenerSlot<I: Io> {
    frontend: String,
    listener: I::Listener,
    /// The listener's fd, kept for `shutdown()`; owned by `listener`.
    fd: RawFd,
    closed: Cell<bool>,
    /// Wakes an accept loop paused at `max_connections` when the listener closes.
    closed_bell: Notify,
    /// Passed by the service manager: it keeps the socket (and its queue) for the next
    /// process, so closing only stops accepting (see `listener::activation`).
    external: bool,
    /// The frontend's snapshot as this listener last saw it. When a reload removes the
    /// frontend, what is still in the listener's queue is served with it (see
    /// [`close_gracefully`]); kept up to date by `serve` at the cost of a pointer compare.
    seen: RefCell<Option<Arc<FrontendSnap>>>,
}

impl<I: Io> ListenerSlot<I> {
    pub fn new(
        frontend: String,
        listener: std::net::TcpListener,
        external: bool,
        shared: &Shared,
    ) -> std::io::Result<Self> {
        let seen = shared.published.load().frontend(&frontend).cloned();
        Ok(ListenerSlot {
            frontend,
            fd: listener.as_raw_fd(),
            listener: I::listener(listener)?,
            closed: Cell::new(false),
            closed_bell: Notify::new(),
            external,
            seen: RefCell::new(seen),
        })
    }

    /// The frontend this listener serves: as published, or as last seen if a reload removed
    /// it (only a closing listener's queue is served that way).
    fn frontend(&self, shared: &Shared) -> Option<Arc<FrontendSnap>> {
        let snap = shared.published.load();
        let Some(fe) = snap.frontend(&self.frontend) else {
            return self.seen.borrow().clone();
        };
        let mut seen = self.seen.borrow_mut();
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, fe)) {
            *seen = Some(fe.clone());
        }
        Some(fe.clone())
    }

    /// Stops accepting and shuts the socket down, unless the service manager owns it.
    pub fn close(&self) {
        self.stop(!self.external);
    }

    /// Stops accepting without touching the socket: a binary upgrade's new process accepts
    /// on it (and on its queue) from here on.
    pub fn stop_accepting(&self) {
        self.stop(false);
    }

    fn stop(&self, shut: bool) {
        if !self.closed.replace(true) {
            if shut {
                shutdown_listener(self.fd);
            }
            self.closed_bell.notify_one();
        }
    }
}

/// How long a closing listener keeps accepting after it stopped taking new handshakes: a
/// handshake already under way then completes (its last ACK is one client round trip away)
/// and is served.
pub const CLOSE_LINGER: Duration = Duration::from_millis(250);

/// Closes a listener without losing a connection the kernel accepted on it. It stops taking
/// new handshakes (`listener::refuse_new_handshakes`: new SYNs go unanswered, and the
/// client's retransmission a second later is refused by the closed port), keeps accepting for
/// [`CLOSE_LINGER`], then takes what is still queued and closes, with nothing else running on
/// this worker in between. Closing a listening socket resets every connection in its queue;
/// this leaves none there. If the reload removed the frontend itself, the queue is served
/// with the frontend as the listener last saw it.
pub async fn close_gracefully<I: Io>(slot: Rc<ListenerSlot<I>>, shared: Arc<Shared>) {
    if slot.closed.get() {
        return;
    }
    if slot.external {
        // The service manager keeps the socket and its queue for the next process.
        slot.close();
        return;
    }
    match super::listener::refuse_new_handshakes(&slot.listener) {
        // The accept loop goes on meanwhile.
        Ok(()) => super::deadline::sleep(CLOSE_LINGER).await,
        Err(e) => crate::warn!(
            "frontend {}: cannot stop new handshakes before closing a listener ({e}); \
             connections queued at the close may be reset",
            slot.frontend
        ),
    }
    if slot.closed.get() {
        return;
    }
    loop {
        match relay::ops::accept_now(slot.fd) {
            Ok((socket, peer)) => {
                let Ok(stream) = I::stream(socket) else {
                    continue;
                };
                // Past the cap if need be: these were accepted by the kernel already, and
                // there are at most a listen queue's worth.
                shared.active.fetch_add(1, Ordering::SeqCst);
                spawn_serve(stream, peer, &slot, &shared);
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            // Empty (or out of fds: what is left is reset by the close, as before).
            Err(_) => break,
        }
    }
    slot.close();
}

/// Backoff after EMFILE/ENFILE/ENOBUFS: long enough not to spin, short enough to recover fast.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(50);

pub async fn accept_loop<I: Io>(slot: Rc<ListenerSlot<I>>, shared: Arc<Shared>) {
    loop {
        if slot.closed.get() {
            return;
        }
        // A socket passed by the service manager (or handed to a new process by an upgrade)
        // is not shut down to end a pending accept: the bell does, and the readiness wait it
        // drops is cancelled (a connection that came meanwhile stays queued for whoever
        // accepts next). The accept itself is a readiness wait and a non-blocking accept4, so
        // leaving it loses nothing. The bell goes first: once the listener is closed, not one more
        // connection is taken (an upgrade's new process serves those).
        let accepted = tokio::select! {
            biased;
            _ = slot.closed_bell.notified() => return,
            a = I::accept(&slot.listener) => a,
        };
        if slot.closed.get() {
            // Shut down for a reload or a stop; a connection accepted in the race is served.
            if let Ok((stream, peer)) = accepted {
                shared.active.fetch_add(1, Ordering::SeqCst);
                I::spawn(serve::<I>(
                    stream,
                    peer,
                    slot,
                    shared.clone(),
                    OpenSlot(shared),
                ));
            }
            return;
        }
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::ECONNABORTED) | Some(libc::EINTR) => {}
                    _ => {
                        let local = shared.local.record(Op::Accept, &e, || {
                            format!("frontend {}: accept failed", slot.frontend)
                        });
                        if !local {
                            crate::warn!("frontend {}: accept failed: {e}", slot.frontend);
                        }
                        super::deadline::sleep(RESOURCE_BACKOFF).await;
                    }
                }
                continue;
            }
        };
        // At the cap this waits, holding the one connection just accepted, and the loop
        // accepts nothing more: new clients wait in the listen queue (the kernel keeps them)
        // until a connection closes, instead of being accepted and closed. The fd budget
        // leaves room for one such held connection per listener per worker.
        acquire_slot(&slot, &shared).await;
        spawn_serve(stream, peer, &slot, &shared);
    }
}

/// Serves one accepted client on this worker; its `max_connections` slot is already taken.
fn spawn_serve<I: Io>(
    stream: I::Stream,
    peer: SocketAddr,
    slot: &Rc<ListenerSlot<I>>,
    shared: &Arc<Shared>,
) {
    I::spawn(serve::<I>(
        stream,
        peer,
        slot.clone(),
        shared.clone(),
        OpenSlot(shared.clone()),
    ));
}

/// Takes one of the `max_connections` slots, waiting while there is none. If the listener
/// closes meanwhile (a reload or a stop), it takes one anyway: the client it holds was
/// accepted, and is served rather than lost.
async fn acquire_slot<I: Io>(slot: &ListenerSlot<I>, shared: &Shared) {
    loop {
        let max = shared.max_connections.load(Ordering::Relaxed);
        let open = shared.active.load(Ordering::SeqCst);
        if open < max || slot.closed.get() {
            if shared
                .active
                .compare_exchange(open, open + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return;
            }
            continue;
        }
        shared.note_paused();
        let freed = shared.capacity.notified();
        tokio::pin!(freed);
        // Register before the second look, so a close between the look and the await wakes us.
        freed.as_mut().enable();
        shared.paused.fetch_add(1, Ordering::SeqCst);
        if shared.active.load(Ordering::SeqCst) >= shared.max_connections.load(Ordering::Relaxed) {
            tokio::select! {
                _ = &mut freed => {}
                _ = slot.closed_bell.notified() => {}
            }
        }
        shared.paused.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts one open client connection for `max_connections`, however `serve` ends; wakes
/// accept loops paused at the cap.
struct OpenSlot(Arc<Shared>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        if self.0.paused.load(Ordering::SeqCst) > 0 {
            self.0.capacity.notify_waiters();
        }
    }
}

async fn serve<I: Io>(
    client: I::Stream,
    peer: SocketAddr,
    slot: Rc<ListenerSlot<I>>,
    shared: Arc<Shared>,
    _open: OpenSlot,
) {
    // TCP_NODELAY comes from the listener (see `listener::bind_one`).
    let Some(fe) = slot.frontend(&shared) else {
        return;
    };
    drop(slot);
    let mut trace = connlog::Trace::begin(fe.log.as_ref(), peer);
    // Traffic controls (PROXY header in, ACL, per-source limits): skipped when none is set.
    // Boxed, like the connect: the header buffer and the admission live off the connection's
    // future, which keeps only the pointer (one for the gate and SNI routing together).
    let mut extras: Option<Box<Extras>> = None;
    let peer = if fe.config.traffic.is_on() {
        match Box::pin(super::gate::admit(&fe, &client, peer)).await {
            Ok((addr, a)) => {
                trace.client(addr);
                trace.waited(a.waited);
                extras.get_or_insert_with(Box::default).admission = Some(a);
                addr
            }
            Err(refused) => {
                if let Some(waited) = refused.queued {
                    trace.client(refused.client);
                    trace.waited(waited);
                    trace.finish(&fe, &shared.active, connlog::End::QueueTimeout);
                }
                relay::sys::shutdown(client.as_raw_fd(), nix::sys::socket::Shutdown::Both);
                return;
            }
        }
    } else {
        peer
    };
    // SNI routing: the ClientHello is read (into a pooled buffer, relayed first) and picks
    // the pool. Boxed, like the gate; frontends without routes skip it and use pool 0.
    if fe.routes.is_some() {
        match Box::pin(route::read_hello(&fe, &client, peer)).await {
            Some(h) => extras.get_or_insert_with(Box::default).hello = Some(Box::new(h)),
            None => {
                relay::sys::shutdown(client.as_raw_fd(), nix::sys::socket::Shutdown::Both);
                return;
            }
        }
    }
    let fe_counts = fe.state.counts.local();
    per_worker::bump(&fe_counts.accepted);
    per_worker::bump(&fe_counts.active);
    let _fe_active = CounterGuard(&fe_counts.active);

    let cfg = &fe.config;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_failed: Option<usize> = None;
    let mut attempts = 0;
    // Local errors (this host out of fds) do not use up attempts: they are retried after a
    // backoff until one connect timeout has passed, then the client is closed cleanly.
    let local_deadline = Instant::now() + cfg.connect_timeout;
    while attempts <= cfg.retries {
        // With max_connections on backends, a pick takes a slot (held until the connection
        // ends, or given back before the next attempt) and may wait in the queue.
        let mut _slot = None;
        let idx = if fe.limited {
            match Box::pin(super::queue::pick(&fe, pool_of(&extras), &peer, &tried)).await {
                Pick::Backend(idx, slot, waited) => {
                    trace.waited(waited);
                    _slot = slot.map(Box::new);
                    idx
                }
                Pick::NoBackend => break,
                Pick::TimedOut(waited) => {
                    trace.waited(waited);
                    let detail = format!(
                        "every backend at max_connections for queue_timeout ({})",
                        crate::config::format_duration(cfg.traffic.queue_timeout)
                    );
                    fe.state
                        .gate
                        .reject(&cfg.name, Reason::QueueTimeout, peer, &detail);
                    trace.finish(&fe, &shared.active, connlog::End::QueueTimeout);
                    relay::sys::shutdown(client.as_raw_fd(), nix::sys::socket::Shutdown::Both);
                    return;
                }
            }
        } else {
            let Some(idx) = fe
                .select_in(pool_of(&extras), &peer, &tried)
                .or_else(|| retired_pick(&fe, pool_of(&extras), &tried))
            else {
                break;
            };
            idx
        };
        // Counted only now that there is another backend to retry on.
        if let Some(prev) = last_failed.take() {
            per_worker::bump(&fe.backends[prev].state.counts.local().retries);
        }
        trace.attempt(idx);
        // Connect (hedged onto another backend if slow; see `hedge`) and first move are
        // boxed: they are over in a moment, and keeping their state (timers, ops) out of line
        // keeps the future every idle connection lives in small.
        // In a block of its own: what `connect` returns is gone before the relay's await, so
        // the future every idle connection lives in holds none of it (its hedge slot field
        // alone took the future into the next allocator size class: 1.4 -> 1.7 KiB per idle
        // connection).
        let (carried, result) = {
            let c = Box::pin(hedge::connect::<I>(
                &fe,
                &peer,
                pool_of(&extras),
                idx,
                &mut tried,
                &shared,
            ))
            .await;
            if c.idx != idx {
                // The hedge carries the client: its slot replaces the first backend's.
                _slot = c.slot.map(Box::new);
            }
            (c.idx, c.result)
        };
        let (idx, backend) = (carried, &fe.backends[carried]);
        trace.carried_by(idx);
        let failure = match result {
            Ok(server) => {
                trace.connected();
                if let Some(idle) = cfg.tcp_keepalive {
                    keepalive(&client, &server, idle);
                }
                // The PROXY header goes first, before the backend or the client says anything.
                if let Some(version) = backend.config.send_proxy {
                    if let Err(e) = Box::pin(send_proxy_header(
                        &client,
                        &server,
                        peer,
                        extras
                            .as_ref()
                            .and_then(|e| e.admission.as_ref())
                            .and_then(|a| a.dst),
                        version,
                    ))
                    .await
                    {
                        crate::debug!(
                            "frontend {}: PROXY header to {} failed: {e}",
                            cfg.name,
                            backend.config.name
                        );
                    }
                }
                match Box::pin(first_move(
                    &mut extras,
                    &client,
                    &server,
                    cfg.connect_timeout,
                ))
                .await
                {
                    FirstMove::Relay(head) => {
                        backend.state.record_connect_success();
                        let reg = Registration::new(
                            client.as_raw_fd(),
                            server.as_raw_fd(),
                            ActiveGuard::new(backend.state.clone()),
                            Timeouts::of(cfg),
                        );
                        trace.relaying(&fe, &shared.active);
                        let ended =
                            relay::relay(&client, &server, reg.meter(), shared.relay_mode, head)
                                .await;
                        let (cut, meter) = (reg.cut(), reg.meter());
                        let end = connlog::End::Relayed { ended, cut, meter };
                        trace.finish(&fe, &shared.active, end);
                        // `reg` goes before the sockets: the sweeper never sees a closed fd.
                        drop(reg);
                        return;
                    }
                    // Nothing was relayed yet, so this counts as a failed connect and the client
                    // is retried on another backend like any other.
                    FirstMove::BackendFailed(e) => {
                        trace.failed(ConnectFailed::Refused);
                        e.to_string()
                    }
                }
            }
            Err(ConnectError::Io(e))
                if shared.local.record(Op::Connect, &e, || {
                    format!(
                        "frontend {}: connect to {} ({})",
                        cfg.name, backend.config.name, backend.config.address
                    )
                }) =>
            {
                trace.failed(ConnectFailed::Local);
                if Instant::now() + RESOURCE_BACKOFF < local_deadline {
                    super::deadline::sleep(RESOURCE_BACKOFF).await;
                    continue;
                }
                fe.state
                    .rejected_local_total
                    .fetch_add(1, Ordering::Relaxed);
                trace.finish(&fe, &shared.active, connlog::End::NotConnected);
                relay::sys::shutdown(client.as_raw_fd(), nix::sys::socket::Shutdown::Both);
                return;
            }
            Err(e) => {
                trace.failed(match &e {
                    ConnectError::TimedOut => ConnectFailed::TimedOut,
                    _ => ConnectFailed::Refused,
                });
                e.to_string()
            }
        };
        hedge::note_failure(&shared, &fe, idx, failure);
        tried.push(idx);
        last_failed = Some(idx);
        attempts += 1;
    }
    fe.state
        .rejected_no_backend_total
        .fetch_add(1, Ordering::Relaxed);
    trace.finish(&fe, &shared.active, connlog::End::NotConnected);
    // A readiness poll left by `first_move` may still hold the client socket: shutting it
    // down completes that poll, so the fd is closed now rather than when the client speaks.
    relay::sys::shutdown(client.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

/// What the gate and SNI routing found about a client, when its frontend uses them: kept in
/// one box so that `serve`'s future, which every idle connection lives in, holds one pointer
/// for both (the future's size decides the allocator's size class of every connection's task).
#[derive(Default)]
struct Extras {
    /// Held for the connection's life (per-source and frontend slots).
    admission: Option<super::gate::Admission>,
    /// Given up once the relay has the ClientHello (boxed: a frontend with the gate and no
    /// routes pays a pointer for it, not the buffer's handle).
    hello: Option<Box<route::Hello>>,
}

/// The client's SNI routing pool: the default pool (every backend) without routes.
fn pool_of(extras: &Option<Box<Extras>>) -> usize {
    extras
        .as_ref()
        .and_then(|e| e.hello.as_ref())
        .map_or(DEFAULT_POOL, |h| h.pool)
}

/// What first happened on the new connection (see `relay::first_move`). A routed client's
/// ClientHello was read already: it is the first data, and the routing is done with, so its
/// buffer goes to the relay. Kept out of `serve`'s future, boxed.
async fn first_move<S: relay::Conn>(
    extras: &mut Option<Box<Extras>>,
    client: &S,
    server: &S,
    limit: Duration,
) -> FirstMove {
    let routed = extras.as_mut().and_then(|e| e.hello.as_mut());
    if let Some(head) = routed.and_then(|h| h.head.take()) {
        if let Some(e) = extras.as_mut() {
            e.hello = None;
        }
        return FirstMove::Relay(head);
    }
    relay::first_move(client, server, limit).await
}

/// When a reload removed every backend of this frontend's pool (or the frontend itself, whose
/// listen queue is still being served): they are all draining, so selection finds none, and
/// the first one still up serves the client as the connections already open on them finish.
/// The window is short: from the reload marking them draining until the new snapshot (or the
/// listener's close) takes over.
fn retired_pick(fe: &FrontendSnap, pool: usize, tried: &[usize]) -> Option<usize> {
    let members = &fe.pools.get(pool)?.members;
    if !members.iter().all(|&i| fe.backends[i].state.is_draining()) {
        return None;
    }
    members
        .iter()
        .copied()
        .find(|i| !tried.contains(i) && fe.backends[*i].state.is_up())
}

/// Sends the PROXY protocol header naming `peer` and the address it connected to (`dst` when
/// an incoming PROXY header declared one). A failure here (the backend reset at once) is left
/// for `first_move` to see and retry elsewhere.
async fn send_proxy_header<S: relay::Conn>(
    client: &S,
    server: &S,
    peer: SocketAddr,
    dst: Option<SocketAddr>,
    version: crate::config::ProxyVersion,
) -> std::io::Result<()> {
    let local = match dst {
        Some(d) => d,
        None => socket2::SockRef::from(client)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("client socket has no IP address"))?,
    };
    relay::send_all(server, &relay::proxy::header(version, peer, local)).await
}

/// Lowers a per-worker gauge on drop.
struct CounterGuard<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for CounterGuard<'_> {
    fn drop(&mut self) {
        per_worker::drop_one(self.0);
    }
}

/// TCP keepalive on both sockets (`tcp_keepalive`): the first probe after `idle` of silence,
/// then one every `idle / 4` (1 to 75 s); 4 unanswered end the connection. A failure here is
/// not worth the connection: it goes on without keepalive, and says so at debug level.
fn keepalive<S: relay::Conn>(client: &S, server: &S, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(75));
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(every)
        .with_retries(4);
    for s in [client, server] {
        if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
            crate::debug!("tcp_keepalive: {e}");
        }
    }
}
