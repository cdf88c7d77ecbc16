//! Validation of a frontend's accept-time controls (`accept_proxy`, `proxy_timeout`, `allow`,
//! `deny`, `max_connections_per_source`, `rate_per_source`) into [`Traffic`].

use super::super::file::FileFrontend;
use super::super::traffic::{
    parse_net, parse_rate, Prefixes, SourceAcl, Traffic, DEFAULT_PROXY_TIMEOUT,
    DEFAULT_QUEUE_TIMEOUT,
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
