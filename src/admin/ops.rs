//! What the control loop tells the admin side that the snapshot does not carry: reload
//! results, the addresses actually bound, backends that a reload removed and that are still
//! draining, and whether ringlb is stopping.
//!
//! Written only by the control loop (after start, after each reload, at stop); read by the
//! admin handlers and the metrics upkeep on the same thread. Counters are atomics and the
//! lists sit behind short-held `Mutex`es, so nothing here is ever held across an `.await`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{BackendState, Snapshot};
use crate::config::Backend;
use crate::server::ReloadOutcome;

/// A backend that a reload removed while it still had connections open.
#[derive(Clone)]
pub struct Draining {
    /// Its configuration before the reload (weight, backup), for the status page.
    pub config: Backend,
    pub state: Arc<BackendState>,
}

pub struct OpsState {
    pub started: SystemTime,
    pub started_at: Instant,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// 1 for the configuration ringlb started with, +1 for each reload that changed something.
    pub config_generation: AtomicU64,
    /// Unix time in milliseconds of the last successful reload (or of the start).
    pub last_reload_ok_ms: AtomicU64,
    /// Set when the graceful stop begins: /healthz then answers 503.
    pub stopping: AtomicBool,
    /// Admin connections closed to make room for newer ones (see `admin::conns`).
    pub admin_evicted: AtomicU64,
    /// Runtime API writes by result.
    pub admin_writes: super::api::WriteCounts,
    /// Binary upgrades (`crate::upgrade`): `upgrades_ok` is 1 in a process that an upgrade
    /// started and that took over; `upgrades_failed` counts this process's upgrades whose new
    /// process failed (it went on serving).
    pub upgrades_ok: AtomicU64,
    pub upgrades_failed: AtomicU64,
    /// The pid of the process an upgrade handed over to, once it serves (0 before).
    pub upgraded_to: std::sync::atomic::AtomicU32,
    last_reload_error: Mutex<Option<String>>,
    listeners: Mutex<Vec<(String, SocketAddr)>>,
    draining: Mutex<Vec<Draining>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl OpsState {
    pub fn new(listeners: Vec<(String, SocketAddr)>) -> OpsState {
        let now = SystemTime::now();
        OpsState {
            started: now,
            started_at: Instant::now(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            config_generation: AtomicU64::new(1),
            last_reload_ok_ms: AtomicU64::new(unix_ms(now)),
            stopping: AtomicBool::new(false),
            admin_evicted: AtomicU64::new(0),
            admin_writes: Default::default(),
            upgrades_ok: AtomicU64::new(0),
            upgrades_failed: AtomicU64::new(0),
            upgraded_to: std::sync::atomic::AtomicU32::new(0),
            last_reload_error: Mutex::new(None),
            listeners: Mutex::new(sorted(listeners)),
            draining: Mutex::new(Vec::new()),
        }
    }

    /// Records a reload: its result, the listeners now bound, and the backends that `before`
    /// had and `after` no longer has (they drain; the status page shows them as draining).
    pub fn record_reload(
        &self,
        outcome: &ReloadOutcome,
        before: &Snapshot,
        after: &Snapshot,
        listeners: Vec<(String, SocketAddr)>,
    ) {
        match outcome {
            ReloadOutcome::Failed(why) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                *lock(&self.last_reload_error) = Some(why.clone());
                return;
            }
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Applied(_) => {
                self.config_generation.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.last_reload_ok_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        *lock(&self.last_reload_error) = None;
        *lock(&self.listeners) = sorted(listeners);
        self.record_removed(before, after);
    }

    /// Records the backends that `before` had and `after` no longer has, after a reload or a
    /// discovery update: they drain, and `/status` and the metrics show them until done.
    pub fn record_removed(&self, before: &Snapshot, after: &Snapshot) {
        let kept: HashSet<*const BackendState> = after
            .frontends
            .values()
            .flat_map(|f| f.backends.iter().map(|b| Arc::as_ptr(&b.state)))
            .collect();
        let mut draining = lock(&self.draining);
        for f in before.frontends.values() {
            for b in &f.backends {
                if !kept.contains(&Arc::as_ptr(&b.state)) {
                    draining.push(Draining {
                        config: b.config.clone(),
                        state: b.state.clone(),
                    });
                }
            }
        }
    }

    /// The listeners now bound, after the runtime API disabled or enabled a frontend.
    pub fn record_listeners(&self, listeners: Vec<(String, SocketAddr)>) {
        *lock(&self.listeners) = sorted(listeners);
    }

    pub fn last_reload_error(&self) -> Option<String> {
        lock(&self.last_reload_error).clone()
    }

    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.listeners).clone()
    }

    /// Removed backends that still have connections open. Forgets those that have none left.
    pub fn draining(&self) -> Vec<Draining> {
        let mut d = lock(&self.draining);
        // Gone once closed, or once a later reload added the backend back.
        d.retain(|b| b.state.is_draining() && b.state.active.load(Ordering::Relaxed) > 0);
        d.clone()
    }

    pub fn last_reload_ok_unix_seconds(&self) -> f64 {
        self.last_reload_ok_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub fn started_unix_seconds(&self) -> f64 {
        unix_ms(self.started) as f64 / 1000.0
    }
}

fn sorted(mut v: Vec<(String, SocketAddr)>) -> Vec<(String, SocketAddr)> {
    v.sort();
    v
}
