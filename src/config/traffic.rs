//! A frontend's accept-time controls, as validated runtime values: PROXY protocol from an
//! upstream balancer, source ACLs, per-source limits, the frontend's `max_connections` and
//! the `queue_timeout` that also bounds the wait for a backend slot (docs/traffic-controls.md).
//! The worker's gate (`worker::gate`) applies them; all are off by default, and a frontend
//! with none set pays nothing for them.
//!
//! The ACL matcher is built here, at config load: each list becomes sorted, merged address
//! ranges per family, so a lookup is one binary search however long the list.

use std::net::IpAddr;
use std::time::Duration;

/// The default `proxy_timeout`: long enough for a header that follows the upstream's
/// connect by a round trip or two across a datacenter, short enough that a silent or slow
/// client does not hold a connection slot for long (HAProxy's `timeout client` often
/// bounds the same wait; nginx uses `proxy_protocol_timeout 30s`).
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(3);
/// The default `queue_timeout` (HAProxy's `timeout queue` defaults to `timeout connect`;
/// 5 s is the usual explicit setting).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// The default `sni_timeout`: a ClientHello is the client's first flight, sent at once
/// after the TCP handshake; a client that has not sent it whole in 5 s is slow or not there.
pub const DEFAULT_SNI_TIMEOUT: Duration = Duration::from_secs(5);

/// A frontend's SNI routes (`[[frontend.route]]`, `sni_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRouting {
    pub routes: Vec<Route>,
    /// How long the whole ClientHello may take to arrive.
    pub timeout: Duration,
}

/// Clients whose server name is one of `names` go to the backends with `pool = pool`.
/// A name is lowercase, exact (`a.example`) or a wildcard for one label (`*.b.example`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub names: Vec<String>,
    pub pool: String,
}

/// Why `name` cannot be a route's server name, if it cannot: lowercase DNS labels of
/// letters, digits, '-' and '_', with at most a leading `*.` label.
pub fn check_route_name(name: &str) -> Result<(), String> {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if name.len() > 253 {
        return Err(format!("\"{name}\" is longer than 253 characters"));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "\"{name}\" must be lowercase (server names are matched without case): write \"{}\"",
            name.to_ascii_lowercase()
        ));
    }
    for label in rest.split('.') {
        if label == "*" {
            return Err(format!(
                "\"{name}\": a wildcard may only be the first label, like \"*.example.com\""
            ));
        }
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "\"{name}\" is not a host name: labels of 1-63 letters, digits, '-' or '_' \
                 separated by dots, optionally after \"*.\""
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Traffic {
    /// Read a PROXY header (v1 or v2) first; its address is the client's from then on.
    pub accept_proxy: bool,
    /// How long the whole header may take to arrive.
    pub proxy_timeout: Duration,
    /// `None` when neither `allow` nor `deny` is set.
    pub acl: Option<SourceAcl>,
    pub max_connections_per_source: Option<u32>,
    pub rate_per_source: Option<Rate>,
    /// How long a client waits for a slot when every backend is at its `max_connections`;
    /// zero closes it at once.
    pub queue_timeout: Duration,
    /// Most open client connections on this frontend; more wait (FIFO) up to `queue_timeout`.
    pub max_connections: Option<u32>,
}

impl Traffic {
    /// Whether any control is set: the data path skips the gate entirely otherwise.
    pub fn is_on(&self) -> bool {
        self.accept_proxy
            || self.max_connections.is_some()
            || self.acl.is_some()
            || self.max_connections_per_source.is_some()
            || self.rate_per_source.is_some()
    }

    /// Whether per-source state must be kept.
    pub fn tracks_sources(&self) -> bool {
        self.max_connections_per_source.is_some() || self.rate_per_source.is_some()
    }
}

/// `count` new connections per `per`, as a token bucket: a burst of `count`, refilled evenly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// A client address as the controls see it: an IPv4-mapped IPv6 address is its IPv4 address,
/// so `10.0.0.0/8` covers `::ffff:10.1.2.3` and both count as one source.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A set of address prefixes, as sorted, non-overlapping inclusive ranges per family.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prefixes {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Prefixes {
    /// Builds the set from `(address, prefix length)` pairs; lengths must be valid for the
    /// family (validation checks them).
    pub fn build(nets: &[(IpAddr, u8)]) -> Prefixes {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for &(ip, len) in nets {
            match canonical_net(ip, len) {
                (IpAddr::V4(a), len) => {
                    let (lo, hi) = range(u128::from(u32::from(a)), len, 32);
                    // Both fit: a 32-bit address with at most 32 host bits set.
                    v4.push((lo as u32, hi as u32));
                }
                (IpAddr::V6(a), len) => v6.push(range(u128::from(a), len, 128)),
            }
        }
        Prefixes {
            v4: merged(v4),
            v6: merged(v6),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(a) => within(&self.v4, u32::from(a)),
            IpAddr::V6(a) => within(&self.v6, u128::from(a)),
        }
    }
}

/// `::ffff:10.0.0.0/104` is `10.0.0.0/8`.
fn canonical_net(ip: IpAddr, len: u8) -> (IpAddr, u8) {
    match ip {
        IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), len - 96),
            None => (ip, len),
        },
        _ => (ip, len),
    }
}

/// The first and last address of `addr/len` in a family of `bits` bits (32 or 128), as
/// u128 so both families share one function.
fn range(addr: u128, len: u8, bits: u8) -> (u128, u128) {
    let host_bits = u32::from(bits.saturating_sub(len));
    let host = if host_bits == 0 {
        0
    } else {
        u128::MAX >> (128 - host_bits)
    };
    (addr & !host, addr | host)
}

fn merged<T: Copy + Ord + One>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            // Overlapping or adjacent (hi + 1 == lo): one range.
            Some(last) if lo <= last.1 || last.1.succ() == Some(lo) => {
                last.1 = last.1.max(hi);
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

trait One: Sized {
    fn succ(self) -> Option<Self>;
}
impl One for u32 {
    fn succ(self) -> Option<u32> {
        self.checked_add(1)
    }
}
impl One for u128 {
    fn succ(self) -> Option<u128> {
        self.checked_add(1)
    }
}

fn within<T: Copy + Ord>(ranges: &[(T, T)], a: T) -> bool {
    // The last range starting at or before `a` is the only one that can hold it.
    let i = ranges.partition_point(|&(lo, _)| lo <= a);
    i > 0 && a <= ranges[i - 1].1
}

/// `allow` and `deny`: a client is admitted when no `deny` prefix holds it and, if `allow`
/// is set, an `allow` prefix does. Deny wins over allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAcl {
    pub allow: Option<Prefixes>,
    pub deny: Prefixes,
}

impl SourceAcl {
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && self.allow.as_ref().is_none_or(|a| a.contains(ip))
    }
}

/// Parses `"10.0.0.0/8"`, `"2001:db8::/32"` or a single address (a /32 or /128).
pub fn parse_net(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| {
        format!(
            "\"{text}\" is not an address or a prefix, like \"10.0.0.0/8\" or \"2001:db8::/32\""
        )
    })?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => bits,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= bits && (l == "0" || !l.starts_with('0')) => n,
            _ => return Err(format!("\"{text}\": the prefix length must be 0 to {bits}")),
        },
    };
    Ok((ip, len))
}

/// Parses `"20/s"`, `"100/m"`, `"1000/h"` or `"50/10s"` (a count per a duration).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let wrong = || {
        format!("\"{text}\" is not a rate: write connections per period, like \"20/s\", \"600/m\" or \"50/10s\"")
    };
    let (count, per) = text.split_once('/').ok_or_else(wrong)?;
    let count: u32 = count.trim().parse().map_err(|_| wrong())?;
    let per = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        d => super::parse_duration(d).map_err(|_| wrong())?,
    };
    if count == 0 || per.is_zero() {
        return Err(format!(
            "\"{text}\": the count and the period must be greater than zero"
        ));
    }
    if per > Duration::from_secs(24 * 3600) {
        return Err(format!("\"{text}\": the period must be at most a day"));
    }
    Ok(Rate { count, per })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> Prefixes {
        let nets: Vec<_> = nets.iter().map(|n| parse_net(n).unwrap()).collect();
        Prefixes::build(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_match_their_ranges_and_nothing_beside() {
        let s = set(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"]);
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "192.168.1.7",
            "2001:db8:ffff::1",
            "::1",
        ] {
            assert!(s.contains(ip(yes)), "{yes}");
        }
        for no in [
            "9.255.255.255",
            "11.0.0.0",
            "192.168.1.8",
            "2001:db9::",
            "::2",
        ] {
            assert!(!s.contains(ip(no)), "{no}");
        }
    }

    #[test]
    fn an_ipv4_mapped_address_is_matched_as_ipv4_both_ways() {
        let s = set(&["10.0.0.0/8"]);
        assert!(s.contains(ip("::ffff:10.1.2.3")));
        let s = set(&["::ffff:127.0.0.0/104"]);
        assert!(s.contains(ip("127.0.0.2")));
        assert!(!s.contains(ip("128.0.0.1")));
    }

    #[test]
    fn overlapping_and_adjacent_prefixes_merge_into_one_range() {
        let s = set(&["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16", "0.0.0.0/0"]);
        assert_eq!(s.v4, vec![(0, u32::MAX)]);
        let s = set(&["10.0.0.0/9", "10.128.0.0/9"]);
        assert_eq!(s.v4.len(), 1);
        assert!(set(&["::/0"]).contains(ip("2001:db8::1")));
    }

    #[test]
    fn deny_wins_over_allow_and_an_absent_allow_admits_the_rest() {
        let acl = SourceAcl {
            allow: Some(set(&["127.0.0.0/8"])),
            deny: set(&["127.0.0.2"]),
        };
        assert!(acl.admits(ip("127.0.0.1")));
        assert!(!acl.admits(ip("127.0.0.2")));
        assert!(!acl.admits(ip("10.0.0.1")));
        let deny_only = SourceAcl {
            allow: None,
            deny: set(&["127.0.0.2"]),
        };
        assert!(deny_only.admits(ip("10.0.0.1")));
    }

    #[test]
    fn bad_prefixes_and_rates_say_what_to_write() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/08",
            "::/129",
            "example.com",
            "10/8",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_rate("20/s").unwrap(),
            Rate {
                count: 20,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(parse_rate("50/10s").unwrap().per, Duration::from_secs(10));
        for bad in ["20", "0/s", "20/0s", "x/s", "20/y", "20/2d"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
