//! Per-worker pools of relay buffers and splice pipes, lent only while bytes are in flight.
//!
//! A connection takes a buffer (or a pipe) once its socket is readable, moves what is there to
//! the other side and gives it back; an idle connection holds neither. Because the relay reads
//! with plain non-blocking syscalls (not io_uring reads), the kernel writes into a buffer only
//! during the `recv` call itself: a buffer back in the pool can never be written to by a
//! completion that arrives later.
//!
//! Each worker thread has its own pools (no locks); the counts in [`PoolStats`] are written
//! only by that worker and read by the metrics exporter.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::sys;

/// Size of one relay buffer. 16 KiB (nginx's default proxy buffer) measured as fast as 64 KiB
/// for bulk and steadier, at less CPU per GB: the copy in and out stays in the L1 cache.
/// Small reads use the same buffer, but only for one recv + send, so its size costs nothing
/// while idle.
pub const BUF_SIZE: usize = 16 * 1024;
/// Bytes moved per splice, and the capacity each pooled pipe asks for (F_SETPIPE_SZ): 1 MiB,
/// the most fs.pipe-max-size lets an unprivileged process ask by default. Against the default
/// 64 KiB pipe, one stream through splice-auto measured 17.8 against 14.3-14.8 Gbit/s at 0.16
/// against 0.24-0.36 CPU s per GB with 256 KiB; 1 MiB against 256 KiB, two runs with the
/// columns swapped: 0.25-0.26 against 0.38-0.50 CPU s per GB with one stream, 0.17-0.25 against
/// 0.24-0.25 with four (see docs/performance.md). The pages are the kernel's and are used only
/// while bytes sit in the pipe. An unprivileged user's pipes share fs.pipe-user-pages-soft
/// (64 MiB by default); where the kernel refuses the size, the pipe keeps its 64 KiB and
/// splices move at most that.
pub const PIPE_CHUNK: usize = 1024 * 1024;
/// Free buffers a worker keeps for the next reads; more are freed on return.
const FREE_BUFFERS_MAX: usize = 16;
/// Free pipes a worker keeps; more are closed on return.
const FREE_PIPES_MAX: usize = 16;
/// Default pipes a worker may lend at once (each is two fds and up to 1 MiB of kernel
/// memory); past it splice falls back to copy.
pub const PIPES_IN_USE_MAX: usize = 64;

/// What one worker's pools hold and lend, for /metrics and the fd tests.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub buffers_in_use: AtomicUsize,
    pub buffers_free: AtomicUsize,
    pub pipes_in_use: AtomicUsize,
    pub pipes_free: AtomicUsize,
    /// Small copies: the unsent tail of a blocked send, or a client's first bytes on their way
    /// out in a send op (see [`Tail`]).
    pub tails_in_use: AtomicUsize,
    /// A direction wanted a pipe and copied instead (pipe limit reached, or out of fds).
    pub pipe_unavailable_total: AtomicU64,
    /// Buffers of the worker's io_uring buffer ring taken by a read and not yet given back.
    pub ring_buffers_in_use: AtomicUsize,
    /// A read found the worker's io_uring buffer ring empty and used a pooled buffer instead.
    pub ring_empty_total: AtomicU64,
}

struct Pools {
    buffers: Vec<Box<[u8]>>,
    pipes: Vec<(OwnedFd, OwnedFd)>,
    buffers_in_use: usize,
    pipes_in_use: usize,
    tails_in_use: usize,
    pipe_limit: usize,
    stats: Arc<PoolStats>,
}

impl Pools {
    /// Copies the counts into the stats the exporter reads. Only this thread writes them, so
    /// plain stores do (no locked read-modify-write per chunk).
    fn publish(&self) {
        let st = &self.stats;
        st.buffers_in_use
            .store(self.buffers_in_use, Ordering::Relaxed);
        st.buffers_free.store(self.buffers.len(), Ordering::Relaxed);
        st.pipes_in_use.store(self.pipes_in_use, Ordering::Relaxed);
        st.pipes_free.store(self.pipes.len(), Ordering::Relaxed);
        st.tails_in_use.store(self.tails_in_use, Ordering::Relaxed);
    }
}

thread_local! {
    static POOLS: RefCell<Pools> = RefCell::new(Pools {
        buffers: Vec::new(),
        pipes: Vec::new(),
        buffers_in_use: 0,
        pipes_in_use: 0,
        tails_in_use: 0,
        pipe_limit: PIPES_IN_USE_MAX,
        stats: Arc::default(),
    });
}

/// Binds this thread's pools to the worker's stats and fd budget; called once at worker start.
pub fn init(stats: Arc<PoolStats>, pipe_limit: usize) {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        p.stats = stats;
        p.pipe_limit = pipe_limit;
    });
}

/// Publishes how many buffers of the worker's io_uring buffer ring are taken (only the
/// worker writes it: a plain store).
pub fn note_ring_in_use(n: usize) {
    let _ = POOLS.try_with(|p| {
        p.borrow()
            .stats
            .ring_buffers_in_use
            .store(n, Ordering::Relaxed)
    });
}

/// Counts a read that found the io_uring buffer ring empty (see `relay::RingRead`).
pub fn note_ring_empty() {
    let _ = POOLS.try_with(|p| {
        p.borrow()
            .stats
            .ring_empty_total
            .fetch_add(1, Ordering::Relaxed)
    });
}

/// A relay buffer on loan; goes back to the pool when dropped.
pub struct Buf(Option<Box<[u8]>>);

impl Buf {
    pub fn take() -> Buf {
        POOLS.with(|p| {
            let mut p = p.borrow_mut();
            let b = p
                .buffers
                .pop()
                .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
            p.buffers_in_use += 1;
            p.publish();
            Buf(Some(b))
        })
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let Some(b) = self.0.take() else { return };
        // `try_with`: a connection dropped while the thread exits finds no pool; the buffer
        // is simply freed.
        let _ = POOLS.try_with(|p| {
            let mut p = p.borrow_mut();
            p.buffers_in_use = p.buffers_in_use.saturating_sub(1);
            if p.buffers.len() < FREE_BUFFERS_MAX {
                p.buffers.push(b);
            }
            p.publish();
        });
    }
}

/// The few unsent bytes of a send that would block, copied out of the pooled buffer so the
/// buffer can go back while a slow reader catches up; or a small first read from a client,
/// held by its send op for a loop turn (`relay::send_head`). Counted while alive, like a
/// buffer.
pub struct Tail(Vec<u8>);

impl Tail {
    pub fn new(bytes: &[u8]) -> Tail {
        let _ = POOLS.try_with(|p| {
            let mut p = p.borrow_mut();
            p.tails_in_use += 1;
            p.publish();
        });
        Tail(bytes.to_vec())
    }
}

impl Tail {
    /// Appends `bytes` (what a cancelled read op had read behind the unsent rest).
    pub fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

impl std::ops::Deref for Tail {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = POOLS.try_with(|p| {
            let mut p = p.borrow_mut();
            p.tails_in_use = p.tails_in_use.saturating_sub(1);
            p.publish();
        });
    }
}

/// A pipe on loan. `in_pipe` counts bytes spliced in and not yet out: a pipe goes back to the
/// pool only empty; one dropped with bytes in it (the connection failed mid-transfer) is closed.
pub struct Pipe {
    ends: Option<(OwnedFd, OwnedFd)>,
    pub in_pipe: usize,
}

impl Pipe {
    /// Lends a pipe, or `None` when this worker has lent its limit or cannot make one (out of
    /// fds): the caller copies instead, and that is counted.
    pub fn take() -> Option<Pipe> {
        POOLS.with(|p| {
            let mut p = p.borrow_mut();
            let ends = if p.pipes_in_use >= p.pipe_limit {
                None
            } else if let Some(ends) = p.pipes.pop() {
                Some(ends)
            } else {
                sys::pipe(PIPE_CHUNK).ok()
            };
            let Some(ends) = ends else {
                p.stats
                    .pipe_unavailable_total
                    .fetch_add(1, Ordering::Relaxed);
                return None;
            };
            p.pipes_in_use += 1;
            p.publish();
            Some(Pipe {
                ends: Some(ends),
                in_pipe: 0,
            })
        })
    }

    /// Splices what `from` holds into the pipe (at most one pipe's worth); `Ok(0)` is EOF.
    pub fn fill(&mut self, from: impl AsFd) -> io::Result<usize> {
        let Some((_, write)) = &self.ends else {
            return Ok(0);
        };
        let n = sys::splice(from, write, PIPE_CHUNK)?;
        self.in_pipe += n;
        Ok(n)
    }

    /// Splices what the pipe holds out to `to`; returns the bytes moved.
    pub fn drain(&mut self, to: impl AsFd) -> io::Result<usize> {
        let Some((read, _)) = &self.ends else {
            return Ok(0);
        };
        let n = sys::splice(read, to, self.in_pipe)?;
        self.in_pipe -= n;
        Ok(n)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let Some(ends) = self.ends.take() else { return };
        let empty = self.in_pipe == 0;
        let _ = POOLS.try_with(|p| {
            let mut p = p.borrow_mut();
            p.pipes_in_use = p.pipes_in_use.saturating_sub(1);
            if empty && p.pipes.len() < FREE_PIPES_MAX {
                p.pipes.push(ends);
            }
            p.publish();
        });
    }
}
