//! The kernel's TCP listeners through NETLINK_SOCK_DIAG, the interface `ss` uses: a dump
//! request for TCP sockets in the LISTEN state only, per address family.
//!
//! Why not `/proc/net/tcp6`: on a machine whose connections are IPv4, reading the IPv6 table
//! walks the whole established hash (every bucket, and every connection and TIME_WAIT socket
//! in it, to skip them) before it can say there is nothing more: 7.9 ms with 18,000 TIME_WAIT
//! sockets here, and about 1% of ringlb's CPU under a Connection: close load when read every
//! 2 s. A dump with only LISTEN in its state mask reads the listening hash and nothing else.
//!
//! No `unsafe`: the request and the replies are built and read as bytes, in the layout of
//! `linux/inet_diag.h` (`inet_diag_req_v2`, `inet_diag_msg`) and `linux/netlink.h`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

use super::owners::Listening;

/// SOCK_DIAG_BY_FAMILY (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
/// NLM_F_ROOT | NLM_F_MATCH.
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the 48-byte sockid.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` up to and with `idiag_inode`.
const MSG_LEN: usize = 72;
/// TCP_LISTEN in the kernel's state numbering.
const TCP_LISTEN: u32 = 10;

/// Every TCP listener of this network namespace, IPv4 and IPv6. An error means the kernel (or
/// a sandbox: systemd's RestrictAddressFamilies, seccomp) refused the netlink socket or the
/// dump; the caller reads procfs instead.
pub fn tcp_listeners() -> io::Result<Vec<Listening>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let mut out = Vec::new();
    for (seq, family) in [(1, libc::AF_INET), (2, libc::AF_INET6)] {
        let req = request(family as u8, seq);
        sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &req,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        read_dump(&fd, seq, &mut out)?;
    }
    Ok(out)
}

/// The dump request for TCP sockets of `family` in the LISTEN state.
fn request(family: u8, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    b.push(family);
    b.push(libc::IPPROTO_TCP as u8);
    b.push(0); // no extensions
    b.push(0);
    b.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    b.resize(len, 0); // the sockid: match any
    b
}

/// Reads the replies to request `seq` until its NLMSG_DONE, adding each listener to `out`.
fn read_dump(fd: &std::os::fd::OwnedFd, seq: u32, out: &mut Vec<Listening>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(io::Error::other(
                "sock_diag: the dump ended without NLMSG_DONE",
            ));
        }
        if parse(&buf[..n], seq, out)? {
            return Ok(());
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses one datagram of replies; `true` once it holds the dump's NLMSG_DONE. Replies to
/// another request (a stale sequence number) are skipped; a malformed one is an error.
fn parse(mut b: &[u8], seq: u32, out: &mut Vec<Listening>) -> io::Result<bool> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "sock_diag: malformed reply");
    while b.len() >= NLMSG_HDRLEN {
        let len = u32_at(b, 0).ok_or_else(bad)? as usize;
        let kind = u16_at(b, 4).ok_or_else(bad)?;
        let their_seq = u32_at(b, 8).ok_or_else(bad)?;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(bad());
        }
        let body = &b[NLMSG_HDRLEN..len];
        if their_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = u32_at(body, 0).ok_or_else(bad)? as i32;
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => out.push(listener(body).ok_or_else(bad)?),
                _ => {}
            }
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(false)
}

/// One `inet_diag_msg`: the local address, the owner's uid and the socket's inode.
fn listener(m: &[u8]) -> Option<Listening> {
    if m.len() < MSG_LEN {
        return None;
    }
    let family = m[0] as i32;
    // The sockid starts at 4: source port (network order), destination port, source address
    // (16 bytes, IPv4 in the first 4), destination address, interface, cookie.
    let port = u16::from_be_bytes([m[4], m[5]]);
    let ip = match family {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(m[8], m[9], m[10], m[11])),
        libc::AF_INET6 => {
            let bytes: [u8; 16] = m[8..24].try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(Listening {
        addr: SocketAddr::new(ip, port),
        uid: u32_at(m, 64)?,
        inode: u64::from(u32_at(m, 68)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_read_as_the_kernel_lays_it_out() {
        // One inet_diag_msg for [::1]:8080, uid 1000, inode 4242, then NLMSG_DONE.
        let mut msg = [0u8; MSG_LEN];
        msg[0] = libc::AF_INET6 as u8;
        msg[1] = TCP_LISTEN as u8;
        msg[4..6].copy_from_slice(&8080u16.to_be_bytes());
        msg[8..24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        msg[64..68].copy_from_slice(&1000u32.to_ne_bytes());
        msg[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        let mut b = Vec::new();
        for (kind, body) in [(SOCK_DIAG_BY_FAMILY, &msg[..]), (NLMSG_DONE, &[0u8; 4][..])] {
            b.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&7u32.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(body);
        }
        let mut out = Vec::new();
        assert!(parse(&b, 7, &mut out).unwrap());
        assert_eq!(
            out,
            vec![Listening {
                addr: "[::1]:8080".parse().unwrap(),
                uid: 1000,
                inode: 4242,
            }]
        );
        // Another request's replies are not ours; a truncated message is an error.
        let mut other = Vec::new();
        assert!(!parse(&b[..NLMSG_HDRLEN + MSG_LEN], 8, &mut other).unwrap());
        assert!(other.is_empty());
        assert!(parse(&b[..NLMSG_HDRLEN + 10], 7, &mut other).is_err());
    }

    #[test]
    fn the_kernel_lists_a_listener_and_no_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A connection to it: its two ends are not listeners and are not listed.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let _a = l.accept().unwrap();
        let found = tcp_listeners().unwrap();
        assert_eq!(
            found.iter().filter(|x| x.addr == addr).count(),
            1,
            "{found:?}"
        );
        assert!(found.iter().all(|x| x.addr.port() != 0));
        // This process's uid: the owner of its /proc entry.
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
        assert!(found.iter().any(|x| x.addr == addr && x.uid == uid));
    }
}
