//! The immutable snapshot that workers read: frontends, their backends and prebuilt selectors.
//!
//! Built on the control thread (after a reload, a health transition or a slow-start step) and
//! published through `ArcSwap`; a worker `load()`s it once per connection. Anything costly
//! (the Maglev table, the round-robin schedule) is built here, never on the data path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::state::{BackendState, FrontendState, Registry};
use crate::balance::pools::{self, Pool, SniTable, DEFAULT_POOL};
use crate::config::{Backend, Config, Frontend};

/// The handle every worker holds.
pub type Published = Arc<ArcSwap<Snapshot>>;

pub struct BackendRef {
    pub config: Backend,
    pub state: Arc<BackendState>,
}

impl BackendRef {
    /// Whether the backend is at its `max_connections` (never, without one).
    #[inline]
    pub fn full(&self) -> bool {
        self.config.max_connections.is_some_and(|max| {
            self.state.slots.load(std::sync::atomic::Ordering::Acquire) >= u64::from(max)
        })
    }
}

pub struct FrontendSnap {
    pub config: Frontend,
    pub state: Arc<FrontendState>,
    pub backends: Vec<BackendRef>,
    /// The connection log, if the frontend has a `[frontend.log]`.
    pub log: Option<Arc<crate::connlog::FrontendLog>>,
    /// Some backend has `max_connections`: picks take slots and may queue (`worker::queue`).
    pub limited: bool,
    /// The frontend's pools, the default pool first; one pool of every backend without
    /// routes. Each has its prebuilt selectors, so a pick only indexes this.
    pub pools: Vec<Pool>,
    /// The pool of each backend (indices as in `backends`).
    pub pool_of: Vec<usize>,
    /// Server name -> pool, with `[[frontend.route]]`s; `None` without (nothing is read
    /// from the client before the pick then).
    pub routes: Option<Box<SniTable>>,
}

impl FrontendSnap {
    pub fn build(config: &Frontend, registry: &mut Registry) -> FrontendSnap {
        let backends: Vec<BackendRef> = config
            .backends
            .iter()
            .map(|b| {
                let state = registry.backend(&config.name, b);
                let mut config = b.clone();
                // A weight set through the runtime API reaches every selector here: the
                // schedule and the table below are built from these configs.
                if let Some(w) = state.runtime_weight(b.weight) {
                    config.weight = w;
                }
                BackendRef { config, state }
            })
            .collect();
        let (pools, pool_of) = pools::build(config, &backends);
        FrontendSnap {
            routes: config
                .sni
                .as_ref()
                .map(|sni| Box::new(SniTable::build(sni, &pools))),
            pools,
            pool_of,
            state: registry.frontend(&config.name),
            log: config
                .log
                .as_ref()
                .and_then(|l| crate::connlog::FrontendLog::build(l, &mut registry.log_sinks)),
            config: config.clone(),
            limited: backends.iter().any(|b| b.config.max_connections.is_some()),
            backends,
        }
    }

    /// Picks a backend of the default pool (every backend, without routes) for `client`,
    /// skipping those already `tried`. Backup servers are used only when no primary can be
    /// picked.
    pub fn select(&self, client: &SocketAddr, tried: &[usize]) -> Option<usize> {
        self.select_in(DEFAULT_POOL, client, tried)
    }

    /// Like [`select`](Self::select), within pool `pool`.
    #[inline]
    pub fn select_in(&self, pool: usize, client: &SocketAddr, tried: &[usize]) -> Option<usize> {
        self.pools.get(pool)?.select(client, &self.backends, tried)
    }

    /// Whether backend `idx` is in pool `pool`.
    #[inline]
    pub fn in_pool(&self, pool: usize, idx: usize) -> bool {
        self.pool_of.get(idx) == Some(&pool)
    }

    /// A hash of the routing when the balancer is Maglev (see
    /// `balance::maglev::fingerprint`): equal on every node that routes clients alike.
    pub fn fingerprint(&self) -> Option<u64> {
        let mut pools = self.pools.iter();
        let mut f = pools.next()?.fingerprint()?;
        // Routed frontends: every pool's table counts.
        for p in pools {
            f = crate::balance::maglev::hash::mix64(f ^ p.fingerprint()?.rotate_left(29)) >> 12;
        }
        Some(f)
    }

    pub fn usable_counts(&self) -> (usize, usize) {
        let mut primary = 0;
        let mut backup = 0;
        for b in &self.backends {
            if b.state.is_usable() {
                if b.config.backup {
                    backup += 1;
                } else {
                    primary += 1;
                }
            }
        }
        (primary, backup)
    }
}

pub struct Snapshot {
    /// Incremented on every publish; exported as a metric.
    pub generation: u64,
    pub config: Arc<Config>,
    pub frontends: HashMap<String, Arc<FrontendSnap>>,
}

impl Snapshot {
    pub fn build(config: Arc<Config>, registry: &mut Registry, generation: u64) -> Snapshot {
        let frontends = config
            .frontends
            .iter()
            .map(|f| (f.name.clone(), Arc::new(FrontendSnap::build(f, registry))))
            .collect();
        Snapshot {
            generation,
            config,
            frontends,
        }
    }

    pub fn frontend(&self, name: &str) -> Option<&Arc<FrontendSnap>> {
        self.frontends.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RuntimeWeight;

    fn config(weight: u32) -> Arc<Config> {
        let toml = format!(
            "[[frontend]]\nname = \"f\"\nlisten = [\"127.0.0.1:1\"]\n\
             [[frontend.backend]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nweight = {weight}\n"
        );
        Arc::new(Config::parse(&toml, "t").unwrap())
    }

    #[test]
    fn a_runtime_weight_is_built_in_until_the_configured_weight_changes() {
        let mut registry = Registry::default();
        let snap = Snapshot::build(config(2), &mut registry, 1);
        snap.frontends["f"].backends[0]
            .state
            .set_runtime_weight(Some(RuntimeWeight {
                weight: 50,
                configured: 2,
            }));
        let snap = Snapshot::build(config(2), &mut registry, 2);
        assert_eq!(snap.frontends["f"].backends[0].config.weight, 50);
        // The operator edited the file: the file wins, and the runtime weight is gone.
        let snap = Snapshot::build(config(3), &mut registry, 3);
        assert_eq!(snap.frontends["f"].backends[0].config.weight, 3);
        let snap = Snapshot::build(config(2), &mut registry, 4);
        assert_eq!(snap.frontends["f"].backends[0].config.weight, 2);
    }
}
