//! The relay: bytes both ways between a client and its backend until both directions end.
//!
//! One orchestration for every runtime and every mode. Each direction waits for bytes on its
//! source socket, moves what is there, and goes back to waiting when a short read says the
//! socket ran dry. Only the wait differs between runtimes: that is the [`Conn`] trait. On
//! io_uring the wait of a copying direction is a read op whose buffers the kernel takes from
//! the worker's provided buffer ring when bytes arrive ([`Conn::read_op`]). The op is
//! multishot: it stays armed from one message to the next, one completion per read, until it
//! has read 16 KiB (then a burst goes on by syscall, and a stream of messages re-arms it).
//! While it is armed every read of the direction comes from it, so no syscall read can
//! overtake bytes it took. A read's bytes (with the reads queued behind it, gathered into one
//! pooled buffer) go out as a send op ([`Conn::send_op`], as does the client's first read)
//! and the buffer goes back when that op's completion is reaped, the next loop turn. If the
//! socket was full, the rest is copied aside, the read op is cancelled (a slow reader stops
//! the reading, as it would by syscall) and what it had read joins the copy, so a slow reader
//! holds no ring buffer (but for reads that beat the cancel, at most the op's 16 KiB). Sends as ops go out together in the loop turn's one `io_uring_enter`, so
//! the readers they wake preempt the worker once per batch instead of at the end of each
//! send(2). Elsewhere (a splicing direction, the epoll runtime) the wait is a readiness wait
//! (an io_uring POLL_ADD, or tokio's epoll). After a read that filled its buffer,
//! a direction reads on with plain non-blocking syscalls without waiting. How a chunk moves is
//! the mode:
//!
//! - `copy`: recv into a buffer lent by the worker's pool, send it all, give the buffer back.
//! - `splice`: splice the socket into a pooled pipe and the pipe into the other socket; the
//!   pipe goes back to the pool once empty. The bytes never enter user space.
//! - `splice-auto`: copy, and switch a direction to splice while it carries bulk (a read
//!   filled the whole buffer); back to copy when chunks get small again.
//!
//! So an idle connection holds no buffer and no pipe, only its two sockets and two pending
//! waits. Splices are plain syscalls on the worker thread (never IORING_OP_SPLICE,
//! which parks an io-wq kernel thread per waiting splice).
//!
//! At EOF a direction shuts the other side's write half, so a half-close travels end to end.
//! A direction that fails shuts both sockets down, which ends the other direction too. The
//! worker's connection table ends a connection early (idle timeout, kill switch) the same way:
//! `shutdown(Both)` completes every pending wait and read op (an op whose future is dropped
//! anyway is cancelled by `worker::ring`).

pub mod ops;
pub mod pool;
pub mod proxy;
pub mod proxy_in;
pub mod sni;
pub mod sys;

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::sys::socket::Shutdown;
use tokio::io::Interest;

use crate::config::RelayMode;
use crate::worker::ring::{Lent, Reads, SendOp, RING_BUF_SIZE};
use pool::{Buf, Pipe};

/// A connected, non-blocking socket as the relay sees it: plain syscalls on its fd, and a way
/// to wait for readiness on the worker's runtime.
pub trait Conn: AsRawFd + AsFd + 'static {
    /// Resolves when the socket is ready for `interest`, or has an error or hang-up to report.
    fn wait(&self, interest: Interest) -> impl Future<Output = io::Result<()>>;
    /// Runs one non-blocking syscall on the socket. A runtime that tracks readiness itself
    /// (epoll) learns from a `WouldBlock` here that the socket is no longer ready.
    fn attempt<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Whether the runtime has a read that waits and reads in one op, into a buffer the
    /// kernel picks when the bytes arrive (io_uring's provided buffer ring): not on the epoll
    /// runtime, nor on a kernel without buffer rings.
    fn reads_by_op(&self) -> bool {
        false
    }
    /// Starts that read ([`Conn::reads_by_op`]): one op for the direction's reads from here
    /// on, until its last completion. An error where there is none.
    fn read_op(&self) -> io::Result<Reads> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether the runtime has send ops ([`Conn::send_op`]).
    fn sends_by_op(&self) -> bool {
        false
    }
    /// Starts a send of `bytes` as an op of the runtime, corked (MSG_MORE) if `corked`; the
    /// bytes back where the runtime has no such op or it could not start (`None`: lost, which
    /// the runtime never does).
    fn send_op(&self, bytes: Lent, corked: bool) -> Result<SendOp, Option<Lent>> {
        let _ = corked;
        Err(Some(bytes))
    }
}

/// Per-connection activity, read by the worker's connection table (idle timeout, byte counts).
#[derive(Debug)]
pub struct Meter {
    /// When the client last sent bytes (the start, before it has).
    pub last_up: Cell<Instant>,
    /// When the backend last sent bytes.
    pub last_down: Cell<Instant>,
    /// Client to backend.
    pub bytes_up: Cell<u64>,
    /// Backend to client.
    pub bytes_down: Cell<u64>,
}

impl Meter {
    pub fn new() -> Meter {
        let now = Instant::now();
        Meter {
            last_up: Cell::new(now),
            last_down: Cell::new(now),
            bytes_up: Cell::new(0),
            bytes_down: Cell::new(0),
        }
    }
}

impl Meter {
    /// When anything last moved, either way.
    pub fn last_activity(&self) -> Instant {
        self.last_up.get().max(self.last_down.get())
    }
}

impl Default for Meter {
    fn default() -> Self {
        Meter::new()
    }
}

/// A blocked send with at most this many bytes left copies them aside and returns the big
/// buffer, so a slow reader holds a small allocation rather than a whole pooled buffer (a
/// ring read's rest is copied whatever its size, with what its op had read ahead). A
/// client's first read of at most this much goes to its send op as such a copy too
/// ([`send_head`]).
const SMALL_TAIL: usize = 4096;
// A ring buffer's unsent rest always fits a tail (`send_or_copy`).
const _: () = assert!(RING_BUF_SIZE <= SMALL_TAIL);
/// A splice that moved at least this much suggests more is waiting; in splice-auto a
/// direction keeps splicing while its chunks are this large.
const SPLICE_BULK: usize = 16 * 1024;

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// What one step of a direction did.
#[derive(Clone, Copy)]
enum Step {
    /// Moved `n` bytes; `more` when the read filled its buffer (more is likely waiting).
    Moved { n: usize, more: bool },
    /// Nothing to read now: wait for readiness.
    Dry,
    /// The source closed its write half.
    Eof,
    /// Moved `n` bytes, and the source's FIN was already queued behind them: the bytes went
    /// out corked, so that the shutdown (or close) that ends the direction now sends them and
    /// the FIN in one segment (what HAProxy does, one packet and its ACK fewer per connection).
    Last { n: usize },
}

/// Which socket of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// How a relay ended, for the connection log: two bytes, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions reached EOF; `first` closed its write half first.
    Closed { first: Side },
    /// A socket failed (a reset, a broken pipe): the relay shut both down. The first failure
    /// is the one reported; what it causes on the other direction is not.
    Failed(Side),
}

/// Which socket of a direction a failure came from.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The socket read from.
    Src,
    /// The socket written to.
    Dst,
}

/// Relays until both directions end, and says how they did. `head` is what [`first_move`]
/// already read from the client: it goes to the backend first.
///
/// The caller closes both sockets as soon as this returns: the direction that ends last does
/// not shut its destination's write half, because the close right after sends the same FIN
/// (both sockets have been read to EOF by then, so the close cannot turn into a reset). One
/// syscall fewer per connection.
pub async fn relay<S: Conn>(
    client: &S,
    server: &S,
    meter: &Meter,
    mode: RelayMode,
    head: Head,
) -> Ended {
    // Written by whichever direction ends first; read once both have. Two bytes, and no
    // closure: the relay's future is part of every idle connection's.
    let how = Cell::new(Outcome::default());
    let up = async {
        let sent = match head {
            Head::Nothing => Ok(false),
            Head::Eof => Ok(true),
            Head::Data(buf, n) => {
                meter.bytes_up.set(meter.bytes_up.get() + n as u64);
                // A full read suggests more is waiting: read again at once.
                let more = n == buf.len();
                Box::pin(send_head(server, buf, n))
                    .await
                    .map(|()| more)
                    .map_err(|_| Fault::Dst)
            }
        };
        let r = match sent {
            Ok(readable) => {
                pump(
                    client,
                    server,
                    (&meter.bytes_up, &meter.last_up),
                    mode,
                    readable,
                )
                .await
            }
            Err(e) => Err(e),
        };
        half_close(server, r, &how);
        how.set(how.get().with(r, Side::Client, Side::Server));
        if r.is_err() {
            end_both(client, server);
        }
    };
    let down = async {
        let r = pump(
            server,
            client,
            (&meter.bytes_down, &meter.last_down),
            mode,
            false,
        )
        .await;
        half_close(client, r, &how);
        how.set(how.get().with(r, Side::Server, Side::Client));
        if r.is_err() {
            end_both(client, server);
        }
    };
    tokio::join!(up, down);
    how.get().ended()
}

/// What the directions of a relay reported so far.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    /// The side whose EOF came first.
    closed_first: Option<Side>,
    /// The side of the first failure.
    failed: Option<Side>,
}

impl Outcome {
    /// Whether a direction has ended cleanly and none has failed.
    fn one_closed(self) -> bool {
        self.closed_first.is_some() && self.failed.is_none()
    }

    /// With one direction's end added: `src` is the side it reads from, `dst` the other.
    fn with(self, r: Result<(), Fault>, src: Side, dst: Side) -> Outcome {
        match r {
            Ok(()) => Outcome {
                closed_first: self.closed_first.or(Some(src)),
                ..self
            },
            Err(f) => Outcome {
                failed: self.failed.or(Some(match f {
                    Fault::Src => src,
                    Fault::Dst => dst,
                })),
                ..self
            },
        }
    }

    fn ended(self) -> Ended {
        match self.failed {
            Some(side) => Ended::Failed(side),
            None => Ended::Closed {
                first: self.closed_first.unwrap_or(Side::Client),
            },
        }
    }
}

/// Shuts both sockets down: every wait pending on them completes at once, and each direction
/// then ends on its own. This is how a connection is ended early without dropping an op.
pub fn end_both(client: &impl AsRawFd, server: &impl AsRawFd) {
    sys::shutdown(client.as_raw_fd(), Shutdown::Both);
    sys::shutdown(server.as_raw_fd(), Shutdown::Both);
}

/// A direction that reached EOF (`r` is Ok) passes it on: it shuts `to`'s write half,
/// unless the other direction has already ended cleanly (`how`): then the relay is over and
/// the caller's close of both sockets sends that FIN. Done here rather than in [`pump`], so
/// that each direction's future, which every idle connection holds, stays as small.
fn half_close(to: &impl AsRawFd, r: Result<(), Fault>, how: &Cell<Outcome>) {
    if r.is_ok() && !how.get().one_closed() {
        sys::shutdown(to.as_raw_fd(), Shutdown::Write);
    }
}

/// Moves bytes from `from` to `to` until EOF (then the caller half-closes `to`). `readable`
/// says bytes are likely waiting (the head read filled its buffer): read before waiting.
async fn pump<S: Conn>(
    from: &S,
    to: &S,
    (bytes, last): (&Cell<u64>, &Cell<Instant>),
    mode: RelayMode,
    mut readable: bool,
) -> Result<(), Fault> {
    let mut splicing = mode == RelayMode::Splice;
    // The direction's read op while it is armed, or has completions left to take: every read
    // goes through it until its last one (no syscall read may overtake bytes it took).
    let mut reads: Option<Reads> = None;
    loop {
        // A direction that waits for bytes does it with the runtime's read op where it has one
        // (an op that waits and reads: no readiness wait of its own, and all an idle direction
        // holds). While a transfer is in full flow (the last read filled its buffer, or the op
        // reached its byte cap with more queued) it reads with plain syscalls instead, from
        // the pool's hot buffers, without a loop turn per chunk; the first short read sends it
        // back to the op.
        let step = if reads.is_some() || (!splicing && !readable && from.reads_by_op()) {
            RingRead::new(from, to, &mut reads).await?
        } else {
            if !readable {
                from.wait(Interest::READABLE)
                    .await
                    .map_err(|_| Fault::Src)?;
            }
            match splicing.then(Pipe::take) {
                // Boxed: a splice step is rare next to the idle wait, and keeping its state out
                // of line keeps every idle connection's future small.
                Some(Some(pipe)) => Box::pin(splice_once(from, to, pipe)).await?,
                // Copy mode, or no pipe to be had (limit or out of fds): copy this chunk.
                _ => copy_once(from, to).await?,
            }
        };
        // A read that filled its buffer says more is probably there: read again at once.
        readable = false;
        match step {
            Step::Dry => {}
            Step::Eof => return Ok(()),
            Step::Last { n } => {
                bytes.set(bytes.get() + n as u64);
                last.set(Instant::now());
                return Ok(());
            }
            // The read op ended without bytes (cancelled for a slow reader): read on by
            // syscall.
            Step::Moved { n: 0, more } => readable = more,
            Step::Moved { n, more } => {
                bytes.set(bytes.get() + n as u64);
                last.set(Instant::now());
                if mode == RelayMode::SpliceAuto {
                    // Bulk is a read that filled a pooled buffer (a ring buffer is smaller).
                    splicing = n >= SPLICE_BULK && (splicing || more);
                }
                readable = more;
            }
        }
    }
}

/// Copy mode's step on a runtime with a read op ([`Conn::read_op`]): the op's next completion,
/// then a send of what it read, as an op too where the runtime has one ([`Conn::send_op`]).
/// The op itself is the direction's (`reads`, kept by [`pump`] from one step to the next while
/// it is armed). Written out by hand so that an idle direction's future is a few references:
/// the rare cases (a slow reader, an empty ring) go on in a boxed future.
struct RingRead<'a, 'r, S: Conn> {
    from: &'a S,
    to: &'a S,
    reads: &'r mut Option<Reads>,
    state: RingState<'a>,
}

enum RingState<'a> {
    /// Waiting for the read op's next completion (the op is armed at the first poll if the
    /// direction has none).
    Reading,
    /// The read's bytes on their way out, and what the read made of them.
    Sending(SendOp, RingStep),
    Slow(SlowStep<'a>),
}

impl<'a, 'r, S: Conn> RingRead<'a, 'r, S> {
    fn new(from: &'a S, to: &'a S, reads: &'r mut Option<Reads>) -> Self {
        RingRead {
            from,
            to,
            reads,
            state: RingState::Reading,
        }
    }
}

impl<S: Conn> Future for RingRead<'_, '_, S> {
    type Output = Result<Step, Fault>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let RingRead {
            from,
            to,
            reads,
            state,
        } = self.get_mut();
        let (from, to, reads) = (*from, *to, &mut **reads);
        loop {
            let slow: SlowStep<'_> = match state {
                RingState::Slow(f) => return f.as_mut().poll(cx),
                RingState::Reading => {
                    let op = match reads {
                        Some(op) => op,
                        None => match from.read_op() {
                            Ok(op) => reads.insert(op),
                            // Not queued (EBUSY: the submission queue full and the kernel
                            // busy), or no ring: read by readiness instead.
                            Err(_) => {
                                *state = RingState::Slow(Box::pin(wait_then_copy(from, to)));
                                continue;
                            }
                        },
                    };
                    let multishot = op.is_multishot();
                    let (read, armed) = match op.poll_read(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    if !armed {
                        *reads = None;
                    }
                    match read {
                        Ok(Some(buf)) => {
                            let (bytes, step) = match gather(from, buf, reads) {
                                Ok(out) => out,
                                Err(()) => return Poll::Ready(Err(Fault::Src)),
                            };
                            match to.send_op(bytes, step.last) {
                                Ok(op) => {
                                    *state = RingState::Sending(op, step);
                                    continue;
                                }
                                Err(Some(bytes)) => send_rest(to, bytes, 0, step.into(), reads),
                                Err(None) => return Poll::Ready(Err(Fault::Dst)),
                            }
                        }
                        Ok(None) => return Poll::Ready(Ok(Step::Eof)),
                        // An error ends the op (the kernel's contract): read by syscall only
                        // if it has, so that no syscall read overtakes the op's.
                        Err(_) if reads.is_some() => return Poll::Ready(Err(Fault::Src)),
                        Err(e) => match e.raw_os_error() {
                            // Cancelled for a slow reader that has caught up since: read on
                            // by syscall.
                            Some(libc::ECANCELED) => {
                                return Poll::Ready(Ok(Step::Moved { n: 0, more: true }))
                            }
                            // The ring was empty (every buffer between a read and its send's
                            // completion): the bytes are still in the socket; read them into
                            // a pooled buffer instead.
                            Some(libc::ENOBUFS) => {
                                pool::note_ring_empty();
                                Box::pin(wait_then_copy(from, to))
                            }
                            // A kernel that reports 6.17 or later but refuses the multishot
                            // read's byte cap: nothing was read; one-shot reads from now on.
                            Some(libc::EINVAL)
                                if crate::worker::ring::multishot_refused(multishot) =>
                            {
                                Box::pin(wait_then_copy(from, to))
                            }
                            _ => return Poll::Ready(Err(Fault::Src)),
                        },
                    }
                }
                RingState::Sending(op, step) => {
                    let step = Step::from(*step);
                    match Pin::new(op).poll(cx).map(unsent) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(None)) => return Poll::Ready(Ok(step)),
                        Poll::Ready(Ok(Some((bytes, sent)))) => {
                            send_rest(to, bytes, sent, step, reads)
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(Err(Fault::Dst)),
                    }
                }
            };
            *state = RingState::Slow(slow);
        }
    }
}

/// A ring read's bytes with the reads queued behind them on the op ([`take_queued`]): one
/// buffer goes out as it is; several are copied into one pooled buffer, up to its size, for
/// one send. Then what comes after them: the FIN (the bytes go out corked, to leave with it),
/// more bytes, or nothing yet. `Err` if a completion broke the op's contract.
fn gather(
    from: &impl AsRawFd,
    first: crate::worker::ring::RingBuf,
    reads: &mut Option<Reads>,
) -> Result<(Lent, RingStep), ()> {
    // The pooled buffer is taken only when a second read is queued.
    let mut pooled: Option<(Buf, usize)> = None;
    let queued = take_queued(reads, pool::BUF_SIZE - first.len(), |b| {
        let (buf, at) = pooled.get_or_insert_with(|| {
            let mut buf = Buf::take();
            buf[..first.len()].copy_from_slice(&first);
            (buf, first.len())
        });
        buf[*at..*at + b.len()].copy_from_slice(b);
        *at += b.len();
    })?;
    let (tail_len, tail_queued) = queued.last.unwrap_or((first.len(), first.more_queued()));
    let (bytes, n) = match pooled {
        Some((buf, n)) => (Lent::Pool(buf, n), n),
        None => {
            let n = first.len();
            (Lent::Ring(first), n)
        }
    };
    let (more, last) = match (reads.as_ref(), queued.next) {
        // The op is armed: it brings what comes next; an EOF already queued is the FIN.
        (Some(_), Some(0)) => (false, true),
        (Some(_), Some(res)) => (res > 0, false),
        (Some(_), None) => (false, false),
        // The op has ended (its byte cap, or a one-shot read): something queued behind the
        // last read is more bytes (read on by syscall at once) or the FIN, which a peek tells.
        (None, _) => {
            let full = tail_len == RING_BUF_SIZE;
            let queued = tail_queued && !full;
            let last = queued && matches!(sys::peek(from.as_raw_fd()), Ok(0));
            (full || queued, last)
        }
    };
    let step = RingStep {
        n: n as u16,
        more,
        last,
    };
    Ok((bytes, step))
}

/// What [`take_queued`] took from a direction's read op.
struct Queued {
    /// Bytes taken.
    n: usize,
    /// The length of the last read taken and whether the kernel said more was queued behind
    /// it (`None` if none was taken).
    last: Option<(usize, bool)>,
    /// The result of the completion queued next, left in the op (`None` if none is, or the
    /// op has ended).
    next: Option<i32>,
}

/// Takes the reads already queued on a direction's read op, in order, while they fit in
/// `room` bytes, and hands each one's bytes to `put` (its ring buffer goes back right after).
/// Stops at a completion that is not bytes (EOF, an error), which stays queued; clears
/// `reads` if a read taken was the op's last. `Err` if a completion of bytes had none.
fn take_queued(
    reads: &mut Option<Reads>,
    mut room: usize,
    mut put: impl FnMut(&[u8]),
) -> Result<Queued, ()> {
    let mut taken = Queued {
        n: 0,
        last: None,
        next: None,
    };
    while let Some(op) = reads.as_mut() {
        taken.next = op.next_queued();
        let Some(len) = taken.next.filter(|&res| res > 0) else {
            break;
        };
        if len as usize > room {
            break;
        }
        let (read, armed) = op.try_read().ok_or(())?;
        if !armed {
            *reads = None;
            taken.next = None;
        }
        let b = read.ok().flatten().ok_or(())?;
        put(&b);
        (taken.n, room) = (taken.n + b.len(), room - b.len());
        taken.last = Some((b.len(), b.more_queued()));
        taken.next = None;
    }
    Ok(taken)
}

impl Step {
    /// The step with `extra` more bytes moved.
    fn plus(self, extra: usize) -> Step {
        match self {
            Step::Moved { n, more } => Step::Moved { n: n + extra, more },
            Step::Last { n } => Step::Last { n: n + extra },
            other => other,
        }
    }
}

/// What a ring read made of its bytes ([`Step::Moved`] or [`Step::Last`]), in four bytes: it
/// waits beside every send op in flight, inside the relay's future.
#[derive(Clone, Copy)]
struct RingStep {
    n: u16,
    more: bool,
    last: bool,
}

// A ring read's length fits, gathered into a pooled buffer too.
const _: () = assert!(RING_BUF_SIZE <= pool::BUF_SIZE && pool::BUF_SIZE <= u16::MAX as usize);

impl From<RingStep> for Step {
    fn from(s: RingStep) -> Step {
        let n = s.n as usize;
        if s.last {
            Step::Last { n }
        } else {
            Step::Moved { n, more: s.more }
        }
    }
}

/// What a send op left to send: `None` if it sent everything, or the bytes and how many of
/// them went (none, if the socket was full: EAGAIN), for the syscall path to go on with; an
/// error if the send failed.
fn unsent((res, bytes): (io::Result<usize>, Option<Lent>)) -> io::Result<Option<(Lent, usize)>> {
    let bytes = bytes.ok_or_else(|| io::Error::other("a send op lost its bytes"))?;
    match res {
        Ok(sent) if sent >= bytes.len() => Ok(None),
        Ok(sent) => Ok(Some((bytes, sent))),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(Some((bytes, 0))),
        Err(e) => Err(e),
    }
}

/// A boxed step that finishes what a ring read started (see [`RingRead`]).
type SlowStep<'a> = Pin<Box<dyn Future<Output = Result<Step, Fault>> + 'a>>;

/// Sends what a send op could not, from byte `from` of `bytes` on, by syscall
/// ([`send_or_copy`]), and then, if the socket did not take it all, a copy of the rest as it
/// makes room. The reader is slow then: the direction's read op is cancelled (no more reads
/// until it catches up, as a syscall relay would not read either), and what the op read
/// already joins the copy ([`hold`]). The rare case of a ring read's step (boxed, like every
/// rare case there).
fn send_rest<'a, S: Conn>(
    to: &'a S,
    bytes: Lent,
    from: usize,
    step: Step,
    reads: &mut Option<Reads>,
) -> SlowStep<'a> {
    let fin_next = matches!(step, Step::Last { .. });
    let mut step = step;
    let rest = send_or_copy(to, bytes, from, fin_next).map_err(|_| Fault::Dst);
    let rest = rest.and_then(|rest| match rest {
        Some(mut tail) => {
            step = step.plus(hold(reads, &mut tail).map_err(|()| Fault::Src)?);
            Ok(Some(tail))
        }
        None => Ok(None),
    });
    Box::pin(async move {
        // The ring buffers are back already: a slow reader holds the copy (at most 16 KiB
        // unsent and the 16 KiB the read op had read ahead), and only the reads that
        // completed in the loop turn of the cancel, after `hold`, wait in the op's slot.
        if let Some(rest) = rest? {
            send_all(to, &rest).await.map_err(|_| Fault::Dst)?;
        }
        Ok(step)
    })
}

/// Stops a direction's reads for a slow reader: cancels its read op and appends the bytes of
/// the reads it has queued to `tail`, giving their ring buffers back. The op's last
/// completion, and any read that beats the cancel (one posted by a submit later in this loop
/// turn, or all up to the op's cap if the cancel cannot be queued), are taken in order by the
/// next step, once the reader has caught up: they hold their ring buffers until then. Returns
/// how many bytes it appended; `Err` if a completion broke the op's contract.
pub(crate) fn hold(reads: &mut Option<Reads>, tail: &mut pool::Tail) -> Result<usize, ()> {
    if let Some(op) = reads.as_mut() {
        op.cancel();
    }
    Ok(take_queued(reads, usize::MAX, |b| tail.push(b))?.n)
}

/// A copy step by readiness: where a ring read is not to be had (no op, an empty ring).
async fn wait_then_copy<S: Conn>(from: &S, to: &S) -> Result<Step, Fault> {
    from.wait(Interest::READABLE)
        .await
        .map_err(|_| Fault::Src)?;
    copy_once(from, to).await
}

/// Sends what a ring read's bytes hold after their first `from` as far as the socket takes
/// them now, corked for the FIN if `fin_next` ([`sys::send_before_fin`]). If it does not take
/// them all, what is left comes back as a copy ([`pool::Tail`]: at most [`SMALL_TAIL`] from
/// one ring buffer, at most a pooled buffer's 16 KiB from reads gathered into one) and the
/// buffer goes back: it is never held across a wait.
fn send_or_copy<S: Conn>(
    to: &S,
    buf: Lent,
    from: usize,
    fin_next: bool,
) -> io::Result<Option<pool::Tail>> {
    let send = if fin_next {
        sys::send_before_fin
    } else {
        sys::send
    };
    let rest = buf.get(from..).unwrap_or_default();
    let sent = send_with(to, rest, send)?;
    Ok((sent < rest.len()).then(|| pool::Tail::new(&rest[sent..])))
}

/// Copy mode's step: one recv into a pooled buffer, then all of it out.
async fn copy_once<S: Conn>(from: &S, to: &S) -> Result<Step, Fault> {
    let mut buf = Buf::take();
    let n = match from.attempt(Interest::READABLE, || sys::recv(from.as_raw_fd(), &mut buf)) {
        Ok(0) => return Ok(Step::Eof),
        Ok(n) => n,
        Err(e) if would_block(&e) => return Ok(Step::Dry),
        Err(_) => return Err(Fault::Src),
    };
    let more = n == buf.len();
    let sent = send_now(to, &buf[..n]).map_err(|_| Fault::Dst)?;
    if sent < n {
        // The reader is slow: wait with what is left, in a small copy if it is small. Boxed
        // for the same reason as the splice step: a blocked send is the rare case.
        if n - sent <= SMALL_TAIL {
            let tail = pool::Tail::new(&buf[sent..n]);
            drop(buf);
            Box::pin(send_all(to, &tail))
                .await
                .map_err(|_| Fault::Dst)?;
        } else {
            Box::pin(send_all(to, &buf[sent..n]))
                .await
                .map_err(|_| Fault::Dst)?;
        }
    }
    Ok(Step::Moved { n, more })
}

/// Sends as much of `data` as the socket takes now; returns how much that was.
fn send_now<S: Conn>(to: &S, data: &[u8]) -> io::Result<usize> {
    send_with(to, data, sys::send)
}

/// [`send_now`] with `send`, one of [`sys`]'s non-blocking sends.
fn send_with<S: Conn>(
    to: &S,
    data: &[u8],
    send: fn(std::os::fd::RawFd, &[u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut sent = 0;
    while sent < data.len() {
        match to.attempt(Interest::WRITABLE, || send(to.as_raw_fd(), &data[sent..])) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => sent += m,
            Err(e) if would_block(&e) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Sends the first `n` bytes of `buf` (the client's first read), as an op where the runtime
/// has one ([`Conn::send_op`]), then what is left by syscall and waits. A small head goes out
/// of a copy, and the pooled buffer back at once: the op holds its bytes until the loop
/// turn's submit, and a burst of new connections would otherwise hold a 16 KiB buffer each
/// until then (buffers the allocator keeps afterwards).
async fn send_head<S: Conn>(to: &S, buf: Buf, n: usize) -> io::Result<()> {
    if !to.sends_by_op() {
        return send_all(to, buf.get(..n).unwrap_or_default()).await;
    }
    let head = if n <= SMALL_TAIL {
        let copy = pool::Tail::new(buf.get(..n).unwrap_or_default());
        drop(buf);
        Lent::Copy(copy)
    } else {
        Lent::Pool(buf, n)
    };
    let (bytes, sent) = match to.send_op(head, false) {
        Err(Some(bytes)) => (bytes, 0),
        Err(None) => return Err(io::Error::other("a send op lost its bytes")),
        Ok(op) => match unsent(op.await)? {
            None => return Ok(()),
            Some(rest) => rest,
        },
    };
    send_all(to, bytes.get(sent..).unwrap_or_default()).await
}

/// Sends all of `data`, waiting for room when the socket is full.
pub async fn send_all<S: Conn>(to: &S, mut data: &[u8]) -> io::Result<()> {
    loop {
        data = &data[send_now(to, data)?..];
        if data.is_empty() {
            return Ok(());
        }
        to.wait(Interest::WRITABLE).await?;
    }
}

/// Splice mode's step: socket -> pipe (one pipe's worth), then pipe -> socket until empty.
/// The pipe goes back to the pool on return; if an error leaves bytes in it, it is closed.
async fn splice_once<S: Conn>(from: &S, to: &S, mut pipe: Pipe) -> Result<Step, Fault> {
    let n = match from.attempt(Interest::READABLE, || pipe.fill(from)) {
        Ok(0) => return Ok(Step::Eof),
        Ok(n) => n,
        Err(e) if would_block(&e) => return Ok(Step::Dry),
        Err(_) => return Err(Fault::Src),
    };
    while pipe.in_pipe > 0 {
        match to.attempt(Interest::WRITABLE, || pipe.drain(to)) {
            Ok(0) => return Err(Fault::Dst),
            Ok(_) => {}
            Err(e) if would_block(&e) => {
                to.wait(Interest::WRITABLE).await.map_err(|_| Fault::Dst)?;
            }
            Err(_) => return Err(Fault::Dst),
        }
    }
    Ok(Step::Moved {
        n,
        more: n >= SPLICE_BULK,
    })
}

/// What [`first_move`] read from the client before the relay started.
pub enum Head {
    /// Nothing yet: the backend spoke first, or the wait ran out.
    Nothing,
    /// The client's first bytes, in a pooled buffer: the connection is committed to this
    /// backend (client bytes are never replayed to another one).
    Data(Buf, usize),
    /// The client closed without sending anything (EOF stays readable, so the relay sees it).
    Eof,
}

/// What happened first on a freshly connected pair, before any byte was relayed.
pub enum FirstMove {
    /// Relay, starting with what was read from the client.
    Relay(Head),
    /// The backend closed or reset the connection before either side sent a byte. Nothing
    /// reached the backend's application, so the client can safely be retried elsewhere
    /// (a backend that died with this connection still in its accept queue looks like this).
    BackendFailed(io::Error),
}

/// Waits, up to `limit`, for the first sign of life on a new connection.
///
/// The client's first bytes, if they are already there (the common case for client-speaks-first
/// protocols), are read at once: one recv, no peek. Otherwise both sockets are watched with
/// waits that consume nothing. On io_uring the loser's poll is cancelled when its future is
/// dropped (`worker::ring`); it holds its own `Rc` of the socket until the cancel completes,
/// so nothing leaks and no fd is reused under it.
pub async fn first_move<S: Conn>(client: &S, server: &S, limit: Duration) -> FirstMove {
    if let Some(head) = read_head(client) {
        return FirstMove::Relay(head);
    }
    tokio::select! {
        biased;
        _ = client.wait(Interest::READABLE) => {
            FirstMove::Relay(read_head(client).unwrap_or(Head::Nothing))
        }
        r = server.wait(Interest::READABLE) => match r {
            Err(e) => FirstMove::BackendFailed(e),
            Ok(()) => match sys::peek(server.as_raw_fd()) {
                Ok(0) => FirstMove::BackendFailed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "backend closed the connection before sending anything",
                )),
                Ok(_) => FirstMove::Relay(Head::Nothing),
                Err(e) if would_block(&e) => FirstMove::Relay(Head::Nothing),
                Err(e) => FirstMove::BackendFailed(e),
            },
        },
        _ = crate::worker::deadline::sleep(limit) => FirstMove::Relay(Head::Nothing),
    }
}

/// One recv from the client: `None` when nothing is there yet. An error is left for the
/// relay to meet (as `Nothing`: its first read sees it again).
fn read_head<S: Conn>(client: &S) -> Option<Head> {
    let mut buf = Buf::take();
    match client.attempt(Interest::READABLE, || {
        sys::recv(client.as_raw_fd(), &mut buf)
    }) {
        Ok(0) => Some(Head::Eof),
        Ok(n) => Some(Head::Data(buf, n)),
        Err(e) if would_block(&e) => None,
        Err(_) => Some(Head::Nothing),
    }
}
