//! SO_REUSEPORT listening sockets, one per worker per listen address.
//!
//! Sockets are bound on the control thread (so a reload that cannot bind a port fails before
//! anything changes) and handed to workers as `std::net::TcpListener`s.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

const BACKLOG: i32 = 4096;

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // Explicit: "[::]:80" means IPv6 only, so "0.0.0.0:80" can be listed beside it.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds `count` SO_REUSEPORT sockets on `addr`. Port 0 picks one free port for all of them.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_one(addr)?;
    let actual = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..count {
        out.push(bind_one(actual)?);
    }
    Ok(out)
}
