//! The io_uring operations tokio-uring does not give us in the shape we need.
//!
//! All of ringlb's `unsafe` lives here. tokio-uring's own `TcpStream::connect` creates its
//! socket inside the op, so a connect that times out cannot be aborted: dropping the future
//! leaves the op in flight, holding the fd until the kernel gives up on the SYN (minutes).
//! Here we own the socket, so on timeout we `shutdown()` it first: in SYN_SENT that aborts the
//! connect, the op completes at once, and the driver drops the socket with it.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, types};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio_uring::net::TcpStream;
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

/// What the kernel reads while the op is in flight. The address is boxed so that its
/// pointer in the SQE stays valid when this struct moves; the socket is here so that its fd
/// lives exactly as long as the op, even if the future is dropped.
struct ConnectData {
    socket: Socket,
    #[allow(dead_code)] // read by the kernel through the pointer in the SQE
    addr: Box<SockAddr>,
}

struct ConnectDone;

impl OneshotOutputTransform for ConnectDone {
    type Output = (io::Result<()>, Socket);
    type StoredData = ConnectData;

    fn transform_oneshot_output(self, data: ConnectData, cqe: cqueue::Entry) -> Self::Output {
        let res = cqe.result();
        let out = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(())
        };
        (out, data.socket)
    }
}

/// Connects to `addr` on the current tokio-uring runtime within `timeout`, with TCP_NODELAY.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(ConnectError::Io)?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    let fd = socket.as_raw_fd();
    let addr = Box::new(SockAddr::from(addr));
    let sqe = opcode::Connect::new(types::Fd(fd), addr.as_ptr(), addr.len()).build();
    // SAFETY: the SQE points at `addr` (boxed, so stable) and names `fd`; both are owned by
    // the op's stable data, which tokio-uring keeps alive until the completion arrives, even
    // if this future is dropped first.
    let mut op = UnsubmittedOneshot::new(ConnectData { socket, addr }, ConnectDone, sqe).submit();
    match tokio::time::timeout(timeout, &mut op).await {
        Ok((Ok(()), socket)) => Ok(TcpStream::from_std(socket.into())),
        Ok((Err(e), _socket)) => Err(ConnectError::Io(e)),
        Err(_elapsed) => {
            // The op still owns the socket, so `fd` is open. Shutting down a socket in SYN_SENT
            // disconnects it, which completes the pending connect; dropping `op` then hands the
            // socket to the driver, which closes it on that completion.
            // SAFETY: plain syscall on an fd we know is open (owned by `op`, not yet dropped).
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
            drop(op);
            Err(ConnectError::TimedOut)
        }
    }
}

/// Keeps the polled socket open for as long as the kernel may look at it.
struct PollData<T> {
    _fd_owner: std::rc::Rc<T>,
}

struct PollDone<T>(std::marker::PhantomData<fn() -> T>);

impl<T> OneshotOutputTransform for PollDone<T> {
    type Output = io::Result<u32>;
    type StoredData = PollData<T>;

    fn transform_oneshot_output(self, _data: PollData<T>, cqe: cqueue::Entry) -> Self::Output {
        let res = cqe.result();
        if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as u32)
        }
    }
}

/// Waits on io_uring until `owner`'s socket is ready for `mask` (libc::POLLIN, POLLOUT...);
/// returns the ready events. The op holds a clone of `owner`, so the fd outlives the op even
/// if this future is dropped. To end a wait early, shut the socket down: that wakes the poll.
pub async fn poll_ready<T: AsRawFd + 'static>(
    owner: &std::rc::Rc<T>,
    mask: u32,
) -> io::Result<u32> {
    let fd = owner.as_raw_fd();
    let sqe = opcode::PollAdd::new(types::Fd(fd), mask).build();
    let data = PollData {
        _fd_owner: owner.clone(),
    };
    UnsubmittedOneshot::new(data, PollDone(std::marker::PhantomData), sqe)
        .submit()
        .await
}

/// One non-blocking splice(2) between two fds, one of which is a pipe.
pub fn splice_nonblocking(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: splice with null offsets only reads the two fds, which the caller keeps open;
    // no memory of ours is passed to the kernel.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sets O_NONBLOCK on a socket the caller owns.
pub fn set_nonblocking(fd: i32) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// recv(MSG_PEEK | MSG_DONTWAIT) of one byte: never waits, consumes nothing.
fn peek_one(fd: i32) -> isize {
    let mut byte = [0u8; 1];
    // SAFETY: recv into a 1-byte buffer we own, on an fd the caller keeps open.
    unsafe {
        libc::recv(
            fd,
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    }
}

/// Whether the client has already sent data (or closed): then there is nothing to wait for.
pub fn has_spoken(fd: i32) -> bool {
    peek_one(fd) >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
}

/// After a socket polled readable before anything was sent on it: is it data, or a close?
pub fn peek_first_byte(fd: i32) -> crate::relay::FirstMove {
    use crate::relay::FirstMove;
    let n = peek_one(fd);
    match n {
        0 => FirstMove::BackendFailed(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "backend closed the connection before sending anything",
        )),
        n if n > 0 => FirstMove::Relay,
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                FirstMove::Relay
            } else {
                FirstMove::BackendFailed(e)
            }
        }
    }
}
