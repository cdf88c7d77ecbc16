//! Live state of backends and frontends: health verdict, counters, the kill switch.
//!
//! These live in `Arc`s keyed by (frontend, backend name, address) in the [`Registry`], so a
//! reload that keeps a backend keeps its counters and its health. The counters a connection
//! bumps (connections, retries, bytes, a frontend's accepted and open connections) are kept
//! per worker ([`super::per_worker`]) and summed when read; byte counts are added by each
//! worker's sweeper, at most once a second per connection, never per read. The metrics
//! exporter reads them on the control thread, so the data path never calls a `metrics` macro.
//! The cross-core writes left per connection are the backend's open-connection count
//! (least-connections needs one number all cores see) and the process-wide count that
//! `max_connections` caps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::per_worker::{self, PerWorker};
use crate::config::{Backend, Config};

/// Full weight in the slow-start ramp, in thousandths.
pub const FULL_RAMP: u32 = 1000;

/// What the last active check found, for /status and metrics.
#[derive(Debug, Clone, Default)]
pub struct CheckRecord {
    pub last_result: Option<String>,
    pub last_duration_ms: Option<u64>,
}

/// Keeps `T` on a cache line (two, against adjacent-line prefetch) of its own, so that writes
/// to it from every core do not slow down reads of its neighbours.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CacheLine<T>(pub T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Field order is deliberate (`repr(C)` keeps it): identity and the flags selection reads on
/// every pick come first and are written only on health changes; the open-connection count,
/// written twice per connection by every core, sits alone on its own line; the counters
/// written per connection (or flushed per second) follow, away from both.
#[derive(Debug)]
#[repr(C)]
pub struct BackendState {
    pub frontend: String,
    pub name: String,
    pub address: SocketAddr,
    /// The health verdict (active and passive checks). Selection skips a backend that is down.
    up: AtomicBool,
    /// Set by a reload that removed this backend: no new connections, existing ones drain.
    draining: AtomicBool,
    /// Slow-start ramp in thousandths of the configured weight ([`FULL_RAMP`] = full).
    ramp: AtomicU32,
    /// Incremented to ask every connection through this backend to close; each connection
    /// remembers the value it started with, and its worker's sweeper compares (see
    /// `worker::conns` and `Shared::kill_connections`, which also wakes the sweepers).
    kill_epoch: AtomicU64,
    /// Open connections through this backend, counted across all workers: least-connections
    /// needs one number that every core sees, or each core would pick the same "idle" backend.
    pub active: CacheLine<AtomicU64>,
    /// Connections, retries and bytes: one copy per worker (see [`per_worker`]).
    pub counts: PerWorker<BackendCounts>,
    /// Connection slots taken under the backend's `max_connections`, from the pick to the
    /// connection's end (`worker::queue`); untouched when the backend has no limit.
    pub slots: AtomicU64,
    pub connect_failures_total: AtomicU64,
    pub check_failures_total: AtomicU64,
    pub state_changes_total: AtomicU64,
    /// Consecutive failed connects seen on real traffic (passive health).
    pub consecutive_errors: AtomicU32,
    /// Passive health asks the control thread to mark the backend down through this.
    pub passive_tripped: AtomicBool,
    pub last_change: Mutex<Instant>,
    pub check: Mutex<CheckRecord>,
}

impl BackendState {
    pub fn new(frontend: &str, b: &Backend) -> BackendState {
        BackendState {
            frontend: frontend.to_string(),
            name: b.name.clone(),
            address: b.address,
            up: AtomicBool::new(b.health.initial_up),
            draining: AtomicBool::new(false),
            ramp: AtomicU32::new(FULL_RAMP),
            active: CacheLine(AtomicU64::new(0)),
            counts: PerWorker::default(),
            slots: AtomicU64::new(0),
            connect_failures_total: AtomicU64::new(0),
            check_failures_total: AtomicU64::new(0),
            state_changes_total: AtomicU64::new(0),
            consecutive_errors: AtomicU32::new(0),
            kill_epoch: AtomicU64::new(0),
            passive_tripped: AtomicBool::new(false),
            last_change: Mutex::new(Instant::now()),
            check: Mutex::new(CheckRecord::default()),
        }
    }

    pub fn connections_total(&self) -> u64 {
        self.counts.sum(|c| &c.connections)
    }

    pub fn retries_total(&self) -> u64 {
        self.counts.sum(|c| &c.retries)
    }

    pub fn bytes_in_total(&self) -> u64 {
        self.counts.sum(|c| &c.bytes_in)
    }

    pub fn bytes_out_total(&self) -> u64 {
        self.counts.sum(|c| &c.bytes_out)
    }

    /// Up and not draining: may receive new connections.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.up.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Sets the health verdict; returns true if it changed.
    pub fn set_up(&self, up: bool) -> bool {
        let changed = self.up.swap(up, Ordering::Relaxed) != up;
        if changed {
            self.state_changes_total.fetch_add(1, Ordering::Relaxed);
            *self.last_change.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            if up {
                self.consecutive_errors.store(0, Ordering::Relaxed);
                self.passive_tripped.store(false, Ordering::Relaxed);
            }
        }
        changed
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// A reload added the backend back while it was draining: it takes connections again.
    pub fn clear_draining(&self) {
        self.draining.store(false, Ordering::Relaxed);
    }

    #[inline]
    pub fn ramp(&self) -> u32 {
        self.ramp.load(Ordering::Relaxed)
    }

    pub fn set_ramp(&self, permille: u32) {
        self.ramp
            .store(permille.clamp(1, FULL_RAMP), Ordering::Relaxed);
    }

    /// The weight selection uses now: configured weight scaled by the slow-start ramp, in
    /// thousandths (so a weight of 1 at 10% ramp is still a positive number).
    #[inline]
    pub fn effective_weight_milli(&self, weight: u32) -> u64 {
        u64::from(weight) * u64::from(self.ramp())
    }

    pub fn kill_epoch(&self) -> u64 {
        self.kill_epoch.load(Ordering::Acquire)
    }

    /// Flips the kill switch; use `Shared::kill_connections`, which also wakes the workers.
    pub fn bump_kill_epoch(&self) {
        self.kill_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Records a failed connect from real traffic; returns true when it trips `error_limit`.
    pub fn record_connect_failure(&self, error_limit: u32) -> bool {
        self.connect_failures_total.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        error_limit > 0
            && n >= error_limit
            && self.is_up()
            && !self.passive_tripped.swap(true, Ordering::Relaxed)
    }

    pub fn record_connect_success(&self) {
        if self.consecutive_errors.load(Ordering::Relaxed) != 0 {
            self.consecutive_errors.store(0, Ordering::Relaxed);
        }
    }
}

/// Counts one open connection on a backend for as long as it lives.
pub struct ActiveGuard {
    state: Arc<BackendState>,
}

impl ActiveGuard {
    pub fn new(state: Arc<BackendState>) -> ActiveGuard {
        state.active.fetch_add(1, Ordering::Relaxed);
        per_worker::bump(&state.counts.local().connections);
        ActiveGuard { state }
    }

    pub fn state(&self) -> &Arc<BackendState> {
        &self.state
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend's counters that workers bump per connection (one copy per worker).
#[derive(Debug, Default)]
pub struct BackendCounts {
    pub connections: AtomicU64,
    /// Connects to this backend that failed and were retried on another backend.
    pub retries: AtomicU64,
    /// Bytes from clients to this backend / from this backend to clients.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// A frontend's counters that workers bump per connection (one copy per worker).
#[derive(Debug, Default)]
pub struct FrontendCounts {
    /// Open client connections (a gauge: raised and lowered by the same worker).
    pub active: AtomicU64,
    pub accepted: AtomicU64,
}

/// Per-frontend counters, kept across reloads like backend state.
#[derive(Debug, Default)]
pub struct FrontendState {
    pub counts: PerWorker<FrontendCounts>,
    /// Closed at once because `max_connections` was reached (no longer happens: at the cap
    /// the workers stop accepting; kept so the series stays continuous).
    pub rejected_limit_total: AtomicU64,
    /// Closed because this host ran out of fds or memory for the backend connect.
    pub rejected_local_total: AtomicU64,
    /// No backend could be reached (all down, or every attempt failed).
    pub rejected_no_backend_total: AtomicU64,
    /// Set once the "has no server available" line was logged, cleared when one returns.
    pub no_server_logged: AtomicBool,
    /// Outcomes of the `on_ready` / `on_unready` commands.
    pub announce: Arc<crate::announce::AnnounceCounts>,
    /// Traffic controls: rejections by reason, the per-source table.
    pub gate: crate::worker::gate::GateState,
}

impl FrontendState {
    pub fn active(&self) -> u64 {
        self.counts.sum(|c| &c.active)
    }

    pub fn accepted_total(&self) -> u64 {
        self.counts.sum(|c| &c.accepted)
    }
}

type BackendKey = (String, String, SocketAddr);

/// All live state, owned by the control thread.
#[derive(Default)]
pub struct Registry {
    backends: HashMap<BackendKey, Arc<BackendState>>,
    frontends: HashMap<String, Arc<FrontendState>>,
    /// Backends removed by a reload, while anything (an open connection, the drain limit)
    /// still holds them. A reload that adds one back adopts it, so its open connections are
    /// not closed by the drain limit and its counters and health carry on.
    removed: HashMap<BackendKey, Weak<BackendState>>,
    /// The connection logs' sinks, shared by the frontends (and snapshots) that name them.
    pub log_sinks: crate::connlog::Sinks,
}

impl Registry {
    pub fn backend(&mut self, frontend: &str, b: &Backend) -> Arc<BackendState> {
        let key = (frontend.to_string(), b.name.clone(), b.address);
        if let Some(state) = self.backends.get(&key) {
            return state.clone();
        }
        let state = match self.removed.remove(&key).and_then(|w| w.upgrade()) {
            Some(state) => {
                state.clear_draining();
                state
            }
            None => Arc::new(BackendState::new(frontend, b)),
        };
        self.backends.insert(key, state.clone());
        state
    }

    pub fn frontend(&mut self, name: &str) -> Arc<FrontendState> {
        self.frontends.entry(name.to_string()).or_default().clone()
    }

    /// Forgets state that `config` no longer names, marking dropped backends as draining.
    /// Connections still open on them hold their own `Arc` and finish normally.
    pub fn retain(&mut self, config: &Config) -> Vec<Arc<BackendState>> {
        let mut removed = Vec::new();
        self.backends.retain(|(fe, name, addr), state| {
            let keep = config.frontend(fe).is_some_and(|f| {
                f.backends
                    .iter()
                    .any(|b| &b.name == name && &b.address == addr)
            });
            if !keep {
                state.set_draining();
                removed.push(state.clone());
            }
            keep
        });
        self.removed.retain(|_, w| w.strong_count() > 0);
        for state in &removed {
            let key = (state.frontend.clone(), state.name.clone(), state.address);
            self.removed.insert(key, Arc::downgrade(state));
        }
        self.frontends
            .retain(|name, _| config.frontend(name).is_some());
        removed
    }

    pub fn backends(&self) -> impl Iterator<Item = &Arc<BackendState>> {
        self.backends.values()
    }
}
