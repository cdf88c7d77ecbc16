//! The immutable snapshot that workers read: frontends, their backends and prebuilt selectors.
//!
//! Built on the control thread (after a reload, a health transition or a slow-start step) and
//! published through `ArcSwap`; a worker `load()`s it once per connection. Anything costly
//! (the Maglev table, the round-robin schedule) is built here, never on the data path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::state::{BackendState, FrontendState, Registry};
use crate::balance::pools::{self, Pool, SniTable, DEFAULT_POOL};
use crate::config::{Backend, Config, ConfigDiff, Frontend};

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
    /// Builds the frontend's part of a snapshot from scratch.
    pub fn build(config: &Frontend, registry: &mut Registry) -> FrontendSnap {
        FrontendSnap::rebuild(config, registry, None)
    }

    /// Builds it again from `config` and the live state, keeping what of `prev` (the one it
    /// replaces) did not change: the selectors whose inputs are the same, with their cursors
    /// (see `balance::build`).
    pub fn rebuild(
        config: &Frontend,
        registry: &mut Registry,
        prev: Option<&FrontendSnap>,
    ) -> FrontendSnap {
        let state = registry.frontend(&config.name);
        state.rebuilds.frontend.fetch_add(1, Ordering::Relaxed);
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
        let prev_pools = prev.map_or(&[][..], |p| &p.pools[..]);
        let (pools, pool_of) = pools::build(config, &backends, prev_pools, &state.rebuilds);
        let left_out: usize = pools.iter().map(Pool::left_out).sum();
        let before = state
            .maglev_left_out
            .swap(left_out as u64, Ordering::Relaxed);
        if left_out > 0 && before == 0 {
            // Once, when it starts; the gauge follows every change.
            crate::warn!(
                "frontend {}: {left_out} usable backends do not fit maglev_table_size {} and \
                 get no clients (the table keeps the first by name); raise maglev_table_size",
                config.name,
                config.maglev_table_size
            );
        } else if left_out == 0 && before > 0 {
            crate::info!(
                "frontend {}: every usable backend fits maglev_table_size {} again",
                config.name,
                config.maglev_table_size
            );
        }
        FrontendSnap {
            routes: config
                .sni
                .as_ref()
                .map(|sni| Box::new(SniTable::build(sni, &pools))),
            pools,
            pool_of,
            state,
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

    /// The snapshot after `self` for `config`: the frontends `which` names (and any `self`
    /// lacks) are rebuilt from their previous part ([`FrontendSnap::rebuild`]), the others
    /// are kept as they are, and those `config` no longer has are left out. Only valid when
    /// the kept frontends' config did not change (the reload diff says which did).
    pub fn next(
        &self,
        config: Arc<Config>,
        registry: &mut Registry,
        generation: u64,
        which: Rebuild<'_>,
    ) -> Snapshot {
        let frontends = config
            .frontends
            .iter()
            .map(|f| {
                let prev = self.frontends.get(&f.name);
                let fe = match prev {
                    Some(p) if !which.includes(&f.name) => p.clone(),
                    _ => Arc::new(FrontendSnap::rebuild(f, registry, prev.map(|p| &**p))),
                };
                (f.name.clone(), fe)
            })
            .collect();
        Snapshot {
            generation,
            config,
            frontends,
        }
    }

    /// The routing half of applying a reload diff, on values: `registry` forgets what `d`
    /// removes (the backends it drops are returned, marked draining), and the next snapshot
    /// for `config` (the new config, which `d` leads to from `self.config`) rebuilds only the
    /// frontends `d` adds or changes.
    pub fn apply(
        &self,
        d: &ConfigDiff,
        config: Arc<Config>,
        registry: &mut Registry,
        generation: u64,
    ) -> (Snapshot, Vec<Arc<BackendState>>) {
        let removed = registry.apply(d);
        let rebuilt = d.rebuilt_frontends();
        let snap = self.next(config, registry, generation, Rebuild::Only(&rebuilt));
        (snap, removed)
    }

    pub fn frontend(&self, name: &str) -> Option<&Arc<FrontendSnap>> {
        self.frontends.get(name)
    }
}

/// Which frontends a publish rebuilds ([`Snapshot::next`]).
#[derive(Debug, Clone, Copy)]
pub enum Rebuild<'a> {
    All,
    Only(&'a [&'a str]),
}

impl Rebuild<'_> {
    fn includes(&self, name: &str) -> bool {
        match self {
            Rebuild::All => true,
            Rebuild::Only(names) => names.contains(&name),
        }
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

    /// Two frontends: `web` (round robin over a, b, c, or `balance`) and `api` (one backend).
    fn two(web_backends: &str, balance: &str) -> Config {
        Config::parse(
            &format!(
                r#"
[[frontend]]
name = "web"
listen = ["127.0.0.1:1"]
balance = "{balance}"
{web_backends}
[[frontend]]
name = "api"
listen = ["127.0.0.1:2"]
[[frontend.backend]]
name = "x"
address = "127.0.0.1:20"
"#
            ),
            "t",
        )
        .unwrap()
    }

    fn backends(list: &[(&str, u16, u32)]) -> String {
        list.iter()
            .map(|(n, port, w)| {
                format!(
                    "[[frontend.backend]]\nname = \"{n}\"\naddress = \"127.0.0.1:{port}\"\nweight = {w}\n"
                )
            })
            .collect()
    }

    const ABC: &[(&str, u16, u32)] = &[("a", 10, 1), ("b", 11, 1), ("c", 12, 1)];

    /// What a reload from the running snapshot to `new` gives, on values.
    fn reload(
        snap: &Snapshot,
        new: Config,
        registry: &mut Registry,
    ) -> (Snapshot, Vec<Arc<BackendState>>, ConfigDiff) {
        let d = crate::config::diff(&snap.config, &new);
        let (next, removed) = snap.apply(&d, Arc::new(new), registry, snap.generation + 1);
        (next, removed, d)
    }

    fn state<'a>(snap: &'a Snapshot, fe: &str, b: &str) -> &'a Arc<BackendState> {
        &snap.frontends[fe]
            .backends
            .iter()
            .find(|r| r.config.name == b)
            .unwrap()
            .state
    }

    fn rebuilds(snap: &Snapshot, fe: &str) -> u64 {
        snap.frontends[fe]
            .state
            .rebuilds
            .frontend
            .load(Ordering::Relaxed)
    }

    #[test]
    fn a_weight_change_rebuilds_only_its_frontend_and_keeps_the_backend_state() {
        let mut registry = Registry::default();
        let s1 = Snapshot::build(
            Arc::new(two(&backends(ABC), "round-robin")),
            &mut registry,
            1,
        );
        let a = state(&s1, "web", "a").clone();
        let heavier = two(
            &backends(&[("a", 10, 3), ("b", 11, 1), ("c", 12, 1)]),
            "round-robin",
        );
        let (s2, removed, _) = reload(&s1, heavier, &mut registry);
        assert!(removed.is_empty());
        assert!(Arc::ptr_eq(state(&s2, "web", "a"), &a));
        assert_eq!(s2.frontends["web"].backends[0].config.weight, 3);
        assert!(Arc::ptr_eq(&s1.frontends["api"], &s2.frontends["api"]));
        assert!(!Arc::ptr_eq(&s1.frontends["web"], &s2.frontends["web"]));
        assert_eq!((rebuilds(&s2, "web"), rebuilds(&s2, "api")), (2, 1));
    }

    #[test]
    fn a_backend_removed_and_added_back_drains_then_is_adopted_with_its_state() {
        let mut registry = Registry::default();
        let a_cfg = two(&backends(ABC), "round-robin");
        let s1 = Snapshot::build(Arc::new(a_cfg.clone()), &mut registry, 1);
        let c = state(&s1, "web", "c").clone();
        // An open connection holds the state while it drains.
        let b_cfg = two(&backends(&ABC[..2]), "round-robin");
        let (s2, removed, _) = reload(&s1, b_cfg, &mut registry);
        assert_eq!(removed.len(), 1);
        assert!(Arc::ptr_eq(&removed[0], &c));
        assert!(c.is_draining() && !c.is_usable());
        assert_eq!(s2.frontends["web"].backends.len(), 2);
        let (s3, removed, _) = reload(&s2, a_cfg, &mut registry);
        assert!(removed.is_empty());
        assert!(Arc::ptr_eq(state(&s3, "web", "c"), &c));
        assert!(!c.is_draining() && c.is_usable());
    }

    #[test]
    fn frontends_added_removed_and_readdressed() {
        let mut registry = Registry::default();
        let s1 = Snapshot::build(
            Arc::new(two(&backends(ABC), "round-robin")),
            &mut registry,
            1,
        );
        let mut only_web = (*s1.config).clone();
        only_web.frontends.retain(|f| f.name == "web");
        let (s2, removed, d) = reload(&s1, only_web.clone(), &mut registry);
        assert!(!s2.frontends.contains_key("api"));
        assert_eq!(removed.len(), 1);
        assert!(registry.find_frontend("api").is_none());
        assert!(Arc::ptr_eq(&s1.frontends["web"], &s2.frontends["web"]));
        assert_eq!(
            d.listens_removed(),
            [("api", "127.0.0.1:2".parse().unwrap())]
        );
        let mut moved = only_web;
        moved.frontends[0].listen = vec!["127.0.0.1:3".parse().unwrap()];
        let (s3, removed, d) = reload(&s2, moved, &mut registry);
        assert!(removed.is_empty());
        assert_eq!(d.listens_added(), [("web", "127.0.0.1:3".parse().unwrap())]);
        assert_eq!(s3.frontends["web"].config.listen.len(), 1);
        let (s4, _, d) = reload(&s3, two(&backends(ABC), "round-robin"), &mut registry);
        assert!(s4.frontends.contains_key("api"));
        assert!(d
            .listens_added()
            .contains(&("api", "127.0.0.1:2".parse().unwrap())));
        assert!(state(&s4, "api", "x").is_usable());
    }

    #[test]
    fn a_discovery_update_adds_down_backends_and_drains_vanished_ones() {
        use crate::config::DiscoverTarget;
        let base = two(
            &format!(
                "{}[[frontend.backend]]\nname = \"d\"\ndiscover = \"tasks.web:80\"\n",
                backends(&ABC[..1])
            ),
            "round-robin",
        );
        let target = DiscoverTarget::Host {
            host: "tasks.web".into(),
            port: 80,
        };
        let found = |addrs: &[&str]| -> crate::discovery::Found {
            let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
            [(
                ("web".to_string(), "d".to_string()),
                (target.clone(), addrs),
            )]
            .into()
        };
        let mut registry = Registry::default();
        let s1 = Snapshot::build(Arc::new(base.clone()), &mut registry, 1);
        let (new, d) = crate::discovery::plan(&s1.config, &base, &found(&["10.0.0.5:80"]));
        assert_eq!(d.rebuilt_frontends(), ["web"]);
        let (s2, removed) = s1.apply(&d, Arc::new(new), &mut registry, 2);
        assert!(removed.is_empty());
        let five = state(&s2, "web", "d-10.0.0.5:80").clone();
        assert!(!five.is_usable(), "a new address waits for its checks");
        assert!(Arc::ptr_eq(&s1.frontends["api"], &s2.frontends["api"]));
        let (new, d) = crate::discovery::plan(&s2.config, &base, &found(&["10.0.0.6:80"]));
        let (s3, removed) = s2.apply(&d, Arc::new(new), &mut registry, 3);
        assert_eq!(removed.len(), 1);
        assert!(Arc::ptr_eq(&removed[0], &five) && five.is_draining());
        assert!(s3.frontends["web"]
            .backends
            .iter()
            .any(|b| b.config.name == "d-10.0.0.6:80"));
    }

    #[test]
    fn a_health_setting_change_keeps_the_backend_state() {
        let mut registry = Registry::default();
        let s1 = Snapshot::build(
            Arc::new(two(&backends(ABC), "round-robin")),
            &mut registry,
            1,
        );
        let b = state(&s1, "web", "b").clone();
        b.check_failures_total.fetch_add(3, Ordering::Relaxed);
        let mut text = backends(ABC);
        text.push_str("[frontend.backend.health]\ninterval = \"250ms\"\n");
        let (s2, removed, d) = reload(&s1, two(&text, "round-robin"), &mut registry);
        assert!(removed.is_empty());
        assert!(matches!(
            &d.frontends[0],
            crate::config::FrontendChange::Changed { backends, .. }
                if backends == &[crate::config::BackendChange::Changed { name: "c".into(), health: true }]
        ));
        assert!(Arc::ptr_eq(state(&s2, "web", "b"), &b));
        assert_eq!(b.check_failures_total.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_health_change_rebuilds_only_its_frontend_and_round_robin_goes_on_from_its_cursor() {
        let mut registry = Registry::default();
        let s1 = Snapshot::build(
            Arc::new(two(&backends(ABC), "round-robin")),
            &mut registry,
            1,
        );
        let client = "127.0.0.1:5".parse().unwrap();
        let web = &s1.frontends["web"];
        assert_eq!(web.select(&client, &[]), Some(0));
        assert_eq!(web.select(&client, &[]), Some(1));
        // c goes down: only web is rebuilt, with a schedule of a and b.
        state(&s1, "web", "c").set_up(false);
        let s2 = s1.next(s1.config.clone(), &mut registry, 2, Rebuild::Only(&["web"]));
        assert!(Arc::ptr_eq(&s1.frontends["api"], &s2.frontends["api"]));
        assert_eq!((rebuilds(&s2, "web"), rebuilds(&s2, "api")), (2, 1));
        let web = &s2.frontends["web"];
        // The cursor went on (2 picks made): a fresh one would start at a again.
        assert_eq!(web.select(&client, &[]), Some(0));
        assert_eq!(web.select(&client, &[]), Some(1));
        // c's ramp steps while it is down change nothing: the schedule is kept as it is.
        let before = Arc::as_ptr(web.pools[0].primary());
        state(&s2, "web", "c").set_ramp(500);
        let s3 = s2.next(s2.config.clone(), &mut registry, 3, Rebuild::Only(&["web"]));
        assert!(std::ptr::eq(
            Arc::as_ptr(s3.frontends["web"].pools[0].primary()),
            before
        ));
        let sched = &s3.frontends["web"].state.rebuilds.schedule;
        assert_eq!(
            sched.load(Ordering::Relaxed),
            2,
            "built at start and when c went down"
        );
    }

    #[test]
    fn a_slow_start_step_never_rebuilds_a_maglev_table_but_a_health_change_does() {
        let mut registry = Registry::default();
        let s1 = Snapshot::build(Arc::new(two(&backends(ABC), "maglev")), &mut registry, 1);
        let tables = |s: &Snapshot| {
            s.frontends["web"]
                .state
                .rebuilds
                .maglev_table
                .load(Ordering::Relaxed)
        };
        assert_eq!(tables(&s1), 1);
        let table = Arc::as_ptr(s1.frontends["web"].pools[0].primary());
        state(&s1, "web", "a").set_ramp(100);
        let s2 = s1.next(s1.config.clone(), &mut registry, 2, Rebuild::Only(&["web"]));
        assert!(std::ptr::eq(
            Arc::as_ptr(s2.frontends["web"].pools[0].primary()),
            table
        ));
        assert_eq!(tables(&s2), 1);
        state(&s2, "web", "b").set_up(false);
        let s3 = s2.next(s2.config.clone(), &mut registry, 3, Rebuild::Only(&["web"]));
        assert_eq!(tables(&s3), 2);
    }

    #[test]
    fn backends_beyond_a_maglev_table_are_counted_as_left_out_until_they_fit() {
        let mut registry = Registry::default();
        let five: Vec<(&str, u16, u32)> = ["a", "b", "c", "d", "e"]
            .iter()
            .zip(10..)
            .map(|(n, p)| (*n, p, 1))
            .collect();
        // As a discovered set can be: more usable backends than the table has slots.
        let mut config = two(&backends(&five), "maglev");
        config.frontends[0].maglev_table_size = 3;
        let s1 = Snapshot::build(Arc::new(config), &mut registry, 1);
        let left = |s: &Snapshot| {
            s.frontends["web"]
                .state
                .maglev_left_out
                .load(Ordering::Relaxed)
        };
        assert_eq!(left(&s1), 2);
        state(&s1, "web", "d").set_up(false);
        state(&s1, "web", "e").set_up(false);
        let s2 = s1.next(s1.config.clone(), &mut registry, 2, Rebuild::Only(&["web"]));
        assert_eq!(left(&s2), 0);
        assert_eq!(
            s2.frontends["api"]
                .state
                .maglev_left_out
                .load(Ordering::Relaxed),
            0
        );
    }
}
