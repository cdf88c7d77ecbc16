//! Weighted least-connections over the active counts that all workers share.
//!
//! Score is (active + 1) / effective weight, HAProxy's choice, compared by cross-multiplication
//! to stay in integers. The "+ 1" is the connection being placed: without it every idle
//! backend scores 0 whatever its weight, so weights and slow start would not count until
//! connections pile up.
//! Ties are broken by a rotating start so that an idle pool is not filled in config order.
//! The rotor is per worker thread (a plain `Cell`): tie-breaking needs no agreement between
//! cores, so it costs no shared write. The active counts are the one cross-core write a
//! connection makes, and least-connections cannot do without them.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use super::{eligible, BackendSelection};
use crate::backend::BackendRef;

pub struct LeastConnections {
    members: Vec<usize>,
}

thread_local! {
    /// Where this thread's next tie-break starts; seeded apart per thread so that workers do
    /// not all start from the first backend.
    static ROTOR: Cell<usize> = Cell::new(thread_seed());
}

fn thread_seed() -> usize {
    use std::hash::{BuildHasher, Hasher};
    // Only needs to differ between threads; any fixed hasher over the thread id does.
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    std::hash::Hash::hash(&std::thread::current().id(), &mut h);
    h.finish() as usize
}

impl LeastConnections {
    pub fn new(members: &[usize]) -> LeastConnections {
        LeastConnections {
            members: members.to_vec(),
        }
    }

    pub fn members(&self) -> &[usize] {
        &self.members
    }
}

impl BackendSelection for LeastConnections {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

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
        let start = ROTOR.with(|r| {
            let v = r.get();
            r.set(v.wrapping_add(1));
            v
        }) % n;
        let mut best: Option<(usize, u64, u64)> = None; // (idx, active, weight)
        for k in 0..n {
            let idx = self.members[(start + k) % n];
            if !eligible(backends, tried, idx) {
                continue;
            }
            let b = &backends[idx];
            let active = b.state.active.load(Ordering::Relaxed) + 1;
            let weight = b.state.effective_weight_milli(b.config.weight);
            let better = match best {
                None => true,
                // (active+1)/weight < (best_active+1)/best_weight
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::BackendState;
    use crate::config::Config;

    fn pool(weights: &[u32]) -> Vec<BackendRef> {
        let mut toml = "[[frontend]]\nname = \"f\"\nlisten = [\"127.0.0.1:1\"]\n".to_string();
        for (i, w) in weights.iter().enumerate() {
            toml += &format!(
                "[[frontend.backend]]\nname = \"b{i}\"\naddress = \"127.0.0.1:{}\"\nweight = {w}\n",
                1000 + i
            );
        }
        let c = Config::parse(&toml, "t").unwrap();
        c.frontends[0]
            .backends
            .iter()
            .map(|b| BackendRef {
                config: b.clone(),
                state: Arc::new(BackendState::new("f", b)),
            })
            .collect()
    }

    #[test]
    fn while_all_are_idle_a_slow_starting_backend_loses_every_tie_on_weight() {
        let backends = pool(&[1, 1]);
        backends[1].state.set_ramp(100); // 10% into slow start
        let lc = LeastConnections::new(&[0, 1]);
        let client = "127.0.0.1:5".parse().unwrap();
        // Sequential short connections: nothing is ever open when the next one is placed.
        let picks: Vec<usize> = (0..100)
            .map(|_| lc.select(&client, &backends, &[]).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 100);
    }

    #[test]
    fn open_connections_are_weighed_against_weight() {
        let backends = pool(&[3, 1]);
        backends[0].state.active.store(1, Ordering::Relaxed); // (1+1)/3 < (0+1)/1
        let lc = LeastConnections::new(&[0, 1]);
        let client = "127.0.0.1:5".parse().unwrap();
        assert_eq!(lc.select(&client, &backends, &[]), Some(0));
        assert_eq!(lc.select(&client, &backends, &[0]), Some(1));
    }
}
