//! The PROXY protocol header ringlb sends a backend before the client's first byte, so the
//! backend sees the real client address (HAProxy's `send-proxy` / `send-proxy-v2`; the format
//! is haproxy.org's proxy-protocol.txt, written here from that description).
//!
//! The header names the client (source) and the address the client connected to
//! (destination). Both must be of one family: an IPv4 client on an IPv6 listener arrives as an
//! IPv4-mapped IPv6 address, and is sent as IPv4 when both sides map to IPv4, else both as IPv6.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::ProxyVersion;

/// The v2 signature: it cannot be the start of a v1 header or of most protocols' first bytes.
const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2, command PROXY (a relayed connection, not a health check's LOCAL).
const V2_PROXY: u8 = 0x21;
/// Version 2, command LOCAL: a connection the proxy made on its own (a health check).
const V2_LOCAL: u8 = 0x20;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// Both addresses in one family: IPv4 if both are (or map to) IPv4, else both IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v4 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => Some(SocketAddr::new(IpAddr::V4(ip), s.port())),
        IpAddr::V6(ip) => ip
            .to_ipv4_mapped()
            .map(|ip| SocketAddr::new(IpAddr::V4(ip), s.port())),
    };
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    match (v4(a), v4(b)) {
        (Some(a), Some(b)) => (a, b),
        _ => (v6(a), v6(b)),
    }
}

/// The header for a client `src` that connected to `dst`.
pub fn header(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        ProxyVersion::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(V2_PROXY);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(V2_TCP4);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V6(ip) => ip,
                        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                    };
                    let (s, d): (Ipv6Addr, Ipv6Addr) = (v6(s), v6(d));
                    out.push(V2_TCP6);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// The header of a connection ringlb makes on its own (a health check), which relays no
/// client: v1 `PROXY UNKNOWN`, v2 the `LOCAL` command with no addresses. The receiver uses
/// the connection's own addresses.
pub fn local_header(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyVersion::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            // LOCAL, family and protocol unspecified, no address block.
            out.extend_from_slice(&[V2_LOCAL, 0x00, 0, 0]);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_names_client_and_destination_in_the_spec_order() {
        let h = header(
            ProxyVersion::V1,
            addr("192.168.0.1:56324"),
            addr("192.168.0.11:443"),
        );
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let h = header(ProxyVersion::V1, addr("[2001:db8::1]:5"), addr("[::1]:80"));
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 5 80\r\n");
    }

    #[test]
    fn an_ipv4_client_on_an_ipv6_listener_is_sent_as_ipv4_when_both_map() {
        let h = header(
            ProxyVersion::V1,
            addr("[::ffff:10.0.0.7]:4000"),
            addr("[::ffff:10.0.0.1]:80"),
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.7 10.0.0.1 4000 80\r\n");
        // Mixed: both as IPv6.
        let h = header(ProxyVersion::V1, addr("10.0.0.7:4000"), addr("[::1]:80"));
        assert_eq!(h, b"PROXY TCP6 ::ffff:10.0.0.7 ::1 4000 80\r\n");
    }

    #[test]
    fn a_health_checks_header_names_no_client() {
        assert_eq!(local_header(ProxyVersion::V1), b"PROXY UNKNOWN\r\n");
        let v2 = local_header(ProxyVersion::V2);
        assert_eq!(&v2[..12], &V2_SIGNATURE);
        assert_eq!(&v2[12..], &[0x20, 0x00, 0, 0]);
    }

    #[test]
    fn v2_is_the_binary_header_with_addresses_then_ports() {
        let h = header(ProxyVersion::V2, addr("1.2.3.4:258"), addr("5.6.7.8:80"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 0, 80]);
        assert_eq!(h, want);
        let h = header(ProxyVersion::V2, addr("[::1]:1"), addr("[::2]:2"));
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
    }
}
