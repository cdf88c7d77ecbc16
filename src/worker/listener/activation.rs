//! Listening sockets passed by the service manager (systemd socket activation, `LISTEN_FDS`).
//!
//! With `systemd/ringlb.socket` enabled, systemd owns the listening sockets and keeps them
//! open while the service restarts: between the old process's exit and the new one's start
//! the kernel completes handshakes and queues the connections (up to the socket's backlog)
//! instead of refusing them, and the new process accepts them. ringlb gives each worker a
//! duplicate of the one socket (the workers share its queue; a readiness wake-up that finds
//! it empty just waits again), and never shuts such a socket down: on a stop or a reload it
//! only stops accepting, leaving the queue to whoever accepts next.
//!
//! The same matching takes the sockets a running ringlb passes to its successor in a binary
//! upgrade (`crate::upgrade`): there each address comes as the old process's SO_REUSEPORT
//! sockets, one per old worker, which stay ours (a reload may close them).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Protocol, Socket, Type};

use crate::relay::ops;
use crate::upgrade::{self, Kind};

/// The passed sockets on one address.
struct Group {
    /// One from the service manager; as many as the old process had workers from an upgrade.
    sockets: Vec<Socket>,
    /// How errors name them (the first one's fd).
    what: String,
    /// The service manager holds them too: never shut down, only stopped accepting on.
    external: bool,
    /// From an upgrade: the frontend they listened for and the address its config wrote,
    /// which is how a `listen` with port 0 finds the port it had.
    passed_for: Option<(String, SocketAddr)>,
}

/// The sockets passed at start, by the address they listen on.
#[derive(Default)]
pub struct Inherited {
    by_addr: HashMap<SocketAddr, Group>,
}

impl Inherited {
    /// Takes the sockets in `LISTEN_FDS` (none if it is not set for this process) and those
    /// an upgrading ringlb passed (`upgrade::take_passed`, already checked to be listeners
    /// on their address). Anything but a listening TCP socket, or two passers on one
    /// address, is an error naming the fd.
    pub fn take(passed: Vec<(upgrade::Entry, Socket)>) -> Result<Inherited, String> {
        let fds = ops::take_listen_fds().map_err(|e| e.to_string())?;
        let mut by_addr: HashMap<SocketAddr, Group> = HashMap::new();
        for (socket, name) in fds {
            let what = match &name {
                Some(n) => format!("LISTEN_FDS: fd {} (\"{n}\")", socket.as_raw_fd()),
                None => format!("LISTEN_FDS: fd {}", socket.as_raw_fd()),
            };
            let addr = check(&socket).map_err(|e| format!("{what}: {e}"))?;
            if by_addr.contains_key(&addr) {
                return Err(format!("{what}: a second socket listening on {addr}"));
            }
            by_addr.insert(
                addr,
                Group {
                    sockets: vec![socket],
                    what,
                    external: true,
                    passed_for: None,
                },
            );
        }
        for (entry, socket) in passed {
            let what = entry.what();
            let external = entry.kind == Kind::SocketUnit;
            let passed_for = Some((entry.frontend.clone(), entry.configured));
            match by_addr.get_mut(&entry.bound) {
                None => {
                    by_addr.insert(
                        entry.bound,
                        Group {
                            sockets: vec![socket],
                            what,
                            external,
                            passed_for,
                        },
                    );
                }
                // The old process's other workers' sockets on the same address.
                Some(g) if g.passed_for == passed_for && g.external == external => {
                    g.sockets.push(socket)
                }
                Some(g) => {
                    return Err(format!(
                        "{what}: a second socket listening on {}, already passed as {}",
                        entry.bound, g.what
                    ))
                }
            }
        }
        Ok(Inherited { by_addr })
    }

    /// The passed sockets listening on `addr` for `frontend`, if there are any, spread over
    /// `count` workers: the `i`th goes to worker `i % count` (a worker may get several when
    /// the old process had more workers; fewer are shared through duplicates). The flag
    /// says whether the service manager holds them too.
    pub fn take_for(
        &mut self,
        frontend: &str,
        addr: SocketAddr,
        count: usize,
    ) -> Option<io::Result<(Vec<std::net::TcpListener>, bool)>> {
        let key = if self.by_addr.contains_key(&addr) {
            addr
        } else {
            // `listen = ["127.0.0.1:0"]` keeps the port it was given before the upgrade.
            *self.by_addr.iter().find_map(|(bound, g)| {
                let same = g
                    .passed_for
                    .as_ref()
                    .is_some_and(|(f, configured)| f == frontend && *configured == addr);
                same.then_some(bound)
            })?
        };
        let g = self.by_addr.remove(&key)?;
        let external = g.external;
        Some(share(g.sockets, count).map(|s| (s, external)))
    }

    /// The passed sockets no frontend listens on, as an error naming each; `None` if every
    /// one was taken.
    pub fn leftover(&self) -> Option<String> {
        let mut left: Vec<String> = self
            .by_addr
            .iter()
            .map(|(addr, g)| match g.passed_for {
                None => format!(
                    "{} listens on {addr}, which no frontend's listen names: add it to a \
                     frontend or remove it from the socket unit",
                    g.what
                ),
                Some(_) => format!(
                    "{} listens on {addr}, which no frontend's listen names: an upgrade \
                     keeps every address the running process listens on (drop it by reload \
                     first, or add it back to the config)",
                    g.what
                ),
            })
            .collect();
        left.sort();
        (!left.is_empty()).then(|| left.join("; "))
    }
}

/// The address a passed socket listens on, if it is a listening TCP socket.
pub fn check(socket: &Socket) -> io::Result<SocketAddr> {
    let not = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let kind = socket.r#type().map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            not("not a socket")
        } else {
            e
        }
    })?;
    if kind != Type::STREAM || socket.protocol()? != Some(Protocol::TCP) {
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

fn share(sockets: Vec<Socket>, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let distinct = sockets.len();
    for socket in &sockets {
        // Accepted sockets inherit TCP_NODELAY from the listener (see `bind_one`).
        socket.set_nodelay(true)?;
        super::owners::register_own(socket);
    }
    let total = distinct.max(count);
    let mut out = Vec::with_capacity(total);
    // Duplicates first, then the originals themselves.
    for i in distinct..total {
        out.push((i, sockets[i % distinct].try_clone()?.into()));
    }
    for (i, socket) in sockets.into_iter().enumerate() {
        out.push((i, socket.into()));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, s)| s).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> Socket {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Socket::from(l)
    }

    fn ports(v: &[std::net::TcpListener]) -> Vec<u16> {
        v.iter().map(|l| l.local_addr().unwrap().port()).collect()
    }

    #[test]
    fn passed_sockets_are_spread_over_the_workers_socket_i_to_worker_i_mod_count() {
        let (a, b) = (listener(), listener());
        let (pa, pb) = (
            a.local_addr().unwrap().as_socket().unwrap().port(),
            b.local_addr().unwrap().as_socket().unwrap().port(),
        );
        // More workers than sockets: the extra workers share duplicates, in turn.
        let out = share(vec![a, b], 3).unwrap();
        assert_eq!(ports(&out), vec![pa, pb, pa]);
        // Fewer: every socket is still there, so that each is accepted on.
        let (c, d, e) = (listener(), listener(), listener());
        let out = share(vec![c, d, e], 1).unwrap();
        assert_eq!(out.len(), 3);
    }
}
