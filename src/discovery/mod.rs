//! DNS service discovery: backend groups whose addresses come from DNS (`discover =
//! "tasks.web:8080"`, `discover_srv = "_api._tcp.service.consul"`) and change while ringlb runs.
//!
//! Where it sits: [`Discovery`] lives in the control loop next to the health checks. It runs
//! one tokio task per `discover` entry on the control thread's runtime; each task asks DNS
//! ([`dns`], non-blocking UDP: the control thread never waits on a resolver), again after
//! `resolve_interval` or the answer's TTL, and sends an [`Update`] when the set of addresses
//! changed. The loop hands it to [`apply`], which stores the set in `Server::discovered` and
//! applies the config expanded with it ([`expand`]) exactly as a reload would: a new address
//! is a new backend (down until `rise` checks pass, see `Discover::template`), a vanished one
//! drains like a backend removed by a reload.
//!
//! A host name in `address` (one not in /etc/hosts, see `config::validate`) is an entry of
//! the same kind with `single` set: one backend named as the entry, at the lowest address
//! found, re-resolved the same way.
//!
//! A failed or empty answer never changes the set: the last good one is kept, and the failure
//! is logged once (and again only after an answer succeeded in between). So a name that
//! vanishes, a resolver that is down or answers garbage, never takes backends away.

pub mod dns;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Backend, Config, ConfigDiff, Discover, DiscoverTarget};
use crate::server::{ReloadOutcome, Server};

/// Shortest and longest wait between lookups taken from a TTL.
pub const TTL_CLAMP: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
/// The wait after an answer without TTL (an SRV set whose targets had none), or after a
/// failed lookup when `resolve_interval` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Addresses taken from one entry's answer; the rest are ignored (and that is logged).
pub const MAX_ADDRESSES: usize = 256;
/// SRV targets resolved per lookup.
const MAX_SRV_TARGETS: usize = 32;

/// An entry's identity: (frontend, entry name).
pub type EntryKey = (String, String);

/// The addresses each entry found last, sorted.
pub type Found = HashMap<EntryKey, (DiscoverTarget, Vec<SocketAddr>)>;

/// A changed address set, from a lookup task to the control loop.
#[derive(Debug)]
pub struct Update {
    pub key: EntryKey,
    pub target: DiscoverTarget,
    pub addrs: Vec<SocketAddr>,
}

/// Lookup counts per entry, for metrics.
#[derive(Debug, Default)]
pub struct EntryStats {
    pub lookups_ok: AtomicU64,
    pub lookups_failed: AtomicU64,
    /// Addresses in the set in use.
    pub addresses: AtomicU64,
}

/// Every entry's counts, shared with the metrics exporter.
#[derive(Debug, Default)]
pub struct Stats {
    entries: Mutex<HashMap<EntryKey, Arc<EntryStats>>>,
}

impl Stats {
    fn entry(&self, key: &EntryKey) -> Arc<EntryStats> {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone()).or_default().clone()
    }

    /// (frontend, entry, counts) of every entry, for the exporter.
    pub fn all(&self) -> Vec<(EntryKey, Arc<EntryStats>)> {
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn retain(&self, keep: impl Fn(&EntryKey) -> bool) {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| keep(k));
    }
}

/// What a running task was started with; a reload that changes any of it restarts the task.
type TaskSpec = (DiscoverTarget, Option<Duration>, Vec<SocketAddr>);

/// The lookup tasks of every `discover` entry, owned by the control loop.
pub struct Discovery {
    tasks: HashMap<EntryKey, (TaskSpec, JoinHandle<()>)>,
    updates: mpsc::UnboundedSender<Update>,
    pub stats: Arc<Stats>,
}

impl Discovery {
    /// The receiver is for the control loop to `select!` on.
    pub fn new(stats: Arc<Stats>) -> (Discovery, mpsc::UnboundedReceiver<Update>) {
        let (updates, rx) = mpsc::unbounded_channel();
        let me = Discovery {
            tasks: HashMap::new(),
            updates,
            stats,
        };
        (me, rx)
    }

    /// Starts lookups for new entries, restarts changed ones, stops removed ones. Call after
    /// start and after every applied reload, with the config as loaded.
    pub fn sync(&mut self, config: &Config) {
        let mut wanted = HashMap::new();
        for f in &config.frontends {
            for d in &f.discover {
                let spec: TaskSpec = (
                    d.target.clone(),
                    d.resolve_interval,
                    config.global.resolvers.clone(),
                );
                wanted.insert((f.name.clone(), d.name.clone()), spec);
            }
        }
        self.tasks.retain(|k, (spec, handle)| {
            let keep = wanted.get(k) == Some(spec);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, spec) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let handle = tokio::spawn(run(
                key.clone(),
                spec.clone(),
                self.stats.entry(&key),
                self.updates.clone(),
            ));
            self.tasks.insert(key, (spec, handle));
        }
        let tasks = &self.tasks;
        self.stats.retain(|k| tasks.contains_key(k));
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for (_, handle) in self.tasks.values() {
            handle.abort();
        }
    }
}

/// `frontend/entry`, as log lines name an entry.
fn label(key: &EntryKey) -> String {
    format!("{}/{}", key.0, key.1)
}

/// One entry's lookup loop: ask, report a changed set, wait, ask again.
async fn run(
    key: EntryKey,
    (target, interval, resolvers): TaskSpec,
    stats: Arc<EntryStats>,
    updates: mpsc::UnboundedSender<Update>,
) {
    let mut last: Option<Vec<SocketAddr>> = None;
    // The failure logged last; cleared by a good answer, so each failure is logged once.
    let mut failing: Option<String> = None;
    loop {
        let wait = match lookup(&target, &resolvers).await {
            Ok((mut addrs, ttl)) if !addrs.is_empty() => {
                stats.lookups_ok.fetch_add(1, Ordering::Relaxed);
                if failing.take().is_some() {
                    crate::info!(
                        "discover {}: {target} resolves again ({} addresses)",
                        label(&key),
                        addrs.len()
                    );
                }
                addrs.sort();
                addrs.dedup();
                if addrs.len() > MAX_ADDRESSES {
                    if last.is_none() {
                        crate::warn!(
                            "discover {}: {target} gave {} addresses; using the first {MAX_ADDRESSES}",
                            label(&key),
                            addrs.len()
                        );
                    }
                    addrs.truncate(MAX_ADDRESSES);
                }
                if last.as_ref() != Some(&addrs) {
                    stats.addresses.store(addrs.len() as u64, Ordering::Relaxed);
                    last = Some(addrs.clone());
                    let update = Update {
                        key: key.clone(),
                        target: target.clone(),
                        addrs,
                    };
                    if updates.send(update).is_err() {
                        return;
                    }
                }
                interval.unwrap_or_else(|| match ttl {
                    Some(t) => Duration::from_secs(u64::from(t)).clamp(TTL_CLAMP.0, TTL_CLAMP.1),
                    None => DEFAULT_INTERVAL,
                })
            }
            outcome => {
                stats.lookups_failed.fetch_add(1, Ordering::Relaxed);
                let why = match outcome {
                    Err(e) => e.to_string(),
                    Ok(_) => "the answer holds no address".to_string(),
                };
                if failing.as_deref() != Some(why.as_str()) {
                    let kept = last.as_ref().map_or(0, Vec::len);
                    crate::warn!(
                        "discover {}: looking up {target} failed: {why}; keeping the last {kept} addresses",
                        label(&key)
                    );
                    failing = Some(why);
                }
                interval.unwrap_or(DEFAULT_INTERVAL)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The addresses of `target`, with the smallest TTL of the records used.
async fn lookup(
    target: &DiscoverTarget,
    resolvers: &[SocketAddr],
) -> Result<(Vec<SocketAddr>, Option<u32>), dns::DnsError> {
    let servers = dns::servers(resolvers).await?;
    match target {
        DiscoverTarget::Host { host, port } => {
            let (ips, ttl) = addresses(&servers, host).await?;
            Ok((
                ips.into_iter()
                    .map(|ip| SocketAddr::new(ip, *port))
                    .collect(),
                ttl,
            ))
        }
        DiscoverTarget::Srv(name) => {
            let answer = dns::query(&servers, name, dns::SRV).await?;
            // Only the best (lowest) priority is used; the others are fallbacks in SRV's model,
            // and health checks already route around a dead target.
            let best = answer.srv.iter().map(|s| s.priority).min();
            let mut ttl = answer.ttl;
            let mut out = Vec::new();
            for s in answer
                .srv
                .iter()
                .filter(|s| Some(s.priority) == best && s.port != 0)
                .take(MAX_SRV_TARGETS)
            {
                let glue: Vec<IpAddr> = answer
                    .glue
                    .iter()
                    .filter(|(owner, _)| *owner == s.target)
                    .map(|(_, ip)| *ip)
                    .collect();
                let ips = if glue.is_empty() {
                    match addresses(&servers, &s.target).await {
                        Ok((ips, t)) => {
                            ttl = min_ttl(ttl, t);
                            ips
                        }
                        // One target that does not resolve does not void the others.
                        Err(_) => Vec::new(),
                    }
                } else {
                    glue
                };
                out.extend(ips.into_iter().map(|ip| SocketAddr::new(ip, s.port)));
            }
            Ok((out, ttl))
        }
    }
}

fn min_ttl(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A and AAAA records of `host`, asked at once. One family failing is fine if the other
/// answered; NXDOMAIN or both failing is the error.
async fn addresses(
    servers: &[SocketAddr],
    host: &str,
) -> Result<(Vec<IpAddr>, Option<u32>), dns::DnsError> {
    let (v4, v6) = tokio::join!(
        dns::query(servers, host, dns::A),
        dns::query(servers, host, dns::AAAA)
    );
    match (v4, v6) {
        (Err(e), Err(_)) => Err(e),
        (Err(dns::DnsError::NoSuchName), _) | (_, Err(dns::DnsError::NoSuchName)) => {
            Err(dns::DnsError::NoSuchName)
        }
        (a, b) => {
            let (mut ips, mut ttl) = (Vec::new(), None);
            for answer in [a, b].into_iter().flatten() {
                ttl = min_ttl(ttl, answer.ttl);
                ips.extend(answer.addrs);
            }
            Ok((ips, ttl))
        }
    }
}

/// The name of the backend entry `entry` found at `addr`: `web-10.0.0.5:8080`.
pub fn backend_name(entry: &str, addr: SocketAddr) -> String {
    format!("{entry}-{addr}")
}

/// `config` with, in each frontend, one backend per address each `discover` entry found,
/// after the static ones. Pure: the reload path and discovery updates both go through it.
pub fn expand(config: &Config, found: &Found) -> Config {
    let mut out = config.clone();
    for f in &mut out.frontends {
        for d in &f.discover {
            let Some((target, addrs)) = found.get(&(f.name.clone(), d.name.clone())) else {
                continue;
            };
            if *target != d.target {
                continue;
            }
            if d.single {
                // The lowest address (the set is sorted): stable while DNS rotates its order.
                if let Some(&a) = addrs.iter().min() {
                    f.backends.push(Backend {
                        name: d.name.clone(),
                        address: a,
                        ..d.template.clone()
                    });
                }
                continue;
            }
            f.backends.extend(addrs.iter().map(|&a| discovered(d, a)));
        }
    }
    out
}

fn discovered(d: &Discover, address: SocketAddr) -> Backend {
    Backend {
        name: backend_name(&d.name, address),
        address,
        ..d.template.clone()
    }
}

/// What serving `base` with the addresses `found` would change from `running` (the config
/// served now, expanded): the config to serve, and the diff to apply. Pure: a reload and a
/// discovery update are both this, then `Server::apply_diff`.
pub fn plan(running: &Config, base: &Config, found: &Found) -> (Config, ConfigDiff) {
    let new = expand(base, found);
    let d = crate::config::diff(running, &new);
    (new, d)
}

/// The part of `found` that `config` still asks for (same frontend, entry and target).
pub fn kept(found: &Found, config: &Config) -> Found {
    found
        .iter()
        .filter(|((fe, name), (target, _))| {
            config.frontend(fe).is_some_and(|f| {
                f.discover
                    .iter()
                    .any(|d| &d.name == name && &d.target == target)
            })
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Applies a changed address set: logs it and republishes like a reload. Returns true if the
/// backends changed (the caller then syncs the health checks).
pub fn apply(server: &mut Server, update: Update) -> bool {
    let Update { key, target, addrs } = update;
    let before = server
        .discovered
        .get(&key)
        .filter(|(t, _)| *t == target)
        .map(|(_, a)| a.clone())
        .unwrap_or_default();
    let added: Vec<String> = addrs
        .iter()
        .filter(|a| !before.contains(a))
        .map(ToString::to_string)
        .collect();
    let removed: Vec<String> = before
        .iter()
        .filter(|a| !addrs.contains(a))
        .map(ToString::to_string)
        .collect();
    let n = addrs.len();
    let single = server
        .base
        .frontend(&key.0)
        .and_then(|f| f.discover.iter().find(|d| d.name == key.1))
        .is_some_and(|d| d.single);
    let now = addrs.iter().min().copied();
    let mut found = server.discovered.clone();
    found.insert(key.clone(), (target.clone(), addrs));
    match server.apply_discovered(found) {
        ReloadOutcome::Applied(_) if single => {
            let was = before.iter().min();
            crate::info!(
                "Server {}/{}: {target} resolves to {}{}",
                key.0,
                key.1,
                now.map_or_else(|| "nothing".to_string(), |a| a.to_string()),
                was.map_or_else(String::new, |a| format!(" (was {a}, draining)")),
            );
            true
        }
        ReloadOutcome::Applied(_) => {
            crate::info!(
                "discover {}: {target} has {n} addresses{}{}",
                label(&key),
                if added.is_empty() {
                    String::new()
                } else {
                    format!(", new: {}", added.join(" "))
                },
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(", gone (draining): {}", removed.join(" "))
                },
            );
            true
        }
        ReloadOutcome::Unchanged => false,
        ReloadOutcome::Failed(why) => {
            crate::error!(
                "discover {}: cannot apply the new addresses: {why}",
                label(&key)
            );
            false
        }
    }
}

/// For `ringlb check`: asks DNS once, all at once, for every name the config leaves to the
/// resolver (a host name in `address`, `discover`, `discover_srv`) and describes each that
/// does not resolve now, naming its frontend and entry. Not an error: ringlb starts without
/// those backends and keeps asking (a name may be published later, or DNS be down for a
/// moment), but a typing error in a host name should not pass a check unseen.
pub fn unresolved(config: &Config) -> Vec<String> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![format!("host names not looked up: {e}")],
    };
    rt.block_on(async {
        let entries: Vec<(String, String, DiscoverTarget)> = config
            .frontends
            .iter()
            .flat_map(|f| {
                f.discover
                    .iter()
                    .map(|d| (f.name.clone(), d.name.clone(), d.target.clone()))
            })
            .collect();
        if entries.is_empty() {
            return Vec::new();
        }
        let servers = match dns::servers(&config.global.resolvers).await {
            Ok(s) => Arc::new(s),
            Err(e) => return vec![format!("host names not looked up: {e}")],
        };
        let mut set = tokio::task::JoinSet::new();
        for (i, (_, _, target)) in entries.iter().enumerate() {
            let (target, servers) = (target.clone(), servers.clone());
            set.spawn(async move {
                let found = match &target {
                    DiscoverTarget::Host { host, .. } => {
                        match dns::query(&servers, host, dns::A).await {
                            Ok(a) if !a.addrs.is_empty() => Ok(()),
                            _ => match dns::query(&servers, host, dns::AAAA).await {
                                Ok(a) if !a.addrs.is_empty() => Ok(()),
                                Ok(_) => Err("no A or AAAA record".to_string()),
                                Err(e) => Err(e.to_string()),
                            },
                        }
                    }
                    DiscoverTarget::Srv(name) => match dns::query(&servers, name, dns::SRV).await {
                        Ok(a) if !a.srv.is_empty() => Ok(()),
                        Ok(_) => Err("no SRV record".to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                };
                (i, found)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = set.join_next().await {
            if let Ok((i, Err(why))) = done {
                let (fe, entry, target) = &entries[i];
                out.push((
                    i,
                    format!(
                        "frontend \"{fe}\": backend \"{entry}\": {target} does not resolve now \
                         ({why}); ringlb would start without it and keep asking"
                    ),
                ));
            }
        }
        out.sort();
        out.into_iter().map(|(_, line)| line).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[[frontend]]
name = "web"
listen = ["127.0.0.1:0"]
[[frontend.backend]]
name = "static"
address = "127.0.0.1:9001"
[[frontend.backend]]
name = "api"
discover = "tasks.web:8080"
weight = 3
"#;

    fn found(addrs: &[&str]) -> Found {
        let target = DiscoverTarget::Host {
            host: "tasks.web".into(),
            port: 8080,
        };
        let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        HashMap::from([(("web".to_string(), "api".to_string()), (target, addrs))])
    }

    #[test]
    fn each_found_address_becomes_a_backend_named_for_it_with_the_entry_settings() {
        let config = Config::parse(TEXT, "t").unwrap();
        let f = &config.frontends[0];
        assert_eq!(f.backends.len(), 1);
        assert!(!f.discover[0].template.health.initial_up);
        let e = expand(&config, &found(&["10.0.0.5:8080", "10.0.0.6:8080"]));
        let names: Vec<&str> = e.frontends[0]
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(names, ["static", "api-10.0.0.5:8080", "api-10.0.0.6:8080"]);
        assert_eq!(e.frontends[0].backends[1].weight, 3);
        assert!(!e.frontends[0].backends[1].health.initial_up);
        assert!(e.frontends[0].backends[0].health.initial_up);
    }

    #[test]
    fn a_reload_that_changes_the_target_drops_what_the_old_one_found() {
        let config = Config::parse(TEXT, "t").unwrap();
        let f = found(&["10.0.0.5:8080"]);
        assert_eq!(kept(&f, &config).len(), 1);
        let other = Config::parse(&TEXT.replace("tasks.web:8080", "tasks.api:8080"), "t").unwrap();
        assert!(kept(&f, &other).is_empty());
        assert_eq!(expand(&other, &f).frontends[0].backends.len(), 1);
    }

    #[test]
    fn a_host_name_in_address_is_one_backend_at_the_lowest_address_found() {
        let text = "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\n\
                    [[frontend.backend]]\nname = \"api\"\naddress = \"api.invalid:8080\"\n\
                    resolve_interval = \"2s\"\n";
        let config = Config::parse(text, "t").unwrap();
        let f = &config.frontends[0];
        assert!(f.backends.is_empty());
        let d = &f.discover[0];
        assert!(d.single && d.template.health.initial_up);
        assert_eq!(d.resolve_interval, Some(Duration::from_secs(2)));
        let target = DiscoverTarget::Host {
            host: "api.invalid".into(),
            port: 8080,
        };
        let addrs = ["10.0.0.7:8080", "10.0.0.5:8080", "[2001:db8::1]:8080"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let found = HashMap::from([(("web".to_string(), "api".to_string()), (target, addrs))]);
        let e = expand(&config, &found);
        assert_eq!(e.frontends[0].backends.len(), 1);
        assert_eq!(e.frontends[0].backends[0].name, "api");
        assert_eq!(
            e.frontends[0].backends[0].address,
            "10.0.0.5:8080".parse().unwrap()
        );
    }

    #[test]
    fn localhost_in_address_is_fixed_at_load_and_takes_no_resolve_interval() {
        let text = |extra: &str| {
            format!(
                "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\n\
                 [[frontend.backend]]\nname = \"a\"\naddress = \"localhost:8080\"\n{extra}"
            )
        };
        let config = Config::parse(&text(""), "t").unwrap();
        assert!(config.frontends[0].discover.is_empty());
        assert!(config.frontends[0].backends[0].address.ip().is_loopback());
        let e = Config::parse(&text("resolve_interval = \"1s\"\n"), "t").unwrap_err();
        assert!(e.to_string().contains("resolve_interval"), "{e}");
        let e = Config::parse(&text("").replace("localhost:8080", "bad name:1"), "t").unwrap_err();
        assert!(
            e.to_string().contains("is not an address or a host name"),
            "{e}"
        );
    }
}
