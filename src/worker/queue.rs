//! Backend `max_connections` and the frontend's FIFO queue (HAProxy's `maxconn` on a server
//! with `timeout queue`; docs/traffic-controls.md).
//!
//! A backend with `max_connections` counts the slots taken on it (`BackendState::slots`),
//! from the pick to the connection's end; selection skips a full backend (`balance::eligible`),
//! so least-connections and round robin take another, and Maglev the next backend in the
//! client's table order. A slot is taken with a compare-and-swap, so two workers picking the
//! same backend at once never take it past its limit.
//!
//! When every usable backend is full the client waits in its frontend's queue, one for all
//! workers, up to `queue_timeout`. A slot that frees while clients wait is not given back: it
//! goes straight to the client at the head of the queue (whichever backend it is on), so a
//! newcomer can never take it first and clients are served in arrival order. The head also
//! looks again every [`RECHECK`], for capacity that comes from elsewhere (a backend coming
//! up, a reload raising a limit).
//!
//! Frontends without `max_connections` on any backend never come here.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::backend::{BackendState, FrontendSnap, FrontendState};

/// How often the client at the head of a queue looks for capacity no release announced.
const RECHECK: Duration = Duration::from_millis(200);
/// Queue time is averaged over about this many clients (HAProxy's `qtime`: the last 1024).
const QTIME_SAMPLES: f64 = 1024.0;

/// A frontend's queue and its figures; lives in its `FrontendState` (kept across reloads).
#[derive(Debug, Default)]
pub struct BackendQueue {
    waiters: Mutex<VecDeque<Arc<Waiter>>>,
    /// Clients waiting now (HAProxy's `qcur`).
    pub current: AtomicU64,
    /// The most that ever waited at once (`qmax`).
    pub max: AtomicU64,
    /// Clients that ever waited.
    pub queued_total: AtomicU64,
    /// Average wait of the recent clients that got a slot, in microseconds (`qtime`), as f64
    /// bits.
    qtime_us: AtomicU64,
}

impl BackendQueue {
    /// Average time in the queue of the last ~1024 clients served from it, in seconds.
    pub fn qtime_seconds(&self) -> f64 {
        f64::from_bits(self.qtime_us.load(Ordering::Relaxed)) / 1e6
    }

    pub(super) fn record_wait(&self, waited: Duration) {
        let sample = waited.as_secs_f64() * 1e6;
        // One writer at a time is not needed for a figure like this: a lost update between
        // two workers only skips one sample.
        let old = f64::from_bits(self.qtime_us.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old + (sample - old) / QTIME_SAMPLES
        };
        self.qtime_us.store(new.to_bits(), Ordering::Relaxed);
    }
}

/// One waiting client. `grant` is written under the queue's lock by the releaser that hands
/// it a slot, after taking it out of the queue.
#[derive(Debug)]
struct Waiter {
    grant: Mutex<Option<Arc<BackendState>>>,
    bell: Notify,
    /// On a frontend with several pools (SNI routes), the backends of the client's pool (by
    /// address of their state): a slot freed on another pool's backend goes to a client of
    /// that pool instead, and a client only waits behind clients of its own pool. `None`:
    /// one pool, every backend fits.
    pool: Option<Box<[usize]>>,
}

impl Waiter {
    fn fits(&self, b: &Arc<BackendState>) -> bool {
        let me = Arc::as_ptr(b) as usize;
        self.pool.as_ref().is_none_or(|m| m.contains(&me))
    }
}

/// The members of `pool` as [`Waiter::pool`] keeps them.
fn pool_key(fe: &FrontendSnap, pool: usize) -> Option<Box<[usize]>> {
    if fe.pools.len() < 2 {
        return None;
    }
    let members = fe
        .pools
        .get(pool)
        .map(|p| p.members.as_slice())
        .unwrap_or(&[]);
    Some(
        members
            .iter()
            .map(|&i| Arc::as_ptr(&fe.backends[i].state) as usize)
            .collect(),
    )
}

/// One slot taken on a backend with `max_connections`; given to the next waiting client, or
/// back to the backend, when dropped.
pub struct BackendSlot {
    backend: Arc<BackendState>,
    frontend: Arc<FrontendState>,
}

impl Drop for BackendSlot {
    fn drop(&mut self) {
        let queue = &self.frontend.gate.queue;
        let mut waiters = queue.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let next = waiters.iter().position(|w| w.fits(&self.backend));
        match next.and_then(|i| waiters.remove(i)) {
            Some(w) => {
                queue.current.fetch_sub(1, Ordering::Relaxed);
                *w.grant.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.backend.clone());
                w.bell.notify_one();
            }
            None => {
                self.backend.slots.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Takes a slot on `backends[idx]` if it has room (or no limit: then `Some(None)`).
fn take(fe: &FrontendSnap, idx: usize) -> Option<Option<BackendSlot>> {
    let b = &fe.backends[idx];
    let Some(max) = b.config.max_connections else {
        return Some(None);
    };
    let max = u64::from(max);
    let mut n = b.state.slots.load(Ordering::Acquire);
    while n < max {
        match b
            .state
            .slots
            .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                return Some(Some(BackendSlot {
                    backend: b.state.clone(),
                    frontend: fe.state.clone(),
                }))
            }
            Err(now) => n = now,
        }
    }
    None
}

/// A slot on `backends[idx]` taken now or never, for a hedged connect (`Some(None)`: the
/// backend has no limit). `None` when it is full, or when clients wait in the queue: a free
/// slot is theirs first, and a hedge never overtakes them.
pub(super) fn take_now(fe: &FrontendSnap, idx: usize) -> Option<Option<BackendSlot>> {
    if fe.state.gate.queue.current.load(Ordering::Relaxed) > 0 {
        return None;
    }
    take(fe, idx)
}

/// What [`pick`] found.
pub enum Pick {
    /// This backend, with its slot if it has a limit, and how long the client waited in the
    /// queue for it (zero when it did not).
    Backend(usize, Option<BackendSlot>, Duration),
    /// Nothing usable (all down, or all tried): not a matter of capacity.
    NoBackend,
    /// Every usable backend stayed full for `queue_timeout`; how long the client waited.
    TimedOut(Duration),
}

/// Picks a backend of `pool` for `client` and takes a slot on it, waiting in the frontend's
/// queue while every usable backend of the pool not yet `tried` is full.
pub async fn pick(fe: &FrontendSnap, pool: usize, client: &SocketAddr, tried: &[usize]) -> Pick {
    let queue = &fe.state.gate.queue;
    // Clients already waiting go first: a newcomer joins the queue rather than overtake.
    if queue.current.load(Ordering::Relaxed) == 0 {
        if let Some(p) = try_pick(fe, pool, client, tried) {
            return p;
        }
    }
    let started = Instant::now();
    let deadline = started + fe.config.traffic.queue_timeout;
    let me = Arc::new(Waiter {
        grant: Mutex::new(None),
        bell: Notify::new(),
        pool: pool_key(fe, pool),
    });
    {
        let mut waiters = queue.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock no slot can be handed out unseen: look once more before waiting
        // (clients of other pools waiting do not hold this one back).
        if !waiters.iter().any(|w| w.pool == me.pool) {
            if let Some(p) = try_pick(fe, pool, client, tried) {
                return p;
            }
        }
        if fe.config.traffic.queue_timeout.is_zero() {
            drop(waiters);
            return Pick::TimedOut(Duration::ZERO);
        }
        waiters.push_back(me.clone());
        let now = queue.current.fetch_add(1, Ordering::Relaxed) + 1;
        queue.max.fetch_max(now, Ordering::Relaxed);
        queue.queued_total.fetch_add(1, Ordering::Relaxed);
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = me.bell.notified() => {}
            _ = super::deadline::sleep(left.min(RECHECK)) => {}
        }
        let mut waiters = queue.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let granted = me.grant.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(backend) = granted {
            drop(waiters);
            let slot = BackendSlot {
                backend,
                frontend: fe.state.clone(),
            };
            // The slot may be on a backend this client cannot use (tried, down, removed by a
            // reload, in another pool); then it goes on to the next client and this one
            // looks again.
            let idx = fe.backends.iter().enumerate().position(|(i, b)| {
                Arc::ptr_eq(&b.state, &slot.backend)
                    && b.state.is_usable()
                    && !tried.contains(&i)
                    && fe.in_pool(pool, i)
            });
            match idx {
                Some(i) => {
                    let waited = started.elapsed();
                    queue.record_wait(waited);
                    return Pick::Backend(i, Some(slot), waited);
                }
                None => {
                    drop(slot);
                    // Back in line, at the end: rare enough not to matter for the order.
                    let mut waiters = queue.waiters.lock().unwrap_or_else(|e| e.into_inner());
                    if Instant::now() >= deadline {
                        drop(waiters);
                        return Pick::TimedOut(started.elapsed());
                    }
                    waiters.push_back(me.clone());
                    queue.current.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let head = waiters.iter().position(|w| w.pool == me.pool);
        if let Some(at) = head.filter(|&i| Arc::ptr_eq(&waiters[i], &me)) {
            if let Some(p) = try_pick(fe, pool, client, tried) {
                waiters.remove(at);
                queue.current.fetch_sub(1, Ordering::Relaxed);
                drop(waiters);
                return match p {
                    Pick::Backend(i, slot, _) => {
                        let waited = started.elapsed();
                        queue.record_wait(waited);
                        Pick::Backend(i, slot, waited)
                    }
                    other => other,
                };
            }
        }
        if Instant::now() >= deadline {
            if let Some(i) = waiters.iter().position(|w| Arc::ptr_eq(w, &me)) {
                waiters.remove(i);
                queue.current.fetch_sub(1, Ordering::Relaxed);
            }
            drop(waiters);
            return Pick::TimedOut(started.elapsed());
        }
    }
}

/// One look: a backend with room, `NoBackend` when nothing usable is left at all, `None`
/// when the usable ones are all full (wait).
fn try_pick(fe: &FrontendSnap, pool: usize, client: &SocketAddr, tried: &[usize]) -> Option<Pick> {
    loop {
        match fe.select_in(pool, client, tried) {
            Some(idx) => match take(fe, idx) {
                Some(slot) => return Some(Pick::Backend(idx, slot, Duration::ZERO)),
                // Another worker took the last slot between the look and the take: look
                // again (selection now sees it full).
                None => continue,
            },
            None => {
                let waiting_helps = fe.backends.iter().enumerate().any(|(i, b)| {
                    b.state.is_usable() && !tried.contains(&i) && b.full() && fe.in_pool(pool, i)
                });
                return if waiting_helps {
                    None
                } else {
                    Some(Pick::NoBackend)
                };
            }
        }
    }
}
