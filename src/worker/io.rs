//! The two runtimes a worker can run on, behind one trait: io_uring (ringlb's own ring, the
//! default) and the epoll fallback (plain tokio) for machines where io_uring is unavailable.
//!
//! The accept loop, the connection logic (`accept.rs`) and the relay are written once; a
//! runtime only supplies accept, connect, spawn and the readiness wait ([`Conn`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use socket2::Socket;
use tokio::io::Interest;

use super::ring::{self, Lent, Reads, RingSocket, SendOp};
use crate::relay::ops::{self, ConnectError};
use crate::relay::Conn;

pub trait Io: 'static {
    type Listener: std::os::fd::AsFd + 'static;
    type Stream: Conn;
    const NAME: &'static str;

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener>;
    /// Accepts a connection; the socket is non-blocking and close-on-exec.
    fn accept(l: &Self::Listener) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>>;
    /// Connects a non-blocking, close-on-exec socket with TCP_NODELAY. No timeout of its
    /// own: the caller races it against its timers. Dropping the future unfinished must
    /// abort the connect and release its fd promptly (a hedge's loser, a timed-out connect:
    /// on io_uring a shutdown and a cancel, and the close with the next submit).
    /// From the local address `source` when given (`source` in the config).
    fn connect(
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> impl Future<Output = Result<Self::Stream, ConnectError>>;
    fn spawn(f: impl Future<Output = ()> + 'static);
    /// A connection accepted outside [`Io::accept`] (non-blocking, close-on-exec).
    fn stream(s: Socket) -> io::Result<Self::Stream>;
}

/// io_uring: ringlb's own ring per worker (`worker::ring`), under its own executor
/// (`worker::exec`) and timers (`worker::deadline`).
pub struct Uring;

impl Conn for Rc<RingSocket> {
    /// Started at once (not when first polled): every caller polls it next.
    fn wait(&self, interest: Interest) -> impl Future<Output = io::Result<()>> {
        let mut mask = 0;
        if interest.is_readable() {
            mask |= libc::POLLIN | libc::POLLRDHUP;
        }
        if interest.is_writable() {
            mask |= libc::POLLOUT;
        }
        let op = ring::poll(self, mask as u32);
        async { op.await.map(drop) }
    }

    fn attempt<R>(&self, _: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        f()
    }

    fn reads_by_op(&self) -> bool {
        ring::has_buffer_ring()
    }

    fn read_op(&self) -> io::Result<Reads> {
        ring::reads(self)
    }

    fn sends_by_op(&self) -> bool {
        true
    }

    fn send_op(&self, bytes: Lent, corked: bool) -> Result<SendOp, Option<Lent>> {
        ring::send(self, bytes, corked).map_err(|(_, bytes)| bytes)
    }
}

impl Io for Uring {
    type Listener = Rc<std::net::TcpListener>;
    /// Shared so that an op in flight keeps the socket open (see `worker::ring`).
    type Stream = Rc<RingSocket>;
    const NAME: &'static str = "io_uring";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        l.set_nonblocking(true)?;
        Ok(Rc::new(l))
    }

    /// Readiness, then accept4: one wake-up drains the queue (the accept loop comes straight
    /// back here), where one io_uring accept op per connection would take one at a time.
    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        loop {
            match ops::accept_now(l.as_raw_fd()) {
                Ok((s, a)) => return Ok((Rc::new(RingSocket::new(s)), a)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ring::poll(l, libc::POLLIN as u32).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect(
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self::Stream, ConnectError> {
        ring::connect(addr, source).await
    }

    fn spawn(f: impl Future<Output = ()> + 'static) {
        super::exec::spawn(f);
    }

    fn stream(s: Socket) -> io::Result<Self::Stream> {
        Ok(Rc::new(RingSocket::new(s)))
    }
}

/// The epoll fallback through plain tokio (a current-thread runtime with a LocalSet).
pub struct Epoll;

impl Conn for tokio::net::TcpStream {
    async fn wait(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(drop)
    }

    fn attempt<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(interest, f)
    }
}

impl Io for Epoll {
    type Listener = tokio::net::TcpListener;
    type Stream = tokio::net::TcpStream;
    const NAME: &'static str = "epoll";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        // mio accepts with accept4(SOCK_NONBLOCK | SOCK_CLOEXEC).
        l.accept().await
    }

    async fn connect(
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self::Stream, ConnectError> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(ConnectError::Io)?;
        socket.set_nodelay(true).map_err(ConnectError::Io)?;
        if let Some(ip) = source {
            crate::relay::sys::bind_source(&socket, ip).map_err(ConnectError::Io)?;
        }
        // Dropping the future closes the socket: nothing is left in flight.
        socket.connect(addr).await.map_err(ConnectError::Io)
    }

    fn spawn(f: impl Future<Output = ()> + 'static) {
        tokio::task::spawn_local(f);
    }

    fn stream(s: Socket) -> io::Result<Self::Stream> {
        tokio::net::TcpStream::from_std(s.into())
    }
}

/// Whether this kernel and process may use io_uring (it may be disabled by sysctl or seccomp).
pub fn io_uring_available() -> Result<(), io::Error> {
    let ring = io_uring::IoUring::new(4)?;
    // The worker's executor waits with a timeout (`worker::exec`).
    if !ring.params().is_feature_ext_arg() {
        return Err(io::Error::other(
            "this kernel's io_uring cannot wait with a timeout (IORING_FEAT_EXT_ARG, Linux 5.11)",
        ));
    }
    Ok(())
}
