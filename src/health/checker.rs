//! One backend's checker: a tokio task that probes, feeds the [`Machine`] and reports
//! transitions to the control loop.
//!
//! The task never touches the backend's `up` flag itself: it sends a [`HealthEvent`] and the
//! control loop (which owns the `Server`) applies it, logs it and republishes the snapshot, so
//! the verdict, the log line and the published selectors change in one place, in one order.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch, Notify};

use super::machine::{Machine, Transition};
use super::probe::{CheckOutcome, CheckResult, HealthCheck};
use crate::backend::BackendState;
use crate::config::Health;
use crate::worker::local::{LocalErrors, Op};

/// What checkers (and slow-start ramps) tell the control loop.
#[derive(Debug)]
pub enum HealthEvent {
    /// The active check changed its verdict on `state`.
    Transition {
        state: Arc<BackendState>,
        to: Transition,
        outcome: CheckOutcome,
    },
    /// A slow-start step changed `state`'s ramp: republish so round robin sees the weight.
    RampStep { state: Arc<BackendState> },
}

/// The inputs a checker listens to besides its timer.
pub struct Controls {
    /// New settings after a reload.
    pub settings: watch::Receiver<Health>,
    /// Passive health marked the backend down: put the machine in the down state.
    /// `notify_one` keeps a permit, so a trip during a probe is not lost.
    pub forced_down: Arc<Notify>,
    /// Where a probe that failed for a reason of this host (out of fds) is counted instead of
    /// against the backend.
    pub local: Arc<LocalErrors>,
}

/// How soon a probe that hit a local error (this host out of fds) is tried again.
const LOCAL_RETRY: Duration = Duration::from_millis(500);

/// Runs until the control loop drops its end of `events` or aborts the task.
pub async fn run<C: HealthCheck>(
    check: C,
    state: Arc<BackendState>,
    mut controls: Controls,
    events: mpsc::UnboundedSender<HealthEvent>,
    mut jitter: Jitter,
) {
    let addr: SocketAddr = state.address;
    let mut h = controls.settings.borrow_and_update().clone();
    let mut machine = Machine::new(h.rise, h.fall, state.is_up());
    // Spread the first probes of many backends over one interval instead of firing together.
    let mut wait = jitter.below(h.interval);
    loop {
        // With `check = false` nothing is probed while the backend is up; probing starts
        // only to bring back a backend that passive health took out.
        let idle = !h.check && machine.is_up();
        let due = tokio::time::Instant::now() + wait;
        tokio::select! {
            _ = tokio::time::sleep_until(due), if !idle => {}
            _ = controls.forced_down.notified() => {
                machine.force_down();
                wait = jitter.spread(machine.next_interval(&h), h.spread_percent);
                continue;
            }
            changed = controls.settings.changed() => {
                if changed.is_err() {
                    return;
                }
                h = controls.settings.borrow_and_update().clone();
                machine.retune(h.rise, h.fall);
                // The probe already due stays due: restarting the wait on every reload would
                // let a run of reloads postpone a pending transition indefinitely.
                let retuned = jitter.spread(machine.next_interval(&h), h.spread_percent);
                wait = retuned.min(due.saturating_duration_since(tokio::time::Instant::now()));
                continue;
            }
        }
        // In maintenance (runtime API) checks are paused, as HAProxy's MAINT pauses them; the
        // verdict stays as it was and probing resumes within an interval of `ready`.
        if state.admin_mode() == crate::backend::AdminMode::Maint {
            wait = h.interval;
            continue;
        }
        let outcome = check.check(addr, &h).await;
        if let CheckResult::LocalError(code) = outcome.result {
            // Says nothing about the backend: neither a pass nor a failure. Probe again soon.
            let e = std::io::Error::from_raw_os_error(code);
            controls.local.record(Op::Probe, &e, || {
                format!("health check of {}/{}", state.frontend, state.name)
            });
            wait = h.interval.min(LOCAL_RETRY);
            continue;
        }
        record(&state, &outcome);
        if let Some(to) = machine.observe(outcome.result.passed()) {
            let ev = HealthEvent::Transition {
                state: state.clone(),
                to,
                outcome,
            };
            if events.send(ev).is_err() {
                return;
            }
        }
        wait = jitter.spread(machine.next_interval(&h), h.spread_percent);
    }
}

/// Keeps the last result for /status and counts failures for metrics.
fn record(state: &BackendState, outcome: &CheckOutcome) {
    if !outcome.result.passed() {
        state.check_failures_total.fetch_add(1, Ordering::Relaxed);
    }
    let mut rec = state.check.lock().unwrap_or_else(|e| e.into_inner());
    rec.last_result = Some(outcome.result.to_string());
    rec.last_duration_ms = Some(outcome.duration.as_millis() as u64);
}

/// A small xorshift64* generator for check spread. Spread needs no statistical quality and no
/// reproducibility, only that backends (and ringlb nodes) do not probe in lockstep; ten lines
/// here beat a new dependency in the binary.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock and `salt` (a hash of the backend's key).
    pub fn new(salt: u64) -> Jitter {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Jitter::from_seed(now ^ salt.rotate_left(17))
    }

    pub fn from_seed(seed: u64) -> Jitter {
        Jitter(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform duration in `[0, d)`.
    pub fn below(&mut self, d: Duration) -> Duration {
        let n = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        if n == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % n)
    }

    /// `d` varied at random by up to `percent` either way (HAProxy's spread-checks).
    pub fn spread(&mut self, d: Duration, percent: u32) -> Duration {
        let span = d * percent.min(100) / 100;
        d - span + self.below(span * 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;
    use crate::health::probe::CheckResult;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// A check that answers from a script and records when it was asked.
    #[derive(Clone, Default)]
    struct Scripted {
        script: Arc<Mutex<VecDeque<bool>>>,
        asked: Arc<Mutex<Vec<Instant>>>,
    }

    impl Scripted {
        fn new(script: &str) -> Scripted {
            let s = Scripted::default();
            s.script
                .lock()
                .unwrap()
                .extend(script.chars().map(|c| c == '+'));
            s
        }

        fn asked(&self) -> Vec<Instant> {
            self.asked.lock().unwrap().clone()
        }
    }

    impl HealthCheck for Scripted {
        async fn check(&self, _addr: SocketAddr, _: &Health) -> CheckOutcome {
            self.asked.lock().unwrap().push(Instant::now());
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(true) => CheckOutcome {
                    result: CheckResult::Passed,
                    duration: Duration::ZERO,
                },
                Some(false) => CheckOutcome {
                    result: CheckResult::ConnectionProblem("Connection refused".into()),
                    duration: Duration::ZERO,
                },
                // Script over: hang, so no more results arrive.
                None => std::future::pending().await,
            }
        }
    }

    fn health(check: bool) -> Health {
        crate::health::machine::test_health(check)
    }

    struct Harness {
        check: Scripted,
        state: Arc<BackendState>,
        forced_down: Arc<Notify>,
        settings: watch::Sender<Health>,
        events: mpsc::UnboundedReceiver<HealthEvent>,
        task: tokio::task::JoinHandle<()>,
        started: Instant,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn start(script: &str, h: Health) -> Harness {
        let backend = Backend {
            name: "b1".into(),
            address: "127.0.0.1:9".parse().unwrap(),
            weight: 1,
            backup: false,
            slow_start: Duration::ZERO,
            send_proxy: None,
            max_connections: None,
            pool: None,
            health: h.clone(),
        };
        let state = Arc::new(BackendState::new("web", &backend));
        let check = Scripted::new(script);
        let (settings_tx, settings) = watch::channel(h);
        let forced_down = Arc::new(Notify::new());
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            check.clone(),
            state.clone(),
            Controls {
                settings,
                forced_down: forced_down.clone(),
                local: Arc::default(),
            },
            tx,
            Jitter::from_seed(7),
        ));
        Harness {
            check,
            state,
            forced_down,
            settings: settings_tx,
            events,
            task,
            started: Instant::now(),
        }
    }

    async fn next_transition(h: &mut Harness) -> Transition {
        // Paused time jumps ahead when idle, so a missing event fails here instead of hanging.
        match tokio::time::timeout(Duration::from_secs(3600), h.events.recv()).await {
            Ok(Some(HealthEvent::Transition { to, .. })) => to,
            other => panic!("expected a transition, got {other:?}"),
        }
    }

    /// Gaps between consecutive checks.
    fn gaps(asked: &[Instant]) -> Vec<Duration> {
        asked.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn checks_follow_interval_fast_interval_and_down_interval_as_the_state_changes() {
        let mut h = start("+---++", health(true));
        assert_eq!(next_transition(&mut h).await, Transition::Down);
        assert_eq!(next_transition(&mut h).await, Transition::Up);
        let asked = h.check.asked();
        assert!(
            asked[0] - h.started < Duration::from_secs(2),
            "first check within one interval"
        );
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            gaps(&asked[..6]),
            vec![
                ms(2000),  // settled up: interval
                ms(500),   // falling: fast_interval
                ms(500),   // falling
                ms(10000), // down: down_interval
                ms(500),   // rising: fast_interval
            ]
        );
        // Settled up again: the next check waits a whole interval.
        tokio::time::sleep(ms(2500)).await;
        assert_eq!(h.check.asked().len(), 7);
        assert_eq!(h.check.asked()[6] - asked[5], ms(2000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_while_rising_needs_rise_fresh_successes() {
        let mut down = health(true);
        down.initial_up = false;
        let mut h = start("+-++", down);
        assert!(!h.state.is_up());
        assert_eq!(next_transition(&mut h).await, Transition::Up);
        assert_eq!(h.check.asked().len(), 4);
        assert_eq!(h.state.check_failures_total.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn passive_mark_down_switches_to_down_interval_and_rise_checks_bring_it_back() {
        let mut h = start("++++++++++", health(true));
        // Let the first check settle the machine at the top.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = h.check.asked().len();
        assert!(before >= 1);
        h.forced_down.notify_one();
        assert_eq!(next_transition(&mut h).await, Transition::Up);
        let asked = h.check.asked();
        // Two checks after the trip (rise = 2), the first one a down_interval later.
        assert_eq!(asked.len(), before + 2);
        assert!(asked[before] - asked[before - 1] >= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn with_check_off_nothing_is_probed_until_passive_health_marks_it_down() {
        let mut h = start("++", health(false));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(h.check.asked().is_empty());
        h.forced_down.notify_one();
        assert_eq!(next_transition(&mut h).await, Transition::Up);
        assert_eq!(h.check.asked().len(), 2);
        // Back up: probing stops again.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.check.asked().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn reloads_that_retune_a_backend_do_not_postpone_its_pending_transition() {
        // A dead backend (every check fails) while reloads change its health settings every
        // 300 ms, more often than its 2 s interval: the checks must still run and mark it
        // down, not restart their wait at every reload.
        let mut h = start("---------------", health(true));
        let settings = h.settings.clone();
        let storm = tokio::spawn(async move {
            for i in 0..200u32 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                settings.send_modify(|s| s.spread_percent = i % 2);
            }
        });
        assert_eq!(next_transition(&mut h).await, Transition::Down);
        assert!(
            h.started.elapsed() < Duration::from_secs(10),
            "marked down only after {:?}",
            h.started.elapsed()
        );
        storm.abort();
    }

    #[test]
    fn spread_stays_within_its_percentage_and_is_not_constant() {
        let mut j = Jitter::from_seed(42);
        let d = Duration::from_secs(2);
        let v: Vec<Duration> = (0..1000).map(|_| j.spread(d, 10)).collect();
        assert!(v
            .iter()
            .all(|&x| x >= Duration::from_millis(1800) && x < Duration::from_millis(2200)));
        assert!(v.iter().any(|&x| x < Duration::from_millis(1950)));
        assert!(v.iter().any(|&x| x > Duration::from_millis(2050)));
        assert_eq!(j.spread(d, 0), d);
        assert!(j.below(d) < d);
        assert_eq!(j.below(Duration::ZERO), Duration::ZERO);
    }
}
