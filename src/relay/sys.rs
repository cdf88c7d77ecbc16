//! The plain, non-blocking syscalls the relay makes once a socket is ready: recv, send, splice,
//! a one-byte peek, shutdown. They are the same on every runtime, which is what lets one relay
//! serve io_uring and the epoll fallback alike (see the module docs of [`super`]).
//!
//! Every socket the relay sees is non-blocking (accept4 and socket flags), so none of these
//! ever waits: `WouldBlock` sends the caller back to wait for readiness.

use std::io;
use std::os::fd::{AsFd, RawFd};

use nix::fcntl::SpliceFFlags;
use nix::sys::socket::{self, MsgFlags};

/// recv(2) into `buf`; `Ok(0)` is EOF.
pub fn recv(s: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(socket::recv(s, buf, MsgFlags::MSG_DONTWAIT)?)
}

/// send(2) of `buf`, without SIGPIPE on a closed peer.
pub fn send(s: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_flags(s, buf, MsgFlags::empty())
}

/// [`send`] with MSG_MORE: the bytes wait in the socket (corked, even with TCP_NODELAY) for
/// what comes next. Used when the FIN comes next: the shutdown that follows sends both in
/// one segment.
pub fn send_before_fin(s: RawFd, buf: &[u8]) -> io::Result<usize> {
    // nix has no name for it.
    send_flags(s, buf, MsgFlags::from_bits_retain(libc::MSG_MORE))
}

fn send_flags(s: RawFd, buf: &[u8], flags: MsgFlags) -> io::Result<usize> {
    Ok(socket::send(
        s,
        buf,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL | flags,
    )?)
}

/// One splice(2) of up to `len` bytes between a socket and a pipe, never waiting.
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    Ok(nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )?)
}

/// Peeks at one byte without consuming it: `Ok(0)` is EOF, `WouldBlock` means nothing yet.
pub fn peek(s: RawFd) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    Ok(socket::recv(
        s,
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    )?)
}

/// shutdown(2); ENOTCONN (the peer is already gone) is not worth reporting.
pub fn shutdown(s: RawFd, how: socket::Shutdown) {
    let _ = socket::shutdown(s, how);
}

/// A new non-blocking, close-on-exec pipe: (read end, write end), asked to hold `size`
/// bytes. A pipe's pages are the kernel's and used only while bytes sit in it; if the kernel
/// refuses the size (over /proc/sys/fs/pipe-max-size for an unprivileged user), the default
/// 64 KiB pipe is kept.
pub fn pipe(size: usize) -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    let size = i32::try_from(size).unwrap_or(i32::MAX);
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&w),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(size),
    );
    Ok((r, w))
}

/// Binds a socket that is about to connect to the local address `ip` (`source`), leaving
/// the port to connect() (IP_BIND_ADDRESS_NO_PORT): without it, bind would reserve a port
/// for every connection and run out of them long before connect would.
pub fn bind_source(s: &impl AsFd, ip: std::net::IpAddr) -> io::Result<()> {
    let fd = s.as_fd();
    // An IPv4 socket option; an IPv6 source binds with a port reserved, as without it.
    if ip.is_ipv4() {
        socket::setsockopt(&fd, socket::sockopt::IpBindAddressNoPort, &true)?;
    }
    let addr = socket::SockaddrStorage::from(std::net::SocketAddr::new(ip, 0));
    Ok(socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?)
}
