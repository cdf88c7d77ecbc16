//! Pools: the named sets of a frontend's backends that SNI routes send clients to, each with
//! its own selectors, and the table from a TLS server name to a pool (docs/traffic-controls.md,
//! "SNI routing").
//!
//! Built with the snapshot on the control thread. Pool 0 is the default pool: the backends
//! without `pool`, or every backend of a frontend without routes, which so has exactly one
//! pool and selects as it always did. The data path looks a name up once per connection and
//! then only indexes the pool array.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::BackendSelection;
use crate::backend::{BackendRef, RebuildCounts};
use crate::config::{traffic::SniRouting, Frontend};

/// The default pool's index.
pub const DEFAULT_POOL: usize = 0;

/// One pool's selectors: its primary servers, and its backup servers for when no primary
/// can be picked. A retry stays in the pool.
pub struct Pool {
    /// `None` for the default pool.
    pub name: Option<String>,
    /// Indices (into the frontend's backends) of the pool's members.
    pub members: Vec<usize>,
    primary: Arc<dyn BackendSelection>,
    backup: Arc<dyn BackendSelection>,
}

impl Pool {
    /// `prev`: the pool of this name in the frontend's previous snapshot, whose selectors are
    /// kept where their inputs did not change (see [`super::build`]).
    fn build(
        config: &Frontend,
        backends: &[BackendRef],
        name: Option<String>,
        members: Vec<usize>,
        prev: Option<&Pool>,
        built: &RebuildCounts,
    ) -> Pool {
        let (backup, primary): (Vec<usize>, Vec<usize>) =
            members.iter().partition(|&&i| backends[i].config.backup);
        Pool {
            primary: super::build(config, backends, &primary, prev.map(|p| &p.primary), built),
            backup: super::build(config, backends, &backup, prev.map(|p| &p.backup), built),
            name,
            members,
        }
    }

    /// Usable backends its selectors cannot place (see [`BackendSelection::left_out`]).
    pub fn left_out(&self) -> usize {
        self.primary.left_out() + self.backup.left_out()
    }

    /// The primary servers' selector (tests look at what a rebuild kept).
    pub fn primary(&self) -> &Arc<dyn BackendSelection> {
        &self.primary
    }

    pub fn select(
        &self,
        client: &SocketAddr,
        backends: &[BackendRef],
        tried: &[usize],
    ) -> Option<usize> {
        self.primary
            .select(client, backends, tried)
            .or_else(|| self.backup.select(client, backends, tried))
    }

    /// See [`BackendSelection::fingerprint`]: the primary and backup tables mixed.
    pub fn fingerprint(&self) -> Option<u64> {
        let p = self.primary.fingerprint()?;
        Some(match self.backup.fingerprint() {
            Some(b) => super::maglev::hash::mix64(p ^ b.rotate_left(17)) >> 12,
            None => p,
        })
    }
}

/// Builds the frontend's pools (the default first, then each pool in the order routes
/// first name it) and the pool index of every backend. `prev`: the pools of the frontend's
/// previous snapshot (empty for a new frontend), matched by name.
pub fn build(
    config: &Frontend,
    backends: &[BackendRef],
    prev: &[Pool],
    built: &RebuildCounts,
) -> (Vec<Pool>, Vec<usize>) {
    let prev_of = |name: &Option<String>| prev.iter().find(|p| &p.name == name);
    let Some(sni) = &config.sni else {
        let all = (0..backends.len()).collect();
        return (
            vec![Pool::build(
                config,
                backends,
                None,
                all,
                prev_of(&None),
                built,
            )],
            vec![DEFAULT_POOL; backends.len()],
        );
    };
    let mut names: Vec<&str> = Vec::new();
    for r in &sni.routes {
        if !names.contains(&r.pool.as_str()) {
            names.push(&r.pool);
        }
    }
    let pool_of: Vec<usize> = backends
        .iter()
        .map(|b| match &b.config.pool {
            // Validation makes every backend's pool a route's; one that is not (never, in a
            // validated config) would be in no pool, so it goes nowhere rather than default.
            Some(p) => names
                .iter()
                .position(|n| n == p)
                .map_or(usize::MAX, |i| i + 1),
            None => DEFAULT_POOL,
        })
        .collect();
    let pool = |i: usize, name: Option<String>| {
        let members = (0..backends.len()).filter(|&b| pool_of[b] == i).collect();
        let prev = prev_of(&name);
        Pool::build(config, backends, name, members, prev, built)
    };
    let mut pools = vec![pool(DEFAULT_POOL, None)];
    for (i, n) in names.iter().enumerate() {
        pools.push(pool(i + 1, Some(n.to_string())));
    }
    (pools, pool_of)
}

/// Server names to pools: exact names, and wildcards (`*.b.example`, kept as `b.example`)
/// that match one label in front of their suffix.
#[derive(Debug, Default)]
pub struct SniTable {
    // RandomState on purpose: the names looked up are chosen by clients. Nothing here
    // decides placement.
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
}

impl SniTable {
    pub fn build(sni: &SniRouting, pools: &[Pool]) -> SniTable {
        let mut t = SniTable::default();
        for r in &sni.routes {
            let Some(idx) = pools
                .iter()
                .position(|p| p.name.as_deref() == Some(&r.pool))
            else {
                continue;
            };
            for n in &r.names {
                match n.strip_prefix("*.") {
                    Some(suffix) => t.wildcard.insert(suffix.to_string(), idx),
                    None => t.exact.insert(n.clone(), idx),
                };
            }
        }
        t
    }

    /// The pool for `name` (lowercase, as the parser gives it): an exact route first, then a
    /// wildcard over its first label; `None` when no route matches.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        if let Some(&p) = self.exact.get(name) {
            return Some(p);
        }
        let (_, suffix) = name.split_once('.')?;
        self.wildcard.get(suffix).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Snapshot;
    use crate::config::Config;
    use std::sync::Arc;

    const ROUTED: &str = r#"
[[frontend]]
name = "tls"
listen = ["127.0.0.1:1"]
[[frontend.route]]
sni = ["a.example"]
pool = "a"
[[frontend.route]]
sni = ["*.b.example", "b.example"]
pool = "b"
[[frontend.backend]]
name = "d"
address = "127.0.0.1:10"
[[frontend.backend]]
name = "b1"
address = "127.0.0.1:11"
pool = "b"
[[frontend.backend]]
name = "a1"
address = "127.0.0.1:12"
pool = "a"
[[frontend.backend]]
name = "a2"
address = "127.0.0.1:13"
pool = "a"
backup = true
"#;

    fn snap(toml: &str) -> Snapshot {
        let c = Arc::new(Config::parse(toml, "t").unwrap());
        Snapshot::build(c, &mut Default::default(), 1)
    }

    #[test]
    fn names_pick_their_pool_and_a_wildcard_matches_exactly_one_label() {
        let s = snap(ROUTED);
        let fe = &s.frontends["tls"];
        let t = fe.routes.as_ref().unwrap();
        let pool = |n: &str| t.lookup(n).map(|p| fe.pools[p].name.clone().unwrap());
        assert_eq!(pool("a.example").as_deref(), Some("a"));
        assert_eq!(pool("x.b.example").as_deref(), Some("b"));
        assert_eq!(pool("b.example").as_deref(), Some("b"));
        assert_eq!(pool("y.x.b.example"), None);
        assert_eq!(pool("c.example"), None);
        assert_eq!(pool("example"), None);
    }

    #[test]
    fn selection_and_retries_stay_in_the_pool_with_its_backup_last() {
        let s = snap(ROUTED);
        let fe = &s.frontends["tls"];
        let client = "127.0.0.1:5".parse().unwrap();
        let a = fe.routes.as_ref().unwrap().lookup("a.example").unwrap();
        assert_eq!(fe.select_in(a, &client, &[]), Some(2));
        // The primary failed: the pool's backup, never the default pool's backend.
        assert_eq!(fe.select_in(a, &client, &[2]), Some(3));
        assert_eq!(fe.select_in(a, &client, &[2, 3]), None);
        assert_eq!(fe.select_in(DEFAULT_POOL, &client, &[]), Some(0));
        assert_eq!(fe.select_in(DEFAULT_POOL, &client, &[0]), None);
    }

    #[test]
    fn a_frontend_without_routes_has_one_pool_of_every_backend() {
        let s = snap(
            "[[frontend]]\nname = \"f\"\nlisten = [\"127.0.0.1:1\"]\n\
             [[frontend.backend]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n\
             [[frontend.backend]]\nname = \"b\"\naddress = \"127.0.0.1:3\"\nbackup = true\n",
        );
        let fe = &s.frontends["f"];
        assert!(fe.routes.is_none());
        assert_eq!(fe.pools.len(), 1);
        assert_eq!(fe.pools[0].members, vec![0, 1]);
    }
}
