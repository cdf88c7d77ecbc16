//! The two runtimes a worker can run on, behind one trait: io_uring (tokio-uring, the
//! default) and the epoll fallback (plain tokio) for machines where io_uring is unavailable.
//!
//! The accept loop and the connection logic (`accept.rs`) are written once against [`Io`];
//! only accepting, connecting and relaying differ.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use crate::backend::BackendState;
use crate::config::RelayMode;
use crate::relay::ops::ConnectError;
use crate::relay::{self, FirstMove, RelayEnd};

pub trait Io: 'static {
    type Listener: 'static;
    type Stream: AsRawFd + 'static;
    const NAME: &'static str;

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener>;
    fn accept(l: &Self::Listener) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>>;
    fn connect(
        addr: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Stream, ConnectError>>;
    fn set_nodelay(s: &Self::Stream);
    /// Ends a client connection that is not going to be relayed. On io_uring a readiness
    /// poll left by `first_move` may still hold the socket: shutting it down completes that
    /// poll, so the fd is closed now rather than whenever the client next speaks.
    fn abandon(s: &Self::Stream) {
        let _ = nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
    /// See [`relay::first_move`]: did the backend fail before anything was relayed?
    fn first_move(
        client: &Self::Stream,
        server: &Self::Stream,
        limit: Duration,
    ) -> impl Future<Output = FirstMove>;
    fn relay(
        client: Self::Stream,
        server: Self::Stream,
        backend: &BackendState,
        kill_epoch: u64,
        idle_timeout: Duration,
        mode: RelayMode,
    ) -> impl Future<Output = RelayEnd>;
    fn spawn(f: impl Future<Output = ()> + 'static);
}

/// io_uring through tokio-uring.
pub struct Uring;

impl Io for Uring {
    type Listener = tokio_uring::net::TcpListener;
    /// Shared so that a readiness poll in flight can keep the socket open (see `first_move`).
    type Stream = Rc<tokio_uring::net::TcpStream>;
    const NAME: &'static str = "io_uring";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        Ok(tokio_uring::net::TcpListener::from_std(l))
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        l.accept().await.map(|(s, a)| (Rc::new(s), a))
    }

    async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self::Stream, ConnectError> {
        relay::ops::connect(addr, timeout).await.map(Rc::new)
    }

    fn set_nodelay(s: &Self::Stream) {
        let _ = s.set_nodelay(true);
    }

    async fn first_move(
        client: &Self::Stream,
        server: &Self::Stream,
        limit: Duration,
    ) -> FirstMove {
        relay::first_move(client, server, limit).await
    }

    async fn relay(
        client: Self::Stream,
        server: Self::Stream,
        backend: &BackendState,
        kill_epoch: u64,
        idle_timeout: Duration,
        mode: RelayMode,
    ) -> RelayEnd {
        match mode {
            RelayMode::Copy => {
                relay::relay(client, server, backend, kill_epoch, idle_timeout).await
            }
            RelayMode::Splice => {
                relay::splice::relay(client, server, backend, kill_epoch, idle_timeout).await
            }
        }
    }

    fn spawn(f: impl Future<Output = ()> + 'static) {
        tokio_uring::spawn(f);
    }
}

/// The epoll fallback through plain tokio (a current-thread runtime with a LocalSet).
pub struct Epoll;

impl Io for Epoll {
    type Listener = tokio::net::TcpListener;
    type Stream = tokio::net::TcpStream;
    const NAME: &'static str = "epoll";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        l.accept().await
    }

    async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self::Stream, ConnectError> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(ConnectError::Io)?;
        socket.set_nodelay(true).map_err(ConnectError::Io)?;
        // Dropping the future on timeout closes the socket: nothing is left in flight.
        match tokio::time::timeout(timeout, socket.connect(addr)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(ConnectError::Io(e)),
            Err(_) => Err(ConnectError::TimedOut),
        }
    }

    fn set_nodelay(s: &Self::Stream) {
        let _ = s.set_nodelay(true);
    }

    async fn first_move(
        client: &Self::Stream,
        server: &Self::Stream,
        limit: Duration,
    ) -> FirstMove {
        relay::epoll::first_move(client, server, limit).await
    }

    async fn relay(
        client: Self::Stream,
        server: Self::Stream,
        backend: &BackendState,
        kill_epoch: u64,
        idle_timeout: Duration,
        _mode: RelayMode,
    ) -> RelayEnd {
        relay::epoll::relay(client, server, backend, kill_epoch, idle_timeout).await
    }

    fn spawn(f: impl Future<Output = ()> + 'static) {
        tokio::task::spawn_local(f);
    }
}

/// Whether this kernel and process may use io_uring (it may be disabled by sysctl or seccomp).
pub fn io_uring_available() -> Result<(), io::Error> {
    io_uring::IoUring::new(4).map(drop)
}
