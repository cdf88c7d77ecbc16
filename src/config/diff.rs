//! The reload diff: a pure function from (old config, new config) to a typed change-set.
//!
//! Applying a reload is "validate -> diff -> apply"; keeping the diff pure lets it be unit
//! tested without sockets, and an empty diff means the reload is a no-op.

use std::net::SocketAddr;

use super::{Config, Frontend};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChange {
    Added(String),
    Removed(String),
    /// Weight, address-independent settings or health settings changed.
    Changed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendChange {
    Added(String),
    Removed(String),
    Changed {
        name: String,
        listen_added: Vec<SocketAddr>,
        listen_removed: Vec<SocketAddr>,
        /// Balance, timeouts, retries or other frontend-wide settings changed.
        settings_changed: bool,
        backends: Vec<BackendChange>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDiff {
    pub global_changed: bool,
    pub admin_changed: bool,
    pub frontends: Vec<FrontendChange>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        !self.global_changed && !self.admin_changed && self.frontends.is_empty()
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
                FrontendChange::Added(n) => parts.push(format!("frontend {n} added")),
                FrontendChange::Removed(n) => parts.push(format!("frontend {n} removed")),
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
                            BackendChange::Added(n) => format!("+{n}"),
                            BackendChange::Removed(n) => format!("-{n}"),
                            BackendChange::Changed(n) => format!("~{n}"),
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

/// Computes what changed from `old` to `new`. Backends are matched by name: a backend whose
/// address changed is a different server, so it is reported as removed and added.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut out = ConfigDiff {
        global_changed: old.global != new.global,
        admin_changed: old.admin != new.admin,
        frontends: Vec::new(),
    };
    for of in &old.frontends {
        if new.frontend(&of.name).is_none() {
            out.frontends.push(FrontendChange::Removed(of.name.clone()));
        }
    }
    for nf in &new.frontends {
        let Some(of) = old.frontend(&nf.name) else {
            out.frontends.push(FrontendChange::Added(nf.name.clone()));
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
                    backends.push(BackendChange::Removed(ob.name.clone()));
                    backends.push(BackendChange::Added(nb.name.clone()));
                }
                Some(nb) if nb != ob => backends.push(BackendChange::Changed(ob.name.clone())),
                Some(_) => {}
                None => backends.push(BackendChange::Removed(ob.name.clone())),
            }
        }
        for nb in &nf.backends {
            if !of.backends.iter().any(|b| b.name == nb.name) {
                backends.push(BackendChange::Added(nb.name.clone()));
            }
        }
        let settings_changed = !same_settings(of, nf);
        if !listen_added.is_empty()
            || !listen_removed.is_empty()
            || settings_changed
            || !backends.is_empty()
        {
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

    #[test]
    fn an_unchanged_config_is_an_empty_diff() {
        let a = cfg("", 1);
        assert!(diff(&a, &a.clone()).is_empty());
        assert_eq!(diff(&a, &a).summary(), "no changes");
    }

    #[test]
    fn added_removed_and_reweighted_backends_are_named() {
        let old = cfg("", 1);
        let new = cfg(
            "[[frontend.backend]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"",
            3,
        );
        let d = diff(&old, &new);
        assert_eq!(
            d.frontends,
            vec![FrontendChange::Changed {
                name: "web".into(),
                listen_added: vec![],
                listen_removed: vec![],
                settings_changed: false,
                backends: vec![
                    BackendChange::Changed("a".into()),
                    BackendChange::Added("b".into())
                ],
            }]
        );
        let back = diff(&new, &old);
        assert!(back.summary().contains("-b"), "{}", back.summary());
    }

    #[test]
    fn whole_frontends_added_and_removed_are_reported() {
        let old = cfg("", 1);
        let mut new = old.clone();
        new.frontends[0].name = "api".into();
        let d = diff(&old, &new);
        assert_eq!(
            d.frontends,
            vec![
                FrontendChange::Removed("web".into()),
                FrontendChange::Added("api".into())
            ]
        );
    }
}
