//! Zero-copy relay: socket -> pipe -> socket with splice(2), readiness from io_uring.
//!
//! The kernel runs IORING_OP_SPLICE on an io-wq thread, and on a blocking socket each waiting
//! splice holds one: 50 idle connections cost 100 kernel threads (DESIGN.md). So io_uring is
//! used only to wait for readiness (POLL_ADD), and the splices are plain non-blocking
//! syscalls made on the worker thread. An idle connection costs two pending polls, no thread.
//!
//! Pipes are pooled per worker: a connection takes two and gives back those it left empty.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_uring::net::TcpStream;

use super::ops::{poll_ready, set_nonblocking, splice_nonblocking};
use super::{end_both, watchdog, RelayEnd};
use crate::backend::BackendState;

/// Bytes moved per splice call: the default pipe capacity (16 pages).
const CHUNK: usize = 64 * 1024;
/// Empty pipes kept per worker for the next connections.
const POOL_MAX: usize = 256;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe() -> io::Result<Pipe> {
    if let Some(p) = POOL.with(|p| p.borrow_mut().pop()) {
        return Ok(p);
    }
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    Ok(Pipe { read, write })
}

fn give_back(pipe: Pipe) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(pipe);
        }
    });
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Moves bytes from `from` to `to` through `pipe` until EOF; half-closes `to`. Returns
/// whether the pipe was left empty (reusable).
async fn pump(
    from: &Rc<TcpStream>,
    to: &Rc<TcpStream>,
    pipe: &Pipe,
    last_activity: &Cell<Instant>,
    bytes: &AtomicU64,
) -> (io::Result<()>, bool) {
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let (pr, pw) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let mut in_pipe = 0usize;
    loop {
        match splice_nonblocking(src, pw, CHUNK) {
            Ok(0) => break,
            Ok(n) => {
                in_pipe += n;
                last_activity.set(Instant::now());
            }
            Err(e) if would_block(&e) => {
                if let Err(e) = poll_ready(from, (libc::POLLIN | libc::POLLRDHUP) as u32).await {
                    return (Err(e), in_pipe == 0);
                }
                continue;
            }
            Err(e) => return (Err(e), in_pipe == 0),
        }
        while in_pipe > 0 {
            match splice_nonblocking(pr, dst, in_pipe) {
                Ok(n) => {
                    in_pipe -= n;
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if would_block(&e) => {
                    if let Err(e) = poll_ready(to, libc::POLLOUT as u32).await {
                        return (Err(e), false);
                    }
                }
                Err(e) => return (Err(e), false),
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    (Ok(()), true)
}

/// Relays with splice until both directions end; same contract as [`super::relay`].
pub async fn relay(
    client: Rc<TcpStream>,
    server: Rc<TcpStream>,
    backend: &BackendState,
    kill_epoch: u64,
    idle_timeout: Duration,
) -> RelayEnd {
    let pipes = (take_pipe(), take_pipe());
    let (Ok(up_pipe), Ok(down_pipe)) = pipes else {
        // Out of fds for pipes: fall back to copying rather than failing the client.
        drop(pipes);
        return super::relay(client, server, backend, kill_epoch, idle_timeout).await;
    };
    if set_nonblocking(client.as_raw_fd())
        .and_then(|_| set_nonblocking(server.as_raw_fd()))
        .is_err()
    {
        // Shutting down completes any readiness poll still holding either socket.
        end_both(&client, &server);
        return RelayEnd::Done;
    }
    let last_activity = Cell::new(Instant::now());
    let end_both = || end_both(&client, &server);
    // In its own block so the pumps' borrows of the pipes end before the pipes go back.
    let (why, (up_clean, down_clean)) = {
        let both = async {
            let up = async {
                let (r, clean) = pump(
                    &client,
                    &server,
                    &up_pipe,
                    &last_activity,
                    &backend.bytes_in_total,
                )
                .await;
                if r.is_err() {
                    end_both();
                }
                clean
            };
            let down = async {
                let (r, clean) = pump(
                    &server,
                    &client,
                    &down_pipe,
                    &last_activity,
                    &backend.bytes_out_total,
                )
                .await;
                if r.is_err() {
                    end_both();
                }
                clean
            };
            tokio::join!(up, down)
        };
        tokio::pin!(both);
        tokio::select! {
            biased;
            clean = &mut both => (RelayEnd::Done, clean),
            why = watchdog(&last_activity, idle_timeout, backend, kill_epoch) => {
                end_both();
                // Shutdown completes every pending poll; wait for the pumps rather than drop them.
                (why, both.await)
            }
        }
    };
    if up_clean {
        give_back(up_pipe);
    }
    if down_clean {
        give_back(down_pipe);
    }
    why
}
