//! The worker's timers: connect deadlines, and on io_uring every sleep and timeout.
//!
//! On io_uring the worker's own executor (`worker::exec`) fires this wheel itself each loop
//! turn ([`fire_due`]) and sleeps in the kernel until its earliest entry, so [`sleep`],
//! [`sleep_until`] and [`timeout_at`] are entries here. Elsewhere (the epoll fallback, the
//! control thread, tests) they are tokio's, and connect deadlines are driven as below.
//!
//! Connect deadlines: one tokio timer per worker, not one per connect.
//!
//! Every backend connect races a deadline (the hedge delay, then `connect_timeout`). Armed as
//! a tokio `Sleep` each, the deadline is earlier than every other timer the worker has, and
//! tokio wakes its driver with an eventfd write whenever a timer earlier than its next wake-up
//! is registered: 0.7-0.8 `write(2)` per connection under load (docs/performance.md). Here a
//! deadline is an entry in the worker's own heap instead, and one task per worker ([`drive`])
//! keeps a single `Sleep` set to the earliest live entry. A connect that completes leaves a
//! stale entry behind (dropped when it reaches the top, or when stale ones outnumber the
//! live), so under load the one sleep is reset about once per hedge delay, not per connect.
//!
//! Worker-local (thread-local state, `!Send` wakers are not needed: the tasks that poll a
//! [`Deadline`] and [`drive`] run on the same thread). A deadline fires no earlier than its
//! instant, with tokio's millisecond granularity, as a `Sleep` would.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// Stale entries are swept out once there are this many more than the live ones.
const SWEEP_SLACK: usize = 1024;

struct Slot {
    /// Bumped on every reset and free: a heap entry of another generation is stale.
    generation: u32,
    fired: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Wheel {
    /// (instant, slot, generation), earliest first.
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    /// What the driver's sleep is set to; `None` while it waits for a first entry.
    armed: Option<Instant>,
    driver: Option<Waker>,
}

thread_local! {
    static WHEEL: RefCell<Wheel> = RefCell::new(Wheel::default());
    /// The thread's executor fires the wheel itself ([`fire_due`]).
    static FIRED_BY_EXECUTOR: Cell<bool> = const { Cell::new(false) };
}

/// Called by the io_uring worker's executor with `true` before its first task (it fires the
/// wheel every loop turn, [`drive`] has nothing to do, and the sleeps below use the wheel),
/// and with `false` when it ends.
pub fn set_fired_by_executor(on: bool) {
    FIRED_BY_EXECUTOR.set(on);
}

fn fired_by_executor() -> bool {
    FIRED_BY_EXECUTOR.try_with(Cell::get).unwrap_or(false)
}

/// Fires every entry due by now (its waker goes into `wake`) and returns the earliest live one
/// left: the executor's next wake-up.
pub fn fire_due(wake: &mut Vec<Waker>) -> Option<Instant> {
    WHEEL.with(|w| {
        let mut w = w.borrow_mut();
        if w.heap.is_empty() {
            return None;
        }
        let next = w.fire(Instant::now(), wake);
        w.armed = next;
        next
    })
}

/// Completes once `at` has passed.
pub async fn sleep_until(at: Instant) {
    if fired_by_executor() {
        Deadline::at(at).await
    } else {
        // Boxed: tokio's timer is large, and this path is the fallback's.
        Box::pin(tokio::time::sleep_until(at)).await
    }
}

/// Completes once `d` has passed.
pub async fn sleep(d: Duration) {
    sleep_until(Instant::now() + d).await
}

/// A [`timeout_at`] that ran out.
#[derive(Debug)]
pub struct Elapsed;

/// `f`'s output, or [`Elapsed`] if `at` passes first (`f` is polled first, as tokio's).
pub async fn timeout_at<F: Future>(at: Instant, f: F) -> Result<F::Output, Elapsed> {
    let mut f = pin!(f);
    let mut timer = pin!(sleep_until(at));
    poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// [`timeout_at`] `d` from now.
pub async fn timeout<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    timeout_at(Instant::now() + d, f).await
}

impl Wheel {
    fn is_stale(&self, slot: u32, generation: u32) -> bool {
        self.slots
            .get(slot as usize)
            .is_none_or(|s| s.generation != generation)
    }

    fn push(&mut self, at: Instant, slot: u32, generation: u32) {
        self.heap.push(Reverse((at, slot, generation)));
        if self.heap.len() > 2 * self.live + SWEEP_SLACK {
            let slots = &self.slots;
            self.heap.retain(|Reverse((_, s, g))| {
                slots.get(*s as usize).is_some_and(|x| x.generation == *g)
            });
        }
        // Earlier than what the driver sleeps on (or it sleeps on nothing): it must re-arm.
        if self.armed.is_none_or(|a| at < a) {
            self.armed = Some(at);
            if let Some(w) = self.driver.take() {
                w.wake();
            }
        }
    }

    fn insert(&mut self, at: Instant) -> Deadline {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    fired: false,
                    waker: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.live += 1;
        let generation = self.slots.get(slot as usize).map_or(0, |s| s.generation);
        self.push(at, slot, generation);
        Deadline { slot, generation }
    }

    /// Marks every live entry due by `now` fired, into `wake`; the earliest live one left.
    fn fire(&mut self, now: Instant, wake: &mut Vec<Waker>) -> Option<Instant> {
        while let Some(&Reverse((at, slot, generation))) = self.heap.peek() {
            if self.is_stale(slot, generation) {
                self.heap.pop();
                continue;
            }
            if at > now {
                return Some(at);
            }
            self.heap.pop();
            if let Some(s) = self.slots.get_mut(slot as usize) {
                s.fired = true;
                wake.extend(s.waker.take());
            }
        }
        None
    }
}

/// A connect deadline: a future that completes once its instant has passed.
pub struct Deadline {
    slot: u32,
    generation: u32,
}

impl Deadline {
    pub fn at(at: Instant) -> Deadline {
        WHEEL.with(|w| w.borrow_mut().insert(at))
    }

    /// Moves the deadline to `at` (fired or not).
    pub fn reset(&mut self, at: Instant) {
        WHEEL.with(|w| {
            let mut w = w.borrow_mut();
            let Some(s) = w.slots.get_mut(self.slot as usize) else {
                return;
            };
            s.generation = s.generation.wrapping_add(1);
            s.fired = false;
            self.generation = s.generation;
            w.push(at, self.slot, self.generation);
        });
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        WHEEL.with(|w| {
            let mut w = w.borrow_mut();
            let Some(s) = w.slots.get_mut(self.slot as usize) else {
                return Poll::Ready(());
            };
            if s.fired {
                return Poll::Ready(());
            }
            if !s.waker.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                s.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // At thread exit the wheel may already be gone; nothing is left to free then.
        let _ = WHEEL.try_with(|w| {
            let mut w = w.borrow_mut();
            if let Some(s) = w.slots.get_mut(self.slot as usize) {
                s.generation = s.generation.wrapping_add(1);
                s.fired = false;
                s.waker = None;
                w.free.push(self.slot);
                w.live -= 1;
            }
        });
    }
}

/// The worker's deadline task: sleeps until the earliest live deadline and fires what is due.
/// Spawned once per worker, before any connection is served.
pub async fn drive() {
    if fired_by_executor() {
        return;
    }
    let mut sleep = pin!(tokio::time::sleep_until(Instant::now()));
    let mut due = Vec::new();
    poll_fn(|cx: &mut Context<'_>| loop {
        let next = WHEEL.with(|w| {
            let mut w = w.borrow_mut();
            let next = w.fire(Instant::now(), &mut due);
            w.armed = next;
            if !w.driver.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                w.driver = Some(cx.waker().clone());
            }
            next
        });
        // Outside the borrow: a wake only schedules, but nothing here may re-enter the wheel.
        for w in due.drain(..) {
            w.wake();
        }
        let Some(at) = next else {
            return Poll::<()>::Pending;
        };
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let set = tokio::task::LocalSet::new();
        set.block_on(&rt, async {
            tokio::task::spawn_local(drive());
            f.await
        })
    }

    #[test]
    fn deadlines_fire_in_order_and_not_before_their_instant() {
        local(async {
            let start = Instant::now();
            let late = Deadline::at(start + Duration::from_millis(60));
            let soon = Deadline::at(start + Duration::from_millis(20));
            soon.await;
            let t = start.elapsed();
            assert!(t >= Duration::from_millis(20), "{t:?}");
            late.await;
            assert!(start.elapsed() >= Duration::from_millis(60));
        });
    }

    #[test]
    fn a_dropped_deadline_never_fires_and_its_slot_is_reused() {
        local(async {
            let start = Instant::now();
            for _ in 0..10_000 {
                drop(Deadline::at(start + Duration::from_secs(3600)));
            }
            // One slot served all of them; the heap was swept of the stale entries.
            WHEEL.with(|w| {
                let w = w.borrow();
                assert_eq!(w.slots.len(), 1);
                assert_eq!(w.live, 0);
                assert!(w.heap.len() <= SWEEP_SLACK + 1, "{}", w.heap.len());
            });
            Deadline::at(start + Duration::from_millis(5)).await;
        });
    }

    #[test]
    fn a_reset_moves_the_deadline_both_ways() {
        local(async {
            let start = Instant::now();
            let mut d = Deadline::at(start + Duration::from_secs(3600));
            d.reset(start + Duration::from_millis(10));
            (&mut d).await;
            assert!(start.elapsed() >= Duration::from_millis(10));
            // Fired, then moved later: pending again until the new instant.
            let again = Instant::now();
            d.reset(again + Duration::from_millis(30));
            let quick = Deadline::at(again + Duration::from_millis(5));
            tokio::select! {
                _ = &mut d => panic!("fired before its new instant"),
                _ = quick => {}
            }
            d.await;
            assert!(again.elapsed() >= Duration::from_millis(30));
        });
    }
}
