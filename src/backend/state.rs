//! Live state of backends and frontends: health verdict, counters, the kill switch.
//!
//! These live in `Arc`s keyed by (frontend, backend name, address) in the [`Registry`], so a
//! reload that keeps a backend keeps its counters and its health. Counters are atomics touched
//! once per connection (byte counts are added by each worker's sweeper, at most once a second
//! per connection, never per read); the metrics exporter reads them on the control thread, so the data
//! path never calls a `metrics` macro.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use crate::config::{Backend, Config};

/// Full weight in the slow-start ramp, in thousandths.
pub const FULL_RAMP: u32 = 1000;

/// What an operator set through the runtime API (HAProxy's READY / DRAIN / MAINT). Kept in
/// the backend's live state, so a reload that keeps the backend keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminMode {
    /// Takes connections as its health allows.
    #[default]
    Ready,
    /// No new connections; established ones finish. Health checks go on.
    Drain,
    /// No new connections and no health checks.
    Maint,
}

impl AdminMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminMode::Ready => "ready",
            AdminMode::Drain => "drain",
            AdminMode::Maint => "maint",
        }
    }

    pub fn parse(s: &str) -> Option<AdminMode> {
        match s {
            "ready" => Some(AdminMode::Ready),
            "drain" => Some(AdminMode::Drain),
            "maint" => Some(AdminMode::Maint),
            _ => None,
        }
    }

    /// The value of the `ringlb_backend_admin_state` gauge.
    pub fn gauge(self) -> f64 {
        match self {
            AdminMode::Ready => 0.0,
            AdminMode::Drain => 1.0,
            AdminMode::Maint => 2.0,
        }
    }

    fn from_u8(v: u8) -> AdminMode {
        match v {
            1 => AdminMode::Drain,
            2 => AdminMode::Maint,
            _ => AdminMode::Ready,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            AdminMode::Ready => 0,
            AdminMode::Drain => 1,
            AdminMode::Maint => 2,
        }
    }
}

/// A weight set through the runtime API, and the configured weight it replaced: a reload
/// that changes the configured weight is the newer intent and drops the runtime one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeWeight {
    pub weight: u32,
    pub configured: u32,
}

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
    /// [`AdminMode`] as a byte: anything but ready takes no new connections.
    admin: AtomicU8,
    /// Slow-start ramp in thousandths of the configured weight ([`FULL_RAMP`] = full).
    ramp: AtomicU32,
    /// Incremented to ask every connection through this backend to close; each connection
    /// remembers the value it started with, and its worker's sweeper compares (see
    /// `worker::conns` and `Shared::kill_connections`, which also wakes the sweepers).
    kill_epoch: AtomicU64,
    /// Open connections through this backend, counted across all workers: least-connections
    /// needs one number that every core sees, or each core would pick the same "idle" backend.
    pub active: CacheLine<AtomicU64>,
    pub connections_total: AtomicU64,
    pub connect_failures_total: AtomicU64,
    /// Connects to this backend that failed and were retried on another backend.
    pub retries_total: AtomicU64,
    /// Bytes from clients to this backend / from this backend to clients.
    pub bytes_in_total: AtomicU64,
    pub bytes_out_total: AtomicU64,
    pub check_failures_total: AtomicU64,
    pub state_changes_total: AtomicU64,
    /// Consecutive failed connects seen on real traffic (passive health).
    pub consecutive_errors: AtomicU32,
    /// Passive health asks the control thread to mark the backend down through this.
    pub passive_tripped: AtomicBool,
    pub last_change: Mutex<Instant>,
    pub check: Mutex<CheckRecord>,
    /// Read only when a snapshot is built (control thread), never on a pick.
    runtime_weight: Mutex<Option<RuntimeWeight>>,
}

impl BackendState {
    pub fn new(frontend: &str, b: &Backend) -> BackendState {
        BackendState {
            frontend: frontend.to_string(),
            name: b.name.clone(),
            address: b.address,
            up: AtomicBool::new(b.health.initial_up),
            draining: AtomicBool::new(false),
            admin: AtomicU8::new(0),
            ramp: AtomicU32::new(FULL_RAMP),
            active: CacheLine(AtomicU64::new(0)),
            connections_total: AtomicU64::new(0),
            connect_failures_total: AtomicU64::new(0),
            retries_total: AtomicU64::new(0),
            bytes_in_total: AtomicU64::new(0),
            bytes_out_total: AtomicU64::new(0),
            check_failures_total: AtomicU64::new(0),
            state_changes_total: AtomicU64::new(0),
            consecutive_errors: AtomicU32::new(0),
            kill_epoch: AtomicU64::new(0),
            passive_tripped: AtomicBool::new(false),
            last_change: Mutex::new(Instant::now()),
            check: Mutex::new(CheckRecord::default()),
            runtime_weight: Mutex::new(None),
        }
    }

    /// Up, not removed by a reload and ready: may receive new connections.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.up.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.admin.load(Ordering::Relaxed) == 0
    }

    /// Up and not removed by a reload, whatever the operator set: Maglev keeps such a backend
    /// in its table while it is drained or in maintenance, so that its clients walk on to the
    /// next entry and come back to it when it is ready, and nobody else's placement moves.
    pub fn is_placeable(&self) -> bool {
        self.up.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    pub fn admin_mode(&self) -> AdminMode {
        AdminMode::from_u8(self.admin.load(Ordering::Relaxed))
    }

    /// Sets the operator's mode; returns the previous one. Counts as a state change (the
    /// status page's "since last change").
    pub fn set_admin_mode(&self, mode: AdminMode) -> AdminMode {
        let old = AdminMode::from_u8(self.admin.swap(mode.to_u8(), Ordering::Relaxed));
        if old != mode {
            *self.last_change.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        old
    }

    /// The runtime weight, if one is set over `configured`. One set over another configured
    /// weight (a reload changed it since) is dropped and `None` returned.
    pub fn runtime_weight(&self, configured: u32) -> Option<u32> {
        let mut w = self
            .runtime_weight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *w {
            Some(rw) if rw.configured == configured => Some(rw.weight),
            Some(rw) => {
                crate::info!(
                    "Server {}/{}: configured weight changed from {} to {configured}; \
                     runtime weight {} dropped",
                    self.frontend,
                    self.name,
                    rw.configured,
                    rw.weight
                );
                *w = None;
                None
            }
            None => None,
        }
    }

    /// The runtime weight as set, without checking it against the configured weight.
    pub fn peek_runtime_weight(&self) -> Option<RuntimeWeight> {
        *self
            .runtime_weight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or with `None` clears) the runtime weight.
    pub fn set_runtime_weight(&self, w: Option<RuntimeWeight>) {
        *self
            .runtime_weight
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = w;
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
        state.connections_total.fetch_add(1, Ordering::Relaxed);
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

/// Per-frontend counters, kept across reloads like backend state.
#[derive(Debug, Default)]
pub struct FrontendState {
    pub active: AtomicU64,
    pub accepted_total: AtomicU64,
    /// Closed at once because `max_connections` was reached (no longer happens: at the cap
    /// the workers stop accepting; kept so the series stays continuous).
    pub rejected_limit_total: AtomicU64,
    /// Closed because this host ran out of fds or memory for the backend connect.
    pub rejected_local_total: AtomicU64,
    /// No backend could be reached (all down, or every attempt failed).
    pub rejected_no_backend_total: AtomicU64,
    /// Set through the runtime API: the frontend's listeners are closed until enabled again.
    pub disabled: AtomicBool,
    /// Set once the "has no server available" line was logged, cleared when one returns.
    pub no_server_logged: AtomicBool,
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

    /// The live state of a configured backend, by frontend and backend name.
    pub fn find_backend(&self, frontend: &str, name: &str) -> Option<&Arc<BackendState>> {
        self.backends
            .iter()
            .find(|((f, n, _), _)| f == frontend && n == name)
            .map(|(_, s)| s)
    }

    /// The live state of a frontend, if configured.
    pub fn find_frontend(&self, name: &str) -> Option<&Arc<FrontendState>> {
        self.frontends.get(name)
    }

    pub fn frontends(&self) -> impl Iterator<Item = (&String, &Arc<FrontendState>)> {
        self.frontends.iter()
    }

    /// Whether the runtime API disabled `frontend`.
    pub fn frontend_disabled(&self, frontend: &str) -> bool {
        self.frontends
            .get(frontend)
            .is_some_and(|f| f.disabled.load(Ordering::Relaxed))
    }
}
