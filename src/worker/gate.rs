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

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::{FrontendSnap, FrontendState};
use crate::config::traffic::{canonical, Rate, Traffic};
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

/// Shards of the per-source table: one lock each, picked by address, so workers admitting
/// different sources rarely meet on one lock.
const SHARDS: usize = 64;
/// Sources tracked per shard (65,536 in all). A shard that is full sweeps out sources with no
/// open connection and a full bucket; if none can go, the new source is admitted untracked
/// and counted (`ringlb_frontend_source_table_full_total`): an address spray must not turn
/// the limits into a refusal of every new client.
const SHARD_CAP: usize = 1024;
/// A full shard sweeps at most this often; between sweeps new sources go untracked.
const SWEEP_EVERY_MS: u64 = 100;

/// A frontend's gate counters and per-source table; lives in its `FrontendState`, so both
/// survive reloads.
#[derive(Debug)]
pub struct GateState {
    rejected: [AtomicU64; Reason::ALL.len()],
    /// Rejections not yet told in a log line, and when the last line was (ms since `start`).
    unlogged: [AtomicU64; Reason::ALL.len()],
    last_logged_ms: [AtomicU64; Reason::ALL.len()],
    /// Sources admitted untracked because their shard of the table was full.
    pub source_table_full_total: AtomicU64,
    sources: [Mutex<Shard>; SHARDS],
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
            source_table_full_total: AtomicU64::new(0),
            sources: std::array::from_fn(|_| Mutex::new(Shard::default())),
            start: Instant::now(),
            queue: Default::default(),
            frontend_slots: Arc::new(Semaphore::new(0)),
            frontend_capacity: Mutex::new(0),
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    // RandomState on purpose: the keys are chosen by clients (any IPv6 address), and a fixed
    // hash would let them pick colliding ones. Nothing here decides placement.
    map: HashMap<IpAddr, Source>,
    last_sweep_ms: u64,
}

/// One source address's open connections and rate bucket.
#[derive(Debug)]
struct Source {
    open: u32,
    tokens: f64,
    /// When `tokens` was last brought up to date (ms since the table's start).
    at_ms: u64,
    /// When the bucket will be full again; 0 without a rate. With `open == 0` and this
    /// passed, the entry says nothing a fresh one would not: it can go.
    full_at_ms: u64,
}

impl Source {
    fn idle(&self, now_ms: u64) -> bool {
        self.open == 0 && now_ms >= self.full_at_ms
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

    fn shard(&self, ip: &IpAddr) -> &Mutex<Shard> {
        // A fixed mix of the address bytes: only spreads the locks, decides nothing else.
        let h = match ip {
            IpAddr::V4(a) => u64::from(u32::from(*a)),
            IpAddr::V6(a) => {
                let v = u128::from(*a);
                (v as u64) ^ ((v >> 64) as u64)
            }
        };
        let h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.sources[(h >> 58) as usize % SHARDS]
    }

    /// Takes a connection slot and a rate token for `ip`, or says which limit refused it.
    fn take_source(
        &self,
        ip: IpAddr,
        max_open: Option<u32>,
        rate: Option<Rate>,
    ) -> Result<bool, Reason> {
        let now = self.now_ms();
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if !shard.map.contains_key(&ip) && shard.map.len() >= SHARD_CAP {
            if now.saturating_sub(shard.last_sweep_ms) < SWEEP_EVERY_MS {
                self.source_table_full_total.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            shard.last_sweep_ms = now;
            shard.map.retain(|_, s| !s.idle(now));
            if shard.map.len() >= SHARD_CAP {
                self.source_table_full_total.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
        }
        let src = shard.map.entry(ip).or_insert_with(|| Source {
            open: 0,
            tokens: rate.map_or(0.0, |r| f64::from(r.count)),
            at_ms: now,
            full_at_ms: 0,
        });
        if max_open.is_some_and(|max| src.open >= max) {
            return Err(Reason::SourceConnections);
        }
        if let Some(r) = rate {
            let per_ms = f64::from(r.count) / r.per.as_millis().max(1) as f64;
            let cap = f64::from(r.count);
            let elapsed = now.saturating_sub(src.at_ms) as f64;
            src.tokens = (src.tokens + elapsed * per_ms).min(cap);
            src.at_ms = now;
            if src.tokens < 1.0 {
                return Err(Reason::SourceRate);
            }
            src.tokens -= 1.0;
            src.full_at_ms = now + ((cap - src.tokens) / per_ms).ceil() as u64;
        }
        if max_open.is_some() {
            src.open += 1;
        }
        Ok(max_open.is_some())
    }

    fn release_source(&self, ip: IpAddr) {
        let now = self.now_ms();
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(src) = shard.map.get_mut(&ip) {
            src.open = src.open.saturating_sub(1);
            if src.idle(now) {
                shard.map.remove(&ip);
            }
        }
    }

    /// Waits (FIFO, up to `timeout`) for one of the frontend's `max` connection slots.
    async fn frontend_slot(&self, max: u32, timeout: Duration) -> Option<OwnedSemaphorePermit> {
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
            return Some(p);
        }
        let q = &self.queue;
        let now = q.current.fetch_add(1, Ordering::Relaxed) + 1;
        q.max.fetch_max(now, Ordering::Relaxed);
        q.queued_total.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let got = tokio::time::timeout(timeout, self.frontend_slots.clone().acquire_owned()).await;
        q.current.fetch_sub(1, Ordering::Relaxed);
        match got {
            Ok(Ok(p)) => {
                q.record_wait(started.elapsed());
                Some(p)
            }
            _ => None,
        }
    }

    /// Sources tracked now (for tests and the status of the table).
    pub fn tracked_sources(&self) -> usize {
        self.sources
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }
}

/// What the gate found out about an admitted client; held for the connection's life.
pub struct Admission {
    /// The address the client connected to, as a PROXY header declared it.
    pub dst: Option<SocketAddr>,
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
        self.state.gate.release_source(self.ip);
    }
}

/// Runs the frontend's gate on a new client: `Ok` with the client's address (as declared by
/// a PROXY header, else `peer`) to use from now on, or `Err` when the client must be closed
/// (already counted and logged). The caller shuts the socket down either way it ends.
pub async fn admit<S: Conn>(
    fe: &FrontendSnap,
    client: &S,
    peer: SocketAddr,
) -> Result<(SocketAddr, Admission), ()> {
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
                return Err(());
            }
            Err(ProxyError::Bad(why)) => {
                gate.reject(name, Reason::Proxy, peer, why);
                return Err(());
            }
        }
    }
    let ip = canonical(addr.ip());
    if let Some(acl) = &t.acl {
        if !acl.admits(ip) {
            gate.reject(name, Reason::Acl, addr, "source address denied by the ACL");
            return Err(());
        }
    }
    let mut slot = None;
    if t.tracks_sources() {
        match gate.take_source(ip, t.max_connections_per_source, t.rate_per_source) {
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
                return Err(());
            }
        }
    }
    // Last: a client refused above never waits for, or holds, one of these.
    let mut frontend_slot = None;
    if let Some(max) = t.max_connections {
        match gate.frontend_slot(max, t.queue_timeout).await {
            Some(p) => frontend_slot = Some(p),
            None => {
                let detail = format!(
                    "frontend at max_connections ({max}) for queue_timeout ({})",
                    crate::config::format_duration(t.queue_timeout)
                );
                gate.reject(name, Reason::QueueTimeout, addr, &detail);
                return Err(());
            }
        }
    }
    Ok((
        addr,
        Admission {
            dst,
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
                // On timeout the wait is dropped; on io_uring its poll stays in flight until
                // the caller's shutdown completes it (see `relay::ops`), so nothing leaks.
                match tokio::time::timeout_at(deadline, client.wait(Interest::READABLE)).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn the_source_table_stays_bounded_and_empties_when_connections_close() {
        let g = GateState::default();
        let n = (SHARDS * SHARD_CAP + 5000) as u32;
        let mut tracked = Vec::new();
        for i in 0..n {
            if g.take_source(ip(i), Some(1), None) == Ok(true) {
                tracked.push(ip(i));
            }
        }
        assert!(g.tracked_sources() <= SHARDS * SHARD_CAP);
        assert_eq!(
            g.source_table_full_total.load(Ordering::Relaxed) as usize,
            n as usize - tracked.len()
        );
        // A tracked source is at its limit of one.
        assert_eq!(
            g.take_source(tracked[0], Some(1), None),
            Err(Reason::SourceConnections)
        );
        for a in tracked {
            g.release_source(a);
        }
        assert_eq!(g.tracked_sources(), 0, "idle sources were kept");
    }

    #[test]
    fn a_source_with_a_draining_bucket_is_kept_until_the_bucket_is_full_again() {
        let s = Source {
            open: 0,
            tokens: 1.0,
            at_ms: 10,
            full_at_ms: 500,
        };
        assert!(!s.idle(499));
        assert!(s.idle(500));
        let busy = Source { open: 1, ..s };
        assert!(!busy.idle(10_000));
    }

    #[test]
    fn the_rate_is_a_burst_of_count_then_count_per_period() {
        let g = GateState::default();
        let rate = Some(Rate {
            count: 3,
            per: Duration::from_secs(3600),
        });
        for _ in 0..3 {
            assert_eq!(g.take_source(ip(1), None, rate), Ok(false));
        }
        assert_eq!(g.take_source(ip(1), None, rate), Err(Reason::SourceRate));
        assert_eq!(g.take_source(ip(2), None, rate), Ok(false));
        // Kept (its bucket is not full), though it holds no connection.
        assert_eq!(g.tracked_sources(), 2);
    }
}
