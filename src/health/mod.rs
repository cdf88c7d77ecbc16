//! Health: active checks (HAProxy's Layer4 connect, or an application exchange in its Layer7
//! and Layer6 words), passive health from real traffic, slow start.
//!
//! Where it sits: [`HealthChecks`] lives in the control loop next to the `Server`. It runs one
//! tokio task per backend ([`checker`]) on a runtime and thread of their own ([`thread`]), so
//! nothing the control loop does delays a probe; the tasks send
//! [`HealthEvent`]s back to the loop, which calls [`HealthChecks::handle`] to flip the
//! backend's verdict, log HAProxy's line ([`report`]), republish the snapshot, close sessions
//! if `on_marked_down = "shutdown-sessions"`, and start a slow-start ramp. Passive mark-downs
//! from the data path arrive as `DataEvent::PassiveDown` and go to
//! [`HealthChecks::passive_down`].
//!
//! - [`machine`]: the pure counter state machine (rise, fall, interval choice).
//! - [`probe`]: the TCP connect check on `tokio::net`, and every check's result words.
//! - [`app`]: the application checks (`kind = "http"`, `"redis"`, ...) on that connection.
//! - [`https`]: TLS under an HTTP check (`tls = true`).
//! - [`proto`]: what each kind sends and how it judges the answer (pure, unit-tested).
//! - [`checker`]: the per-backend task and the spread.
//! - [`report`]: the log lines.
//! - [`thread`]: the `ringlb-health` thread the checkers run on.

pub mod app;
pub mod checker;
pub mod https;
pub mod machine;
pub mod probe;
pub mod proto;
pub mod report;
pub mod thread;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

pub use checker::HealthEvent;
pub use machine::Transition;

use crate::backend::{BackendRef, BackendState, FrontendSnap, Snapshot, FULL_RAMP};
use crate::config::{Balance, Health, OnMarkedDown};
use crate::server::Server;
use checker::{Controls, Jitter};
use probe::Checker;
use report::{Remaining, Subject, Why};

/// Backends are identified as the registry identifies them: a reload that keeps all three
/// keeps the checker (and its counter); a changed address is a different server.
type Key = (String, String, SocketAddr);

struct Task {
    state: Arc<BackendState>,
    settings: watch::Sender<Health>,
    forced_down: Arc<Notify>,
    handle: JoinHandle<()>,
}

/// The health checks of every configured backend, owned by the control loop.
pub struct HealthChecks {
    tasks: HashMap<Key, Task>,
    /// Slow-start ramps in progress, by backend.
    ramps: HashMap<Key, JoinHandle<()>>,
    events: mpsc::UnboundedSender<HealthEvent>,
    /// Where the checkers run. Declared last: dropped after the tasks were aborted.
    probes: thread::ProbeRuntime,
}

fn key_of(state: &BackendState) -> Key {
    (state.frontend.clone(), state.name.clone(), state.address)
}

impl HealthChecks {
    /// A manager with no checks yet; call [`HealthChecks::sync`] once the server started.
    /// The receiver is for the control loop to `select!` on.
    pub fn new() -> (HealthChecks, mpsc::UnboundedReceiver<HealthEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let me = HealthChecks {
            tasks: HashMap::new(),
            ramps: HashMap::new(),
            events,
            probes: thread::ProbeRuntime::start(),
        };
        (me, rx)
    }

    /// Starts checkers for new backends, retunes kept ones whose settings changed and stops
    /// those of removed backends. Call after start and after every applied reload.
    pub fn sync(&mut self, server: &mut Server) {
        let config = server.config.clone();
        let mut seen = HashSet::new();
        for f in &config.frontends {
            for b in &f.backends {
                let key: Key = (f.name.clone(), b.name.clone(), b.address);
                let state = server.registry.backend(&f.name, b);
                seen.insert(key.clone());
                match self.tasks.get(&key) {
                    Some(t) if Arc::ptr_eq(&t.state, &state) => {
                        t.settings.send_if_modified(|h| {
                            let changed = *h != b.health;
                            if changed {
                                *h = b.health.clone();
                            }
                            changed
                        });
                    }
                    _ => {
                        let task =
                            self.spawn(&key, state, b.health.clone(), server.shared.local.clone());
                        if let Some(old) = self.tasks.insert(key, task) {
                            old.handle.abort();
                        }
                    }
                }
            }
        }
        self.tasks.retain(|k, t| {
            let keep = seen.contains(k);
            if !keep {
                t.handle.abort();
            }
            keep
        });
        self.ramps.retain(|k, r| {
            let keep = seen.contains(k);
            if !keep {
                r.abort();
            }
            keep
        });
        // A reload may have added usable backends to a frontend that had none left.
        for fe in server.snapshot().frontends.values() {
            if fe.usable_counts() != (0, 0) {
                fe.state.no_server_logged.store(false, Ordering::Relaxed);
            }
        }
    }

    fn spawn(
        &self,
        key: &Key,
        state: Arc<BackendState>,
        health: Health,
        local: Arc<crate::worker::local::LocalErrors>,
    ) -> Task {
        let (settings, settings_rx) = watch::channel(health);
        let forced_down = Arc::new(Notify::new());
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let handle = self.probes.spawn(checker::run(
            Checker,
            state.clone(),
            Controls {
                settings: settings_rx,
                forced_down: forced_down.clone(),
                local,
            },
            self.events.clone(),
            Jitter::new(hasher.finish()),
        ));
        Task {
            state,
            settings,
            forced_down,
            handle,
        }
    }

    /// Applies what a checker or a ramp reported.
    pub fn handle(&mut self, server: &mut Server, ev: HealthEvent) {
        match ev {
            HealthEvent::Transition { state, to, outcome } => {
                let snap = server.snapshot();
                // Gone from the config (a reload raced the check): nothing to do.
                let Some((fe, b)) = find(&snap, &state) else {
                    return;
                };
                let up = to == Transition::Up;
                if state.is_up() == up {
                    // Passive health got there first.
                    return;
                }
                let slow_start = b.config.slow_start;
                let backup = b.config.backup;
                let on_marked_down = fe.config.on_marked_down;
                drop(snap);
                if up {
                    // Set the weight before the backend becomes selectable; a ramp cut short
                    // by an earlier mark-down must not linger once slow_start is off.
                    state.set_ramp(if slow_start.is_zero() {
                        FULL_RAMP
                    } else {
                        ramp_step(slow_start).1
                    });
                }
                state.set_up(up);
                server.publish_frontend(&state.frontend);
                let reason = outcome.result.to_string();
                let why = Why {
                    reason: &reason,
                    check_duration: Some(outcome.duration),
                };
                if up {
                    self.log_up(server, &state, backup, &why);
                    if !slow_start.is_zero() {
                        self.start_ramp(state, slow_start);
                    }
                } else {
                    self.marked_down(server, &state, backup, on_marked_down, &why);
                }
            }
            HealthEvent::RampStep { state } => {
                // Only round robin builds the ramp into its selector (a new schedule, from
                // the old cursor); least-connections reads it live, and Maglev ignores it.
                let rebuild = state.is_usable()
                    && find(&server.snapshot(), &state)
                        .is_some_and(|(fe, _)| fe.config.balance == Balance::RoundRobin);
                if rebuild {
                    server.publish_frontend(&state.frontend);
                }
            }
        }
    }

    /// The data path tripped `error_limit` on `backend` and already marked it down: log it,
    /// republish, and hand the backend to its checker, which brings it back after `rise`
    /// successful checks.
    pub fn passive_down(&mut self, server: &mut Server, backend: Arc<BackendState>, error: &str) {
        let key = key_of(&backend);
        if let Some(t) = self.tasks.get(&key) {
            if Arc::ptr_eq(&t.state, &backend) {
                t.forced_down.notify_one();
            }
        }
        server.publish_frontend(&backend.frontend);
        let snap = server.snapshot();
        let Some((fe, b)) = find(&snap, &backend) else {
            return;
        };
        let backup = b.config.backup;
        let on_marked_down = fe.config.on_marked_down;
        drop(snap);
        let reason =
            report::passive_reason(backend.consecutive_errors.load(Ordering::Relaxed), error);
        let why = Why {
            reason: &reason,
            check_duration: None,
        };
        self.marked_down(server, &backend, backup, on_marked_down, &why);
    }

    fn log_up(&mut self, server: &Server, state: &BackendState, backup: bool, why: &Why<'_>) {
        let snap = server.snapshot();
        let Some(fe) = snap.frontend(&state.frontend) else {
            return;
        };
        fe.state.no_server_logged.store(false, Ordering::Relaxed);
        crate::info!(
            "{}",
            report::up_line(&subject(state, backup), why, remaining(fe))
        );
    }

    /// Everything a mark-down does after the verdict flipped, whoever flipped it.
    fn marked_down(
        &mut self,
        server: &Server,
        state: &BackendState,
        backup: bool,
        on_marked_down: OnMarkedDown,
        why: &Why<'_>,
    ) {
        if let Some(r) = self.ramps.remove(&key_of(state)) {
            r.abort();
        }
        let snap = server.snapshot();
        let Some(fe) = snap.frontend(&state.frontend) else {
            return;
        };
        let left = remaining(fe);
        let sessions = state.active.load(Ordering::Relaxed);
        crate::warn!(
            "{}",
            report::down_line(&subject(state, backup), why, left, sessions)
        );
        // Even with no session counted yet: one whose connect is completing may count itself
        // in a moment, and a kill with nothing to kill costs nothing.
        if on_marked_down == OnMarkedDown::ShutdownSessions {
            let pace = fe.config.drain_pace.unwrap_or_default();
            if !pace.is_zero() && sessions > 0 {
                crate::info!(
                    "Server {}/{}: closing its {sessions} open connections over {} (drain_pace)",
                    state.frontend,
                    state.name,
                    crate::config::format_duration(pace)
                );
            }
            server.shared.kill_connections(state, pace);
        }
        if left.active + left.backup == 0
            && !fe.state.no_server_logged.swap(true, Ordering::Relaxed)
        {
            crate::error!("{}", report::no_server_line(&state.frontend));
        } else if let Some(pool) = emptied_pool(fe, state) {
            // SNI routing: this pool's clients have nowhere to go, though others do.
            crate::error!("{}", report::no_pool_server_line(&state.frontend, pool));
        }
    }

    /// Raises `state`'s weight from a small share to full over `slow_start`; each step
    /// rebuilds its frontend's round-robin schedule (least-connections reads the ramp live,
    /// Maglev ignores it: neither is rebuilt).
    fn start_ramp(&mut self, state: Arc<BackendState>, slow_start: Duration) {
        let key = key_of(&state);
        let events = self.events.clone();
        let (step, _) = ramp_step(slow_start);
        let handle = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(step).await;
                let permille = ramp_at(start.elapsed(), slow_start);
                state.set_ramp(permille);
                if events
                    .send(HealthEvent::RampStep {
                        state: state.clone(),
                    })
                    .is_err()
                    || permille >= FULL_RAMP
                {
                    return;
                }
            }
        });
        if let Some(old) = self.ramps.insert(key, handle) {
            old.abort();
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.handle.abort();
        }
        for r in self.ramps.values() {
            r.abort();
        }
    }
}

/// The ramp's tick (a twentieth of `slow_start`, 100 ms to 1 s) and its first value.
fn ramp_step(slow_start: Duration) -> (Duration, u32) {
    let step = (slow_start / 20).clamp(Duration::from_millis(100), Duration::from_secs(1));
    (step, ramp_at(step, slow_start))
}

/// Thousandths of full weight after `elapsed` of `slow_start`: linear, never zero.
fn ramp_at(elapsed: Duration, slow_start: Duration) -> u32 {
    let total = slow_start.as_millis().max(1);
    let permille = elapsed.as_millis() * 1000 / total;
    permille.clamp(1, u128::from(FULL_RAMP)) as u32
}

fn find<'a>(
    snap: &'a Snapshot,
    state: &Arc<BackendState>,
) -> Option<(&'a Arc<FrontendSnap>, &'a BackendRef)> {
    let fe = snap.frontend(&state.frontend)?;
    let b = fe.backends.iter().find(|b| Arc::ptr_eq(&b.state, state))?;
    Some((fe, b))
}

fn remaining(fe: &FrontendSnap) -> Remaining {
    let (active, backup) = fe.usable_counts();
    Remaining { active, backup }
}

fn subject(state: &BackendState, backup: bool) -> Subject<'_> {
    Subject {
        frontend: &state.frontend,
        backend: &state.name,
        backup,
    }
}

/// The name of `state`'s SNI routing pool if it has no usable backend left.
fn emptied_pool<'a>(fe: &'a FrontendSnap, state: &BackendState) -> Option<&'a str> {
    fe.routes.as_ref()?;
    let i = fe
        .backends
        .iter()
        .position(|b| std::ptr::eq(Arc::as_ptr(&b.state), state))?;
    let pool = fe.pools.get(*fe.pool_of.get(i)?)?;
    if pool
        .members
        .iter()
        .any(|&m| fe.backends[m].state.is_usable())
    {
        return None;
    }
    Some(pool.name.as_deref().unwrap_or("default"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_ramps_linearly_from_a_small_share_to_full() {
        let s = Duration::from_secs(30);
        let (step, first) = ramp_step(s);
        assert_eq!(step, Duration::from_secs(1));
        assert_eq!(first, 33);
        assert_eq!(ramp_at(Duration::from_secs(15), s), 500);
        assert_eq!(ramp_at(Duration::from_secs(31), s), 1000);
        assert_eq!(ramp_at(Duration::ZERO, s), 1);
        assert_eq!(
            ramp_step(Duration::from_secs(1)).0,
            Duration::from_millis(100)
        );
    }
}
