//! Counters that every worker bumps once per connection, kept as one copy per worker on a
//! cache line of its own and summed when read (by the metrics exporter and /status, on the
//! control thread). A worker's increment then hits a line no other core writes, instead of
//! pulling one shared line back and forth between cores on every connection.
//!
//! Slots are indexed by the worker's number ([`set_slot`], called once on each worker thread);
//! any other thread uses slot 0. There is one slot per online CPU, the default worker count;
//! with more workers than CPUs, workers share slots, which stays correct (the slots are
//! atomics) and only costs the sharing.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::CacheLine;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread count into slot `index` (a worker's number).
pub fn set_slot(index: usize) {
    SLOT.with(|s| s.set(index % slot_count()));
}

fn slot_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[inline]
fn this_slot() -> usize {
    SLOT.with(Cell::get)
}

/// One `T` per worker, each on its own cache line.
#[derive(Debug)]
pub struct PerWorker<T> {
    slots: Box<[CacheLine<T>]>,
}

impl<T: Default> Default for PerWorker<T> {
    fn default() -> Self {
        PerWorker {
            slots: (0..slot_count()).map(|_| CacheLine(T::default())).collect(),
        }
    }
}

impl<T> PerWorker<T> {
    /// This thread's copy.
    #[inline]
    pub fn local(&self) -> &T {
        // `set_slot` keeps the index below `slot_count()`, the length of every table.
        &self.slots[this_slot() % self.slots.len()]
    }

    /// The sum of `f` over every worker's copy.
    pub fn sum(&self, f: impl Fn(&T) -> &AtomicU64) -> u64 {
        self.slots.iter().fold(0u64, |acc, s| {
            acc.wrapping_add(f(s).load(Ordering::Relaxed))
        })
    }
}

/// Adds one to a per-worker counter.
#[inline]
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a per-worker counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Subtracts one (a gauge going down). Gauges are raised and lowered by the same worker (a
/// connection lives on the worker that accepted it), so each slot's value stays the number
/// it holds, and the wrapping sum is exact.
#[inline]
pub fn drop_one(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct C {
        n: AtomicU64,
    }

    #[test]
    fn sums_every_worker_copy() {
        let t = std::sync::Arc::new(PerWorker::<C>::default());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || {
                    set_slot(i);
                    for _ in 0..1000 {
                        bump(&t.local().n);
                    }
                    drop_one(&t.local().n);
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(t.sum(|c| &c.n), 4 * 999);
    }

    #[test]
    fn slots_are_cache_line_apart() {
        let t = PerWorker::<C>::default();
        if t.slots.len() > 1 {
            let a = std::ptr::addr_of!(t.slots[0]) as usize;
            let b = std::ptr::addr_of!(t.slots[1]) as usize;
            assert!(b - a >= 128);
        }
    }
}
