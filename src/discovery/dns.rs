//! A small DNS stub resolver on `tokio::net::UdpSocket`: A, AAAA and SRV questions to the
//! configured servers (or those of /etc/resolv.conf), with the answer's TTL.
//!
//! Why not a resolver crate: ringlb needs three record types over UDP from a recursive server,
//! and their TTL. hickory-resolver does that and much more (DoH, DNSSEC, search lists, caching)
//! and pulls idna/url, tracing and the futures stack into the build; this module is about 300
//! lines whose every bound is visible and tested. What it does not do: TCP fallback (a
//! truncated answer is used for the records it holds; EDNS0 asks for 1232 bytes, enough for
//! ~70 A records) and resolv.conf's `search`/`ndots` (names are asked as written, fully
//! qualified).
//!
//! Everything an answer says is bounded before it is believed: the ID and question must match
//! the query, names are read with at most [`MAX_JUMPS`] compression pointers and
//! [`MAX_NAME`] bytes, at most [`MAX_RECORDS`] records are read, and a record whose length
//! disagrees with its type ends the parse with an error.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

/// How long one server gets to answer one question.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many servers from /etc/resolv.conf are asked (glibc's MAXNS).
const MAX_SERVERS: usize = 3;
/// Records read from one answer; the rest are ignored.
const MAX_RECORDS: usize = 512;
/// Compression pointers followed while reading one name (a loop stops here).
const MAX_JUMPS: usize = 16;
/// The longest name on the wire (RFC 1035).
const MAX_NAME: usize = 255;
/// The UDP payload size advertised with EDNS0 (the DNS flag day's safe size).
const EDNS_SIZE: u16 = 1232;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("no such name (NXDOMAIN)")]
    NoSuchName,
    #[error("server {server} answered {code}")]
    Server {
        server: SocketAddr,
        code: &'static str,
    },
    #[error("server {server} did not answer within {}s", QUERY_TIMEOUT.as_secs())]
    Timeout { server: SocketAddr },
    #[error("server {server}: {why}")]
    Io { server: SocketAddr, why: String },
    #[error("server {server} sent a malformed answer: {why}")]
    Malformed {
        server: SocketAddr,
        why: &'static str,
    },
    #[error("no DNS server: none configured and none in /etc/resolv.conf ({0})")]
    NoServer(String),
}

/// Records of one answer, with the smallest TTL among those used.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    pub srv: Vec<Srv>,
    /// Additional-section addresses, by owner name (SRV targets).
    pub glue: Vec<(String, IpAddr)>,
    pub ttl: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub port: u16,
    pub target: String,
}

/// Whether `name` can be asked: 1-253 characters, labels of 1-63 letters, digits, '-' or '_'.
pub fn check_name(name: &str) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err("a DNS name must have 1 to 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "\"{label}\": each dot-separated label must have 1 to 63 characters"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "\"{label}\": a DNS label holds only letters, digits, '-' and '_'"
            ));
        }
    }
    Ok(())
}

/// The servers to ask: `configured`, else the `nameserver` lines of /etc/resolv.conf (read
/// off the async thread, each time, so an edited file is followed).
pub async fn servers(configured: &[SocketAddr]) -> Result<Vec<SocketAddr>, DnsError> {
    if !configured.is_empty() {
        return Ok(configured.to_vec());
    }
    // Blocking file I/O, on a blocking-pool thread.
    #[allow(clippy::disallowed_methods)]
    let text = tokio::task::spawn_blocking(|| std::fs::read_to_string("/etc/resolv.conf"))
        .await
        .map_err(|e| DnsError::NoServer(e.to_string()))?
        .map_err(|e| DnsError::NoServer(format!("cannot read it: {e}")))?;
    let found = parse_resolv_conf(&text);
    if found.is_empty() {
        return Err(DnsError::NoServer("it names no nameserver".into()));
    }
    Ok(found)
}

/// The `nameserver` addresses of a resolv.conf text, on port 53, at most [`MAX_SERVERS`].
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(ip)) => ip
                    // A scoped IPv6 address ("fe80::1%eth0") is not supported here.
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53)),
                _ => None,
            }
        })
        .take(MAX_SERVERS)
        .collect()
}

/// The addresses /etc/hosts-format `text` gives `name` (case-insensitive), in file order.
pub fn parse_hosts(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let ip = words.next()?.parse::<IpAddr>().ok()?;
            words.any(|w| w.eq_ignore_ascii_case(name)).then_some(ip)
        })
        .collect()
}

/// The address a stub resolver would give `name` before asking DNS: from /etc/hosts, the
/// lowest one (IPv4 before IPv6), and for `localhost` and names under it, 127.0.0.1 even
/// where the file lacks them (RFC 6761). Blocking file I/O: called while a config loads,
/// on the main thread (`check`, start) or the load thread (reload), never on an async one.
pub fn hosts_address(name: &str) -> Option<IpAddr> {
    #[allow(clippy::disallowed_methods)]
    let text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut found = parse_hosts(&text, name);
    found.sort();
    found.first().copied().or_else(|| {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        (lower == "localhost" || lower.ends_with(".localhost"))
            .then_some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    })
}

/// Asks each server in turn until one answers; NXDOMAIN from one is the answer.
pub async fn query(servers: &[SocketAddr], name: &str, qtype: u16) -> Result<Answer, DnsError> {
    let mut last = DnsError::NoServer("none given".into());
    for &server in servers {
        match query_one(server, name, qtype).await {
            Ok(a) => return Ok(a),
            Err(DnsError::NoSuchName) => return Err(DnsError::NoSuchName),
            Err(e) => last = e,
        }
    }
    Err(last)
}

pub const A: u16 = TYPE_A;
pub const AAAA: u16 = TYPE_AAAA;
pub const SRV: u16 = TYPE_SRV;

async fn query_one(server: SocketAddr, name: &str, qtype: u16) -> Result<Answer, DnsError> {
    let io = |e: std::io::Error| DnsError::Io {
        server,
        why: e.to_string(),
    };
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // A fresh socket (a fresh random source port) and a random ID per question.
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    let id = random_id();
    socket
        .send(&encode_query(id, name, qtype))
        .await
        .map_err(io)?;
    let mut buf = vec![0u8; usize::from(EDNS_SIZE)];
    let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => return Err(DnsError::Timeout { server }),
            Ok(r) => r.map_err(io)?,
        };
        match parse_answer(&buf[..n], id, name, qtype) {
            // Not an answer to this question (a late or spoofed datagram): keep waiting.
            Err(Parse::NotOurs) => continue,
            Err(Parse::Bad(why)) => return Err(DnsError::Malformed { server, why }),
            Err(Parse::Rcode(3)) => return Err(DnsError::NoSuchName),
            Err(Parse::Rcode(code)) => {
                return Err(DnsError::Server {
                    server,
                    code: rcode_name(code),
                })
            }
            Ok(a) => return Ok(a),
        }
    }
}

fn rcode_name(code: u8) -> &'static str {
    match code {
        1 => "FORMERR",
        2 => "SERVFAIL",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "an error code",
    }
}

fn random_id() -> u16 {
    // RandomState is seeded from the OS per instance: unpredictable IDs, no extra crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as u16
}

/// A recursive query for `name` with one EDNS0 OPT record.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    for count in [1u16, 0, 0, 1] {
        q.extend_from_slice(&count.to_be_bytes());
    }
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    // OPT: root name, type, UDP size as class, TTL 0, no options.
    q.push(0);
    q.extend_from_slice(&TYPE_OPT.to_be_bytes());
    q.extend_from_slice(&EDNS_SIZE.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    q
}

/// Why a datagram was not an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// Another query's answer, or not a response at all.
    NotOurs,
    /// A response code other than NOERROR.
    Rcode(u8),
    Bad(&'static str),
}

struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, Parse> {
        let b = *self.msg.get(self.pos).ok_or(Parse::Bad("cut short"))?;
        self.pos += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, Parse> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }

    fn u32(&mut self) -> Result<u32, Parse> {
        Ok(u32::from(self.u16()?) << 16 | u32::from(self.u16()?))
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], Parse> {
        let end = self.pos.checked_add(n).ok_or(Parse::Bad("cut short"))?;
        let b = self.msg.get(self.pos..end).ok_or(Parse::Bad("cut short"))?;
        self.pos = end;
        Ok(b)
    }

    /// A possibly compressed name, lower-cased, without the final dot.
    fn name(&mut self) -> Result<String, Parse> {
        let mut out = String::new();
        let mut at = self.pos;
        let mut jumps = 0;
        let mut resume = None;
        loop {
            let len = *self.msg.get(at).ok_or(Parse::Bad("name cut short"))?;
            match len {
                0 => {
                    at += 1;
                    break;
                }
                l if l & 0xC0 == 0xC0 => {
                    let low = *self.msg.get(at + 1).ok_or(Parse::Bad("name cut short"))?;
                    jumps += 1;
                    if jumps > MAX_JUMPS {
                        return Err(Parse::Bad("compression pointers loop"));
                    }
                    resume.get_or_insert(at + 2);
                    at = usize::from(l & 0x3F) << 8 | usize::from(low);
                }
                l if l & 0xC0 != 0 => return Err(Parse::Bad("unknown label type")),
                l => {
                    let label = self
                        .msg
                        .get(at + 1..at + 1 + usize::from(l))
                        .ok_or(Parse::Bad("name cut short"))?;
                    if !out.is_empty() {
                        out.push('.');
                    }
                    for &b in label {
                        if b.is_ascii_graphic() && b != b'.' {
                            out.push(char::from(b.to_ascii_lowercase()));
                        } else {
                            return Err(Parse::Bad("a name holds a byte that is not printable"));
                        }
                    }
                    if out.len() > MAX_NAME {
                        return Err(Parse::Bad("name too long"));
                    }
                    at += 1 + usize::from(l);
                }
            }
        }
        self.pos = resume.unwrap_or(at);
        Ok(out)
    }
}

/// Parses the answer to query `id` for `name` and `qtype`.
pub fn parse_answer(msg: &[u8], id: u16, name: &str, qtype: u16) -> Result<Answer, Parse> {
    let mut r = Reader { msg, pos: 0 };
    let (rid, flags) = (
        r.u16().map_err(|_| Parse::NotOurs)?,
        r.u16().map_err(|_| Parse::NotOurs)?,
    );
    if rid != id || flags & 0x8000 == 0 {
        return Err(Parse::NotOurs);
    }
    let counts = [r.u16()?, r.u16()?, r.u16()?, r.u16()?];
    if counts[0] != 1 {
        return Err(Parse::NotOurs);
    }
    let qname = r.name()?;
    let (qt, qc) = (r.u16()?, r.u16()?);
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    if qname != want || qt != qtype || qc != CLASS_IN {
        return Err(Parse::NotOurs);
    }
    let rcode = (flags & 0x000F) as u8;
    if rcode != 0 {
        return Err(Parse::Rcode(rcode));
    }
    let truncated = flags & 0x0200 != 0;
    let mut answer = Answer::default();
    let sections = [(counts[1], false), (counts[2], false), (counts[3], true)];
    let mut read = 0;
    for (count, additional) in sections {
        for _ in 0..count {
            if read == MAX_RECORDS {
                return Ok(answer);
            }
            read += 1;
            let record = match record(&mut r) {
                Ok(rec) => rec,
                // A truncated answer ends early: use what arrived whole.
                Err(_) if truncated => return Ok(answer),
                Err(e) => return Err(e),
            };
            let Some((owner, ttl, data)) = record else {
                continue;
            };
            let mut used = true;
            match (data, additional) {
                (Data::Ip(ip), false) if qtype != TYPE_SRV => answer.addrs.push(ip),
                (Data::Ip(ip), true) if qtype == TYPE_SRV => answer.glue.push((owner, ip)),
                (Data::Srv(s), false) if qtype == TYPE_SRV => answer.srv.push(s),
                _ => used = false,
            }
            if used {
                answer.ttl = Some(answer.ttl.map_or(ttl, |t| t.min(ttl)));
            }
        }
    }
    Ok(answer)
}

enum Data {
    Ip(IpAddr),
    Srv(Srv),
}

/// One resource record; `None` for those of no interest (CNAME, OPT, other types).
fn record(r: &mut Reader<'_>) -> Result<Option<(String, u32, Data)>, Parse> {
    let owner = r.name()?;
    let (rtype, class, ttl, len) = (r.u16()?, r.u16()?, r.u32()?, r.u16()?);
    let start = r.pos;
    let data = r.bytes(usize::from(len))?;
    if class != CLASS_IN && rtype != TYPE_OPT {
        return Ok(None);
    }
    // A TTL with the top bit set is treated as 0 (RFC 2181, 8).
    let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
    let d = match rtype {
        TYPE_A => {
            let b: [u8; 4] = data
                .try_into()
                .map_err(|_| Parse::Bad("an A record is not 4 bytes"))?;
            Data::Ip(IpAddr::from(b))
        }
        TYPE_AAAA => {
            let b: [u8; 16] = data
                .try_into()
                .map_err(|_| Parse::Bad("an AAAA record is not 16 bytes"))?;
            Data::Ip(IpAddr::from(b))
        }
        TYPE_SRV => {
            let mut s = Reader {
                msg: r.msg,
                pos: start,
            };
            let priority = s.u16()?;
            let _weight = s.u16()?;
            let port = s.u16()?;
            let target = s.name()?;
            if s.pos != start + usize::from(len) {
                return Err(Parse::Bad(
                    "an SRV record's length disagrees with its target",
                ));
            }
            Data::Srv(Srv {
                priority,
                port,
                target,
            })
        }
        TYPE_CNAME | TYPE_OPT => return Ok(None),
        _ => return Ok(None),
    };
    Ok(Some((owner, ttl, d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_give_their_names_addresses_in_file_order() {
        let text = "127.0.0.1 localhost\n::1 localhost ip6-localhost # loopback\n\
                    # 10.0.0.9 api.internal\n10.0.0.5\tAPI.internal api\nbad line\n";
        let ips = |n: &str| parse_hosts(text, n);
        assert_eq!(
            ips("localhost"),
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            ips("api.internal."),
            ["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(ips("api"), ["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert!(ips("loopback").is_empty() && ips("ip6").is_empty());
    }

    /// A response to `encode_query(7, "web.test", A)` with the given answer records appended.
    fn response(flags: u16, answers: &[&[u8]]) -> Vec<u8> {
        let mut q = encode_query(7, "web.test", TYPE_A);
        // Drop the OPT record: header 12 + name 10 + 4 = 26 bytes of question.
        q.truncate(26);
        q[2..4].copy_from_slice(&flags.to_be_bytes());
        q[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        q[10..12].copy_from_slice(&0u16.to_be_bytes());
        for a in answers {
            q.extend_from_slice(a);
        }
        q
    }

    fn a_record(ip: [u8; 4], ttl: u32) -> Vec<u8> {
        let mut r = vec![0xC0, 12]; // pointer to the question's name
        r.extend_from_slice(&TYPE_A.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&ip);
        r
    }

    #[test]
    fn an_answer_gives_its_addresses_and_the_smallest_ttl() {
        let msg = response(
            0x8180,
            &[&a_record([10, 0, 0, 5], 30), &a_record([10, 0, 0, 6], 5)],
        );
        let a = parse_answer(&msg, 7, "web.test", TYPE_A).unwrap();
        assert_eq!(
            a.addrs,
            vec![IpAddr::from([10, 0, 0, 5]), IpAddr::from([10, 0, 0, 6])]
        );
        assert_eq!(a.ttl, Some(5));
    }

    #[test]
    fn another_id_or_question_is_not_our_answer_and_nxdomain_is_an_rcode() {
        let msg = response(0x8180, &[&a_record([10, 0, 0, 5], 30)]);
        assert_eq!(
            parse_answer(&msg, 8, "web.test", TYPE_A),
            Err(Parse::NotOurs)
        );
        assert_eq!(
            parse_answer(&msg, 7, "api.test", TYPE_A),
            Err(Parse::NotOurs)
        );
        let nx = response(0x8183, &[]);
        assert_eq!(
            parse_answer(&nx, 7, "web.test", TYPE_A),
            Err(Parse::Rcode(3))
        );
    }

    #[test]
    fn a_compression_loop_and_a_short_record_are_rejected() {
        let mut looped = vec![0xC0, 26]; // points at itself (offset 26)
        looped.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4]);
        let msg = response(0x8180, &[&looped]);
        assert_eq!(
            parse_answer(&msg, 7, "web.test", TYPE_A),
            Err(Parse::Bad("compression pointers loop"))
        );
        let mut short = a_record([1, 2, 3, 4], 1);
        short.truncate(short.len() - 1);
        let msg = response(0x8180, &[&short]);
        assert!(matches!(
            parse_answer(&msg, 7, "web.test", TYPE_A),
            Err(Parse::Bad(_))
        ));
    }

    #[test]
    fn every_prefix_and_every_flipped_byte_of_an_answer_parses_without_panicking() {
        let msg = response(
            0x8180,
            &[&a_record([10, 0, 0, 5], 30), &a_record([10, 0, 0, 6], 5)],
        );
        for n in 0..msg.len() {
            let _ = parse_answer(&msg[..n], 7, "web.test", TYPE_A);
        }
        for i in 0..msg.len() {
            for v in [0x00, 0x3F, 0xC0, 0xFF] {
                let mut m = msg.clone();
                m[i] = v;
                let _ = parse_answer(&m, 7, "web.test", TYPE_A);
            }
        }
    }

    #[test]
    fn resolv_conf_nameservers_are_read_on_port_53() {
        let text =
            "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver ::1\nnameserver bad\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                SocketAddr::from(([10, 0, 0, 2], 53)),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn names_are_checked_label_by_label() {
        assert!(check_name("tasks.web").is_ok());
        assert!(check_name("_api._tcp.service.consul.").is_ok());
        assert!(check_name("a..b").is_err());
        assert!(check_name("bad name").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
    }
}
