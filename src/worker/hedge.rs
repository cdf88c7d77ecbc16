//! Hedged connects ("happy eyeballs" for backends): the connect stage of `accept::serve`.
//!
//! A connect still pending after the hedge delay gets a second connect, in parallel, to the
//! next pick (a different backend). The first to complete carries the client; the other is
//! dropped, which aborts it and closes its fd promptly (`Io::connect`'s contract; on io_uring
//! see `worker::ring::connect`). No client byte has been read for the backend yet (the relay
//! starts only once a connection is up), so nothing is ever sent twice.
//!
//! The delay (`connect_hedge = "auto"`) is [`AUTO_MULTIPLE`] times the backend's observed
//! connect-time p99 ([`BackendState::connect_p99`]), clamped to [`AUTO_MIN`] .. half of
//! `connect_timeout`; before the first sample it is [`UNSAMPLED`] (same clamp).
//!
//! Cost when no hedge is needed: one [`Deadline`] (it replaces the connect timeout's, and is
//! reset to the connect deadline if the hedge delay passes; no tokio timer of its own), one
//! clock read when the connect
//! completes, and a write to the backend's estimate on one connect in [`SAMPLE_EVERY`] (and
//! on every connect slower than the estimate, which is rare by construction).

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::deadline::Deadline;

use super::io::Io;
use super::local::Op;
use super::queue::BackendSlot;
use super::{DataEvent, Shared};
use crate::backend::{BackendState, FrontendSnap};
use crate::config::ConnectHedge;
use crate::relay::ops::ConnectError;

/// `auto`: the hedge delay is this many times the observed p99.
pub const AUTO_MULTIPLE: u32 = 4;
/// `auto`: never hedge sooner than this (below it, scheduling noise on a busy host would
/// start hedges on healthy backends).
pub const AUTO_MIN: Duration = Duration::from_millis(10);
/// `auto` before the backend has a sample: generous for a LAN, short against a dead host.
pub const UNSAMPLED: Duration = Duration::from_millis(50);
/// One connect in this many (per worker) feeds a fast sample to the estimate.
const SAMPLE_EVERY: u32 = 8;

thread_local! {
    /// Connects completed on this worker, for sampling.
    static COMPLETED: Cell<u32> = const { Cell::new(0) };
}

/// The hedge delay for a connect to `state` under `mode`; `None` when hedging is off.
pub fn delay(
    mode: ConnectHedge,
    state: &BackendState,
    connect_timeout: Duration,
) -> Option<Duration> {
    match mode {
        ConnectHedge::Off => None,
        ConnectHedge::After(d) => Some(d),
        ConnectHedge::Auto => {
            let base = state
                .connect_p99()
                .map_or(UNSAMPLED, |p| p.saturating_mul(AUTO_MULTIPLE));
            // max then min, not clamp: a connect_timeout under 20 ms makes the cap the lower.
            Some(base.max(AUTO_MIN).min(connect_timeout / 2))
        }
    }
}

/// What `connect` ends with: the backend that carried it and the connect's result.
pub struct Connected<S> {
    pub idx: usize,
    pub result: Result<S, ConnectError>,
    /// When the hedge won on a backend with `max_connections`: the slot it took there. The
    /// caller swaps it for the first backend's slot, which the client no longer uses.
    pub slot: Option<BackendSlot>,
}

/// Connects the client from `peer` to `fe.backends[first]`, hedging onto another backend if
/// the connect is still pending at the hedge delay; a hedge stays in `pool`. Backends in
/// `tried` are not picked for a hedge. When both connects of a hedge fail, the one that failed first is accounted here
/// (passive health, retries, pushed onto `tried`) and the other is returned for the caller to
/// account as any failed connect.
pub async fn connect<I: Io>(
    fe: &FrontendSnap,
    peer: &SocketAddr,
    pool: usize,
    first: usize,
    tried: &mut Vec<usize>,
    shared: &Shared,
) -> Connected<I::Stream> {
    let cfg = &fe.config;
    let timeout = cfg.connect_timeout;
    let start = Instant::now();
    let a_deadline = start + timeout;
    let mut hedge_at =
        delay(cfg.connect_hedge, &fe.backends[first].state, timeout).map(|d| start + d);
    // One timer: the hedge delay, then A's deadline.
    let mut timer = Deadline::at(hedge_at.unwrap_or(a_deadline));
    let a = Some(I::connect(fe.backends[first].config.address, cfg.source));
    // Each connect in flight is counted on its backend (`ringlb_backend_connects_pending`)
    // until it completes, fails or is abandoned: the guard goes with the connect's future.
    let mut a_flight = Some(InFlight::new(&fe.backends[first].state));
    let mut b_flight: Option<InFlight<'_>> = None;
    // The hedge, its start and its own deadline; nothing is built unless it starts.
    let b = none_like(&a);
    let (mut a, mut b) = (pin!(a), pin!(b));
    let mut b_timer: Option<Deadline> = None;
    // The hedge's own slot where its backend has `max_connections`.
    let mut b_slot: Option<BackendSlot> = None;
    let mut second = first;
    let mut b_start = start;
    loop {
        let event = poll_fn(|cx| {
            if let Some(f) = a.as_mut().as_pin_mut() {
                if let Poll::Ready(r) = f.poll(cx) {
                    return Poll::Ready(Event::A(r));
                }
            }
            if let Some(f) = b.as_mut().as_pin_mut() {
                if let Poll::Ready(r) = f.poll(cx) {
                    return Poll::Ready(Event::B(r));
                }
            }
            if a.is_some() && Pin::new(&mut timer).poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            if let Some(t) = b_timer.as_mut() {
                if Pin::new(t).poll(cx).is_ready() {
                    return Poll::Ready(Event::BTimedOut);
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::A(Ok(stream)) => {
                sample(&fe.backends[first].state, start, b.is_some());
                // Returning drops a hedge still pending: it is aborted.
                return Connected {
                    idx: first,
                    result: Ok(stream),
                    slot: None,
                };
            }
            Event::B(Ok(stream)) => {
                sample(&fe.backends[second].state, b_start, true);
                if a.is_some() {
                    a.set(None);
                    drop(a_flight.take());
                    lost_race(shared, fe, first, second, start.elapsed());
                }
                return Connected {
                    idx: second,
                    result: Ok(stream),
                    slot: b_slot.take(),
                };
            }
            Event::Timer if hedge_at.take().is_some() => {
                timer.reset(a_deadline);
                let mut skip = tried.clone();
                skip.push(first);
                // Where backends have `max_connections`, the hedge needs a slot of its own,
                // taken without waiting; none is free (or clients are queued for one): no
                // hedge, and the first connect carries on alone.
                let pick = fe.select_in(pool, peer, &skip).and_then(|idx| {
                    if !fe.limited {
                        return Some((idx, None));
                    }
                    super::queue::take_now(fe, idx).map(|slot| (idx, slot))
                });
                if let Some((idx, slot)) = pick {
                    b_slot = slot;
                    fe.backends[first]
                        .state
                        .hedges_total
                        .fetch_add(1, Ordering::Relaxed);
                    second = idx;
                    b_start = Instant::now();
                    b.set(Some(I::connect(
                        fe.backends[idx].config.address,
                        cfg.source,
                    )));
                    b_flight = Some(InFlight::new(&fe.backends[idx].state));
                    b_timer = Some(Deadline::at(b_start + timeout));
                }
            }
            Event::A(Err(e)) => {
                a.set(None);
                drop(a_flight.take());
                if b.is_none() {
                    return Connected {
                        idx: first,
                        result: Err(e),
                        slot: None,
                    };
                }
                failed_in_race(shared, fe, first, e, tried);
            }
            Event::Timer => {
                a.set(None);
                drop(a_flight.take());
                if b.is_none() {
                    return Connected {
                        idx: first,
                        result: Err(ConnectError::TimedOut),
                        slot: None,
                    };
                }
                failed_in_race(shared, fe, first, ConnectError::TimedOut, tried);
            }
            Event::B(Err(e)) => {
                b.set(None);
                drop(b_flight.take());
                b_timer = None;
                b_slot = None;
                if a.is_none() {
                    return Connected {
                        idx: second,
                        result: Err(e),
                        slot: None,
                    };
                }
                failed_in_race(shared, fe, second, e, tried);
            }
            Event::BTimedOut => {
                b.set(None);
                drop(b_flight.take());
                b_timer = None;
                b_slot = None;
                if a.is_none() {
                    return Connected {
                        idx: second,
                        result: Err(ConnectError::TimedOut),
                        slot: None,
                    };
                }
                failed_in_race(shared, fe, second, ConnectError::TimedOut, tried);
            }
        }
    }
}

/// A connect in flight, counted in its backend's per-worker `connecting` gauge while alive.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> InFlight<'a> {
    fn new(state: &'a BackendState) -> InFlight<'a> {
        let gauge = &state.counts.local().connecting;
        crate::backend::per_worker::bump(gauge);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        crate::backend::per_worker::drop_one(self.0);
    }
}

/// An empty slot of the same type: the hedge's connect future is the same type as the first.
fn none_like<T>(_: &Option<T>) -> Option<T> {
    None
}

enum Event<S> {
    A(Result<S, ConnectError>),
    B(Result<S, ConnectError>),
    /// The hedge delay passed (first time) or A's deadline did.
    Timer,
    BTimedOut,
}

/// Feeds the estimate: every connect slower than it, one in [`SAMPLE_EVERY`] of the rest,
/// and every connect that was part of a hedge.
fn sample(state: &BackendState, since: Instant, hedged: bool) {
    let took = since.elapsed();
    let n = COMPLETED.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    if hedged || n % SAMPLE_EVERY == 0 || state.slower_than_p99(took) {
        state.record_connect_time(took, SAMPLE_EVERY);
    }
}

/// The hedge to `winner` completed while the connect to `loser` was still pending (and is now
/// cancelled): counted as a hedge won, and toward `error_limit` like a failure, so a backend
/// whose SYNs vanish leaves rotation after `error_limit` hedged connects.
fn lost_race(shared: &Shared, fe: &FrontendSnap, loser: usize, winner: usize, pending: Duration) {
    let b = &fe.backends[loser];
    if b.state.record_lost_race(b.config.health.error_limit) {
        b.state.set_up(false);
        let _ = shared.events.send(DataEvent::PassiveDown {
            backend: b.state.clone(),
            error: format!(
                "connect still pending after {} ms, a hedged connect to {} won",
                pending.as_millis(),
                fe.backends[winner].config.name
            ),
        });
    }
}

/// One connect of a hedge failed while the other is still pending: the client carries on
/// with the other. A local error (this host out of fds) says nothing of the backend.
fn failed_in_race(
    shared: &Shared,
    fe: &FrontendSnap,
    idx: usize,
    e: ConnectError,
    tried: &mut Vec<usize>,
) {
    let b = &fe.backends[idx];
    if let ConnectError::Io(err) = &e {
        if shared.local.record(Op::Connect, err, || {
            format!(
                "frontend {}: connect to {} ({})",
                fe.config.name, b.config.name, b.config.address
            )
        }) {
            return;
        }
    }
    note_failure(shared, fe, idx, e.to_string());
    crate::backend::per_worker::bump(&b.state.counts.local().retries);
    tried.push(idx);
}

/// A failed connect on real traffic: logged at debug, counted, and fed to passive health.
pub fn note_failure(shared: &Shared, fe: &FrontendSnap, idx: usize, failure: String) {
    let b = &fe.backends[idx];
    crate::debug!(
        "frontend {}: connect to {} ({}) failed: {failure}",
        fe.config.name,
        b.config.name,
        b.config.address
    );
    if b.state.record_connect_failure(b.config.health.error_limit) {
        b.state.set_up(false);
        let _ = shared.events.send(DataEvent::PassiveDown {
            backend: b.state.clone(),
            error: failure,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn backend(extra: &str) -> (crate::config::Frontend, BackendState) {
        let text = format!(
            "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\n{extra}\n\
             [[frontend.backend]]\nname = \"a\"\naddress = \"127.0.0.1:20000\"\n"
        );
        let fe = Config::parse(&text, "test").unwrap().frontends.remove(0);
        let state = BackendState::new("web", &fe.backends[0]);
        (fe, state)
    }

    #[test]
    fn auto_hedge_delay_is_a_multiple_of_the_p99_clamped_to_10ms_and_half_the_timeout() {
        let (fe, state) = backend("");
        assert_eq!(fe.connect_hedge, ConnectHedge::Auto, "the shipped default");
        let t = fe.connect_timeout;
        assert_eq!(delay(fe.connect_hedge, &state, t), Some(UNSAMPLED));
        state.record_connect_time(Duration::from_micros(100), SAMPLE_EVERY);
        assert_eq!(delay(fe.connect_hedge, &state, t), Some(AUTO_MIN));
        state.record_connect_time(Duration::from_millis(30), SAMPLE_EVERY);
        // 100 us raised by an eighth: still under the floor.
        assert_eq!(delay(fe.connect_hedge, &state, t), Some(AUTO_MIN));
        let (_, slow) = backend("");
        slow.record_connect_time(Duration::from_millis(20), SAMPLE_EVERY);
        assert_eq!(
            delay(ConnectHedge::Auto, &slow, t),
            Some(Duration::from_millis(80))
        );
        slow.record_connect_time(Duration::from_secs(5), SAMPLE_EVERY);
        slow.record_connect_time(Duration::from_secs(5), SAMPLE_EVERY);
        for _ in 0..40 {
            slow.record_connect_time(Duration::from_secs(5), SAMPLE_EVERY);
        }
        assert_eq!(delay(ConnectHedge::Auto, &slow, t), Some(t / 2));
        // A connect_timeout under twice the floor: the cap wins, and nothing panics.
        assert_eq!(
            delay(ConnectHedge::Auto, &slow, Duration::from_millis(8)),
            Some(Duration::from_millis(4))
        );
    }

    #[test]
    fn connect_hedge_takes_a_duration_or_off() {
        let (fe, state) = backend("connect_hedge = \"25ms\"");
        assert_eq!(
            delay(fe.connect_hedge, &state, fe.connect_timeout),
            Some(Duration::from_millis(25))
        );
        let (fe, state) = backend("connect_hedge = \"off\"");
        assert_eq!(delay(fe.connect_hedge, &state, fe.connect_timeout), None);
    }

    #[test]
    fn connect_hedge_not_shorter_than_connect_timeout_is_refused_with_its_path() {
        let text = "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\n\
                    connect_timeout = \"1s\"\nconnect_hedge = \"1s\"\n\
                    [[frontend.backend]]\nname = \"a\"\naddress = \"127.0.0.1:20000\"\n";
        let err = Config::parse(text, "test").unwrap_err().to_string();
        assert!(
            err.contains(
                "frontend \"web\": connect_hedge: 1s is not shorter than connect_timeout (1s)"
            ),
            "{err}"
        );
        let text = text.replace("\"1s\"\n[[", "\"soon\"\n[[");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(
            err.contains("connect_hedge: \"soon\" is not \"auto\", \"off\" or a duration"),
            "{err}"
        );
    }
}
