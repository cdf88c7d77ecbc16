//! Weighted least-connections over the active counts that all workers share.
//!
//! Score is active / effective weight, compared by cross-multiplication to stay in integers.
//! Ties are broken by a rotating start so that an idle pool is not filled in config order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{eligible, BackendSelection};
use crate::backend::BackendRef;

pub struct LeastConnections {
    members: Vec<usize>,
    rotor: AtomicUsize,
}

impl LeastConnections {
    pub fn new(members: &[usize]) -> LeastConnections {
        LeastConnections {
            members: members.to_vec(),
            rotor: AtomicUsize::new(0),
        }
    }
}

impl BackendSelection for LeastConnections {
    fn select(
        &self,
        _client: &SocketAddr,
        backends: &[BackendRef],
        tried: &[usize],
    ) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.rotor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u64, u64)> = None; // (idx, active, weight)
        for k in 0..n {
            let idx = self.members[(start + k) % n];
            if !eligible(backends, tried, idx) {
                continue;
            }
            let b = &backends[idx];
            let active = b.state.active.load(Ordering::Relaxed);
            let weight = b.state.effective_weight_milli(b.config.weight);
            let better = match best {
                None => true,
                // active/weight < best_active/best_weight
                Some((_, ba, bw)) => {
                    u128::from(active) * u128::from(bw) < u128::from(ba) * u128::from(weight)
                }
            };
            if better {
                best = Some((idx, active, weight));
            }
        }
        best.map(|b| b.0)
    }
}
