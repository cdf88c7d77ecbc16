//! The reload diff: a pure function from (running config, new config) to a typed change-set,
//! and the one source of truth for applying it.
//!
//! A reload (or a DNS discovery update) is "load and validate -> diff -> apply(diff)":
//! `Server::apply` binds what [`ConfigDiff::listens_added`] names, drains what
//! [`ConfigDiff::backends_removed`] names, rebuilds only the frontends that
//! [`ConfigDiff::rebuilt_frontends`] names and closes what [`ConfigDiff::listens_removed`]
//! names; it never compares the configs again. Keeping the diff pure lets it be unit tested
//! without sockets, and an empty diff means the reload is a no-op.

use std::net::SocketAddr;

use super::{Config, Frontend, Global};

/// A backend as the registry knows it: a changed address is a different server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendId {
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChange {
    Added(BackendId),
    Removed(BackendId),
    /// Weight or other settings changed; `health` says whether its health settings did (its
    /// checker is retuned, keeping its counters).
    Changed {
        name: String,
        health: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendChange {
    Added {
        name: String,
        listen: Vec<SocketAddr>,
    },
    /// Everything it had goes: its listeners close, its backends drain.
    Removed {
        name: String,
        listen: Vec<SocketAddr>,
        backends: Vec<BackendId>,
    },
    Changed {
        name: String,
        listen_added: Vec<SocketAddr>,
        listen_removed: Vec<SocketAddr>,
        /// Balance, timeouts, retries or other frontend-wide settings changed.
        settings_changed: bool,
        backends: Vec<BackendChange>,
    },
}

impl FrontendChange {
    pub fn name(&self) -> &str {
        match self {
            FrontendChange::Added { name, .. }
            | FrontendChange::Removed { name, .. }
            | FrontendChange::Changed { name, .. } => name,
        }
    }
}

/// `[global]` keys that a running process cannot change: a reload warns and keeps them.
pub const RESTART_ONLY: [&str; 5] = ["workers", "io", "relay", "cpu_affinity", "ring_buffers"];

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDiff {
    pub global_changed: bool,
    /// The [`RESTART_ONLY`] keys that changed.
    pub restart_only: Vec<&'static str>,
    pub admin_changed: bool,
    pub frontends: Vec<FrontendChange>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        !self.global_changed && !self.admin_changed && self.frontends.is_empty()
    }

    /// (frontend, address) pairs to bind: every address of an added frontend, the new ones
    /// of a changed one.
    pub fn listens_added(&self) -> Vec<(&str, SocketAddr)> {
        self.listens(|f| match f {
            FrontendChange::Added { listen, .. } => Some(listen),
            FrontendChange::Changed { listen_added, .. } => Some(listen_added),
            FrontendChange::Removed { .. } => None,
        })
    }

    /// (frontend, address) pairs to close: every address of a removed frontend, the dropped
    /// ones of a changed one.
    pub fn listens_removed(&self) -> Vec<(&str, SocketAddr)> {
        self.listens(|f| match f {
            FrontendChange::Removed { listen, .. } => Some(listen),
            FrontendChange::Changed { listen_removed, .. } => Some(listen_removed),
            FrontendChange::Added { .. } => None,
        })
    }

    fn listens<'a>(
        &'a self,
        pick: impl Fn(&'a FrontendChange) -> Option<&'a Vec<SocketAddr>>,
    ) -> Vec<(&'a str, SocketAddr)> {
        self.frontends
            .iter()
            .flat_map(|f| pick(f).into_iter().flatten().map(move |&a| (f.name(), a)))
            .collect()
    }

    /// (frontend, backend) pairs that leave: they drain.
    pub fn backends_removed(&self) -> Vec<(&str, &BackendId)> {
        let mut out = Vec::new();
        for f in &self.frontends {
            match f {
                FrontendChange::Removed { name, backends, .. } => {
                    out.extend(backends.iter().map(|b| (name.as_str(), b)));
                }
                FrontendChange::Changed { name, backends, .. } => {
                    out.extend(backends.iter().filter_map(|b| match b {
                        BackendChange::Removed(id) => Some((name.as_str(), id)),
                        _ => None,
                    }));
                }
                FrontendChange::Added { .. } => {}
            }
        }
        out
    }

    /// Frontends whose routing must be rebuilt (added or changed); the others keep theirs.
    pub fn rebuilt_frontends(&self) -> Vec<&str> {
        self.frontends
            .iter()
            .filter(|f| !matches!(f, FrontendChange::Removed { .. }))
            .map(FrontendChange::name)
            .collect()
    }

    /// Frontends that are gone.
    pub fn frontends_removed(&self) -> Vec<&str> {
        self.frontends
            .iter()
            .filter(|f| matches!(f, FrontendChange::Removed { .. }))
            .map(FrontendChange::name)
            .collect()
    }

    /// A one-line summary for the reload log line.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no changes".to_string();
        }
        let mut parts = Vec::new();
        if self.global_changed {
            parts.push("global settings changed".to_string());
        }
        if self.admin_changed {
            parts.push("admin settings changed (applied at restart)".to_string());
        }
        for f in &self.frontends {
            match f {
                FrontendChange::Added { name, .. } => parts.push(format!("frontend {name} added")),
                FrontendChange::Removed { name, .. } => {
                    parts.push(format!("frontend {name} removed"));
                }
                FrontendChange::Changed {
                    name,
                    listen_added,
                    listen_removed,
                    settings_changed,
                    backends,
                } => {
                    let mut bits = Vec::new();
                    for a in listen_added {
                        bits.push(format!("+listen {a}"));
                    }
                    for a in listen_removed {
                        bits.push(format!("-listen {a}"));
                    }
                    if *settings_changed {
                        bits.push("settings".to_string());
                    }
                    for b in backends {
                        bits.push(match b {
                            BackendChange::Added(b) => format!("+{}", b.name),
                            BackendChange::Removed(b) => format!("-{}", b.name),
                            BackendChange::Changed { name, .. } => format!("~{name}"),
                        });
                    }
                    parts.push(format!("frontend {name}: {}", bits.join(" ")));
                }
            }
        }
        parts.join("; ")
    }
}

fn same_settings(a: &Frontend, b: &Frontend) -> bool {
    a.balance == b.balance
        && a.connect_timeout == b.connect_timeout
        && a.connect_hedge == b.connect_hedge
        && a.idle_timeout == b.idle_timeout
        && a.retries == b.retries
        && a.hash_key == b.hash_key
        && a.maglev_table_size == b.maglev_table_size
        && a.on_marked_down == b.on_marked_down
        && a.on_ready == b.on_ready
        && a.on_unready == b.on_unready
        && a.log == b.log
        && a.traffic == b.traffic
        && a.drain_pace == b.drain_pace
        && a.client_timeout == b.client_timeout
        && a.server_timeout == b.server_timeout
        && a.tcp_keepalive == b.tcp_keepalive
        && a.source == b.source
        && a.discover == b.discover
        && a.sni == b.sni
}

fn restart_only(old: &Global, new: &Global) -> Vec<&'static str> {
    let changed = [
        old.workers != new.workers,
        old.io != new.io,
        old.relay != new.relay,
        old.cpu_affinity != new.cpu_affinity,
        old.ring_buffers != new.ring_buffers,
    ];
    RESTART_ONLY
        .iter()
        .zip(changed)
        .filter(|(_, c)| *c)
        .map(|(k, _)| *k)
        .collect()
}

fn id(b: &super::Backend) -> BackendId {
    BackendId {
        name: b.name.clone(),
        address: b.address,
    }
}

/// Computes what changed from `old` to `new` (both as served: with what `discover` entries
/// found expanded into backends). Backends are matched by name: a backend whose address
/// changed is a different server, so it is reported as removed and added.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut out = ConfigDiff {
        global_changed: old.global != new.global,
        restart_only: restart_only(&old.global, &new.global),
        admin_changed: old.admin != new.admin,
        frontends: Vec::new(),
    };
    for of in &old.frontends {
        if new.frontend(&of.name).is_none() {
            out.frontends.push(FrontendChange::Removed {
                name: of.name.clone(),
                listen: of.listen.clone(),
                backends: of.backends.iter().map(id).collect(),
            });
        }
    }
    for nf in &new.frontends {
        let Some(of) = old.frontend(&nf.name) else {
            out.frontends.push(FrontendChange::Added {
                name: nf.name.clone(),
                listen: nf.listen.clone(),
            });
            continue;
        };
        let listen_added: Vec<_> = nf
            .listen
            .iter()
            .filter(|a| !of.listen.contains(a))
            .copied()
            .collect();
        let listen_removed: Vec<_> = of
            .listen
            .iter()
            .filter(|a| !nf.listen.contains(a))
            .copied()
            .collect();
        let mut backends = Vec::new();
        for ob in &of.backends {
            match nf.backends.iter().find(|b| b.name == ob.name) {
                Some(nb) if nb.address != ob.address => {
                    backends.push(BackendChange::Removed(id(ob)));
                    backends.push(BackendChange::Added(id(nb)));
                }
                Some(nb) if nb != ob => backends.push(BackendChange::Changed {
                    name: ob.name.clone(),
                    health: nb.health != ob.health,
                }),
                Some(_) => {}
                None => backends.push(BackendChange::Removed(id(ob))),
            }
        }
        for nb in &nf.backends {
            if !of.backends.iter().any(|b| b.name == nb.name) {
                backends.push(BackendChange::Added(id(nb)));
            }
        }
        // Anything else that differs (backends in another order, which select differently)
        // counts as settings, so that the frontend is rebuilt.
        let explained =
            !listen_added.is_empty() || !listen_removed.is_empty() || !backends.is_empty();
        let settings_changed = !same_settings(of, nf) || (!explained && of != nf);
        if explained || settings_changed {
            out.frontends.push(FrontendChange::Changed {
                name: nf.name.clone(),
                listen_added,
                listen_removed,
                settings_changed,
                backends,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra_backend: &str, weight: u32) -> Config {
        Config::parse(
            &format!(
                r#"
[[frontend]]
name = "web"
listen = ["127.0.0.1:8080"]
[[frontend.backend]]
name = "a"
address = "127.0.0.1:9001"
weight = {weight}
{extra_backend}
"#
            ),
            "t",
        )
        .unwrap()
    }

    const B: &str = "[[frontend.backend]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"";

    fn b_id() -> BackendId {
        BackendId {
            name: "b".into(),
            address: "127.0.0.1:9002".parse().unwrap(),
        }
    }

    #[test]
    fn an_unchanged_config_is_an_empty_diff() {
        let a = cfg("", 1);
        assert!(diff(&a, &a.clone()).is_empty());
        assert_eq!(diff(&a, &a).summary(), "no changes");
        assert!(diff(&a, &a).rebuilt_frontends().is_empty());
    }

    #[test]
    fn a_weight_change_rebuilds_its_frontend_and_drains_nothing() {
        let d = diff(&cfg("", 1), &cfg("", 3));
        assert_eq!(
            d.frontends,
            vec![FrontendChange::Changed {
                name: "web".into(),
                listen_added: vec![],
                listen_removed: vec![],
                settings_changed: false,
                backends: vec![BackendChange::Changed {
                    name: "a".into(),
                    health: false
                }],
            }]
        );
        assert_eq!(d.rebuilt_frontends(), ["web"]);
        assert!(d.backends_removed().is_empty());
        assert!(d.listens_added().is_empty() && d.listens_removed().is_empty());
        assert_eq!(d.summary(), "frontend web: ~a");
    }

    #[test]
    fn added_removed_and_reweighted_backends_are_named() {
        let old = cfg("", 1);
        let new = cfg(B, 3);
        let d = diff(&old, &new);
        assert_eq!(
            d.frontends,
            vec![FrontendChange::Changed {
                name: "web".into(),
                listen_added: vec![],
                listen_removed: vec![],
                settings_changed: false,
                backends: vec![
                    BackendChange::Changed {
                        name: "a".into(),
                        health: false
                    },
                    BackendChange::Added(b_id())
                ],
            }]
        );
        let back = diff(&new, &old);
        assert!(back.summary().contains("-b"), "{}", back.summary());
        assert_eq!(back.backends_removed(), [("web", &b_id())]);
    }

    #[test]
    fn a_backend_removed_and_added_back_is_removed_then_added_under_the_same_identity() {
        let (a, b) = (cfg(B, 1), cfg("", 1));
        let gone = diff(&a, &b);
        assert_eq!(gone.backends_removed(), [("web", &b_id())]);
        let back = diff(&b, &a);
        assert!(back.backends_removed().is_empty());
        assert_eq!(
            back.frontends,
            vec![FrontendChange::Changed {
                name: "web".into(),
                listen_added: vec![],
                listen_removed: vec![],
                settings_changed: false,
                backends: vec![BackendChange::Added(b_id())],
            }]
        );
    }

    #[test]
    fn a_changed_address_is_another_server() {
        let old = cfg(B, 1);
        let new = cfg(&B.replace("9002", "9003"), 1);
        let d = diff(&old, &new);
        assert_eq!(d.backends_removed(), [("web", &b_id())]);
        assert!(d.summary().contains("-b +b"), "{}", d.summary());
    }

    #[test]
    fn a_health_setting_change_is_flagged_for_the_checker() {
        let old = cfg(B, 1);
        let new = cfg(
            &format!("{B}\n[frontend.backend.health]\ninterval = \"250ms\""),
            1,
        );
        let d = diff(&old, &new);
        assert_eq!(
            d.frontends,
            vec![FrontendChange::Changed {
                name: "web".into(),
                listen_added: vec![],
                listen_removed: vec![],
                settings_changed: false,
                backends: vec![BackendChange::Changed {
                    name: "b".into(),
                    health: true
                }],
            }]
        );
        assert!(d.backends_removed().is_empty());
    }

    #[test]
    fn whole_frontends_added_and_removed_carry_their_listeners_and_backends() {
        let old = cfg("", 1);
        let mut new = old.clone();
        new.frontends[0].name = "api".into();
        let d = diff(&old, &new);
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            d.frontends,
            vec![
                FrontendChange::Removed {
                    name: "web".into(),
                    listen: vec![addr],
                    backends: vec![BackendId {
                        name: "a".into(),
                        address: "127.0.0.1:9001".parse().unwrap()
                    }],
                },
                FrontendChange::Added {
                    name: "api".into(),
                    listen: vec![addr]
                }
            ]
        );
        assert_eq!(d.listens_added(), [("api", addr)]);
        assert_eq!(d.listens_removed(), [("web", addr)]);
        assert_eq!(d.rebuilt_frontends(), ["api"]);
        assert_eq!(d.frontends_removed(), ["web"]);
        assert_eq!(d.backends_removed().len(), 1);
    }

    #[test]
    fn a_readdressed_frontend_binds_the_new_address_and_closes_the_old() {
        let old = cfg("", 1);
        let mut new = old.clone();
        let addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        new.frontends[0].listen = vec![addr];
        let d = diff(&old, &new);
        assert_eq!(d.listens_added(), [("web", addr)]);
        assert_eq!(
            d.listens_removed(),
            [("web", "127.0.0.1:8080".parse().unwrap())]
        );
        assert!(d.backends_removed().is_empty());
        assert_eq!(d.rebuilt_frontends(), ["web"]);
    }

    #[test]
    fn only_the_frontend_that_changed_is_rebuilt_and_reordered_backends_count() {
        let two = |w: u32| {
            let mut c = cfg(B, 1);
            let mut other = c.frontends[0].clone();
            other.name = "other".into();
            other.listen = vec!["127.0.0.1:8081".parse().unwrap()];
            other.backends[0].weight = w;
            c.frontends.push(other);
            c
        };
        let d = diff(&two(1), &two(2));
        assert_eq!(d.rebuilt_frontends(), ["other"]);
        let mut swapped = two(1);
        swapped.frontends[0].backends.reverse();
        let d = diff(&two(1), &swapped);
        assert_eq!(d.rebuilt_frontends(), ["web"]);
    }

    #[test]
    fn restart_only_global_keys_are_named() {
        let old = cfg("", 1);
        let mut new = old.clone();
        new.global.workers += 1;
        new.global.cpu_affinity = crate::config::CpuAffinity::Auto;
        new.global.shutdown_timeout += std::time::Duration::from_secs(1);
        let d = diff(&old, &new);
        assert!(d.global_changed);
        assert_eq!(d.restart_only, ["workers", "cpu_affinity"]);
        assert!(d.rebuilt_frontends().is_empty());
    }
}
