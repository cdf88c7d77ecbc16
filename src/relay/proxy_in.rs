//! Parsing the PROXY protocol header an upstream balancer sends before its client's bytes
//! (`accept_proxy = true`): v1 (the text line) and v2 (the binary header), from haproxy.org's
//! proxy-protocol.txt, written here from that description. The sending side is [`super::proxy`].
//!
//! [`parse`] is pure and incremental: given the bytes read so far it says the header is
//! complete (and how long it is), needs more, or is bad. It looks only at the header's own
//! bytes, so the same answer comes back whatever follows them; the reader in `worker::gate`
//! relies on that to consume exactly the header and leave the client's first bytes in the
//! socket. Parsing is strict: anything the specification does not allow is refused, since a
//! lenient parser in front of ACLs and per-source limits would let a client pick its address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature (the same bytes `super::proxy` sends).
const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line the specification allows, CRLF included.
pub const V1_MAX: usize = 107;
/// The longest v2 header accepted, TLVs included: 536 bytes, the smallest segment every TCP
/// stack must take, which the specification names as the size a header should fit in. It
/// leaves 304 bytes of TLVs past the largest address block (UNIX, 216 bytes), more than any
/// balancer known to us sends.
pub const V2_MAX: usize = 536;
/// The most bytes a header can have: the reader's buffer size.
pub const HEADER_MAX: usize = V2_MAX;

/// The client a header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// Use the connection's own addresses: v2 LOCAL (the balancer's health check), v1
    /// UNKNOWN, or a v2 PROXY header for a family with no TCP address (UNSPEC, UNIX).
    Local,
    /// A relayed client: `src` connected to `dst`.
    Proxy { src: SocketAddr, dst: SocketAddr },
}

/// Where parsing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The header's end is not in the bytes yet; `len` is its length once known (v2 after its
    /// first 16 bytes).
    Partial { len: Option<usize> },
    /// The header is the first `len` bytes.
    Done { len: usize, declared: Declared },
}

/// Why a header was refused; `as_str` names it in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// The first bytes are neither "PROXY " nor the v2 signature.
    NotProxy,
    /// No CRLF within 107 bytes.
    V1TooLong,
    /// A v1 line that does not follow the grammar (fields, addresses, ports).
    V1Syntax,
    /// The v2 version nibble is not 2.
    V2Version,
    /// The v2 command is neither LOCAL nor PROXY.
    V2Command,
    /// A v2 address family or transport that is not TCP (or unspecified, or UNIX).
    V2Family,
    /// The v2 length is over [`V2_MAX`].
    V2TooLong,
    /// The v2 length is shorter than the address block of its family.
    V2Short,
    /// The v2 TLVs do not fill the rest of the header exactly.
    V2Tlv,
}

impl Bad {
    pub fn as_str(self) -> &'static str {
        match self {
            Bad::NotProxy => "not a PROXY protocol header",
            Bad::V1TooLong => "v1 line longer than 107 bytes",
            Bad::V1Syntax => "malformed v1 line",
            Bad::V2Version => "v2 header with a version other than 2",
            Bad::V2Command => "v2 header with an unknown command",
            Bad::V2Family => "v2 header with an unsupported address family or transport",
            Bad::V2TooLong => "v2 header longer than 536 bytes",
            Bad::V2Short => "v2 header too short for its addresses",
            Bad::V2Tlv => "v2 header with malformed TLVs",
        }
    }
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses the start of `buf` as a PROXY header. Never looks past the header's end.
pub fn parse(buf: &[u8]) -> Result<Parsed, Bad> {
    match buf.first() {
        None => Ok(Parsed::Partial { len: None }),
        Some(b'P') => parse_v1(buf),
        Some(0x0D) => parse_v2(buf),
        Some(_) => Err(Bad::NotProxy),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Bad> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(Bad::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let cr = window.iter().position(|&b| b == b'\r');
    // Only printable ASCII may come before the CR: refuse binary (or a bare LF) at once
    // instead of waiting for 107 bytes of it.
    let text = &window[..cr.unwrap_or(window.len())];
    if text.iter().any(|&b| !(0x20..0x7F).contains(&b)) {
        return Err(Bad::V1Syntax);
    }
    let Some(cr) = cr else {
        return if window.len() == V1_MAX {
            Err(Bad::V1TooLong)
        } else {
            Ok(Parsed::Partial { len: None })
        };
    };
    match window.get(cr + 1) {
        // The LF may still be on its way, unless there is no room left for it.
        None if cr + 1 < V1_MAX => return Ok(Parsed::Partial { len: None }),
        Some(b'\n') => {}
        _ => return Err(Bad::V1Syntax),
    }
    let line = &buf[V1_PREFIX.len()..cr];
    let declared = v1_fields(line).ok_or(Bad::V1Syntax)?;
    Ok(Parsed::Done {
        len: cr + 2,
        declared,
    })
}

/// `TCP4 src dst sport dport`, `TCP6 ...` or `UNKNOWN[ anything]`, single spaces.
fn v1_fields(line: &[u8]) -> Option<Declared> {
    let line = std::str::from_utf8(line).ok()?;
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Some(Declared::Local);
    }
    let mut f = line.split(' ');
    let (proto, src, dst, sport, dport) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            src.parse::<Ipv4Addr>().ok()?.into(),
            dst.parse::<Ipv4Addr>().ok()?.into(),
        ),
        // An IPv6 text with an embedded IPv4 (::ffff:1.2.3.4) is a valid IPv6 address.
        "TCP6" => (
            src.parse::<Ipv6Addr>().ok()?.into(),
            dst.parse::<Ipv6Addr>().ok()?.into(),
        ),
        _ => return None,
    };
    Some(Declared::Proxy {
        src: SocketAddr::new(src, port(sport)?),
        dst: SocketAddr::new(dst, port(dport)?),
    })
}

/// A decimal port, 0-65535, without a sign or leading zeros.
fn port(text: &str) -> Option<u16> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Bad> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(Bad::NotProxy);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parsed::Partial { len: None });
    };
    if ver_cmd >> 4 != 2 {
        return Err(Bad::V2Version);
    }
    let local = match ver_cmd & 0x0F {
        0 => true,
        1 => false,
        _ => return Err(Bad::V2Command),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Partial { len: None });
    };
    // Address family 0-3 (UNSPEC, INET, INET6, UNIX), transport 0-2 (UNSPEC, STREAM, DGRAM).
    if family >> 4 > 3 || family & 0x0F > 2 {
        return Err(Bad::V2Family);
    }
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parsed::Partial { len: None });
    };
    let len = 16 + usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX {
        return Err(Bad::V2TooLong);
    }
    let Some(body) = buf.get(16..len) else {
        return Ok(Parsed::Partial { len: Some(len) });
    };
    // LOCAL: the balancer speaking for itself; the specification says to ignore the rest.
    if local {
        return Ok(Parsed::Done {
            len,
            declared: Declared::Local,
        });
    }
    let (declared, block) = match family {
        0x00 => (Declared::Local, 0),
        0x11 => {
            let a = body.get(..12).ok_or(Bad::V2Short)?;
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            let (sport, dport) = (be16(a, 8), be16(a, 10));
            let src = SocketAddr::new(ip(0), sport);
            (
                Declared::Proxy {
                    src,
                    dst: SocketAddr::new(ip(4), dport),
                },
                12,
            )
        }
        0x21 => {
            let a = body.get(..36).ok_or(Bad::V2Short)?;
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            let src = SocketAddr::new(ip(0), be16(a, 32));
            (
                Declared::Proxy {
                    src,
                    dst: SocketAddr::new(ip(16), be16(a, 34)),
                },
                36,
            )
        }
        // A UNIX-socket client has no address to stand for: the balancer's own is used.
        0x31 => (Declared::Local, 216),
        // Datagrams over a stream listener, or a family without a transport: refused.
        _ => return Err(Bad::V2Family),
    };
    if body.len() < block {
        return Err(Bad::V2Short);
    }
    if !tlvs_fill(&body[block..]) {
        return Err(Bad::V2Tlv);
    }
    Ok(Parsed::Done { len, declared })
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// Whether `rest` is a whole number of TLVs (type, 16-bit length, value). Their contents are
/// not used; their framing is checked so a header is either well-formed or refused.
fn tlvs_fill(mut rest: &[u8]) -> bool {
    while !rest.is_empty() {
        let Some(head) = rest.get(..3) else {
            return false;
        };
        let end = 3 + usize::from(be16(head, 1));
        match rest.get(end..) {
            Some(tail) => rest = tail,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyVersion;
    use crate::relay::proxy::header;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn done(buf: &[u8]) -> (usize, Declared) {
        match parse(buf) {
            Ok(Parsed::Done { len, declared }) => (len, declared),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn what_ringlb_sends_it_reads_back_in_both_versions_and_families() {
        for (src, dst) in [
            ("1.2.3.4:5", "6.7.8.9:80"),
            ("[2001:db8::1]:65535", "[::1]:0"),
        ] {
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut h = header(v, addr(src), addr(dst));
                let len = h.len();
                h.extend_from_slice(b"GET / HTTP/1.1\r\n");
                let want = Declared::Proxy {
                    src: addr(src),
                    dst: addr(dst),
                };
                assert_eq!(done(&h), (len, want));
            }
        }
    }

    #[test]
    fn every_prefix_of_a_header_is_partial() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let h = header(v, addr("[2001:db8::1]:1"), addr("[::1]:2"));
            for i in 0..h.len() {
                assert!(
                    matches!(parse(&h[..i]), Ok(Parsed::Partial { .. })),
                    "{v:?} prefix {i}"
                );
            }
        }
    }

    #[test]
    fn unknown_and_local_mean_the_real_peer() {
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (15, Declared::Local));
        assert_eq!(done(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\nx").0, 31);
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(done(&local), (16, Declared::Local));
    }

    #[test]
    fn malformed_v1_lines_are_refused() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"[..],
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 001.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4\x005.6.7.8",
            b"PROXY\r\n",
            b"PROXYTCP4",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b'P', b'R', b'O', b'X', b'Y', b' ']
            .into_iter()
            .chain(std::iter::repeat(b'A'))
            .take(V1_MAX)
            .collect::<Vec<_>>();
        assert_eq!(parse(&long), Err(Bad::V1TooLong));
        assert!(matches!(
            parse(&long[..V1_MAX - 1]),
            Ok(Parsed::Partial { .. })
        ));
    }

    #[test]
    fn malformed_v2_headers_are_refused() {
        let with = |ver_cmd: u8, fam: u8, body: &[u8]| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[ver_cmd, fam]);
            h.extend_from_slice(&(body.len() as u16).to_be_bytes());
            h.extend_from_slice(body);
            parse(&h)
        };
        assert_eq!(with(0x11, 0x11, &[0; 12]), Err(Bad::V2Version));
        assert_eq!(with(0x22, 0x11, &[0; 12]), Err(Bad::V2Command));
        assert_eq!(with(0x21, 0x12, &[0; 12]), Err(Bad::V2Family));
        assert_eq!(with(0x21, 0x41, &[0; 12]), Err(Bad::V2Family));
        assert_eq!(with(0x21, 0x11, &[0; 11]), Err(Bad::V2Short));
        assert_eq!(with(0x21, 0x21, &[0; 35]), Err(Bad::V2Short));
        assert_eq!(with(0x21, 0x11, &[0; 14]), Err(Bad::V2Tlv));
        assert_eq!(with(0x21, 0x11, &[0; 600]), Err(Bad::V2TooLong));
        // A TLV that fills the rest exactly is fine.
        let mut body = vec![0u8; 12];
        body.extend_from_slice(&[0x04, 0, 2, 9, 9]);
        assert!(matches!(with(0x21, 0x11, &body), Ok(Parsed::Done { .. })));
        assert!(matches!(
            with(0x21, 0x00, &[]),
            Ok(Parsed::Done {
                declared: Declared::Local,
                ..
            })
        ));
    }
}
