//! Validation of a frontend's accept-time controls (`accept_proxy`, `proxy_timeout`, `allow`,
//! `deny`, `max_connections_per_source`, `rate_per_source`) into [`Traffic`], and of its SNI
//! routes (`[[frontend.route]]`, `sni_timeout`, a backend's `pool`) into [`SniRouting`].

use std::collections::{HashMap, HashSet};

use super::super::file::FileFrontend;
use super::super::traffic::{
    check_route_name, parse_net, parse_rate, Prefixes, Route, SniRouting, SourceAcl, Traffic,
    DEFAULT_PROXY_TIMEOUT, DEFAULT_QUEUE_TIMEOUT, DEFAULT_SNI_TIMEOUT,
};
use super::Problems;

pub(super) fn validate_traffic(ff: &FileFrontend, p: &mut Problems<'_>) -> Traffic {
    let accept_proxy = ff.accept_proxy.unwrap_or(false);
    let proxy_timeout =
        p.positive_duration("proxy_timeout", &ff.proxy_timeout, DEFAULT_PROXY_TIMEOUT);
    if ff.proxy_timeout.is_some() && !accept_proxy {
        p.push(
            "proxy_timeout",
            "set without accept_proxy = true, so it would do nothing",
        );
    }
    let allow = ff.allow.as_ref().map(|l| prefixes("allow", l, p));
    if ff.allow.as_ref().is_some_and(|l| l.is_empty()) {
        p.push(
            "allow",
            "empty: it would refuse every client; remove the key to allow every address",
        );
    }
    let deny = ff.deny.as_ref().map(|l| prefixes("deny", l, p));
    let acl = match (allow, deny) {
        (None, None) => None,
        (allow, deny) => Some(SourceAcl {
            allow,
            deny: deny.unwrap_or_default(),
        }),
    };
    let max_connections_per_source = p
        .opt_int_in(
            "max_connections_per_source",
            ff.max_connections_per_source,
            1,
            10_000_000,
        )
        .map(|n| n as u32);
    let rate_per_source = ff
        .rate_per_source
        .as_deref()
        .and_then(|text| match parse_rate(text) {
            Ok(r) => Some(r),
            Err(e) => {
                p.push("rate_per_source", e);
                None
            }
        });
    let queue_timeout = p.duration("queue_timeout", &ff.queue_timeout, DEFAULT_QUEUE_TIMEOUT);
    let max_connections = p
        .opt_int_in("max_connections", ff.max_connections, 1, 10_000_000)
        .map(|n| n as u32);
    Traffic {
        max_connections,
        queue_timeout,
        accept_proxy,
        proxy_timeout,
        acl,
        max_connections_per_source,
        rate_per_source,
    }
}

/// Every entry parsed; each bad one reported at its place in the list.
fn prefixes(key: &str, list: &[String], p: &mut Problems<'_>) -> Prefixes {
    let mut nets = Vec::with_capacity(list.len());
    for (i, text) in list.iter().enumerate() {
        match parse_net(text) {
            Ok(n) => nets.push(n),
            Err(e) => p.push_at(key, &format!("{key}.{i}"), e),
        }
    }
    Prefixes::build(&nets)
}

/// The frontend's routes: `None` without `[[frontend.route]]`. Every route names a pool some
/// backend is in, every backend's pool is named by a route, and no server name is listed
/// twice.
pub(super) fn validate_routes(ff: &FileFrontend, p: &mut Problems<'_>) -> Option<SniRouting> {
    let timeout = p.positive_duration("sni_timeout", &ff.sni_timeout, DEFAULT_SNI_TIMEOUT);
    let pools: HashSet<&str> = ff
        .backend
        .iter()
        .filter_map(|b| b.pool.as_deref())
        .collect();
    if ff.route.is_empty() {
        if ff.sni_timeout.is_some() {
            p.push(
                "sni_timeout",
                "set without a [[frontend.route]], so it would do nothing",
            );
        }
        for (i, b) in ff.backend.iter().enumerate() {
            if let Some(pool) = &b.pool {
                backend_problems(ff, i, p).push(
                    "pool",
                    format!(
                        "pool \"{pool}\" without a [[frontend.route]] naming it: its backends would take no traffic"
                    ),
                );
            }
        }
        return None;
    }
    let mut routes = Vec::new();
    // Each name, and the route (1-based) that lists it.
    let mut listed: HashMap<String, usize> = HashMap::new();
    for (i, fr) in ff.route.iter().enumerate() {
        let mut rp = p.nested(&format!("route #{}", i + 1), &format!("route.{i}"));
        let pool = match fr.pool.as_deref() {
            None => {
                rp.push("pool", "missing: name the pool, like pool = \"a\", that the backends for these names carry");
                None
            }
            Some(pool) if !pools.contains(pool) => {
                rp.push("pool", format!("no backend has pool = \"{pool}\""));
                None
            }
            Some(pool) => Some(pool.to_string()),
        };
        let mut names = Vec::new();
        match &fr.sni {
            None => rp.push(
                "sni",
                "missing: list the server names, like sni = [\"a.example\", \"*.b.example\"]",
            ),
            Some(l) if l.is_empty() => rp.push("sni", "empty: list at least one server name"),
            Some(l) => {
                for (j, name) in l.iter().enumerate() {
                    let at = format!("sni.{j}");
                    if let Err(e) = check_route_name(name) {
                        rp.push_at("sni", &at, e);
                        continue;
                    }
                    if let Some(other) = listed.insert(name.clone(), i + 1) {
                        rp.push_at(
                            "sni",
                            &at,
                            if other == i + 1 {
                                format!("\"{name}\" is listed twice")
                            } else {
                                format!("\"{name}\" is also listed in route #{other}")
                            },
                        );
                        continue;
                    }
                    names.push(name.clone());
                }
            }
        }
        if let Some(pool) = pool {
            routes.push(Route { names, pool });
        }
    }
    for (i, b) in ff.backend.iter().enumerate() {
        if let Some(pool) = &b.pool {
            if ff.route.iter().all(|r| r.pool.as_deref() != Some(pool)) {
                backend_problems(ff, i, p).push(
                    "pool",
                    format!("no [[frontend.route]] names pool \"{pool}\": its backends would take no traffic"),
                );
            }
        }
    }
    Some(SniRouting { routes, timeout })
}

/// Problems about `ff.backend[i]`, labelled like the backend's own.
fn backend_problems<'p>(ff: &FileFrontend, i: usize, p: &'p mut Problems<'_>) -> Problems<'p> {
    let label = match &ff.backend[i].name {
        Some(n) => format!("backend \"{n}\""),
        None => format!("backend #{}", i + 1),
    };
    p.nested(&label, &format!("backend.{i}"))
}
