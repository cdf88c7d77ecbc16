//! ringloop: the bound of an own runtime, not product code (issue 9, "the runtime is a means").
//!
//! A minimal TCP relay written directly on the io-uring crate, one thread per core, to measure
//! next to ringlb (tokio-uring), HAProxy and nginx what CPU per connection and conn/s a small
//! per-core loop could reach at best. It does the least a balancer must do and nothing else:
//!
//! - one SO_REUSEPORT listener and one ring per thread, the thread pinned to its core;
//! - a multishot accept (one SQE for every connection the listener will ever take);
//! - per connection: socket(2) + TCP_NODELAY (syscalls, as ringlb), an io_uring connect to the
//!   one backend, then both directions as recv -> send -> recv ... ops (the kernel's internal
//!   poll waits for readiness; no epoll, no POLL_ADD of ours), shutdown(2) of the write half
//!   for the first direction to end (IORING_OP_SHUTDOWN with `--shutdown-op`: the kernel runs
//!   every one on an io-wq worker thread, a thread wake-up each), and close ops for both fds
//!   once both have ended;
//! - one `io_uring_enter` per loop turn (`submit_and_wait(1)`) that submits everything queued
//!   and reaps what completed, with `DEFER_TASKRUN` so completions run only there
//!   (`--coop`: `COOP_TASKRUN` instead, as ringlb's tokio-uring ring; `--no-defer`: neither).
//!
//! No health checks, no timeouts, no metrics, no selection, no config: everything it lacks is
//! what an own runtime would have to add back, so its figures are a bound, not a target.
//! Each connection owns two 16 KiB buffers for its life (slots are reused), so its memory
//! figures mean nothing. Run it through `benches/compare.py --ringloop BIN` (build it with
//! `cargo bench --bench ringloop --no-run`; cargo prints the binary's path), or by hand:
//!
//! ```sh
//! ringloop --workers 2 --listen 127.0.0.1:8000 --backend 127.0.0.1:8080 [--no-defer | --coop] [--shutdown-op]
//! ```
//!
//! The unsafe here is the io_uring contract: every fd and buffer an SQE names must stay valid
//! until its completion. Each `unsafe` block says why it holds; the buffers are boxed (so a
//! growing slot table does not move them) and a slot is reused only when no op of it is left.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Each direction's buffer (ringlb's pooled buffer is the same size).
const BUF: usize = 16 * 1024;
/// Submission queue entries; completions get twice as many by default.
const ENTRIES: u32 = 4096;

// user_data: slot << 8 | op. The accept has no slot.
const OP_ACCEPT: u64 = 0;
const OP_CONNECT: u64 = 1;
/// + the direction (0 up: client -> server, 1 down: server -> client).
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 4;
const OP_SHUT: u64 = 6;
const OP_CLOSE: u64 = 8;

struct Dir {
    buf: Box<[u8]>,
    len: usize,
    off: usize,
    done: bool,
}

struct Conn {
    client: RawFd,
    server: RawFd,
    /// Ops of this slot still in flight: the slot (and its buffers) is free only at zero.
    inflight: u32,
    dirs: [Dir; 2],
}

impl Conn {
    fn src(&self, d: usize) -> RawFd {
        if d == 0 {
            self.client
        } else {
            self.server
        }
    }
    fn dst(&self, d: usize) -> RawFd {
        if d == 0 {
            self.server
        } else {
            self.client
        }
    }
}

struct Worker {
    ring: IoUring,
    conns: Vec<Conn>,
    free: Vec<usize>,
    listener: RawFd,
    /// The backend's address; lives as long as the worker, so connect SQEs may point at it.
    backend: Box<SockAddr>,
    /// Half-close with IORING_OP_SHUTDOWN (`--shutdown-op`) rather than shutdown(2). The op
    /// is never done inline: the kernel hands every one to an io-wq worker thread.
    shutdown_op: bool,
}

impl Worker {
    /// Queues `sqe`, submitting what is queued first when the submission queue is full.
    ///
    /// # Safety
    /// Every fd and buffer `sqe` names must stay valid until its completion is reaped.
    unsafe fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: the caller guarantees what the SQE names outlives the op.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            self.ring.submit().expect("io_uring_enter");
        }
    }

    fn arm_accept(&mut self) {
        let sqe = opcode::AcceptMulti::new(types::Fd(self.listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(OP_ACCEPT);
        // SAFETY: the listener is open for the worker's life; the op names no memory.
        unsafe { self.push(sqe) };
    }

    fn new_conn(&mut self, client: RawFd) {
        let server = match Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                s.into_raw_fd()
            }
            Err(_) => {
                close_now(client);
                return;
            }
        };
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                let dir = || Dir {
                    buf: vec![0u8; BUF].into_boxed_slice(),
                    len: 0,
                    off: 0,
                    done: false,
                };
                self.conns.push(Conn {
                    client: -1,
                    server: -1,
                    inflight: 0,
                    dirs: [dir(), dir()],
                });
                self.conns.len() - 1
            }
        };
        let c = &mut self.conns[slot];
        c.client = client;
        c.server = server;
        c.inflight = 1;
        for d in &mut c.dirs {
            d.done = false;
        }
        let sqe =
            opcode::Connect::new(types::Fd(server), self.backend.as_ptr(), self.backend.len())
                .build()
                .user_data(tag(slot, OP_CONNECT));
        // SAFETY: `server` stays open until this slot's close, which waits for every op of
        // the slot; the address is the worker's `backend`, boxed and never freed before it.
        unsafe { self.push(sqe) };
    }

    fn recv(&mut self, slot: usize, d: usize) {
        let c = &mut self.conns[slot];
        c.inflight += 1;
        let sqe = opcode::Recv::new(types::Fd(c.src(d)), c.dirs[d].buf.as_mut_ptr(), BUF as u32)
            .build()
            .user_data(tag(slot, OP_RECV + d as u64));
        // SAFETY: the buffer is a boxed slice owned by the slot, which is not reused (nor its
        // buffer touched) until this op has completed (`inflight`); the fd likewise.
        unsafe { self.push(sqe) };
    }

    fn send(&mut self, slot: usize, d: usize) {
        let c = &mut self.conns[slot];
        c.inflight += 1;
        let dir = &c.dirs[d];
        let sqe = opcode::Send::new(
            types::Fd(c.dst(d)),
            dir.buf[dir.off..].as_ptr(),
            (dir.len - dir.off) as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(tag(slot, OP_SEND + d as u64));
        // SAFETY: as in `recv`: slot, buffer and fd outlive the op.
        unsafe { self.push(sqe) };
    }

    /// A direction ended: half-close its destination, or, if it was the last, close both.
    fn end_dir(&mut self, slot: usize, d: usize, failed: bool) {
        let c = &mut self.conns[slot];
        c.dirs[d].done = true;
        if failed {
            // Wake the other direction's pending op; it then ends too.
            shutdown_now(c.client);
            shutdown_now(c.server);
        } else if !c.dirs[1 - d].done {
            if self.shutdown_op {
                c.inflight += 1;
                let sqe = opcode::Shutdown::new(types::Fd(c.dst(d)), libc::SHUT_WR)
                    .build()
                    .user_data(tag(slot, OP_SHUT + d as u64));
                // SAFETY: the fd stays open until the slot's close; no memory is named.
                unsafe { self.push(sqe) };
            } else {
                // SAFETY: shutdown(2) on an fd of this slot, open until the slot's close.
                unsafe { libc::shutdown(c.dst(d), libc::SHUT_WR) };
            }
        }
        self.maybe_close(slot);
    }

    fn maybe_close(&mut self, slot: usize) {
        let c = &self.conns[slot];
        if c.inflight > 0 || !c.dirs[0].done || !c.dirs[1].done {
            return;
        }
        let (client, server) = (c.client, c.server);
        for fd in [client, server] {
            let sqe = opcode::Close::new(types::Fd(fd))
                .build()
                .user_data(OP_CLOSE);
            // SAFETY: no op of this slot is in flight, and the fd is not used after this.
            unsafe { self.push(sqe) };
        }
        self.free.push(slot);
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let (slot, op) = ((user_data >> 8) as usize, user_data & 0xff);
        match op {
            OP_ACCEPT => {
                if res >= 0 {
                    self.new_conn(res);
                }
                if !cqueue::more(flags) {
                    self.arm_accept();
                }
            }
            OP_CLOSE => {}
            _ => {
                self.conns[slot].inflight -= 1;
                match op {
                    OP_CONNECT if res < 0 => {
                        let c = &mut self.conns[slot];
                        c.dirs[0].done = true;
                        c.dirs[1].done = true;
                        self.maybe_close(slot);
                    }
                    OP_CONNECT => {
                        self.recv(slot, 0);
                        self.recv(slot, 1);
                    }
                    OP_RECV | 3 => {
                        let d = (op - OP_RECV) as usize;
                        match res {
                            0 => self.end_dir(slot, d, false),
                            n if n < 0 => self.end_dir(slot, d, true),
                            n => {
                                let dir = &mut self.conns[slot].dirs[d];
                                dir.len = n as usize;
                                dir.off = 0;
                                self.send(slot, d);
                            }
                        }
                    }
                    OP_SEND | 5 => {
                        let d = (op - OP_SEND) as usize;
                        if res <= 0 {
                            self.end_dir(slot, d, true);
                        } else {
                            let dir = &mut self.conns[slot].dirs[d];
                            dir.off += res as usize;
                            if dir.off < dir.len {
                                self.send(slot, d);
                            } else {
                                self.recv(slot, d);
                            }
                        }
                    }
                    // A half-close done (or refused: the peer is gone, which the other
                    // direction learns by itself).
                    _ => self.maybe_close(slot),
                }
            }
        }
    }

    fn run(mut self) -> ! {
        self.arm_accept();
        let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(ENTRIES as usize);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => panic!("io_uring_enter: {e}"),
            }
            done.clear();
            done.extend(
                self.ring
                    .completion()
                    .map(|e| (e.user_data(), e.result(), e.flags())),
            );
            for &(user_data, res, flags) in &done {
                self.complete(user_data, res, flags);
            }
        }
    }
}

fn tag(slot: usize, op: u64) -> u64 {
    ((slot as u64) << 8) | op
}

fn close_now(fd: RawFd) {
    // SAFETY: `fd` is an open fd this worker owns and no op uses.
    unsafe { libc::close(fd) };
}

fn shutdown_now(fd: RawFd) {
    // SAFETY: shutdown(2) on an fd this worker owns; it touches no memory.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

fn listener(addr: SocketAddr) -> RawFd {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    // Accepted sockets inherit it, as ringlb's listeners are set up.
    s.set_nodelay(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(4096).unwrap();
    s.into_raw_fd()
}

fn main() {
    let mut workers = 2usize;
    let mut listen: Option<SocketAddr> = None;
    let mut backend: Option<SocketAddr> = None;
    let mut defer = true;
    let mut coop = false;
    let mut shutdown_op = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--workers N")
            }
            "--listen" => listen = args.next().and_then(|v| v.parse().ok()),
            "--backend" => backend = args.next().and_then(|v| v.parse().ok()),
            "--no-defer" => defer = false,
            "--coop" => (defer, coop) = (false, true),
            "--shutdown-op" => shutdown_op = true,
            // `cargo bench` passes --bench.
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    let (Some(listen), Some(backend)) = (listen, backend) else {
        eprintln!(
            "usage: ringloop --workers N --listen ADDR --backend ADDR [--no-defer | --coop] [--shutdown-op]"
        );
        return;
    };
    // All listeners bound before any thread runs, so the port is ready when this prints.
    let fds: Vec<RawFd> = (0..workers).map(|_| listener(listen)).collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = fds
        .into_iter()
        .enumerate()
        .map(|(i, fd)| {
            std::thread::spawn(move || {
                let mut set = nix::sched::CpuSet::new();
                let _ = set.set(i % cpus);
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
                let mut b = IoUring::builder();
                if defer {
                    b.setup_single_issuer().setup_defer_taskrun();
                } else if coop {
                    // What ringlb's tokio-uring ring has (src/worker/mod.rs).
                    b.setup_coop_taskrun();
                }
                let ring = b.setup_cqsize(ENTRIES * 4).build(ENTRIES).unwrap();
                Worker {
                    ring,
                    conns: Vec::new(),
                    free: Vec::new(),
                    listener: fd,
                    backend: Box::new(SockAddr::from(backend)),
                    shutdown_op,
                }
                .run()
            })
        })
        .collect();
    eprintln!("ringloop: {workers} workers on {listen} -> {backend}");
    for t in threads {
        let _ = t.join();
    }
}
