//! The three io_uring operations ringlb submits itself: accept, connect and a readiness poll.
//!
//! All of ringlb's `unsafe` lives here. tokio-uring runs the ring and the executor; these ops go
//! through its `UnsubmittedOneshot`, whose stored data lives until the completion arrives even
//! when the future is dropped first. Each op's stored data owns everything the kernel reads or
//! writes while the op is in flight: the fd (an `Rc` clone, so it cannot be closed and reused
//! under the kernel) and any address buffer (boxed, so its pointer is stable).
//!
//! Cancellation: a dropped op is not cancelled. A pending accept completes when the listener is
//! shut down; a pending poll when its socket is shut down; a connect that times out is aborted
//! with `shutdown()` (in SYN_SENT that disconnects at once).

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use io_uring::{cqueue, opcode, types};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

/// Why a connect to a backend failed.
#[derive(Debug)]
pub enum ConnectError {
    TimedOut,
    Io(io::Error),
}

impl ConnectError {
    /// A failure of this host (out of fds, memory or buffers), not of the backend: it must not
    /// count against the backend's health (see `crate::worker::local`).
    pub fn is_local(&self) -> bool {
        matches!(self, ConnectError::Io(e) if crate::worker::local::is_local_error(e))
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::TimedOut => f.write_str("connect timed out"),
            ConnectError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn cqe_result(cqe: &cqueue::Entry) -> io::Result<u32> {
    let res = cqe.result();
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as u32)
    }
}

/// Stored data of a connect: the socket lives exactly as long as the op.
struct ConnectData {
    socket: Socket,
    #[allow(dead_code)] // read by the kernel through the pointer in the SQE
    addr: Box<SockAddr>,
}

struct ConnectDone;

impl OneshotOutputTransform for ConnectDone {
    type Output = (io::Result<u32>, Socket);
    type StoredData = ConnectData;

    fn transform_oneshot_output(self, data: ConnectData, cqe: cqueue::Entry) -> Self::Output {
        (cqe_result(&cqe), data.socket)
    }
}

/// Connects to `addr` within `timeout`. The socket is non-blocking (the relay makes plain
/// non-blocking syscalls on it), close-on-exec, with TCP_NODELAY.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Socket, ConnectError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(ConnectError::Io)?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    let fd = socket.as_raw_fd();
    let addr = Box::new(SockAddr::from(addr));
    let sqe = opcode::Connect::new(types::Fd(fd), addr.as_ptr(), addr.len()).build();
    // SAFETY: the SQE names `fd` and points at `addr`. Both are moved into the op's stored
    // data (`addr` boxed, so the pointer stays valid when the struct moves), which tokio-uring
    // keeps alive until the completion arrives, even if this future is dropped first.
    let mut op = unsafe { submit(ConnectData { socket, addr }, ConnectDone, sqe) };
    match tokio::time::timeout(timeout, &mut op).await {
        Ok((Ok(_), socket)) => Ok(socket),
        Ok((Err(e), _socket)) => Err(ConnectError::Io(e)),
        Err(_elapsed) => {
            // The op still owns the socket, so `fd` is open. Shutting down a socket in SYN_SENT
            // disconnects it, which completes the connect; dropping `op` then hands the socket
            // to the driver, which closes it on that completion. Nothing waits for the SYN.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
            drop(op);
            Err(ConnectError::TimedOut)
        }
    }
}

/// Stored data of an accept: the listener (kept open) and where the kernel writes the peer's
/// address.
struct AcceptData<L> {
    _listener: Rc<L>,
    addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
}

struct AcceptDone<L>(std::marker::PhantomData<fn() -> L>);

impl<L> OneshotOutputTransform for AcceptDone<L> {
    type Output = io::Result<(Socket, SocketAddr)>;
    type StoredData = AcceptData<L>;

    fn transform_oneshot_output(self, data: AcceptData<L>, cqe: cqueue::Entry) -> Self::Output {
        let fd = cqe_result(&cqe)? as i32;
        // SAFETY: a successful accept returns a new fd that nothing else owns.
        let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let (storage, len) = *data.addr;
        // SAFETY: the kernel wrote a socket address of `len` bytes into `storage` (the whole
        // storage was zeroed first, so a shorter address leaves the rest initialised).
        let addr = unsafe { SockAddr::new(storage, len) };
        let peer = addr
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
        Ok((socket, peer))
    }
}

/// Accepts one connection on `listener`: the new socket is non-blocking and close-on-exec
/// from the start (accept4 flags), so no fcntl follows.
pub async fn accept<L: AsRawFd + 'static>(listener: &Rc<L>) -> io::Result<(Socket, SocketAddr)> {
    let fd = listener.as_raw_fd();
    // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
    let storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let mut addr = Box::new((storage, len));
    let sqe = opcode::Accept::new(
        types::Fd(fd),
        std::ptr::addr_of_mut!(addr.0).cast(),
        std::ptr::addr_of_mut!(addr.1),
    )
    .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    .build();
    let data = AcceptData {
        _listener: listener.clone(),
        addr,
    };
    // SAFETY: the SQE names the listener's fd, kept open by the `Rc` in the stored data, and
    // points into the boxed address buffer, also in the stored data: both live until the
    // completion, even if this future is dropped.
    unsafe { submit(data, AcceptDone(std::marker::PhantomData), sqe) }.await
}

/// Stored data of a poll: keeps the polled socket open for as long as the kernel may look at it.
struct PollData<T> {
    _fd_owner: Rc<T>,
}

struct PollDone<T>(std::marker::PhantomData<fn() -> T>);

impl<T> OneshotOutputTransform for PollDone<T> {
    type Output = io::Result<u32>;
    type StoredData = PollData<T>;

    fn transform_oneshot_output(self, _data: PollData<T>, cqe: cqueue::Entry) -> Self::Output {
        cqe_result(&cqe)
    }
}

/// Waits until `owner`'s socket is ready for `mask` (libc::POLLIN, POLLOUT...) and returns the
/// ready events. To end a wait early, shut the socket down: that wakes the poll.
pub async fn poll_ready<T: AsRawFd + 'static>(owner: &Rc<T>, mask: u32) -> io::Result<u32> {
    let fd = owner.as_raw_fd();
    let sqe = opcode::PollAdd::new(types::Fd(fd), mask).build();
    let data = PollData {
        _fd_owner: owner.clone(),
    };
    // SAFETY: the SQE names only `fd`, which the `Rc` clone in the stored data keeps open
    // until the completion; no memory of ours is passed.
    unsafe { submit(data, PollDone(std::marker::PhantomData), sqe) }.await
}

/// Submits a raw SQE with its stored data.
///
/// # Safety
/// Every fd and pointer in `sqe` must be owned by `data`, so that it stays valid until the
/// completion arrives.
unsafe fn submit<D: 'static, T: OneshotOutputTransform<StoredData = D>>(
    data: D,
    transform: T,
    sqe: io_uring::squeue::Entry,
) -> tokio_uring::InFlightOneshot<D, T> {
    UnsubmittedOneshot::new(data, transform, sqe).submit()
}
