//! The syscalls whose safe wrappers do not fit (accept4 with flags and the peer's address),
//! taking ownership of the sockets a service manager or an upgrading parent passed, and
//! keeping fds across exec. The io_uring ops are in `worker::ring`.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{SockAddr, Socket};

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

/// Makes `fds` survive `exec` in the child that `cmd` starts, and only there: the parent's
/// copies stay close-on-exec, so no other program ringlb runs meanwhile inherits them. The
/// fd numbers stay the same in the child. Used by the binary upgrade (`crate::upgrade`).
pub fn keep_across_exec(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it calls fcntl alone and touches no lock or allocation (`fds` was
    // built before the fork). The fds are open in the parent, so in the child as well.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Takes ownership of fd `fd`, which the process that started this one passed to it (the
/// binary upgrade's `RINGLB_INHERIT`), and makes it close-on-exec. `what` names it in the
/// error for an fd that is not open.
///
/// The caller must take each passed fd once (`crate::upgrade::take_passed` removes the
/// variable that names them and takes them once per process).
pub fn take_passed_fd(fd: RawFd, what: &str) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}: fd {fd} is stdin, stdout or stderr, not a passed socket"),
        ));
    }
    // SAFETY: F_GETFD reads the flags of an fd number and touches no memory; on an fd that is
    // not open it fails with EBADF, which is reported instead of taking it.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}: fd {fd} is not open"),
        ));
    }
    // SAFETY: the parent passed this fd number to this process for ringlb to own; nothing
    // else in the process knows the number (the variable naming it is removed once read and
    // read once), and it is open (checked above).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        owned.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(owned)
}
