//! The accept-time gate: what a frontend's traffic controls do to a new client before any
//! backend work (docs/traffic-controls.md).
//!
//! In order: read the PROXY header (`accept_proxy`), whose address is the client's from then
//! on; check the source ACL (`allow`, `deny`); take a per-source slot
//! (`max_connections_per_source`) and a token (`rate_per_source`); last, wait in arrival order
//! (up to `queue_timeout`) for one of the frontend's `max_connections`. A client refused at any
//! step is closed at once, counted by reason (`ringlb_frontend_rejected_total`) and logged
//! at most once per [`LOG_EVERY`] per frontend and reason, with the count since the last line.
//!
//! `accept.rs` calls [`admit`] only when the frontend sets one of these keys, so a plain
//! frontend pays no syscall and no allocation for the gate.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::sources::SourceTable;
use crate::backend::{FrontendSnap, FrontendState};
use crate::config::traffic::{canonical, Traffic};
use crate::relay::proxy_in::{self, Declared, Parsed, HEADER_MAX};
use crate::relay::Conn;

/// Why the gate closed a client: the `reason` label of `ringlb_frontend_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A PROXY header that was malformed, truncated (EOF before its end) or over the cap.
    Proxy = 0,
    /// No whole PROXY header within `proxy_timeout`.
    ProxyTimeout = 1,
    /// Refused by `allow` / `deny`.
    Acl = 2,
    /// The source already has `max_connections_per_source` open.
    SourceConnections = 3,
    /// The source is over `rate_per_source`.
    SourceRate = 4,
    /// Every backend stayed at its `max_connections` for `queue_timeout`.
    QueueTimeout = 5,
    /// SNI routing: a malformed, truncated or oversized TLS ClientHello, or no pool for the
    /// client (no route matched and the default pool is empty).
    Sni = 6,
    /// SNI routing: no whole ClientHello within `sni_timeout`.
    SniTimeout = 7,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Proxy,
        Reason::ProxyTimeout,
        Reason::Acl,
        Reason::SourceConnections,
        Reason::SourceRate,
        Reason::QueueTimeout,
        Reason::Sni,
        Reason::SniTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Proxy => "proxy",
            Reason::ProxyTimeout => "proxy_timeout",
            Reason::Acl => "acl",
            Reason::SourceConnections => "source_connections",
            Reason::SourceRate => "source_rate",
            Reason::QueueTimeout => "queue_timeout",
            Reason::Sni => "sni",
            Reason::SniTimeout => "sni_timeout",
        }
    }
}

/// How often each frontend may log each kind of rejection.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A frontend's gate counters and per-source table; lives in its `FrontendState`, so both
/// survive reloads.
#[derive(Debug)]
pub struct GateState {
    rejected: [AtomicU64; Reason::ALL.len()],
    /// Rejections not yet told in a log line, and when the last line was (ms since `start`).
    unlogged: [AtomicU64; Reason::ALL.len()],
    last_logged_ms: [AtomicU64; Reason::ALL.len()],
    /// The per-source table (`max_connections_per_source`, `rate_per_source`).
    pub sources: SourceTable,
    start: Instant,
    /// Clients waiting for a backend slot (`max_connections` on backends).
    pub queue: super::queue::BackendQueue,
    /// The frontend's `max_connections`: a fair (FIFO) semaphore, and how many permits it
    /// was given in all, so a reload that changes the limit can add or withdraw the
    /// difference.
    frontend_slots: Arc<Semaphore>,
    frontend_capacity: Mutex<u32>,
}

impl Default for GateState {
    fn default() -> Self {
        GateState {
            rejected: Default::default(),
            unlogged: Default::default(),
            last_logged_ms: Default::default(),
            sources: SourceTable::default(),
            start: Instant::now(),
            queue: Default::default(),
            frontend_slots: Arc::new(Semaphore::new(0)),
            frontend_capacity: Mutex::new(0),
        }
    }
}

impl GateState {
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// Counts a rejection and logs it unless this frontend logged one for this reason less
    /// than [`LOG_EVERY`] ago; the next line says how many went unlogged in between.
    pub fn reject(&self, frontend: &str, reason: Reason, client: SocketAddr, detail: &str) {
        let i = reason as usize;
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
        self.unlogged[i].fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let last = self.last_logged_ms[i].load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64;
        if !due
            || self.last_logged_ms[i]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let n = self.unlogged[i].swap(0, Ordering::Relaxed);
        let more = match n.saturating_sub(1) {
            0 => String::new(),
            m => format!(" ({m} more since the last such line)"),
        };
        let line =
            format!("frontend {frontend}: connection from {client} rejected: {detail}{more}");
        match reason {
            // A broken PROXY header most likely means a misconfigured upstream.
            Reason::Proxy | Reason::ProxyTimeout => crate::warn!("{line}"),
            _ => crate::info!("{line}"),
        }
    }

    /// One of the frontend's `max_connections`, waiting in its queue up to `timeout`: the
    /// permit and how long the wait was (zero when one was free), or `Err` with the wait when
    /// the timeout passed.
    async fn frontend_slot(
        &self,
        max: u32,
        timeout: Duration,
    ) -> Result<(OwnedSemaphorePermit, Duration), Duration> {
        {
            // Follow the configured limit: add what it grew by, withdraw free permits it
            // shrank by (busy ones are withdrawn as their connections end, on later calls).
            let mut cap = self
                .frontend_capacity
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *cap < max {
                self.frontend_slots.add_permits((max - *cap) as usize);
                *cap = max;
            } else if *cap > max {
                let gone = self.frontend_slots.forget_permits((*cap - max) as usize);
                *cap -= gone as u32;
            }
        }
        if let Ok(p) = self.frontend_slots.clone().try_acquire_owned() {
            return Ok((p, Duration::ZERO));
        }
        let q = &self.queue;
        let now = q.current.fetch_add(1, Ordering::Relaxed) + 1;
        q.max.fetch_max(now, Ordering::Relaxed);
        q.queued_total.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let got =
            super::deadline::timeout(timeout, self.frontend_slots.clone().acquire_owned()).await;
        q.current.fetch_sub(1, Ordering::Relaxed);
        let waited = started.elapsed();
        match got {
            Ok(Ok(p)) => {
                q.record_wait(waited);
                Ok((p, waited))
            }
            _ => Err(waited),
        }
    }
}

/// What the gate found out about an admitted client; held for the connection's life.
pub struct Admission {
    /// The address the client connected to, as a PROXY header declared it.
    pub dst: Option<SocketAddr>,
    /// Time spent in the frontend's queue (`max_connections`), for the log's `Tw`.
    pub waited: Duration,
    /// The per-source slot, given back when the connection ends.
    _slot: Option<SourceSlot>,
    /// One of the frontend's `max_connections`, likewise.
    _frontend_slot: Option<OwnedSemaphorePermit>,
}

/// One open connection counted against its source.
struct SourceSlot {
    state: Arc<FrontendState>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.state.gate.sources.release(self.ip);
    }
}

/// A client the gate refused (already counted, and logged at most once per interval).
pub struct Refused {
    /// The client's address (as a PROXY header declared it, when one was read).
    pub client: SocketAddr,
    /// How long it waited for one of the frontend's `max_connections` before
    /// `queue_timeout` refused it; `None` when it was refused without waiting (ACL, PROXY
    /// header, per-source limits). Only a queue timeout gets a connection log line (`sQ`):
    /// like HAProxy's `tcp-request connection reject`, the other refusals write none, so a
    /// flood of refused clients cannot flood the log.
    pub queued: Option<Duration>,
}

/// Runs the frontend's gate on a new client: `Ok` with the client's address (as declared by
/// a PROXY header, else `peer`) to use from now on, or `Err` when the client must be closed.
/// The caller shuts the socket down either way it ends.
pub async fn admit<S: Conn>(
    fe: &FrontendSnap,
    client: &S,
    peer: SocketAddr,
) -> Result<(SocketAddr, Admission), Refused> {
    let t: &Traffic = &fe.config.traffic;
    let gate = &fe.state.gate;
    let name = &fe.config.name;
    let (mut addr, mut dst) = (peer, None);
    if t.accept_proxy {
        match read_proxy(client, t.proxy_timeout).await {
            Ok(Declared::Proxy { src, dst: d }) => {
                addr = src;
                dst = Some(d);
            }
            Ok(Declared::Local) => {}
            Err(ProxyError::TimedOut) => {
                let detail = format!(
                    "no whole PROXY protocol header within {}",
                    crate::config::format_duration(t.proxy_timeout)
                );
                gate.reject(name, Reason::ProxyTimeout, peer, &detail);
                return Err(Refused {
                    client: addr,
                    queued: None,
                });
            }
            Err(ProxyError::Bad(why)) => {
                gate.reject(name, Reason::Proxy, peer, why);
                return Err(Refused {
                    client: addr,
                    queued: None,
                });
            }
        }
    }
    let ip = canonical(addr.ip());
    if let Some(acl) = &t.acl {
        if !acl.admits(ip) {
            gate.reject(name, Reason::Acl, addr, "source address denied by the ACL");
            return Err(Refused {
                client: addr,
                queued: None,
            });
        }
    }
    let mut slot = None;
    if t.tracks_sources() {
        match gate
            .sources
            .take(ip, t.max_connections_per_source, t.rate_per_source)
        {
            Ok(true) => {
                slot = Some(SourceSlot {
                    state: fe.state.clone(),
                    ip,
                })
            }
            Ok(false) => {}
            Err(reason) => {
                let detail = match reason {
                    Reason::SourceConnections => format!(
                        "source has max_connections_per_source ({}) open",
                        t.max_connections_per_source.unwrap_or(0)
                    ),
                    _ => "source is over rate_per_source".to_string(),
                };
                gate.reject(name, reason, addr, &detail);
                return Err(Refused {
                    client: addr,
                    queued: None,
                });
            }
        }
    }
    // Last: a client refused above never waits for, or holds, one of these.
    let (mut frontend_slot, mut waited) = (None, Duration::ZERO);
    if let Some(max) = t.max_connections {
        match gate.frontend_slot(max, t.queue_timeout).await {
            Ok((p, w)) => (frontend_slot, waited) = (Some(p), w),
            Err(w) => {
                let detail = format!(
                    "frontend at max_connections ({max}) for queue_timeout ({})",
                    crate::config::format_duration(t.queue_timeout)
                );
                gate.reject(name, Reason::QueueTimeout, addr, &detail);
                return Err(Refused {
                    client: addr,
                    queued: Some(w),
                });
            }
        }
    }
    Ok((
        addr,
        Admission {
            dst,
            waited,
            _slot: slot,
            _frontend_slot: frontend_slot,
        },
    ))
}

enum ProxyError {
    TimedOut,
    Bad(&'static str),
}

/// Reads the PROXY header and nothing after it: each round peeks at what has arrived, works
/// out how much of it is header, and consumes exactly that, so the client's first bytes stay
/// in the socket for the relay. Every byte peeked is consumed unless the header ends within
/// it, so a fragment never stays readable and the wait never spins.
async fn read_proxy<S: Conn>(client: &S, timeout: Duration) -> Result<Declared, ProxyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; HEADER_MAX];
    let mut have = 0;
    let fd = client.as_raw_fd();
    loop {
        let peeked = client.attempt(Interest::READABLE, || {
            recv_flags(fd, &mut buf[have..], MsgFlags::MSG_PEEK)
        });
        let n = match peeked {
            Ok(0) => return Err(ProxyError::Bad("connection closed inside the PROXY header")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // On timeout the wait is dropped; on io_uring its poll is cancelled and keeps
                // the socket open until the cancel completes (see `worker::ring`).
                match super::deadline::timeout_at(deadline, client.wait(Interest::READABLE)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return Err(ProxyError::Bad("socket error in the PROXY header")),
                    Err(_) => return Err(ProxyError::TimedOut),
                }
            }
            Err(_) => return Err(ProxyError::Bad("socket error in the PROXY header")),
        };
        let parsed = proxy_in::parse(&buf[..have + n]).map_err(|b| ProxyError::Bad(b.as_str()))?;
        let take = match parsed {
            Parsed::Done { len, .. } => len - have,
            Parsed::Partial { .. } => n,
        };
        let got = client
            .attempt(Interest::READABLE, || {
                recv_flags(fd, &mut buf[have..have + take], MsgFlags::empty())
            })
            .map_err(|_| ProxyError::Bad("socket error in the PROXY header"))?;
        have += got;
        if let Parsed::Done { len, declared } = parsed {
            if have == len {
                return Ok(declared);
            }
        }
        if have >= HEADER_MAX {
            // Unreachable with a correct parser (it refuses sooner); a guard, not a panic.
            return Err(ProxyError::Bad(proxy_in::Bad::V2TooLong.as_str()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProxyError::TimedOut);
        }
    }
}

fn recv_flags(fd: std::os::fd::RawFd, buf: &mut [u8], flags: MsgFlags) -> io::Result<usize> {
    Ok(nix::sys::socket::recv(
        fd,
        buf,
        flags | MsgFlags::MSG_DONTWAIT,
    )?)
}
