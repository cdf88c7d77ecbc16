//! The io_uring operations ringlb submits itself (connect and a readiness poll), the one
//! syscall whose safe wrappers do not fit (accept4 with flags and the peer's address), and
//! taking ownership of the sockets a service manager passed (`LISTEN_FDS`).
//!
//! All of ringlb's `unsafe` lives here. tokio-uring runs the ring and the executor; these ops go
//! through its `UnsubmittedOneshot`, whose stored data lives until the completion arrives even
//! when the future is dropped first. Each op's stored data owns everything the kernel reads or
//! writes while the op is in flight: the fd (an `Rc` clone, so it cannot be closed and reused
//! under the kernel) and any address buffer (boxed, so its pointer is stable).
//!
//! Cancellation: a dropped op is not cancelled. A pending poll completes when its socket (or
//! listener) is shut down; a connect whose future is dropped (timed out, or lost a hedge race)
//! aborts itself with `shutdown()` (in SYN_SENT that disconnects at once).

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use io_uring::{cqueue, opcode, types};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

/// Why a connect to a backend failed.
#[derive(Debug)]
pub enum ConnectError {
    TimedOut,
    Io(io::Error),
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

/// Connects to `addr`. The socket is non-blocking (the relay makes plain non-blocking
/// syscalls on it), close-on-exec, with TCP_NODELAY. There is no timeout here: the caller
/// races this future against its own timers (one for the hedge delay and the deadline, see
/// `worker::hedge`) and simply drops it to give up. Dropping it before it completes aborts
/// the connect at once (see [`Connecting`]), so the fd is closed on the next completion the
/// worker reaps, not when the kernel gives up on the SYN minutes later.
pub async fn connect(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> Result<Socket, ConnectError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(ConnectError::Io)?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    if let Some(ip) = source {
        super::sys::bind_source(&socket, ip).map_err(ConnectError::Io)?;
    }
    let fd = socket.as_raw_fd();
    let addr = Box::new(SockAddr::from(addr));
    let sqe = opcode::Connect::new(types::Fd(fd), addr.as_ptr(), addr.len()).build();
    // SAFETY: the SQE names `fd` and points at `addr`. Both are moved into the op's stored
    // data (`addr` boxed, so the pointer stays valid when the struct moves), which tokio-uring
    // keeps alive until the completion arrives, even if this future is dropped first.
    let op = unsafe { submit(ConnectData { socket, addr }, ConnectDone, sqe) };
    match (Connecting { op: Some(op), fd }).await {
        (Ok(_), socket) => Ok(socket),
        (Err(e), _socket) => Err(ConnectError::Io(e)),
    }
}

/// A connect op in flight that aborts itself when dropped unfinished.
///
/// tokio-uring does not cancel a dropped op: its stored data (here the socket) is kept until
/// the completion arrives, and a connect to a host that drops SYNs completes only when the
/// kernel gives up (two minutes). Shutting down a socket in SYN_SENT disconnects it, which
/// completes the connect at once; the driver then closes the socket on that completion.
/// `Drop::drop` runs before the fields are dropped, so `fd` is still owned by `op` (and open)
/// when it is shut down: the number cannot have been reused by another socket.
struct Connecting {
    op: Option<tokio_uring::InFlightOneshot<ConnectData, ConnectDone>>,
    fd: RawFd,
}

impl std::future::Future for Connecting {
    type Output = (io::Result<u32>, Socket);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(op) = self.op.as_mut() else {
            // Polled after completion: never done by `connect`, which awaits once.
            return std::task::Poll::Pending;
        };
        match std::pin::Pin::new(op).poll(cx) {
            std::task::Poll::Ready(out) => {
                self.op = None;
                std::task::Poll::Ready(out)
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if self.op.is_some() {
            let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
        }
    }
}

/// Accepts one connection waiting on the (non-blocking) listener `fd`, without waiting:
/// `WouldBlock` when none is queued. The new socket is non-blocking and close-on-exec from the
/// start (accept4 flags), so no fcntl follows. Used with a readiness wait on the listener, so
/// one wake-up drains the whole accept queue, as an epoll server does.
pub fn accept_now(fd: RawFd) -> io::Result<(Socket, SocketAddr)> {
    // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: accept4 writes at most `len` bytes into `storage`, which we own, and `len`
    // itself; `fd` is the caller's open listener.
    let new = unsafe {
        libc::accept4(
            fd,
            std::ptr::addr_of_mut!(storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful accept returns a new fd that nothing else owns.
    let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(new) });
    // SAFETY: the kernel wrote a socket address of `len` bytes into `storage`.
    let addr = unsafe { SockAddr::new(storage, len) };
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((socket, peer))
}

/// The first fd of systemd's socket-passing protocol (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The sockets the service manager passed to this process (systemd's `LISTEN_FDS`,
/// `LISTEN_PID` and `LISTEN_FDNAMES`, see sd_listen_fds(3)), each with its name if given,
/// made close-on-exec. Empty when the variables are absent or meant for another process.
/// The variables are removed, and a second call returns nothing: each fd is owned once.
pub fn take_listen_fds() -> io::Result<Vec<(Socket, Option<String>)>> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let count: RawFd = count.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS is {count:?}, not a number of sockets"),
        )
    })?;
    let names: Vec<String> = names
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, fd) in (LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count)).enumerate() {
        // SAFETY: F_GETFD reads the flags of an fd number and touches no memory; on an fd
        // that is not open it fails with EBADF, which is reported instead of taking it.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("LISTEN_FDS names fd {fd}, which is not open"),
            ));
        }
        // SAFETY: the service manager passed fd numbers LISTEN_FDS_START.. to this process
        // (LISTEN_PID is ours), nothing else in the process owns them, and `TAKEN` makes sure
        // they are wrapped once; the fd is open (checked above).
        let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
        socket.set_cloexec(true)?;
        out.push((socket, names.get(i).cloned().filter(|n| !n.is_empty())));
    }
    Ok(out)
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
    // The one place raw SQEs are submitted (clippy.toml disallows it elsewhere).
    #[allow(clippy::disallowed_methods)]
    UnsubmittedOneshot::new(data, transform, sqe).submit()
}
