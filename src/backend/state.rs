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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::per_worker::{self, PerWorker};
use crate::config::{Backend, ConfigDiff};

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
    /// Unique for the process's life: what the metrics exporter tells states apart by (an
    /// `Arc`'s address can be reused by the allocator for the next state with that name,
    /// which would make a re-added backend's series stall instead of continuing).
    pub serial: u64,
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
    /// The last kill's pace: when it started (ms on [`pace_clock_ms`]) and the window its
    /// closes are spread over (0: all at once). Written before `kill_epoch` is bumped.
    kill_from_ms: AtomicU64,
    kill_pace_ms: AtomicU64,
    /// A kill epoch withdrawn (the backend was added back while a paced drain ran): the
    /// connections it would still close are spared.
    spared_epoch: AtomicU64,
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
    /// Open connections ringlb closed through the kill switch (backend removed, marked down
    /// with shutdown-sessions, drain limit, stop), paced or not.
    pub shut_down_total: AtomicU64,
    /// Consecutive failed connects seen on real traffic (passive health).
    pub consecutive_errors: AtomicU32,
    /// Passive health asks the control thread to mark the backend down through this.
    pub passive_tripped: AtomicBool,
    /// Decaying estimate of the p99 of successful connect times, in nanoseconds (0: no sample
    /// yet). Written by [`BackendState::record_connect_time`] on a fraction of connects, read
    /// by every connect for its hedge delay (`worker::hedge`).
    connect_p99_ns: AtomicU64,
    /// Connects to this backend still pending at the hedge delay, for which a second connect
    /// to another backend was opened.
    pub hedges_total: AtomicU64,
    /// Of those, the ones the other backend's connect won (this one was then cancelled).
    pub hedges_won_total: AtomicU64,
    pub last_change: Mutex<Instant>,
    pub check: Mutex<CheckRecord>,
    /// Read only when a snapshot is built (control thread), never on a pick.
    runtime_weight: Mutex<Option<RuntimeWeight>>,
}

impl BackendState {
    pub fn new(frontend: &str, b: &Backend) -> BackendState {
        BackendState {
            serial: next_serial(),
            frontend: frontend.to_string(),
            name: b.name.clone(),
            address: b.address,
            up: AtomicBool::new(b.health.initial_up),
            draining: AtomicBool::new(false),
            admin: AtomicU8::new(0),
            ramp: AtomicU32::new(FULL_RAMP),
            active: CacheLine(AtomicU64::new(0)),
            counts: PerWorker::default(),
            slots: AtomicU64::new(0),
            connect_failures_total: AtomicU64::new(0),
            check_failures_total: AtomicU64::new(0),
            state_changes_total: AtomicU64::new(0),
            consecutive_errors: AtomicU32::new(0),
            kill_epoch: AtomicU64::new(0),
            kill_from_ms: AtomicU64::new(0),
            kill_pace_ms: AtomicU64::new(0),
            spared_epoch: AtomicU64::new(u64::MAX),
            shut_down_total: AtomicU64::new(0),
            passive_tripped: AtomicBool::new(false),
            connect_p99_ns: AtomicU64::new(0),
            hedges_total: AtomicU64::new(0),
            hedges_won_total: AtomicU64::new(0),
            last_change: Mutex::new(Instant::now()),
            check: Mutex::new(CheckRecord::default()),
            runtime_weight: Mutex::new(None),
        }
    }

    pub fn connections_total(&self) -> u64 {
        self.counts.sum(|c| &c.connections)
    }

    pub fn retries_total(&self) -> u64 {
        self.counts.sum(|c| &c.retries)
    }

    /// Connects to this backend in flight, across workers (hedges included).
    pub fn connecting(&self) -> u64 {
        self.counts.sum(|c| &c.connecting)
    }

    pub fn bytes_in_total(&self) -> u64 {
        self.counts.sum(|c| &c.bytes_in)
    }

    pub fn bytes_out_total(&self) -> u64 {
        self.counts.sum(|c| &c.bytes_out)
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

    /// Flips the kill switch for every connection open now, to be closed spread over `pace`
    /// (zero: at once); use `Shared::kill_connections`, which also wakes the workers.
    pub fn bump_kill_epoch(&self, pace: Duration) {
        self.kill_from_ms.store(pace_clock_ms(), Ordering::Relaxed);
        self.kill_pace_ms
            .store(duration_ms(pace), Ordering::Relaxed);
        self.kill_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Withdraws the last kill: connections it has not closed yet stay open.
    pub fn spare(&self) {
        self.spared_epoch
            .store(self.kill_epoch(), Ordering::Release);
    }

    /// Whether a connection that started at kill epoch `epoch` is to be closed by `now_ms`
    /// (on [`pace_clock_ms`]); `place` in [0, 1) is its place in a paced drain's window.
    pub fn kill_due(&self, epoch: u64, place: f64, now_ms: u64) -> bool {
        let current = self.kill_epoch();
        if current == epoch || self.spared_epoch.load(Ordering::Acquire) == current {
            return false;
        }
        let pace = self.kill_pace_ms.load(Ordering::Relaxed);
        let from = self.kill_from_ms.load(Ordering::Relaxed);
        pace == 0 || now_ms >= from + (pace as f64 * place) as u64
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

    /// A connect that a hedge beat, cancelled while still pending: its outcome is unknown,
    /// and it counts toward `error_limit` like a failure (see docs/health-checks.md), but not
    /// in `connect_failures_total`. Returns true when it trips `error_limit`.
    pub fn record_lost_race(&self, error_limit: u32) -> bool {
        self.hedges_won_total.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        error_limit > 0
            && n >= error_limit
            && self.is_up()
            && !self.passive_tripped.swap(true, Ordering::Relaxed)
    }

    /// The connect-time p99 estimate; `None` before the first sample.
    #[inline]
    pub fn connect_p99(&self) -> Option<Duration> {
        match self.connect_p99_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Feeds one successful connect's duration to the p99 estimate. `weight` is how many
    /// connects this sample stands for when it is not above the estimate: the caller feeds
    /// every connect slower than the estimate but only one in `weight` of the others, so most
    /// connects write nothing shared. See [`next_p99`].
    pub fn record_connect_time(&self, took: Duration, weight: u32) {
        let est = self.connect_p99_ns.load(Ordering::Relaxed);
        let next = next_p99(est, duration_ns(took), weight);
        // Load and store, not a read-modify-write: two workers racing lose one sample, which
        // an estimate does not miss, and the common case costs no locked instruction.
        if next != est {
            self.connect_p99_ns.store(next, Ordering::Relaxed);
        }
    }

    /// Whether a connect that took `took` was slower than the estimate (such a sample is
    /// always fed to it).
    #[inline]
    pub fn slower_than_p99(&self, took: Duration) -> bool {
        duration_ns(took) > self.connect_p99_ns.load(Ordering::Relaxed)
    }

    pub fn record_connect_success(&self) {
        if self.consecutive_errors.load(Ordering::Relaxed) != 0 {
            self.consecutive_errors.store(0, Ordering::Relaxed);
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds on a clock all threads share (since its first use), for paced drains.
pub fn pace_clock_ms() -> u64 {
    pace_ms_at(Instant::now())
}

/// [`pace_clock_ms`] at `at`.
pub fn pace_ms_at(at: Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    duration_ms(at.saturating_duration_since(origin))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// One step of a streaming quantile estimate (stochastic approximation, kept in the log
/// domain so it works the same at 50 us and at 50 ms): a sample above the estimate raises it
/// by 1/8, one at or below lowers it by 1/800 (times `weight`, the connects it stands for).
/// It settles where 1/8 of the mass above equals 1/800 of the mass below: about 1% of
/// samples above, the p99. Old samples fade on their own; a jump in connect times is
/// followed within a few dozen slow connects, a fall within a few hundred connects.
pub fn next_p99(est: u64, sample: u64, weight: u32) -> u64 {
    if est == 0 {
        return sample.max(1);
    }
    if sample > est {
        est.saturating_add((est / 8).max(1))
    } else {
        let down = (est / 800).saturating_mul(u64::from(weight.max(1)));
        est.saturating_sub(down).max(1)
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
    /// Connects to this backend in flight (a gauge: raised and lowered by the same worker).
    pub connecting: AtomicU64,
}

/// A frontend's counters that workers bump per connection (one copy per worker).
#[derive(Debug, Default)]
pub struct FrontendCounts {
    /// Open client connections (a gauge: raised and lowered by the same worker).
    pub active: AtomicU64,
    pub accepted: AtomicU64,
}

/// A number no other state of this process has had (see [`BackendState::serial`]).
pub fn next_serial() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Per-frontend counters, kept across reloads like backend state.
#[derive(Debug)]
pub struct FrontendState {
    pub counts: PerWorker<FrontendCounts>,
    /// See [`BackendState::serial`].
    pub serial: u64,
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
    /// Outcomes of the `on_ready` / `on_unready` commands.
    pub announce: Arc<crate::announce::AnnounceCounts>,
    /// Traffic controls: rejections by reason, the per-source table.
    pub gate: crate::worker::gate::GateState,
    /// What publishes rebuilt of this frontend's routing.
    pub rebuilds: RebuildCounts,
    /// Usable backends its Maglev tables had no slot for, as of the last rebuild.
    pub maglev_left_out: AtomicU64,
}

/// Counts of what publishes rebuilt for one frontend (`ringlb_frontend_rebuilds_total`): a
/// publish rebuilds only the frontends it concerns, and within one keeps every selector its
/// inputs did not change.
#[derive(Debug, Default)]
pub struct RebuildCounts {
    /// The frontend's part of the snapshot (its backend list and pools).
    pub frontend: AtomicU64,
    /// Round-robin schedules built anew (an unchanged one is kept, with its cursor).
    pub schedule: AtomicU64,
    /// Maglev tables built anew (one depends on the placeable backends, their names and
    /// weights, never on a slow-start ramp).
    pub maglev_table: AtomicU64,
}

impl FrontendState {
    pub fn active(&self) -> u64 {
        self.counts.sum(|c| &c.active)
    }

    pub fn accepted_total(&self) -> u64 {
        self.counts.sum(|c| &c.accepted)
    }
}

impl Default for FrontendState {
    fn default() -> FrontendState {
        FrontendState {
            counts: PerWorker::default(),
            serial: next_serial(),
            rejected_limit_total: AtomicU64::new(0),
            rejected_local_total: AtomicU64::new(0),
            rejected_no_backend_total: AtomicU64::new(0),
            disabled: AtomicBool::new(false),
            no_server_logged: AtomicBool::new(false),
            announce: Arc::default(),
            gate: Default::default(),
            rebuilds: RebuildCounts::default(),
            maglev_left_out: AtomicU64::new(0),
        }
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
                // A paced drain of its connections, if one runs, stops here.
                state.spare();
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

    /// Forgets the state of what `diff` removes: its removed backends are marked draining
    /// and returned (connections still open on them hold their own `Arc` and finish
    /// normally), its removed frontends' state goes. A later reload that adds such a backend
    /// back while anything still holds it adopts it ([`Registry::backend`]).
    pub fn apply(&mut self, diff: &ConfigDiff) -> Vec<Arc<BackendState>> {
        let mut removed = Vec::new();
        for (fe, b) in diff.backends_removed() {
            let key = (fe.to_string(), b.name.clone(), b.address);
            if let Some(state) = self.backends.remove(&key) {
                state.set_draining();
                removed.push(state);
            }
        }
        self.removed.retain(|_, w| w.strong_count() > 0);
        for state in &removed {
            let key = (state.frontend.clone(), state.name.clone(), state.address);
            self.removed.insert(key, Arc::downgrade(state));
        }
        for fe in diff.frontends_removed() {
            self.frontends.remove(fe);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `n` samples from `draw` with the data path's sampling (every slow one, one in
    /// eight of the others, weighted 8).
    fn run(mut est: u64, n: usize, mut draw: impl FnMut(usize) -> u64) -> u64 {
        for i in 0..n {
            let s = draw(i);
            if s > est || i % 8 == 0 {
                est = next_p99(est, s, 8);
            }
        }
        est
    }

    #[test]
    fn connect_p99_estimate_settles_near_the_99th_percentile() {
        // 98% of connects at 100 us and 2% at 5 ms: the p99 is 5 ms. 99.5% at 100 us and
        // 0.5% at 5 ms: the p99 is 100 us. The estimate must tell the two apart.
        let heavy = run(100_000, 200_000, |i| {
            if i % 50 == 0 {
                5_000_000
            } else {
                100_000
            }
        });
        assert!(
            heavy > 1_000_000,
            "2% slow: p99 is the slow value, got {heavy} ns"
        );
        let light = run(100_000, 200_000, |i| {
            if i % 200 == 0 {
                5_000_000
            } else {
                100_000
            }
        });
        assert!(
            light < 400_000,
            "0.5% slow: p99 is the fast value, got {light} ns"
        );
    }

    #[test]
    fn connect_p99_estimate_follows_a_jump_up_fast_and_a_fall_slowly() {
        let fast = run(0, 10_000, |_| 100_000);
        assert!((50_000..=200_000).contains(&fast), "{fast}");
        // Connects now take 10 ms: within 50 of them the estimate is there.
        let up = run(fast, 50, |_| 10_000_000);
        assert!(up >= 5_000_000, "{up}");
        // Back to 100 us: the estimate falls, over a few thousand connects.
        let down = run(up, 20_000, |_| 100_000);
        assert!(down < 1_000_000, "{down}");
    }

    #[test]
    fn connect_p99_estimate_never_reaches_zero_or_overflows() {
        assert_eq!(next_p99(0, 0, 8), 1);
        assert_eq!(next_p99(1, 0, 8), 1);
        assert_eq!(next_p99(u64::MAX - 1, u64::MAX, 8), u64::MAX);
    }
}
