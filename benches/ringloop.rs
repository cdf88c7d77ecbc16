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
//! figures mean nothing.
//!
//! `--pbuf` is the variant a product could ship (the default stays, for A/B in one run):
//!
//! - no buffer per connection: each thread registers a provided buffer ring
//!   (IORING_REGISTER_PBUF_RING) of `--bufs` (256) buffers of `--buf-size` (16 KiB, the size of
//!   ringlb's pooled buffer, which won its bulk runs against 64 KiB);
//! - each direction has one multishot recv (IORING_RECV_MULTISHOT with buffer select) armed
//!   for the connection's life; each completion names a buffer, which is queued on the
//!   direction and sent (short sends resend the rest), in order, one send in flight per
//!   direction, and goes back to the ring when its last byte is sent;
//! - a direction with `--dir-bufs` (16) buffers queued has its recv cancelled (AsyncCancel)
//!   and re-armed when the queue is down to half: without it one connection with a slow reader
//!   would take the whole ring (the kernel keeps receiving while the sends wait);
//! - a recv ended without F_MORE is re-armed; one ended by ENOBUFS (the ring is empty) is
//!   re-armed when buffers come back, one per returned buffer, oldest first;
//! - a timer per connection: a hashed wheel per thread (a link at accept, an unlink at close,
//!   a stored deadline on activity) and one absolute IORING_OP_TIMEOUT for the wheel's next
//!   tick (`--tick-ms`, 100); the deadline is `--connect-timeout-ms` (2,000) while connecting,
//!   then `--idle-timeout-ms` (600,000; 0: no timers at all), ringlb's defaults. A timeout, like
//!   an error, shuts both sockets down, which ends both recvs.
//!
//! It prints its counters (ENOBUFS, pauses, re-arms, timeouts) when stopped by SIGTERM or
//! SIGINT. Run it through `benches/compare.py --ringloop BIN [--ringloop-args=ARGS ...]`
//! (build it with `cargo bench --bench ringloop --no-run`; cargo prints the binary's path), or
//! by hand:
//!
//! ```sh
//! ringloop --workers 2 --listen 127.0.0.1:8000 --backend 127.0.0.1:8080 [--no-defer | --coop] \
//!     [--shutdown-op | --pbuf [--bufs N] [--buf-size BYTES] [--dir-bufs N] [--idle-timeout-ms MS] \
//!     [--connect-timeout-ms MS] [--tick-ms MS] [--oneshot]]
//! ```
//!
//! The unsafe here is the io_uring contract: every fd and buffer an SQE names must stay valid
//! until its completion. Each `unsafe` block says why it holds; the buffers are boxed (so a
//! growing slot table does not move them) and a slot is reused only when no op of it is left.
//! With `--pbuf` a multishot recv counts as one op until its final completion (no F_MORE), so
//! no recv of a closed connection can complete into its slot's next one, and a ring buffer is
//! written by the kernel only between its publication and the completion that names it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

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

/// A connection's two fds, and each direction's source and destination (0 up: client ->
/// server, 1 down).
trait Ends {
    fn client_server(&self) -> (RawFd, RawFd);
    fn src(&self, d: usize) -> RawFd {
        let (client, server) = self.client_server();
        if d == 0 {
            client
        } else {
            server
        }
    }
    fn dst(&self, d: usize) -> RawFd {
        self.src(1 - d)
    }
}

impl Ends for Conn {
    fn client_server(&self) -> (RawFd, RawFd) {
        (self.client, self.server)
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
        // SAFETY: the caller's guarantee, passed on.
        unsafe { push_sqe(&mut self.ring, sqe) };
    }

    fn arm_accept(&mut self) {
        let sqe = accept_sqe(self.listener);
        // SAFETY: the listener is open for the worker's life; the op names no memory.
        unsafe { self.push(sqe) };
    }

    fn new_conn(&mut self, client: RawFd) {
        let Some(server) = backend_socket() else {
            close_now(client);
            return;
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
        let sqe = connect_sqe(server, &self.backend, slot);
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
            turn(&mut self.ring, &mut done);
            for &(user_data, res, flags) in &done {
                self.complete(user_data, res, flags);
            }
        }
    }
}

/// Queues `sqe` on `ring`, submitting what is queued first when the submission queue is full.
///
/// # Safety
/// Every fd and buffer `sqe` names must stay valid until its completion is reaped.
unsafe fn push_sqe(ring: &mut IoUring, sqe: squeue::Entry) {
    loop {
        // SAFETY: the caller guarantees what the SQE names outlives the op.
        if unsafe { ring.submission().push(&sqe) }.is_ok() {
            return;
        }
        ring.submit().expect("io_uring_enter");
    }
}

/// One loop turn: submits what is queued, waits for at least one completion, and collects
/// every completion there is into `done` as (user_data, result, flags).
fn turn(ring: &mut IoUring, done: &mut Vec<(u64, i32, u32)>) {
    match ring.submit_and_wait(1) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => panic!("io_uring_enter: {e}"),
    }
    done.clear();
    done.extend(
        ring.completion()
            .map(|e| (e.user_data(), e.result(), e.flags())),
    );
}

/// The backend connection's socket, with TCP_NODELAY (syscalls, as ringlb).
fn backend_socket() -> Option<RawFd> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP)).ok()?;
    let _ = s.set_nodelay(true);
    Some(s.into_raw_fd())
}

/// The multishot accept: one SQE for every connection the listener will take.
fn accept_sqe(listener: RawFd) -> squeue::Entry {
    opcode::AcceptMulti::new(types::Fd(listener))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(OP_ACCEPT)
}

/// The connect of `slot`'s backend socket to `backend`, which must outlive the op.
fn connect_sqe(server: RawFd, backend: &SockAddr, slot: usize) -> squeue::Entry {
    opcode::Connect::new(types::Fd(server), backend.as_ptr(), backend.len())
        .build()
        .user_data(tag(slot, OP_CONNECT))
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

// ---------------------------------------------------------------- --pbuf: a provided buffer ring

// More ops of the --pbuf worker (same user_data layout). The tick has no slot.
const OP_TICK: u64 = 10;
/// + the direction: the AsyncCancel of that direction's multishot recv.
const OP_CANCEL: u64 = 12;
/// The buffer group id of each thread's ring (one ring per io_uring, so 0 on each).
const BGID: u16 = 0;
const NO_BUF: u16 = u16::MAX;
const NIL: u32 = u32::MAX;
/// Slots of the timer wheel: 1,024 ticks (102 s at the default 100 ms) per turn. A deadline
/// further out (the default idle timeout is 10 minutes) is passed over, at most once per turn.
const WHEEL: usize = 1024;

/// Counted events of every --pbuf thread, printed when ringloop is stopped (SIGTERM/SIGINT).
static ENOBUFS: AtomicU64 = AtomicU64::new(0);
static PAUSES: AtomicU64 = AtomicU64::new(0);
static REARMS: AtomicU64 = AtomicU64::new(0);
static TIMEOUTS: AtomicU64 = AtomicU64::new(0);

/// A thread's provided buffer ring (IORING_REGISTER_PBUF_RING) and the buffers it hands out.
///
/// A buffer is the kernel's from when its entry is published (the ring's tail passes it) until
/// a recv completion names its id; then it is this thread's until `give_back`, which is called
/// only after the last send of its bytes has completed. Between the two, `len`/`next` hold its
/// byte count and its successor in its direction's send queue.
struct Pool {
    /// `entries` ring entries, page-aligned (mmap), never unmapped: the thread never ends.
    ring: *mut types::BufRingEntry,
    /// `entries * size` bytes (mmap), never unmapped.
    bufs: *mut u8,
    size: u32,
    mask: u16,
    /// The tail as this thread has written it; published to the kernel by `publish`.
    tail: u16,
    /// Buffers given back since the last `publish`.
    returned: u32,
    len: Vec<u32>,
    next: Vec<u16>,
}

impl Pool {
    fn new(ring: &IoUring, entries: u16, size: u32) -> Pool {
        assert!(entries.is_power_of_two(), "--bufs must be a power of two");
        let map = |bytes: usize| {
            // SAFETY: an anonymous private mapping; it names no existing memory.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert!(p != libc::MAP_FAILED, "mmap of {bytes} bytes failed");
            p
        };
        let n = entries as usize;
        let mut pool = Pool {
            ring: map(n * std::mem::size_of::<types::BufRingEntry>()).cast(),
            bufs: map(n * size as usize).cast(),
            size,
            mask: entries - 1,
            tail: 0,
            returned: 0,
            len: vec![0; n],
            next: vec![NO_BUF; n],
        };
        // SAFETY: the ring's memory is page-aligned (mmap), `entries` entries long and never
        // unmapped, so it outlives the registration (the io_uring lives as long as the thread).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(pool.ring as u64, entries, BGID, 0)
                .expect("IORING_REGISTER_PBUF_RING (kernel 5.19 or later)")
        };
        for bid in 0..entries {
            pool.give_back(bid);
        }
        pool.publish();
        pool
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < entries (the kernel names only ids this thread published), so the
        // offset is inside the buffers' mapping.
        unsafe { self.bufs.add(bid as usize * self.size as usize) }
    }

    /// Puts buffer `bid` back at the ring's tail (not yet visible to the kernel: `publish`).
    fn give_back(&mut self, bid: u16) {
        self.next[bid as usize] = NO_BUF;
        let i = (self.tail & self.mask) as usize;
        // SAFETY: `i` < entries. The entry at the tail is not the kernel's: it consumes only
        // entries between its head and the published tail, and at most `entries` buffers are
        // published and not yet consumed, because only buffers it handed out come back.
        let e = unsafe { &mut *self.ring.add(i) };
        e.set_addr(self.buf(bid) as u64);
        e.set_len(self.size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.returned += 1;
    }

    /// Makes every buffer given back visible to the kernel (one release store per loop turn).
    fn publish(&mut self) {
        // SAFETY: the ring's base is valid and its first entry initialised (`new` publishes
        // every buffer before the first use); the tail field is a u16 the kernel reads with
        // acquire semantics, so an atomic store through it is the documented protocol.
        let tail = unsafe { &*types::BufRingEntry::tail(self.ring).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

#[derive(Default)]
struct PDir {
    /// The send queue: buffer ids linked through `Pool::next`, oldest first.
    head: u16,
    last: u16,
    queued: u16,
    /// Bytes of the head buffer already sent.
    off: u32,
    /// A send of the head buffer is in flight.
    sending: bool,
    /// The multishot recv is armed (its final completion, without F_MORE, not yet seen).
    armed: bool,
    /// Nothing more will be received: EOF, an error, or the connection failed.
    eof: bool,
    /// The recv was cancelled (or ended) with `cap` buffers queued; re-armed when half drained.
    paused: bool,
    /// The recv ended with ENOBUFS; re-armed when buffers come back to the ring.
    starved: bool,
    /// This direction's end has been acted on (half-close of its destination).
    ended: bool,
}

impl PDir {
    fn reset() -> PDir {
        PDir {
            head: NO_BUF,
            last: NO_BUF,
            ..PDir::default()
        }
    }
    fn done(&self) -> bool {
        self.eof && !self.armed && !self.sending && self.queued == 0
    }
}

struct PConn {
    client: RawFd,
    server: RawFd,
    /// Ops in flight (a multishot recv counts once, until its final completion): the slot is
    /// reused only at zero, so no late completion can name a new connection.
    inflight: u32,
    failed: bool,
    dirs: [PDir; 2],
    /// The tick at which the connection times out: connect timeout, then idle timeout,
    /// moved on by every recv and send (a store; the wheel notices it when the slot comes up,
    /// so a store may only move it later: the switch to the idle timeout relinks).
    deadline: u32,
    /// Where it is linked in the wheel (NIL: not linked), and its neighbours there.
    wslot: u32,
    wprev: u32,
    wnext: u32,
}

impl Ends for PConn {
    fn client_server(&self) -> (RawFd, RawFd) {
        (self.client, self.server)
    }
}

/// The timer: a hashed wheel per thread, one IORING_OP_TIMEOUT (absolute, CLOCK_MONOTONIC)
/// armed for its next tick. A connection costs a link at accept and an unlink at close, and
/// activity only stores a new deadline; no syscall or SQE per connection.
struct Wheel {
    /// 0: no timers (`--idle-timeout-ms 0`).
    tick_ns: u64,
    idle: u32,
    connect: u32,
    /// Ticks since `start`; advanced by the tick op's completions.
    now: u32,
    start: Duration,
    heads: Vec<u32>,
    /// The next tick's absolute time; the kernel reads it when the SQE is submitted.
    ts: Box<types::Timespec>,
}

struct PWorker {
    ring: IoUring,
    pool: Pool,
    conns: Vec<PConn>,
    free: Vec<usize>,
    listener: RawFd,
    backend: Box<SockAddr>,
    /// Buffers a direction may hold before its recv is paused.
    cap: u16,
    /// `--oneshot` (see [`PbufOpts`]).
    oneshot: bool,
    /// Directions waiting for buffers (ENOBUFS), oldest first.
    starved: VecDeque<(usize, usize)>,
    wheel: Wheel,
}

impl PWorker {
    /// # Safety
    /// Every fd and buffer `sqe` names must stay valid until its completion is reaped.
    unsafe fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { push_sqe(&mut self.ring, sqe) };
    }

    fn arm_accept(&mut self) {
        let sqe = accept_sqe(self.listener);
        // SAFETY: the listener is open for the worker's life; the op names no memory.
        unsafe { self.push(sqe) };
    }

    fn arm_tick(&mut self) {
        let at = self.wheel.start
            + Duration::from_nanos(self.wheel.tick_ns * (u64::from(self.wheel.now) + 1));
        *self.wheel.ts = at.into();
        let sqe = opcode::Timeout::new(&*self.wheel.ts)
            .flags(types::TimeoutFlags::ABS)
            .build()
            .user_data(OP_TICK);
        // SAFETY: the timespec is boxed in the worker and rewritten only here, when the
        // previous tick has completed; the kernel copies it when the SQE is submitted
        // (io_timeout_prep), which is before this is called again.
        unsafe { self.push(sqe) };
    }

    fn new_conn(&mut self, client: RawFd) {
        let Some(server) = backend_socket() else {
            close_now(client);
            return;
        };
        let fresh = PConn {
            client,
            server,
            inflight: 1,
            failed: false,
            dirs: [PDir::reset(), PDir::reset()],
            deadline: self.wheel.now.wrapping_add(self.wheel.connect),
            wslot: NIL,
            wprev: NIL,
            wnext: NIL,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.conns[i] = fresh;
                i
            }
            None => {
                self.conns.push(fresh);
                self.conns.len() - 1
            }
        };
        self.link(slot);
        let sqe = connect_sqe(server, &self.backend, slot);
        // SAFETY: `server` stays open until this slot's close, which waits for every op of
        // the slot; the address is the worker's `backend`, boxed and never freed before it.
        unsafe { self.push(sqe) };
    }

    fn arm_recv(&mut self, slot: usize, d: usize) {
        let c = &mut self.conns[slot];
        c.inflight += 1;
        c.dirs[d].armed = true;
        let sqe = if self.oneshot {
            // IORING_RECVSEND_POLL_FIRST in ioprio; each completion then comes without F_MORE,
            // which `on_recv` answers with a new arm, as for a multishot the kernel ended.
            opcode::Recv::new(types::Fd(c.src(d)), std::ptr::null_mut(), 0)
                .buf_group(BGID)
                .ioprio(1)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        } else {
            opcode::RecvMulti::new(types::Fd(c.src(d)), BGID).build()
        }
        .user_data(tag(slot, OP_RECV + d as u64));
        // SAFETY: the op names no memory of ours but the ring's buffers (valid for the
        // thread's life); the fd stays open until the slot's close, which waits for the
        // recv's final completion (`inflight`).
        unsafe { self.push(sqe) };
    }

    fn send_head(&mut self, slot: usize, d: usize) {
        let c = &mut self.conns[slot];
        c.inflight += 1;
        let fd = c.dst(d);
        let dir = &mut c.dirs[d];
        dir.sending = true;
        let bid = dir.head;
        // SAFETY: off < len[bid] <= size, so the pointer stays inside buffer `bid`.
        let at = unsafe { self.pool.buf(bid).add(dir.off as usize) };
        let sqe = opcode::Send::new(types::Fd(fd), at, self.pool.len[bid as usize] - dir.off)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(tag(slot, OP_SEND + d as u64));
        // SAFETY: buffer `bid` is this thread's (a recv completion named it) and is given back
        // to the ring only after this send completes; the fd outlives the op as in `arm_recv`.
        unsafe { self.push(sqe) };
    }

    fn bump(&mut self, slot: usize) {
        self.conns[slot].deadline = self.wheel.now.wrapping_add(self.wheel.idle);
    }

    fn on_recv(&mut self, slot: usize, d: usize, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let c = &mut self.conns[slot];
        if !more {
            c.inflight -= 1;
            c.dirs[d].armed = false;
        }
        if res > 0 {
            let Some(bid) = bid else {
                panic!("multishot recv completion without a buffer");
            };
            if c.failed {
                self.pool.give_back(bid);
                if !more {
                    c.dirs[d].eof = true;
                }
            } else {
                self.pool.len[bid as usize] = res as u32;
                let dir = &mut c.dirs[d];
                if dir.last == NO_BUF {
                    dir.head = bid;
                } else {
                    self.pool.next[dir.last as usize] = bid;
                }
                dir.last = bid;
                dir.queued += 1;
                let (sending, full) = (dir.sending, dir.queued >= self.cap);
                if full && !dir.paused {
                    dir.paused = true;
                    PAUSES.fetch_add(1, Ordering::Relaxed);
                    if more {
                        c.inflight += 1;
                        let sqe = opcode::AsyncCancel::new(tag(slot, OP_RECV + d as u64))
                            .build()
                            .user_data(tag(slot, OP_CANCEL + d as u64));
                        // SAFETY: the op names no memory or fd; the user_data it targets is
                        // unique (one recv per direction and slot, and a slot is reused only
                        // when all its ops are done).
                        unsafe { self.push(sqe) };
                    }
                }
                if !sending {
                    self.send_head(slot, d);
                }
                if self.wheel.tick_ns > 0 {
                    self.bump(slot);
                }
                if !more && !self.conns[slot].dirs[d].paused {
                    // The kernel ended the multishot after data (it may, e.g. on CQ overflow).
                    REARMS.fetch_add(1, Ordering::Relaxed);
                    self.arm_recv(slot, d);
                }
            }
        } else {
            if let Some(bid) = bid {
                self.pool.give_back(bid);
            }
            let dir = &mut c.dirs[d];
            match -res {
                0 => dir.eof = true,
                libc::ENOBUFS => {
                    ENOBUFS.fetch_add(1, Ordering::Relaxed);
                    if c.failed {
                        dir.eof = true;
                    } else if dir.paused {
                        // Its queue may be drained already: then no send will resume it.
                        self.maybe_resume(slot, d);
                    } else {
                        dir.starved = true;
                        self.starved.push_back((slot, d));
                    }
                }
                libc::ECANCELED if dir.paused => self.maybe_resume(slot, d),
                _ => {
                    dir.eof = true;
                    self.fail(slot);
                }
            }
        }
        self.check(slot);
    }

    fn on_send(&mut self, slot: usize, d: usize, res: i32) {
        let c = &mut self.conns[slot];
        c.inflight -= 1;
        c.dirs[d].sending = false;
        if res <= 0 && !c.failed {
            self.fail(slot);
        }
        let c = &mut self.conns[slot];
        let dir = &mut c.dirs[d];
        if c.failed {
            self.drop_queue(slot, d);
        } else {
            dir.off += res as u32;
            let bid = dir.head;
            if dir.off < self.pool.len[bid as usize] {
                // A short send: the rest of the same buffer first.
                self.send_head(slot, d);
            } else {
                dir.head = self.pool.next[bid as usize];
                if dir.head == NO_BUF {
                    dir.last = NO_BUF;
                }
                dir.queued -= 1;
                dir.off = 0;
                self.pool.give_back(bid);
                if self.conns[slot].dirs[d].head != NO_BUF {
                    self.send_head(slot, d);
                }
                if self.wheel.tick_ns > 0 {
                    self.bump(slot);
                }
                self.maybe_resume(slot, d);
            }
        }
        self.check(slot);
    }

    /// Re-arms a paused direction once its recv is done and its queue is down to half the cap.
    fn maybe_resume(&mut self, slot: usize, d: usize) {
        let c = &mut self.conns[slot];
        let dir = &mut c.dirs[d];
        if dir.paused && !dir.armed && !dir.eof && !c.failed && dir.queued <= self.cap / 2 {
            dir.paused = false;
            self.arm_recv(slot, d);
        }
    }

    /// Gives back every buffer queued on a direction of a failed connection (none is in a send).
    fn drop_queue(&mut self, slot: usize, d: usize) {
        let dir = &mut self.conns[slot].dirs[d];
        while dir.head != NO_BUF {
            let bid = dir.head;
            dir.head = self.pool.next[bid as usize];
            self.pool.give_back(bid);
        }
        dir.last = NO_BUF;
        dir.queued = 0;
        dir.off = 0;
    }

    /// An error or a timeout: shut both sockets down, which ends both recvs (res 0), and drop
    /// what is queued once no send uses it.
    fn fail(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.failed {
            return;
        }
        c.failed = true;
        shutdown_now(c.client);
        shutdown_now(c.server);
        for d in 0..2 {
            let dir = &mut self.conns[slot].dirs[d];
            if !dir.armed {
                // Paused, starved or not yet armed: no recv will end it.
                dir.eof = true;
            }
            dir.paused = false;
            dir.starved = false;
            dir.ended = true;
            if !dir.sending {
                self.drop_queue(slot, d);
            }
        }
    }

    /// Half-closes after a direction is done, closes both fds when both are and no op is left.
    fn check(&mut self, slot: usize) {
        for d in 0..2 {
            let c = &mut self.conns[slot];
            if !c.dirs[d].ended && c.dirs[d].done() {
                c.dirs[d].ended = true;
                if !c.dirs[1 - d].done() {
                    // SAFETY: shutdown(2) on an fd of this slot, open until the slot's close.
                    unsafe { libc::shutdown(c.dst(d), libc::SHUT_WR) };
                }
            }
        }
        let c = &self.conns[slot];
        if c.inflight > 0 || !c.dirs[0].done() || !c.dirs[1].done() {
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
        self.unlink(slot);
        self.conns[slot].client = -1;
        self.conns[slot].server = -1;
        self.free.push(slot);
    }

    fn link(&mut self, slot: usize) {
        if self.wheel.tick_ns == 0 {
            return;
        }
        let w = self.conns[slot].deadline as usize % WHEEL;
        let head = self.wheel.heads[w];
        if head != NIL {
            self.conns[head as usize].wprev = slot as u32;
        }
        let c = &mut self.conns[slot];
        (c.wslot, c.wprev, c.wnext) = (w as u32, NIL, head);
        self.wheel.heads[w] = slot as u32;
    }

    fn unlink(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.wslot == NIL {
            return;
        }
        let (w, prev, next) = (c.wslot as usize, c.wprev, c.wnext);
        c.wslot = NIL;
        if prev == NIL {
            self.wheel.heads[w] = next;
        } else {
            self.conns[prev as usize].wnext = next;
        }
        if next != NIL {
            self.conns[next as usize].wprev = prev;
        }
    }

    /// One tick: expires what is due in this tick's slot, moves what was bumped meanwhile.
    fn on_tick(&mut self) {
        self.wheel.now = self.wheel.now.wrapping_add(1);
        let now = self.wheel.now;
        let w = now as usize % WHEEL;
        let mut i = self.wheel.heads[w];
        while i != NIL {
            let slot = i as usize;
            i = self.conns[slot].wnext;
            let deadline = self.conns[slot].deadline;
            if deadline.wrapping_sub(now) as i32 <= 0 {
                self.unlink(slot);
                TIMEOUTS.fetch_add(1, Ordering::Relaxed);
                self.fail(slot);
                self.check(slot);
            } else if deadline as usize % WHEEL != w {
                self.unlink(slot);
                self.link(slot);
            }
        }
        self.arm_tick();
    }

    /// Re-arms directions that ran out of buffers, one per buffer given back this turn.
    fn feed_starved(&mut self) {
        let mut n = self.pool.returned;
        while n > 0 {
            let Some((slot, d)) = self.starved.pop_front() else {
                break;
            };
            let c = &mut self.conns[slot];
            // A stale entry (its connection failed and the slot may be another's) has the
            // flag cleared: `fail` and the slot's reset clear it.
            if c.dirs[d].starved {
                c.dirs[d].starved = false;
                self.arm_recv(slot, d);
                n -= 1;
            }
        }
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
            OP_TICK => self.on_tick(),
            OP_CONNECT => {
                let c = &mut self.conns[slot];
                c.inflight -= 1;
                if res < 0 || c.failed {
                    self.fail(slot);
                    self.check(slot);
                } else {
                    // The idle deadline may be earlier than the connect deadline: relink
                    // (bumps may only move a deadline later, the wheel finds those lazily).
                    self.unlink(slot);
                    self.bump(slot);
                    self.link(slot);
                    self.arm_recv(slot, 0);
                    self.arm_recv(slot, 1);
                }
            }
            OP_RECV | 3 => self.on_recv(slot, (op - OP_RECV) as usize, res, flags),
            OP_SEND | 5 => self.on_send(slot, (op - OP_SEND) as usize, res),
            // An AsyncCancel done: the recv's own final completion says how it ended.
            _ => {
                self.conns[slot].inflight -= 1;
                self.check(slot);
            }
        }
    }

    fn run(mut self) -> ! {
        self.arm_accept();
        if self.wheel.tick_ns > 0 {
            self.arm_tick();
        }
        let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(ENTRIES as usize);
        loop {
            turn(&mut self.ring, &mut done);
            for &(user_data, res, flags) in &done {
                self.complete(user_data, res, flags);
            }
            if self.pool.returned > 0 {
                self.pool.publish();
                self.feed_starved();
                self.pool.returned = 0;
            }
        }
    }
}

/// `--pbuf` and its knobs.
#[derive(Clone, Copy)]
struct PbufOpts {
    bufs: u16,
    buf_size: u32,
    dir_bufs: u16,
    idle_ms: u64,
    connect_ms: u64,
    tick_ms: u64,
    /// `--oneshot`: a one-shot recv per read (with buffer select and IORING_RECVSEND_POLL_FIRST,
    /// as ringlb's), armed again after each completion, instead of one multishot recv per
    /// direction: the A/B of the multishot alone.
    oneshot: bool,
}

fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

const USAGE: &str =
    "usage: ringloop --workers N --listen ADDR --backend ADDR [--no-defer | --coop] \
[--shutdown-op] [--pbuf [--bufs N] [--buf-size BYTES] [--dir-bufs N] [--idle-timeout-ms MS] \
[--connect-timeout-ms MS] [--tick-ms MS] [--oneshot]]";

fn main() {
    let mut workers = 2usize;
    let mut listen: Option<SocketAddr> = None;
    let mut backend: Option<SocketAddr> = None;
    let mut defer = true;
    let mut coop = false;
    let mut shutdown_op = false;
    let mut pbuf: Option<PbufOpts> = None;
    let mut o = PbufOpts {
        bufs: 256,
        buf_size: BUF as u32,
        dir_bufs: 16,
        // ringlb's defaults (idle_timeout 10m, connect_timeout 2s), as compare.py configures
        // every balancer.
        idle_ms: 600_000,
        connect_ms: 2_000,
        tick_ms: 100,
        oneshot: false,
    };
    let mut args = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(args: &mut impl Iterator<Item = String>, flag: &str) -> T {
        args.next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} takes a number\n{USAGE}"))
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "--workers" => workers = num(&mut args, &a),
            "--listen" => listen = args.next().and_then(|v| v.parse().ok()),
            "--backend" => backend = args.next().and_then(|v| v.parse().ok()),
            "--no-defer" => defer = false,
            "--coop" => (defer, coop) = (false, true),
            "--shutdown-op" => shutdown_op = true,
            "--pbuf" => pbuf = Some(o),
            "--bufs" => o.bufs = num(&mut args, &a),
            "--buf-size" => o.buf_size = num(&mut args, &a),
            "--dir-bufs" => o.dir_bufs = num(&mut args, &a),
            "--idle-timeout-ms" => o.idle_ms = num(&mut args, &a),
            "--connect-timeout-ms" => o.connect_ms = num(&mut args, &a),
            "--tick-ms" => o.tick_ms = num(&mut args, &a),
            "--oneshot" => o.oneshot = true,
            // `cargo bench` passes --bench.
            "--bench" => {}
            other => panic!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    // The knobs may come before or after --pbuf.
    let pbuf = pbuf.map(|_| o);
    let (Some(listen), Some(backend)) = (listen, backend) else {
        eprintln!("{USAGE}");
        return;
    };
    if let Some(o) = pbuf {
        assert!(o.dir_bufs >= 2, "--dir-bufs must be at least 2");
        assert!(o.tick_ms > 0, "--tick-ms must be above 0");
        assert!(!shutdown_op, "--shutdown-op is not implemented with --pbuf");
    }
    // SIGINT and SIGTERM are taken by this thread (sigwait below), so it can print the
    // counters; the workers inherit the mask.
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGINT);
    stop.add(nix::sys::signal::Signal::SIGTERM);
    stop.thread_block().unwrap();
    // All listeners bound before any thread runs, so the port is ready when this prints.
    let fds: Vec<RawFd> = (0..workers).map(|_| listener(listen)).collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (i, fd) in fds.into_iter().enumerate() {
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
            let backend = Box::new(SockAddr::from(backend));
            let Some(o) = pbuf else {
                Worker {
                    ring,
                    conns: Vec::new(),
                    free: Vec::new(),
                    listener: fd,
                    backend,
                    shutdown_op,
                }
                .run()
            };
            let ticks = |ms: u64| ms.div_ceil(o.tick_ms).min(u64::from(u32::MAX / 2)) as u32;
            PWorker {
                pool: Pool::new(&ring, o.bufs, o.buf_size),
                ring,
                conns: Vec::new(),
                free: Vec::new(),
                listener: fd,
                backend,
                cap: o.dir_bufs,
                oneshot: o.oneshot,
                starved: VecDeque::new(),
                wheel: Wheel {
                    tick_ns: if o.idle_ms == 0 {
                        0
                    } else {
                        o.tick_ms * 1_000_000
                    },
                    idle: ticks(o.idle_ms),
                    connect: ticks(o.connect_ms),
                    now: 0,
                    start: monotonic_now(),
                    heads: vec![NIL; WHEEL],
                    ts: Box::new(types::Timespec::new()),
                },
            }
            .run()
        });
    }
    match pbuf {
        None => eprintln!("ringloop: {workers} workers on {listen} -> {backend}"),
        Some(o) => eprintln!(
            "ringloop: {workers} workers on {listen} -> {backend}, --pbuf: {} buffers of {} bytes \
             per thread, {} per direction, idle timeout {} ms, connect timeout {} ms, tick {} ms",
            o.bufs, o.buf_size, o.dir_bufs, o.idle_ms, o.connect_ms, o.tick_ms
        ),
    }
    let sig = stop.wait().unwrap();
    if pbuf.is_some() {
        // compare.py adds this line to its notes.
        eprintln!(
            "ringloop: stopped by {sig:?}; enobufs {} pauses {} rearms {} timeouts {}",
            ENOBUFS.load(Ordering::Relaxed),
            PAUSES.load(Ordering::Relaxed),
            REARMS.load(Ordering::Relaxed),
            TIMEOUTS.load(Ordering::Relaxed)
        );
    }
    std::process::exit(0);
}
