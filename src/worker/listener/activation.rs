//! Listening sockets passed by the service manager (systemd socket activation, `LISTEN_FDS`).
//!
//! With `systemd/ringlb.socket` enabled, systemd owns the listening sockets and keeps them
//! open while the service restarts: between the old process's exit and the new one's start
//! the kernel completes handshakes and queues the connections (up to the socket's backlog)
//! instead of refusing them, and the new process accepts them. ringlb gives each worker a
//! duplicate of the one socket (the workers share its queue; a readiness wake-up that finds
//! it empty just waits again), and never shuts such a socket down: on a stop or a reload it
//! only stops accepting, leaving the queue to whoever accepts next.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Protocol, Socket, Type};

use crate::relay::ops;

/// The sockets passed at start, by the address they listen on.
#[derive(Default)]
pub struct Inherited {
    by_addr: HashMap<SocketAddr, (Socket, String)>,
}

impl Inherited {
    /// Takes the sockets in `LISTEN_FDS` (none if it is not set for this process). Anything
    /// but a listening TCP socket, or two on one address, is an error naming the fd.
    pub fn take() -> Result<Inherited, String> {
        let fds = ops::take_listen_fds().map_err(|e| e.to_string())?;
        let mut by_addr = HashMap::new();
        for (socket, name) in fds {
            let what = match &name {
                Some(n) => format!("LISTEN_FDS: fd {} (\"{n}\")", socket.as_raw_fd()),
                None => format!("LISTEN_FDS: fd {}", socket.as_raw_fd()),
            };
            let addr = check(&socket).map_err(|e| format!("{what}: {e}"))?;
            if by_addr.contains_key(&addr) {
                return Err(format!("{what}: a second socket listening on {addr}"));
            }
            by_addr.insert(addr, (socket, what));
        }
        Ok(Inherited { by_addr })
    }

    /// `count` duplicates of the passed socket listening on `addr`, one per worker, if there
    /// is one.
    pub fn take_for(
        &mut self,
        addr: SocketAddr,
        count: usize,
    ) -> Option<io::Result<Vec<std::net::TcpListener>>> {
        let (socket, _) = self.by_addr.remove(&addr)?;
        Some(share(socket, count))
    }

    /// The passed sockets no frontend listens on, as an error naming each; `None` if every
    /// one was taken.
    pub fn leftover(&self) -> Option<String> {
        let mut left: Vec<String> = self
            .by_addr
            .iter()
            .map(|(addr, (_, what))| {
                format!(
                    "{what} listens on {addr}, which no frontend's listen names: add it to a \
                     frontend or remove it from the socket unit"
                )
            })
            .collect();
        left.sort();
        (!left.is_empty()).then(|| left.join("; "))
    }
}

/// The address a passed socket listens on, if it is a listening TCP socket.
fn check(socket: &Socket) -> io::Result<SocketAddr> {
    let not = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    if socket.r#type()? != Type::STREAM || socket.protocol()? != Some(Protocol::TCP) {
        return Err(not("not a TCP socket"));
    }
    if !socket.is_listener()? {
        return Err(not("not listening (ListenStream= in the socket unit)"));
    }
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| not("not an IP socket"))
}

fn share(socket: Socket, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    // Accepted sockets inherit TCP_NODELAY from the listener (see `bind_one`).
    socket.set_nodelay(true)?;
    super::owners::register_own(&socket);
    let mut out = Vec::with_capacity(count);
    for _ in 1..count {
        out.push(socket.try_clone()?.into());
    }
    out.push(socket.into());
    Ok(out)
}
