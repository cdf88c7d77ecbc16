//! Smooth weighted round robin (the algorithm nginx uses), precomputed into a schedule.
//!
//! Weights 3 and 1 give `a a b a`-like interleaving rather than `a a a b` bursts. The schedule
//! for one full cycle (sum of effective weights) is built off the data path; workers share
//! one atomic cursor, so across all cores the counts over whole cycles are exact and the order
//! stays smooth. That is one shared write per connection, kept on a cache line of its own; a
//! cursor per worker would interleave several partial cycles and lose both properties (a
//! client could see `a a a` with weights 3:1:1), for a saving of tens of nanoseconds.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{eligible, BackendSelection};
use crate::backend::{BackendRef, FULL_RAMP};
use std::net::SocketAddr;

pub struct SmoothRoundRobin {
    schedule: Vec<usize>,
    cursor: crate::backend::CacheLine<AtomicUsize>,
}

/// Effective weights in slow start are scaled to this resolution for the schedule.
const RAMP_STEPS: u64 = 10;

/// One cycle of smooth weighted round robin over `(index, weight)` pairs.
pub fn smooth_schedule(weights: &[(usize, u64)]) -> Vec<usize> {
    let total: u64 = weights.iter().map(|w| w.1).sum();
    let mut current: Vec<i64> = vec![0; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, (_, w)) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(weights[best].0);
    }
    out
}

impl SmoothRoundRobin {
    pub fn new(backends: &[BackendRef], members: &[usize]) -> SmoothRoundRobin {
        SmoothRoundRobin::resume(schedule(backends, members), 0)
    }

    /// A selector over `schedule` whose cursor starts at `cursor`: a rebuilt schedule goes on
    /// where the one it replaces was, so that frequent publishes (slow-start steps) do not
    /// keep restarting it and favour the backends at its start.
    pub fn resume(schedule: Vec<usize>, cursor: usize) -> SmoothRoundRobin {
        SmoothRoundRobin {
            schedule,
            cursor: crate::backend::CacheLine(AtomicUsize::new(cursor)),
        }
    }

    pub fn schedule(&self) -> &[usize] {
        &self.schedule
    }

    /// Where the next pick starts (before the modulo).
    pub fn cursor(&self) -> usize {
        self.cursor.0.load(Ordering::Relaxed)
    }
}

/// One cycle of the schedule over the usable `members`, by effective weight.
pub fn schedule(backends: &[BackendRef], members: &[usize]) -> Vec<usize> {
    let weights: Vec<(usize, u64)> = members
        .iter()
        .filter(|&&i| backends[i].state.is_usable())
        .map(|&i| {
            let b = &backends[i];
            // Ramp is in thousandths; keep a tenth-of-weight resolution so that a
            // slow-starting backend gets a small but non-zero share.
            let w = u64::from(b.config.weight) * RAMP_STEPS * u64::from(b.state.ramp())
                / u64::from(FULL_RAMP);
            (i, w.max(1))
        })
        .collect();
    let g = weights.iter().fold(0, |g, w| gcd(g, w.1)).max(1);
    let reduced: Vec<(usize, u64)> = weights.iter().map(|&(i, w)| (i, w / g)).collect();
    smooth_schedule(&reduced)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl BackendSelection for SmoothRoundRobin {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn select(
        &self,
        _client: &SocketAddr,
        backends: &[BackendRef],
        tried: &[usize],
    ) -> Option<usize> {
        let n = self.schedule.len();
        if n == 0 {
            return None;
        }
        // One shared step per pick keeps whole cycles exact across workers. From there the walk
        // is local: re-reading the shared cursor would let concurrent picks push this one
        // past every eligible slot.
        let start = self.cursor.0.fetch_add(1, Ordering::Relaxed) % n;
        for k in 0..n {
            let idx = self.schedule[(start + k) % n];
            if eligible(backends, tried, idx) {
                return Some(idx);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_three_one_one_interleave_within_one_cycle() {
        let s = smooth_schedule(&[(0, 3), (1, 1), (2, 1)]);
        assert_eq!(s.len(), 5);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 3);
        // Smooth: never two of the minor backends in a row and never three of the major.
        assert_eq!(s, vec![0, 1, 0, 2, 0]);
    }

    #[test]
    fn equal_weights_alternate() {
        assert_eq!(smooth_schedule(&[(4, 1), (7, 1)]), vec![4, 7]);
    }
}
