//! SO_REUSEPORT listening sockets, one per worker per listen address, and ours alone.
//!
//! Sockets are bound on the control thread (so a reload that cannot bind a port fails before
//! anything changes) and handed to workers as `std::net::TcpListener`s.
//!
//! SO_REUSEPORT lets any process of the same user bind the same address and join the group,
//! where the kernel would hand it a share of the connections. So before binding, an address
//! another process listens on (exactly, or through a wildcard either way) is refused, naming
//! that process ([`owners`]); our group carries a program that picks only our own sockets
//! ([`reuseport`]), so a process that joins after us gets no connections; and the control
//! thread looks again every few seconds and logs an ERROR for anything new
//! ([`ForeignWatch`]).

pub mod activation;
pub mod owners;
mod reuseport;
mod sockdiag;

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

pub use owners::refuse_if_taken;

const BACKLOG: i32 = 4096;

fn bind_one(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux copies the listener's TCP
    // options into each child): one setsockopt here instead of one per connection.
    socket.set_nodelay(true)?;
    if addr.is_ipv6() {
        // Explicit: "[::]:80" means IPv6 only, so "0.0.0.0:80" can be listed beside it.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    owners::register_own(&socket);
    Ok(socket)
}

/// Binds `count` SO_REUSEPORT sockets on `addr`. Port 0 picks one free port for all of them.
///
/// Fails with `AddrInUse` naming the other process if another process listens on `addr` (or
/// on an address that clashes with it), checked before binding and again once all `count`
/// are bound, which closes the gap between the first check and our binds. The group gets a
/// program that never picks a socket past our `count` (see [`reuseport`]).
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    refuse_if_taken(addr)?;
    let first = bind_one(addr)?;
    // At once, before our other sockets join: from here on nothing past our `count` is picked.
    reuseport::attach(&first, count).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot attach the SO_REUSEPORT program that keeps the port to ringlb's own \
                 sockets (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5 and later): {e}"
            ),
        )
    })?;
    let actual = first.local_addr()?.as_socket().unwrap_or(addr);
    let mut out = vec![first];
    for _ in 1..count {
        out.push(bind_one(actual)?);
    }
    refuse_if_taken(actual)?;
    Ok(out.into_iter().map(Into::into).collect())
}

/// Makes a listening socket drop new SYNs (a socket filter, SO_ATTACH_FILTER), so that its
/// queue only shrinks from here on: connections already queued, and handshakes already under
/// way (their final ACK passes), are still accepted; a new client's SYN goes unanswered, and
/// its retransmission (one second later) meets the closed port and is refused. This is how a
/// listener that a reload removes (or a stop closes) serves its queue before it closes;
/// closing at once would reset every connection the kernel had already accepted.
///
/// The filter runs on the TCP header (the kernel has pulled the IP header by then): byte 13
/// holds the flags, and a packet with SYN set and ACK clear is a new handshake.
pub fn refuse_new_handshakes(listener: &impl std::os::fd::AsFd) -> io::Result<()> {
    const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const ALU_AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let program = [
        insn(LD_B_ABS, 0, 0, 13),         // A = TCP flags
        insn(ALU_AND_K, 0, 0, SYN | ACK), // A &= SYN|ACK
        insn(JEQ_K, 0, 1, SYN),           // a bare SYN?
        insn(RET_K, 0, 0, 0),             //   drop it
        insn(RET_K, 0, 0, u32::MAX),      // anything else: keep all of it
    ];
    socket2::SockRef::from(listener).attach_filter(&program)
}

/// Logs, once each, listeners of other processes that clash with our addresses; the control
/// thread calls [`ForeignWatch::check`] periodically and after each reload.
#[derive(Default)]
pub struct ForeignWatch {
    /// `(our address, their socket inode)` already logged.
    reported: HashSet<(SocketAddr, u64)>,
}

impl ForeignWatch {
    /// `ours` is `(what, address)`, e.g. `("frontend \"web\"", 127.0.0.1:80)`.
    pub fn check(&mut self, ours: &[(String, SocketAddr)]) {
        let table = match owners::tcp_listeners() {
            Ok(t) => t,
            Err(e) => {
                crate::debug!("cannot read the TCP listener table: {e}");
                return;
            }
        };
        owners::forget_closed(&table);
        let own = owners::own_inodes();
        let mut now = HashSet::new();
        for (what, addr) in ours {
            let fresh: Vec<_> = owners::foreign_in(*addr, &table, &own)
                .into_iter()
                .filter(|l| {
                    now.insert((*addr, l.inode));
                    !self.reported.contains(&(*addr, l.inode))
                })
                .collect();
            let mut said = HashSet::new();
            for f in owners::with_owners(fresh) {
                // One process's several sockets on the address read the same: once.
                if !said.insert(f.to_string()) {
                    continue;
                }
                let effect = if f.same_address(*addr) {
                    "it should get no connections while ringlb runs (ringlb's SO_REUSEPORT \
                     group picks only ringlb's sockets), but stop it"
                } else {
                    "connections meant for ringlb may reach it: stop it"
                };
                crate::error!("{what}: another process also listens on {addr}: {f}; {effect}");
            }
        }
        // Forget what went away, so that it is reported again if it comes back.
        self.reported = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    #[test]
    fn a_listener_refusing_new_handshakes_still_hands_out_what_it_queued() {
        let listener: std::net::TcpListener =
            bind_one("127.0.0.1:0".parse().unwrap()).unwrap().into();
        let addr = listener.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        refuse_new_handshakes(&listener).unwrap();
        // A new SYN is dropped: the connect hangs (until the client's own timeout).
        let late = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            late.is_err(),
            "a new handshake completed on a refusing listener"
        );
        // The one queued before is still there, and works.
        let (mut accepted, _) = listener.accept().unwrap();
        let mut queued = queued;
        queued.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        drop(listener);
        // Closed: refused at once.
        assert_eq!(
            std::net::TcpStream::connect(addr).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }

    #[test]
    fn accepted_sockets_inherit_tcp_nodelay_from_the_listener() {
        let listener = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "the relay relies on it for latency"
        );
    }
}
