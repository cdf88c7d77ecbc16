//! Each worker's table of its relayed connections, and the sweeper that ends them early.
//!
//! A connection costs no timer and no wait registration of its own: one sweeper per worker
//! wakes a few times per idle timeout, and when the control thread rings the worker's kill
//! bell. It ends connections that have been idle too long or whose backend's kill switch
//! flipped (`shutdown(Both)` on both sockets: the relay's pending waits complete and its
//! directions end on their own), and it moves each connection's byte counts into the
//! backend's shared counters, so the relay never writes a cross-core cache line per read.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use tokio::sync::Notify;

use crate::backend::{per_worker, ActiveGuard};
use crate::relay::{end_both, Meter};

/// The sweeper's slowest tick; it runs more often when an idle timeout is short.
const MAX_TICK: Duration = Duration::from_secs(1);
const MIN_TICK: Duration = Duration::from_millis(5);
/// The tick while a paced drain is closing connections on this worker: closes land within
/// this of their turn.
const PACE_TICK: Duration = Duration::from_millis(20);

/// A connection's place in a paced drain's window, in [0, 1), from its table key: Fibonacci
/// hashing spreads consecutive keys evenly (the golden ratio's low discrepancy), so the
/// closes of a worker's connections are spread evenly without storing anything per
/// connection.
fn place_of(key: usize) -> f64 {
    let h = (key as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Why the sweeper ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing moved for `idle_timeout`.
    Idle,
    /// The backend's kill switch flipped (shutdown-sessions, a drain limit).
    Killed,
    /// The client sent nothing for `client_timeout`.
    ClientTimeout,
    /// The backend sent nothing for `server_timeout`.
    ServerTimeout,
}

/// The silences after which the sweeper ends a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Nothing moved either way.
    pub idle: Duration,
    /// The client sent nothing (`client_timeout`).
    pub client: Option<Duration>,
    /// The backend sent nothing (`server_timeout`).
    pub server: Option<Duration>,
}

impl Timeouts {
    pub fn of(f: &crate::config::Frontend) -> Timeouts {
        Timeouts {
            idle: f.idle_timeout,
            client: f.client_timeout,
            server: f.server_timeout,
        }
    }

    /// The shortest of them: the sweeper ticks at a fraction of it.
    fn shortest(&self) -> Duration {
        [self.client, self.server]
            .into_iter()
            .flatten()
            .fold(self.idle, Duration::min)
    }
}

/// What the table knows of one connection.
pub struct Record {
    client: RawFd,
    server: RawFd,
    pub meter: Meter,
    /// The backend and its open-connection count, held for the connection's life.
    backend: ActiveGuard,
    kill_epoch: u64,
    timeouts: Timeouts,
    /// Set once the sweeper has shut the sockets down (idle timeout or kill switch), so it
    /// does not do it again on every tick while the relay winds down; the connection log
    /// reads why.
    cut: Cell<Option<Cut>>,
    /// Byte counts already added to the backend's counters.
    flushed_up: Cell<u64>,
    flushed_down: Cell<u64>,
}

impl Record {
    /// Adds what the connection moved since the last flush to the backend's counters.
    fn flush(&self) {
        let counts = self.backend.state().counts.local();
        let (up, down) = (self.meter.bytes_up.get(), self.meter.bytes_down.get());
        if up != self.flushed_up.get() {
            per_worker::add(&counts.bytes_in, up - self.flushed_up.replace(up));
        }
        if down != self.flushed_down.get() {
            per_worker::add(&counts.bytes_out, down - self.flushed_down.replace(down));
        }
    }

    /// Shuts both sockets down, once, recording why; true if it did so now.
    fn end_early(&self, why: Cut) -> bool {
        if self.cut.get().is_some() {
            return false;
        }
        self.cut.set(Some(why));
        end_both(&self.client, &self.server);
        true
    }

    /// Flushes the byte counts and ends the connection if it idled out or its backend's
    /// kill switch flipped (in a paced drain, once its turn in the window has come: `place`
    /// is its place there). Returns true while a paced kill still waits to close it.
    fn sweep(&self, now: Instant, now_ms: u64, place: f64) -> bool {
        self.flush();
        if self.cut.get().is_some() {
            return false;
        }
        let state = self.backend.state();
        let killed = state.kill_epoch() != self.kill_epoch;
        if killed && state.kill_due(self.kill_epoch, place, now_ms) {
            if self.end_early(Cut::Killed) {
                state.shut_down_total.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        let silent =
            |since: Instant, limit: Duration| now.saturating_duration_since(since) >= limit;
        let m = &self.meter;
        let t = &self.timeouts;
        if silent(m.last_activity(), t.idle) {
            self.end_early(Cut::Idle);
        } else if t.client.is_some_and(|c| silent(m.last_up.get(), c)) {
            self.end_early(Cut::ClientTimeout);
        } else if t.server.is_some_and(|s| silent(m.last_down.get(), s)) {
            self.end_early(Cut::ServerTimeout);
        }
        killed && self.cut.get().is_none() && state.kill_due(self.kill_epoch, 0.0, now_ms)
    }
}

#[derive(Default)]
struct Table {
    conns: RefCell<Slab<Rc<Record>>>,
    /// The shortest idle timeout seen on this worker: the sweeper ticks at a quarter of it.
    min_idle: Cell<Option<Duration>>,
}

thread_local! {
    static TABLE: Table = Table::default();
}

/// A connection's place in the table; removes it (and flushes its counts) when dropped.
pub struct Registration {
    key: usize,
    record: Rc<Record>,
}

impl Registration {
    /// Enters a connection whose sockets are `client` and `server`. The fds must stay open
    /// until the registration is dropped: the sweeper may shut them down until then.
    pub fn new(
        client: RawFd,
        server: RawFd,
        backend: ActiveGuard,
        timeouts: Timeouts,
    ) -> Registration {
        let kill_epoch = backend.state().kill_epoch();
        let record = Rc::new(Record {
            client,
            server,
            meter: Meter::new(),
            backend,
            kill_epoch,
            timeouts,
            cut: Cell::new(None),
            flushed_up: Cell::new(0),
            flushed_down: Cell::new(0),
        });
        let key = TABLE.with(|t| {
            let shortest = timeouts.shortest();
            if t.min_idle.get().is_none_or(|m| shortest < m) {
                t.min_idle.set(Some(shortest));
            }
            t.conns.borrow_mut().insert(record.clone())
        });
        Registration { key, record }
    }

    pub fn meter(&self) -> &Meter {
        &self.record.meter
    }

    /// Why the sweeper ended the connection, if it did.
    pub fn cut(&self) -> Option<Cut> {
        self.record.cut.get()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.record.flush();
        let _ = TABLE.try_with(|t| t.conns.borrow_mut().try_remove(self.key));
    }
}

/// Open relayed connections on this worker.
pub fn open() -> usize {
    TABLE.with(|t| t.conns.borrow().len())
}

/// The worker's sweeper: runs for the worker's life.
pub async fn sweeper(bell: Arc<Notify>) {
    let mut pacing = false;
    loop {
        let tick = TABLE.with(|t| {
            t.min_idle
                .get()
                .map_or(MAX_TICK, |m| (m / 4).clamp(MIN_TICK, MAX_TICK))
        });
        let tick = if pacing { tick.min(PACE_TICK) } else { tick };
        tokio::select! {
            _ = super::deadline::sleep(tick) => {}
            _ = bell.notified() => {}
        }
        let now = Instant::now();
        let now_ms = crate::backend::pace_ms_at(now);
        // Ending a connection only shuts its sockets down; its relay wakes (and drops its
        // registration) later, on the worker's next poll, so the borrow here never overlaps.
        pacing = TABLE.with(|t| {
            let mut waiting = false;
            for (key, r) in t.conns.borrow().iter() {
                waiting |= r.sweep(now, now_ms, place_of(key));
            }
            waiting
        });
    }
}
