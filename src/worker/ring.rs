//! ringlb's own io_uring: one ring per worker thread, driven by the worker's executor
//! (`worker::exec`).
//!
//! The executor runs the tasks and the timers; this module runs the ring. SQEs pushed by the
//! tasks are submitted in one `io_uring_enter` per loop turn: the one the executor sleeps in
//! ([`park`]: submit, then wait for a completion or the next timer), or, while tasks stay
//! ready, [`flush`] (submit, reap, no wait); and at once when [`SUBMIT_BATCH`] are waiting.
//! The ring is set up with DEFER_TASKRUN and SINGLE_ISSUER (completions run only in the
//! executor's enter: no IPI, and no task work at the exit of other syscalls), or COOP_TASKRUN
//! on kernels before 6.1.
//!
//! What it has that tokio-uring 0.5 has not, and why ringlb runs its own:
//! - **A provided buffer ring** (IORING_REGISTER_PBUF_RING) of [`RING_BUFS`] buffers per
//!   worker. A read ([`reads`]) names no buffer: the kernel picks one from the ring when the
//!   data arrives, so an idle connection's pending read holds no memory, and the wait and the
//!   read are one op (where a readiness poll is followed by a recv syscall).
//! - **Multishot reads.** One recv op per direction stays armed from message to message and
//!   posts a completion per read, up to a byte cap ([`MULTISHOT_BYTES`]); its completions
//!   queue in the op's slot until the relay takes them.
//! - **Cancellation.** A dropped op future cancels its op (IORING_OP_ASYNC_CANCEL); what the op
//!   holds (its socket, its address) is released when the op's completion arrives.
//! - **Close as an op.** A [`RingSocket`] is closed by an IORING_OP_CLOSE submitted with the
//!   next batch, not by a close(2) of its own.
//!
//! All of the worker's `unsafe` for the ring lives here. The invariant every op keeps: each
//! fd and pointer an SQE names is owned by the op's slot ([`Op`]) until the op's one
//! completion has been reaped, whether or not its future is still there. A buffer of the ring
//! is the kernel's from when it is published until a completion names it; then it is owned by
//! one [`RingBuf`] (or given straight back), and published again only when that is dropped.

#![allow(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::relay::ops::ConnectError;
use crate::relay::pool::{Buf, Tail};

/// Submission queue entries per ring (the completion queue has four times as many).
const ENTRIES: u32 = 1024;
/// SQEs that may wait for the executor's loop turn; one more and they are submitted at once.
const SUBMIT_BATCH: u32 = 32;
/// Buffers in each worker's provided buffer ring by default (`[global] ring_buffers`, a power
/// of two). A buffer is held only from a recv's completion until the completion of the send
/// op that sends its bytes is reaped (a loop turn; its rest is copied aside when the reader is
/// slow), so this bounds the reads completed in about two loop turns, not the connections.
pub const RING_BUFS: u16 = 128;
/// Size of one ring buffer. Small: a ring read is the first read after a wait, which is most
/// often a whole small message (a request, a reply); a read that fills it says a transfer is
/// flowing, and the relay reads on with syscalls into the pool's 16 KiB buffers. The whole
/// ring (128 x 4 KiB by default) stays in a core's L2 cache, where 16 KiB buffers handed out
/// in ring order (FIFO) did not.
pub const RING_BUF_SIZE: usize = 4096;
/// The buffer group of the ring.
const BGID: u16 = 0;
/// IORING_ENTER_GETEVENTS (io-uring keeps its constants private).
const ENTER_GETEVENTS: u32 = 1;
/// IORING_RECVSEND_POLL_FIRST, in a recv's `ioprio`: arm the poll without trying the recv
/// first. A ring read starts when its socket is most likely empty (right after a send, or on
/// an idle connection), where that first attempt is a wasted recvmsg (Linux 5.19; earlier
/// kernels have no buffer rings, so no ring reads).
const RECV_POLL_FIRST: u16 = 1;
/// IORING_RECV_MULTISHOT, in a recv's `ioprio`: the op stays armed and posts a completion per
/// read, each with a buffer of the ring, until one comes without F_MORE.
const RECV_MULTISHOT: u16 = 2;
/// Bytes one multishot read op takes before it ends by itself (the SQE's `optlen`, Linux
/// 6.17: the op's last completion is the read that reaches it). It bounds how far one
/// direction reads ahead of its sends (16 KiB, and at most one ring buffer more) without a
/// cancel, and makes the switch to syscall reads in bulk free: a burst ends the op after one
/// pooled buffer's worth, and the relay reads on by syscall. A stream of smaller messages
/// re-arms it once per 16 KiB, not once per message.
pub const MULTISHOT_BYTES: u32 = crate::relay::pool::BUF_SIZE as u32;
/// user_data of SQEs whose completion nobody waits for (a close, a cancel).
const UNWATCHED: u64 = u64::MAX;

enum State {
    /// In flight; woken with this waker on completion.
    Waiting(Option<Waker>),
    /// Completed: the CQE's result and flags, not yet taken by the future.
    Done(i32, u32),
    /// A multishot op ([`reads`]): its completions not yet taken, in order, and the waker of
    /// the task waiting for the next. The first completion without F_MORE is its last.
    Multi(Option<Waker>, Cqes),
    /// The future was dropped while the op was in flight; its completion frees the slot.
    Orphan,
}

/// The completions of a multishot op not yet taken, oldest first: the first in place (most
/// often the only one), the rest in a deque allocated only when two wait at once (boxed: every
/// idle direction's op slot has one of these, and most never need it).
#[derive(Default)]
struct Cqes {
    first: Option<(i32, u32)>,
    // Boxed on purpose: a pointer in the slot where a deque would take 32 bytes.
    #[allow(clippy::box_collection)]
    rest: Option<Box<VecDeque<(i32, u32)>>>,
}

impl Cqes {
    fn push(&mut self, cqe: (i32, u32)) {
        match &mut self.rest {
            Some(rest) if !rest.is_empty() || self.first.is_some() => rest.push_back(cqe),
            None if self.first.is_some() => self.rest = Some(Box::new(VecDeque::from([cqe]))),
            _ => self.first = Some(cqe),
        }
    }

    fn pop(&mut self) -> Option<(i32, u32)> {
        self.first
            .take()
            .or_else(|| self.rest.as_mut().and_then(|r| r.pop_front()))
    }

    fn front(&self) -> Option<(i32, u32)> {
        self.first
            .or_else(|| self.rest.as_ref().and_then(|r| r.front().copied()))
    }

    /// Whether the op's last completion (no F_MORE) is among them.
    fn has_last(&self) -> bool {
        self.rest
            .as_ref()
            .and_then(|r| r.back())
            .or(self.first.as_ref())
            .is_some_and(|&(_, flags)| !cqueue::more(flags))
    }
}

/// One op in flight: its state and what the kernel may touch until it completes.
struct Op {
    state: State,
    /// Tells this op's completion from that of an earlier op in the same slot (a cancel names
    /// an op by slot and generation).
    generation: u32,
    /// Keeps what the SQE names alive: the op's socket or listener, and for a connect its
    /// address (in the same allocation, so its pointer is stable).
    _keep: Option<Rc<dyn Any>>,
    /// The bytes a send op sends: the kernel reads them until the completion, which hands
    /// them back to the op's future (see [`send`]). Boxed: every idle connection's two
    /// pending reads have a slot each, and this keeps the slots small.
    lent: Option<Box<Lent>>,
}

struct Driver {
    ring: IoUring,
    ops: Slab<Op>,
    bufs: Option<BufRing>,
    /// Whether reads are multishot recvs capped at [`MULTISHOT_BYTES`] (Linux 6.17); one-shot
    /// recvs on older kernels.
    multishot: bool,
    /// SQEs pushed since the last submit.
    queued: u32,
    generation: u32,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's driver: `None` if the thread has none, or if it is in use (a
/// drop from inside the driver; every caller has a fallback for that).
fn with<R>(f: impl FnOnce(&mut Driver) -> R) -> Option<R> {
    DRIVER
        .try_with(|d| {
            let mut d = d.try_borrow_mut().ok()?;
            d.as_mut().map(f)
        })
        .ok()
        .flatten()
}

/// Sets up this thread's ring and its buffer ring of `bufs` buffers (a power of two). Called
/// once by a worker thread before its executor starts.
pub fn init(bufs: u16) -> io::Result<()> {
    // DEFER_TASKRUN came in 6.1, SINGLE_ISSUER in 6.0, COOP_TASKRUN in 5.19: each kernel
    // gets what it has.
    let build = |setup: fn(&mut io_uring::Builder)| {
        let mut b = IoUring::builder();
        setup(&mut b);
        b.setup_cqsize(ENTRIES * 4).build(ENTRIES)
    };
    let ring = build(|b| {
        b.setup_defer_taskrun().setup_single_issuer();
    })
    .or_else(|_| {
        build(|b| {
            b.setup_coop_taskrun().setup_single_issuer();
        })
    })
    .or_else(|_| {
        build(|b| {
            b.setup_coop_taskrun();
        })
    })
    .or_else(|_| build(|_| {}))?;
    // Kernels before 5.19 have no buffer rings: reads then wait for readiness and use the
    // pooled buffers, as the epoll runtime does.
    let bufs = BufRing::new(&ring, bufs).ok();
    DRIVER.with(|d| {
        *d.borrow_mut() = Some(Driver {
            ring,
            ops: Slab::with_capacity(256),
            bufs,
            multishot: kernel_at_least(6, 17),
            queued: 0,
            generation: 0,
        })
    });
    Ok(())
}

/// Whether reads on this thread go through the buffer ring ([`reads`]).
pub fn has_buffer_ring() -> bool {
    with(|d| d.bufs.is_some()).unwrap_or(false)
}

impl Driver {
    /// Queues one SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every fd and pointer `sqe` names must stay valid until its completion is reaped (owned
    /// by its op's slot, or not the process's concern, as a close's fd).
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on from the caller.
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            self.submit();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(sqe) }
                .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        }
        self.queued += 1;
        if self.queued > SUBMIT_BATCH {
            self.submit();
        }
        Ok(())
    }

    /// Submits what is queued and posts what completed, without waiting: with
    /// DEFER_TASKRUN the kernel runs completions only in an enter with GETEVENTS.
    fn submit(&mut self) {
        let len = self.ring.submission().len() as u32;
        // SAFETY: no argument is passed; the SQEs counted are the ones queued and published
        // (the submission queue's tail is written when its handle above is dropped).
        let entered = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(len, 0, ENTER_GETEVENTS, None)
        };
        // EBUSY (completions to reap first) and EINTR leave the SQEs queued for the next try;
        // what the kernel did not take stays counted.
        let _ = entered;
        self.queued = self.ring.submission().len() as u32;
    }

    /// Starts an op: a slot for it, then its SQE tagged with the slot. If the SQE cannot be
    /// queued, the slot comes back with the error, for the caller to drop outside the driver
    /// (what it keeps may be a socket, whose drop queues its close through the driver).
    ///
    /// # Safety
    /// As [`Driver::push`]: what `sqe` names is owned by `keep`.
    unsafe fn start(
        &mut self,
        sqe: squeue::Entry,
        keep: Option<Rc<dyn Any>>,
        lent: Option<Box<Lent>>,
        state: State,
    ) -> Result<(usize, u32), (io::Error, Op)> {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let key = self.ops.insert(Op {
            state,
            generation,
            _keep: keep,
            lent,
        });
        let sqe = sqe.user_data(tag(key, generation));
        // SAFETY: the slot just filled owns what the SQE names until its completion.
        match unsafe { self.push(&sqe) } {
            Ok(()) => Ok((key, generation)),
            // Never submitted: the slot goes at once.
            Err(e) => Err((e, self.ops.remove(key))),
        }
    }
}

fn tag(key: usize, generation: u32) -> u64 {
    ((generation as u64) << 32) | key as u64
}

/// Submits what the tasks queued and reaps what completed, without waiting: the executor's
/// loop turn while tasks are still ready.
pub fn flush() {
    // Even with nothing queued: with DEFER_TASKRUN, completions are posted only by an enter.
    let _ = with(|d| d.submit());
    reap();
}

/// Hands every completion in the queue to its op: wakes its future, or frees the slot of an
/// op whose future is gone. What a freed slot held is dropped outside the driver (a socket's
/// drop submits its close through the driver).
pub fn reap() {
    loop {
        let step = with(|d| {
            let next = d.ring.completion().next();
            let cqe = match next {
                Some(cqe) => cqe,
                // Completions that did not fit the queue wait in the kernel until an enter
                // with GETEVENTS (which io-uring's submit adds when it sees the flag): the
                // ring's fd will not signal them again.
                None if d.ring.submission().cq_overflow() => {
                    d.submit();
                    d.ring.completion().next()?
                }
                None => return None,
            };
            Some(d.complete(cqe))
        })
        .flatten();
        match step {
            None => return,
            Some(Reaped::Wake(w)) => w.wake(),
            Some(Reaped::Free(op)) => drop(op),
            Some(Reaped::Nothing) => {}
        }
    }
}

enum Reaped {
    Wake(Waker),
    Free(Op),
    Nothing,
}

impl Driver {
    fn complete(&mut self, cqe: cqueue::Entry) -> Reaped {
        let ud = cqe.user_data();
        let (res, flags) = (cqe.result(), cqe.flags());
        if ud == UNWATCHED {
            return Reaped::Nothing;
        }
        if let (Some(_), Some(bufs)) = (cqueue::buffer_select(flags), self.bufs.as_mut()) {
            bufs.take();
        }
        let (key, generation) = ((ud & 0xffff_ffff) as usize, (ud >> 32) as u32);
        let Some(op) = self.op_mut(key, generation) else {
            // No op waits for it (cannot happen: a slot lives until its last completion); a
            // buffer it names goes straight back.
            self.give_back_from(flags);
            return Reaped::Nothing;
        };
        if let State::Multi(waker, cqes) = &mut op.state {
            cqes.push((res, flags));
            return waker.take().map_or(Reaped::Nothing, Reaped::Wake);
        }
        if matches!(op.state, State::Orphan) && cqueue::more(flags) {
            // An orphaned multishot op: not its last completion yet, so the slot stays.
            self.give_back_from(flags);
            return Reaped::Nothing;
        }
        match std::mem::replace(&mut op.state, State::Done(res, flags)) {
            State::Waiting(w) => w.map_or(Reaped::Nothing, Reaped::Wake),
            State::Orphan => {
                let op = self.ops.remove(key);
                self.give_back_from(flags);
                Reaped::Free(op)
            }
            // One completion per one-shot op: a second cannot come (its buffer would go
            // back); a multishot op's state is never replaced.
            State::Done(..) | State::Multi(..) => {
                self.give_back_from(flags);
                Reaped::Nothing
            }
        }
    }

    /// Queues the cancel of the op in slot `key` of `generation`. If it cannot be queued, the
    /// op goes on until it ends by itself (a multishot read at its cap or EOF; every op at the
    /// connection's shutdown) and its completion frees the slot then.
    fn cancel(&mut self, key: usize, generation: u32) {
        let cancel = opcode::AsyncCancel::new(tag(key, generation))
            .build()
            .user_data(UNWATCHED);
        // SAFETY: a cancel names no fd or memory, only the op's tag.
        let _ = unsafe { self.push(&cancel) };
    }

    /// The op in slot `key` if it is the one of `generation` (not a later op in that slot).
    fn op_mut(&mut self, key: usize, generation: u32) -> Option<&mut Op> {
        self.ops
            .get_mut(key)
            .filter(|op| op.generation == generation)
    }

    /// Returns the buffer a completion's flags name, if any, to the ring.
    fn give_back_from(&mut self, flags: u32) {
        if let (Some(bid), Some(bufs)) = (cqueue::buffer_select(flags), self.bufs.as_mut()) {
            bufs.give_back(bid);
        }
    }
}

/// Submits what the tasks queued and waits in the kernel for the first completion, at most
/// `wait` (no limit if `None`); the executor's sleep ([`super::exec`]). The caller reaps.
/// A timeout, a signal, or completions to reap first (EBUSY) end the wait early; the loop
/// looks again either way.
pub fn park(wait: Option<std::time::Duration>) {
    let _ = with(|d| {
        let result = match wait {
            Some(w) => {
                let ts = types::Timespec::from(w);
                let args = types::SubmitArgs::new().timespec(&ts);
                d.ring.submitter().submit_with_args(1, &args)
            }
            None => d.ring.submitter().submit_and_wait(1),
        };
        // ETIME (the timer is due), EINTR and EBUSY leave nothing to do here: what the
        // kernel did not take stays queued and counted.
        let _ = result;
        d.queued = d.ring.submission().len() as u32;
    });
}

/// Whether ops are in flight or SQEs wait to be submitted (the executor's end waits for none).
pub fn busy() -> bool {
    with(|d| !d.ops.is_empty() || d.queued > 0 || !d.ring.submission().is_empty()).unwrap_or(false)
}

/// Whether this kernel's ring takes a timeout with its wait (IORING_FEAT_EXT_ARG, 5.11), which
/// the executor's park needs.
pub fn can_park() -> bool {
    with(|d| d.ring.params().is_feature_ext_arg()).unwrap_or(false)
}

/// The future of one op: its result once the completion is reaped. Dropped before that, it
/// cancels the op; the slot (and what it keeps open) is freed by the completion.
struct OpFuture {
    key: usize,
    generation: u32,
    done: bool,
}

impl OpFuture {
    /// # Safety
    /// As [`Driver::push`]: everything `sqe` names is owned by `keep`.
    unsafe fn start(sqe: squeue::Entry, keep: Option<Rc<dyn Any>>) -> io::Result<OpFuture> {
        // SAFETY: passed on from the caller.
        unsafe { OpFuture::lend(sqe, keep, None) }.map_err(|(e, _)| e)
    }

    /// [`OpFuture::start`] of an op that reads from `lent` until it completes; if it cannot
    /// start, the bytes come back with the error.
    ///
    /// # Safety
    /// As [`Driver::push`]: everything `sqe` names is owned by `keep` or is `lent`'s bytes.
    unsafe fn lend(
        sqe: squeue::Entry,
        keep: Option<Rc<dyn Any>>,
        lent: Option<Box<Lent>>,
    ) -> Result<OpFuture, (io::Error, Option<Box<Lent>>)> {
        let mut lent = lent;
        // SAFETY: passed on from the caller.
        let started = with(|d| unsafe { d.start(sqe, keep, lent.take(), State::Waiting(None)) });
        match started {
            Some(Ok((key, generation))) => Ok(OpFuture {
                key,
                generation,
                done: false,
            }),
            // A slot freed without being submitted is dropped here, outside the driver; its
            // bytes go back to the caller.
            Some(Err((e, mut op))) => Err((e, op.lent.take())),
            // The closure did not run: the bytes are still here.
            None => Err((
                io::Error::other("no io_uring on this thread, or it is in use"),
                lent,
            )),
        }
    }
}

impl Future for OpFuture {
    /// The completion's result and flags, and the bytes the op was lent, if any.
    type Output = (i32, u32, Option<Box<Lent>>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (key, generation) = (self.key, self.generation);
        let out = with(|d| {
            let op = d.op_mut(key, generation)?;
            match &mut op.state {
                State::Done(res, flags) => {
                    let out = (*res, *flags);
                    Some(Ok((out, d.ops.remove(key))))
                }
                State::Waiting(w) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    Some(Err(()))
                }
                State::Orphan | State::Multi(..) => None,
            }
        })
        .flatten();
        match out {
            Some(Ok(((res, flags), mut op))) => {
                self.done = true;
                let lent = op.lent.take();
                drop(op);
                Poll::Ready((res, flags, lent))
            }
            Some(Err(())) => Poll::Pending,
            // The driver is gone or busy (never, on a worker): report it as an error. `done`
            // stays false, so that the drop still orphans the op if it is in flight, and its
            // completion frees what it holds.
            None => Poll::Ready((-libc::ECANCELED, 0, None)),
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (key, generation) = (self.key, self.generation);
        let freed = with(|d| {
            let op = d.op_mut(key, generation)?;
            match op.state {
                State::Done(_, flags) => {
                    // Completed but never read: free it now (and its buffer).
                    let op = d.ops.remove(key);
                    d.give_back_from(flags);
                    Some(op)
                }
                State::Waiting(_) => {
                    // An orphan until its completion, which frees the slot.
                    op.state = State::Orphan;
                    d.cancel(key, generation);
                    None
                }
                State::Orphan | State::Multi(..) => None,
            }
        })
        .flatten();
        drop(freed);
    }
}

fn result(res: i32) -> io::Result<u32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as u32)
    }
}

/// A socket of the ring's worker. Closed by a close op with the next batch of SQEs when
/// dropped (by close(2) where no ring is at hand). Each op on it holds an `Rc` of it, so it
/// is closed only once no op can touch its fd.
pub struct RingSocket(Option<Socket>);

impl RingSocket {
    pub fn new(socket: Socket) -> RingSocket {
        RingSocket(Some(socket))
    }

    fn socket(&self) -> &Socket {
        // Always `Some` until `drop` takes it.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("a RingSocket is closed only by drop"))
    }
}

impl AsRawFd for RingSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }
}

impl AsFd for RingSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket().as_fd()
    }
}

impl Drop for RingSocket {
    fn drop(&mut self) {
        let Some(socket) = self.0.take() else {
            return;
        };
        let fd = socket.into_raw_fd();
        let close = opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(UNWATCHED);
        // SAFETY: `fd` was just released by its owner and nothing else refers to it (every op
        // on it held an `Rc` of this socket, and all are gone); the close op owns it now.
        let queued = with(|d| unsafe { d.push(&close) }.is_ok()).unwrap_or(false);
        if !queued {
            // SAFETY: as above; the close op was not queued, so this is the one close.
            unsafe { libc::close(fd) };
        }
    }
}

/// An op started at once, or the error that kept it from starting (reported when polled).
struct Started(Result<OpFuture, Option<io::Error>>);

impl Started {
    /// # Safety
    /// As [`Driver::push`]: everything `sqe` names is owned by `keep`.
    unsafe fn new(sqe: squeue::Entry, keep: Option<Rc<dyn Any>>) -> Started {
        // SAFETY: passed on from the caller.
        Started(unsafe { OpFuture::start(sqe, keep) }.map_err(Some))
    }

    fn poll_op(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(i32, u32)>> {
        match &mut self.0 {
            Ok(op) => Pin::new(op)
                .poll(cx)
                .map(|(res, flags, _)| Ok((res, flags))),
            Err(e) => Poll::Ready(Err(e.take().unwrap_or_else(|| io::ErrorKind::Other.into()))),
        }
    }
}

/// Starts waiting until `owner`'s fd is ready for `mask` (POLLIN, POLLOUT...); resolves to
/// the ready events. Shutting the socket down ends the wait.
pub fn poll<T: AsRawFd + 'static>(owner: &Rc<T>, mask: u32) -> PollOp {
    let sqe = opcode::PollAdd::new(types::Fd(owner.as_raw_fd()), mask).build();
    let keep: Rc<dyn Any> = owner.clone();
    // SAFETY: the SQE names only the fd, which `keep` holds open until the completion.
    PollOp(unsafe { Started::new(sqe, Some(keep)) })
}

/// A readiness wait in flight (from [`poll`]).
pub struct PollOp(Started);

impl Future for PollOp {
    type Output = io::Result<u32>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u32>> {
        self.0
            .poll_op(cx)
            .map(|r| r.and_then(|(res, _)| result(res)))
    }
}

/// Connects to `addr`: a non-blocking, close-on-exec socket with TCP_NODELAY, from `source`
/// when given. No timeout of its own: the caller races it against its timers and drops it to
/// give up, which cancels the connect; the socket is closed when the cancel completes.
pub async fn connect(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> Result<Rc<RingSocket>, ConnectError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(ConnectError::Io)?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    if let Some(ip) = source {
        crate::relay::sys::bind_source(&socket, ip).map_err(ConnectError::Io)?;
    }
    let socket = Rc::new(RingSocket::new(socket));
    let keep = Rc::new(ConnectKeep {
        _socket: socket.clone(),
        addr: SockAddr::from(addr),
    });
    let sqe = opcode::Connect::new(
        types::Fd(socket.as_raw_fd()),
        keep.addr.as_ptr(),
        keep.addr.len(),
    )
    .build();
    // SAFETY: the SQE names the socket's fd and points at the address, both held by `keep`
    // (one allocation: the pointer does not move) until the completion.
    let op = unsafe { OpFuture::start(sqe, Some(keep)) }.map_err(ConnectError::Io)?;
    // Dropped unfinished (a timeout, a lost hedge), the connect is cancelled with the next
    // submit; the shutdown makes sure a socket in SYN_SENT lets go at once even if the cancel
    // could not be queued. The socket is open until then: the op holds it.
    let mut abort = AbortConnect(Some(socket.as_raw_fd()));
    let (res, _, _) = op.await;
    abort.0 = None;
    result(res).map_err(ConnectError::Io)?;
    Ok(socket)
}

/// Shuts down a socket whose connect was given up (see [`connect`]).
struct AbortConnect(Option<RawFd>);

impl Drop for AbortConnect {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
    }
}

/// What a connect op keeps alive: its socket and the address the SQE points at.
struct ConnectKeep {
    _socket: Rc<RingSocket>,
    addr: SockAddr,
}

/// A buffer of the ring holding one read's bytes; back to the ring when dropped.
pub struct RingBuf {
    bid: u16,
    len: usize,
    ptr: *const u8,
    /// The kernel said more was queued on the socket behind these bytes.
    queued: bool,
}

impl RingBuf {
    /// Whether more was queued on the socket when these bytes were read: more bytes, or the
    /// peer's FIN (IORING_CQE_F_SOCK_NONEMPTY, from the kernel's TCP_INQ hint, which counts a
    /// FIN as one byte). `false` on kernels that do not report it.
    pub fn more_queued(&self) -> bool {
        self.queued
    }
}

impl std::ops::Deref for RingBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: buffer `bid` is this value's alone (a completion named it and it is not
        // published again until this is dropped); the kernel wrote `len` <= its size bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        let bid = self.bid;
        // If the driver is in use (a drop from inside it), the buffer is lost to the ring;
        // no caller drops one there.
        let _ = with(|d| {
            if let Some(bufs) = d.bufs.as_mut() {
                bufs.give_back(bid);
            }
        });
    }
}

/// Starts the reads of one direction on `owner`: an op that waits for bytes and reads them
/// into buffers the kernel takes from the ring as they arrive, one completion per read (see
/// [`Reads`]). `ENOBUFS` where this thread has no buffer ring, `EBUSY` if the op could not be
/// queued.
///
/// On Linux 6.17 and later it is a multishot recv, capped at [`MULTISHOT_BYTES`]: it stays
/// armed from one message to the next, where a one-shot recv arms the socket's wait queue
/// again for every read (the cost of a keep-alive request that nginx's persistent epoll
/// registration does not pay). On older kernels, whose multishot recv has no cap, it is a
/// one-shot recv, which ends with its first completion.
pub fn reads<T: AsRawFd + 'static>(owner: &Rc<T>) -> io::Result<Reads> {
    let Some(multishot) = with(|d| d.bufs.as_ref().map(|_| d.multishot)).flatten() else {
        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
    };
    let prio = if multishot {
        RECV_POLL_FIRST | RECV_MULTISHOT
    } else {
        RECV_POLL_FIRST
    };
    // A flag the kernel does not know: its recv refuses the op with EINVAL at prep, as a
    // kernel without the byte cap refuses a nonzero optlen (the field it reads there).
    #[cfg(test)]
    let prio = if multishot && tests::REFUSE_CAP.get() {
        prio | 0x80
    } else {
        prio
    };
    let sqe = opcode::Recv::new(types::Fd(owner.as_raw_fd()), std::ptr::null_mut(), 0)
        .buf_group(BGID)
        .ioprio(prio)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT);
    let sqe = if multishot {
        with_optlen(sqe, MULTISHOT_BYTES)
    } else {
        sqe
    };
    let keep: Rc<dyn Any> = owner.clone();
    let state = State::Multi(None, Cqes::default());
    // SAFETY: the SQE names the fd, held open by `keep` until the op's last completion, and
    // no memory of ours: the kernel writes into ring buffers it owns until a completion names
    // them.
    let started = with(|d| unsafe { d.start(sqe, Some(keep), None, state) });
    match started {
        Some(Ok((key, generation))) => Ok(Reads {
            key,
            generation,
            ended: false,
            cancelled: false,
            multishot,
        }),
        // The slot, and the socket it keeps, go here, outside the driver.
        Some(Err((e, op))) => {
            drop(op);
            Err(e)
        }
        None => Err(io::Error::from_raw_os_error(libc::EBUSY)),
    }
}

/// Called when a read op failed with EINVAL: if the op was multishot, this thread's reads are
/// one-shot from now on (a kernel whose release says 6.17 or later but that refuses the byte
/// cap: nothing was read) and the caller reads by readiness instead (`true`); `false` if it
/// was one-shot (the EINVAL is the socket's).
pub fn multishot_refused(op_was_multishot: bool) -> bool {
    if !op_was_multishot {
        return false;
    }
    let _ = with(|d| {
        if d.multishot {
            d.multishot = false;
            crate::warn!(
                "this kernel refuses multishot reads with a byte cap (EINVAL); this worker \
                 reads with one-shot ops from now on"
            );
        }
    });
    true
}

/// Sets an SQE's `optlen` (its bytes 44 to 47, a union with `splice_fd_in` and `file_index`),
/// which io-uring's recv builder has no setter for: a multishot recv's byte cap.
fn with_optlen(sqe: squeue::Entry, optlen: u32) -> squeue::Entry {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: `Entry` is `repr(C)` around the kernel's 64-byte `io_uring_sqe`, plain integers
    // and unions of them: every bit pattern is a valid value, both ways.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
    raw[44..48].copy_from_slice(&optlen.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Whether the running kernel's release is at least `major.minor` (from uname(2)).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: uname fills the struct it is given; zeroed is a valid `utsname` (byte arrays).
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    // SAFETY: uname NUL-terminates `release` within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    release_at_least(&release.to_string_lossy(), major, minor)
}

/// Whether a kernel release string ("6.18.44-fc-v1045") names `major.minor` or later.
fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (next(), next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// One direction's reads in flight (from [`reads`]): each completion is the bytes of one read,
/// in a ring buffer, or EOF; the last one (`armed` false) ends the op. `ENOBUFS` ends it when
/// the ring was empty as bytes arrived (they stay in the socket, for the caller to read
/// another way), `ECANCELED` after [`Reads::cancel`]. Small: every idle direction holds one.
///
/// Dropping it unfinished may lose bytes: completions taken from the socket and not yet
/// read here go back to the ring unread. Drop one only when the connection ends, or after its
/// last completion.
pub struct Reads {
    key: usize,
    generation: u32,
    /// The last completion has been taken: the slot is gone.
    ended: bool,
    cancelled: bool,
    multishot: bool,
}

/// One completion of [`Reads`]: the read's bytes (`None` at EOF) or its error, and whether the
/// op is still armed (more completions will come).
pub type Read = (io::Result<Option<RingBuf>>, bool);

impl Reads {
    /// Whether the op is a multishot recv (a one-shot one on kernels before 6.17).
    pub fn is_multishot(&self) -> bool {
        self.multishot
    }

    /// The next completion, once there is one.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Read> {
        match self.take(Some(cx)) {
            Some(read) => Poll::Ready(read),
            None => Poll::Pending,
        }
    }

    /// The next completion if one is queued already; never waits.
    pub fn try_read(&mut self) -> Option<Read> {
        self.take(None)
    }

    /// The result of the next queued completion (bytes read, 0 at EOF, or `-errno`) without
    /// taking it; `None` if none is queued.
    pub fn next_queued(&self) -> Option<i32> {
        if self.ended {
            return None;
        }
        let (key, generation) = (self.key, self.generation);
        with(|d| match &d.op_mut(key, generation)?.state {
            State::Multi(_, cqes) => cqes.front().map(|(res, _)| res),
            _ => None,
        })
        .flatten()
    }

    /// Ends the op early: what it read already still comes, in order, then a last completion
    /// with `ECANCELED` (or the one it ended with anyway).
    pub fn cancel(&mut self) {
        if self.ended || self.cancelled {
            return;
        }
        self.cancelled = true;
        let (key, generation) = (self.key, self.generation);
        let _ = with(|d| d.cancel(key, generation));
    }

    fn take(&mut self, cx: Option<&mut Context<'_>>) -> Option<Read> {
        if self.ended {
            return Some((Err(io::Error::other("the reads have ended")), false));
        }
        let (key, generation) = (self.key, self.generation);
        // The buffer is made into a `RingBuf` outside the driver: one dropped inside it (at
        // EOF) could not go back to the ring.
        let popped = with(|d| {
            let Some(op) = d.op_mut(key, generation) else {
                return Some(Err(()));
            };
            let State::Multi(waker, cqes) = &mut op.state else {
                return Some(Err(()));
            };
            let Some((res, flags)) = cqes.pop() else {
                if let Some(cx) = cx {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                }
                return None;
            };
            let armed = cqueue::more(flags);
            // Its last completion: the slot (and the socket it keeps) goes.
            let slot = (!armed).then(|| d.ops.remove(key));
            Some(Ok((res, flags, armed, buf_ptr(d, flags), slot)))
        });
        match popped {
            Some(Some(Ok((res, flags, armed, ptr, op)))) => {
                drop(op);
                self.ended = !armed;
                Some((ring_read(res, flags, ptr), armed))
            }
            Some(None) => None,
            // The driver is gone or busy, or the slot is not this op's (never, on a worker).
            Some(Some(Err(()))) | None => {
                self.ended = true;
                Some((Err(io::Error::other("the reads' op is gone")), false))
            }
        }
    }
}

/// The address of the ring buffer a completion's flags name, if any.
fn buf_ptr(d: &Driver, flags: u32) -> Option<*const u8> {
    let bid = cqueue::buffer_select(flags)?;
    d.bufs.as_ref().map(|b| b.buf(bid))
}

/// A read's completion as its bytes: a ring buffer (given back when dropped), `None` at EOF,
/// or the error.
fn ring_read(res: i32, flags: u32, ptr: Option<*const u8>) -> io::Result<Option<RingBuf>> {
    let buf = cqueue::buffer_select(flags)
        .zip(ptr)
        .map(|(bid, ptr)| RingBuf {
            bid,
            len: 0,
            ptr,
            queued: cqueue::sock_nonempty(flags),
        });
    let n = result(res)? as usize;
    match buf {
        Some(mut b) if n > 0 => {
            b.len = n.min(RING_BUF_SIZE);
            Ok(Some(b))
        }
        // EOF (a buffer named with it goes back as `b` drops).
        _ if n == 0 => Ok(None),
        _ => Err(io::Error::other(
            "a buffer-select recv completed without a buffer",
        )),
    }
}

impl Drop for Reads {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (key, generation, cancelled) = (self.key, self.generation, self.cancelled);
        let freed = with(|d| {
            let op = d.op_mut(key, generation)?;
            let State::Multi(_, cqes) = &mut op.state else {
                return None;
            };
            let mut cqes = std::mem::take(cqes);
            let op = if cqes.has_last() {
                Some(d.ops.remove(key))
            } else {
                // An orphan until its last completion, which frees the slot.
                op.state = State::Orphan;
                if !cancelled {
                    d.cancel(key, generation);
                }
                None
            };
            // What it read and nobody will: back to the ring.
            while let Some((_, flags)) = cqes.pop() {
                d.give_back_from(flags);
            }
            op
        })
        .flatten();
        drop(freed);
    }
}

/// Bytes lent to a send op ([`send`]): a ring buffer, the first `n` bytes of a pooled buffer,
/// or a small copy. Their address does not move with the value (each lives in an allocation
/// of its own).
pub enum Lent {
    Ring(RingBuf),
    Pool(Buf, usize),
    Copy(Tail),
}

impl std::ops::Deref for Lent {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Lent::Ring(b) => b,
            Lent::Pool(b, n) => b.get(..*n).unwrap_or(b),
            Lent::Copy(t) => t,
        }
    }
}

/// Starts sending `bytes` on `owner`, with MSG_MORE when `corked` (see
/// `relay::sys::send_before_fin`). The op never waits for room (MSG_DONTWAIT: a full socket
/// completes it at once with `EAGAIN`), so a ring buffer is lent to the kernel for one loop
/// turn at most, never for as long as a slow reader takes. Sent from the ring, the sends of
/// one loop turn go out in the one `io_uring_enter` that submits the batch: each wakes its
/// reader, and a woken reader that preempts this thread does so once per batch, at the
/// enter's return, where each send(2) of its own was a chance to be preempted.
pub fn send<T: AsRawFd + 'static>(
    owner: &Rc<T>,
    bytes: Lent,
    corked: bool,
) -> Result<SendOp, (io::Error, Option<Lent>)> {
    let mut flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    if corked {
        flags |= libc::MSG_MORE;
    }
    let bytes = Box::new(bytes);
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    let sqe = opcode::Send::new(types::Fd(owner.as_raw_fd()), bytes.as_ptr(), len)
        .flags(flags)
        .build();
    let keep: Rc<dyn Any> = owner.clone();
    // If the op cannot start (`EBUSY`: the submission queue full and the kernel busy), the
    // bytes come back with the error: a slot keeps them only once queued.
    // SAFETY: the SQE names the fd, held open by `keep`, and the bytes, in an allocation of
    // their own that the op's slot owns (a ring buffer is not published to the ring again
    // while its `RingBuf` lives) until the completion.
    unsafe { OpFuture::lend(sqe, Some(keep), Some(bytes)) }
        .map(SendOp)
        .map_err(|(e, bytes)| (e, bytes.map(|b| *b)))
}

/// A send in flight (from [`send`]): resolves to the bytes the socket took (`EAGAIN` when it
/// took none), and the bytes back, for what is left. Small: it is part of the relay's future.
pub struct SendOp(OpFuture);

impl Future for SendOp {
    /// The bytes are `None` only if the driver lost them (it cannot, on a worker): then they
    /// are lost and the caller fails the connection.
    type Output = (io::Result<usize>, Option<Lent>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|(res, _, bytes)| (result(res).map(|n| n as usize), bytes.map(|b| *b)))
    }
}

/// A worker's provided buffer ring (IORING_REGISTER_PBUF_RING) and its buffers, both mapped
/// once and never unmapped: the worker thread lives as long as the process.
struct BufRing {
    ring: *mut types::BufRingEntry,
    bufs: *mut u8,
    mask: u16,
    /// The tail as this thread has written it (published at once by `give_back`).
    tail: u16,
    /// Buffers a completion named that are not back yet (`ringlb_relay_ring_buffers_in_use`).
    taken: usize,
}

impl BufRing {
    fn new(uring: &IoUring, entries: u16) -> io::Result<BufRing> {
        if !entries.is_power_of_two() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let map = |bytes: usize| -> io::Result<*mut u8> {
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
            if p == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(p.cast())
            }
        };
        let n = entries as usize;
        let ring = map(n * std::mem::size_of::<types::BufRingEntry>())?.cast();
        let bufs = map(n * RING_BUF_SIZE)?;
        // SAFETY: the ring's memory is page-aligned (mmap), `entries` entries long and never
        // unmapped, so it outlives the registration.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, entries, BGID, 0)?
        };
        let mut b = BufRing {
            ring,
            bufs,
            mask: entries - 1,
            tail: 0,
            taken: 0,
        };
        for bid in 0..entries {
            b.publish(bid);
        }
        Ok(b)
    }

    fn buf(&self, bid: u16) -> *const u8 {
        // SAFETY: bid < entries (the kernel names only ids this thread published), so the
        // offset stays inside the buffers' mapping.
        unsafe { self.bufs.add((bid & self.mask) as usize * RING_BUF_SIZE) }
    }

    /// Counts buffer `bid`, which a completion named, as taken.
    fn take(&mut self) {
        self.taken += 1;
        crate::relay::pool::note_ring_in_use(self.taken);
    }

    /// Gives back a buffer that a completion named: published again.
    fn give_back(&mut self, bid: u16) {
        self.taken = self.taken.saturating_sub(1);
        crate::relay::pool::note_ring_in_use(self.taken);
        self.publish(bid);
    }

    /// Publishes buffer `bid` at the ring's tail: the kernel may fill it from now on.
    fn publish(&mut self, bid: u16) {
        let i = (self.tail & self.mask) as usize;
        // SAFETY: `i` < entries. The entry at the tail is not the kernel's: it reads only
        // entries between its head and the published tail, and at most `entries` are
        // published and unconsumed, because only buffers it handed out come back.
        let e = unsafe { &mut *self.ring.add(i) };
        e.set_addr(self.buf(bid) as u64);
        e.set_len(RING_BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the ring's first entry holds the tail field the kernel reads with acquire
        // semantics; a release store through it is the documented protocol.
        let tail = unsafe { &*types::BufRingEntry::tail(self.ring).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{deadline, exec};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A connected pair: ringlb's side as a ring socket, and the peer's.
    fn pair(l: &TcpListener) -> (Rc<RingSocket>, TcpStream) {
        let peer = TcpStream::connect(l.local_addr().expect("an address")).expect("a connect");
        let (ours, _) = l.accept().expect("an accept");
        ours.set_nonblocking(true).expect("non-blocking");
        (Rc::new(RingSocket::new(Socket::from(ours))), peer)
    }

    /// A send op on a socket whose reader has stopped completes at once with EAGAIN and hands
    /// its ring buffer back with the bytes in it (a slow reader never holds a ring buffer);
    /// once the reader drains the socket, the same buffer goes out whole.
    #[test]
    fn a_send_op_on_a_full_socket_gives_its_buffer_back_at_once() {
        exec::on_worker(|| {
            Box::pin(async {
                let l = TcpListener::bind("127.0.0.1:0").expect("a listener");
                let (src, mut writer) = pair(&l);
                let (dst, mut reader) = pair(&l);
                // Fill dst until the kernel takes no more.
                let chunk = [7u8; 65536];
                let mut filled = 0usize;
                loop {
                    match crate::relay::sys::send(dst.as_raw_fd(), &chunk) {
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("filling the socket: {e}"),
                    }
                }
                writer.write_all(b"hello").expect("a write");
                let mut op = reads(&src).expect("reads");
                let (buf, _) = next(&mut op).await;
                let buf = buf.expect("a read").expect("bytes, not EOF");
                assert_eq!(&buf[..], b"hello");
                let op = send(&dst, Lent::Ring(buf), false).map_err(|(e, _)| e);
                let sent = deadline::timeout(Duration::from_secs(5), op.expect("a send op"));
                let (res, buf) = sent.await.expect("the send op waited for room");
                assert_eq!(
                    res.expect_err("a full socket takes nothing").raw_os_error(),
                    Some(libc::EAGAIN)
                );
                let buf = buf.expect("the buffer back");
                assert_eq!(&buf[..], b"hello", "the bytes are still in it");
                // Drain what filled the socket, on another thread; then the send goes out.
                let drained = std::thread::spawn(move || {
                    let mut want = vec![0u8; filled + 5];
                    reader.read_exact(&mut want).expect("everything sent");
                    want
                });
                let mut buf = Some(buf);
                while let Some(b) = buf.take() {
                    dst.wait_writable().await;
                    match send(&dst, b, false)
                        .map_err(|(e, _)| e)
                        .expect("a send op")
                        .await
                    {
                        (Ok(n), _) => assert_eq!(n, 5, "a 5-byte send went out whole"),
                        (Err(e), b) if e.raw_os_error() == Some(libc::EAGAIN) => buf = b,
                        (Err(e), _) => panic!("the send failed: {e}"),
                    }
                }
                let got = drained.join().expect("the reader");
                assert_eq!(&got[filled..], b"hello");
            })
        });
    }

    /// The next completion of `reads`, within 5 s.
    async fn next(reads: &mut Reads) -> super::Read {
        let read = std::future::poll_fn(|cx| reads.poll_read(cx));
        deadline::timeout(Duration::from_secs(5), read)
            .await
            .expect("a completion within 5 s")
    }

    /// Ring buffers taken by completions and not given back, and ops in flight.
    fn held() -> (usize, usize) {
        with(|d| (d.bufs.as_ref().map_or(0, |b| b.taken), d.ops.len())).expect("a driver")
    }

    /// [`held`] once the executor has run a few loop turns: its own ops (the wake-up bell's
    /// poll) are in flight by then, the baseline of the tests.
    async fn baseline() -> (usize, usize) {
        let mut turns = 0;
        turns_until(|| {
            turns += 1;
            turns > 3
        })
        .await;
        held()
    }

    /// Lets the executor run a loop turn (submit, reap) until `done`, at most 5 s.
    async fn turns_until(mut done: impl FnMut() -> bool) {
        let wait = std::future::poll_fn(|cx| {
            if done() {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        deadline::timeout(Duration::from_secs(5), wait)
            .await
            .expect("the condition within 5 s");
    }

    /// Completions queue in order, however many wait at once.
    #[test]
    fn a_multishot_ops_completions_come_out_in_order() {
        // IORING_CQE_F_MORE.
        let more = 1 << 1;
        assert!(cqueue::more(more));
        let mut q = Cqes::default();
        for round in 1..5 {
            for i in 0..round {
                q.push((i, more));
            }
            assert!(!q.has_last());
            for i in 0..round {
                assert_eq!(q.front(), Some((i, more)));
                assert_eq!(q.pop(), Some((i, more)));
            }
            assert_eq!(q.pop(), None);
        }
        q.push((1, more));
        q.push((2, more));
        assert_eq!(q.pop(), Some((1, more)));
        q.push((3, 0));
        assert!(q.has_last(), "the one without F_MORE is the last");
        assert_eq!(
            (q.pop(), q.pop(), q.pop()),
            (Some((2, more)), Some((3, 0)), None)
        );
    }

    /// For a slow reader the relay cancels a direction's reads and copies what they had
    /// queued behind the unsent rest, in order, giving their buffers back at once.
    #[test]
    fn a_slow_readers_queued_reads_join_its_copy_in_order() {
        exec::on_worker(|| {
            Box::pin(async {
                let l = TcpListener::bind("127.0.0.1:0").expect("a listener");
                let (src, mut writer) = pair(&l);
                let base = baseline().await;
                let mut op = Some(reads(&src).expect("reads"));
                let multishot = with(|d| d.multishot).expect("a driver");
                // Two reads queued (one on a one-shot kernel, whose op ends with it).
                let want: &[u8] = if multishot { b"abcdef" } else { b"abc" };
                writer.write_all(b"abc").expect("a write");
                turns_until(|| held().0 == base.0 + 1).await;
                if multishot {
                    writer.write_all(b"def").expect("a write");
                    turns_until(|| held().0 == base.0 + 2).await;
                }
                let mut tail = crate::relay::pool::Tail::new(b"rest:");
                let n = crate::relay::hold(&mut op, &mut tail).expect("the reads taken");
                assert_eq!(n, want.len());
                assert_eq!(&tail[5..], want, "after the rest, in order");
                assert_eq!(held().0, base.0, "their buffers are back");
                if let Some(mut op) = op {
                    let (read, armed) = next(&mut op).await;
                    let e = read.err().expect("the cancel's completion");
                    assert_eq!(e.raw_os_error(), Some(libc::ECANCELED));
                    assert!(!armed);
                }
                assert_eq!(held(), base, "no op left");
            })
        });
    }

    #[test]
    fn op_slots_stay_small() {
        // Every idle connection's two pending reads hold one each.
        assert!(
            std::mem::size_of::<Op>() <= 72,
            "{}",
            std::mem::size_of::<Op>()
        );
    }

    #[test]
    fn the_kernel_release_is_read_as_major_and_minor() {
        assert!(release_at_least("6.18.44-fc-v1045", 6, 17));
        assert!(release_at_least("6.17.0", 6, 17));
        assert!(release_at_least("7.0", 6, 17));
        assert!(!release_at_least("6.16.9-arch1", 6, 17));
        assert!(!release_at_least("5.19.17", 6, 17));
        assert!(!release_at_least("garbage", 6, 17));
    }

    /// One op reads message after message, each in its own completion, and ends by itself at
    /// its byte cap: what is behind the cap stays in the socket, for the syscall reads.
    #[test]
    fn reads_stay_armed_across_messages_and_end_at_their_byte_cap() {
        exec::on_worker(|| {
            Box::pin(async {
                if !with(|d| d.multishot).expect("a driver") {
                    // One-shot reads on kernels before 6.17: each ends with its completion.
                    return;
                }
                let l = TcpListener::bind("127.0.0.1:0").expect("a listener");
                let (src, mut writer) = pair(&l);
                let base = baseline().await;
                let mut reads = reads(&src).expect("reads");
                for msg in [&b"first"[..], b"second"] {
                    writer.write_all(msg).expect("a write");
                    let (read, armed) = next(&mut reads).await;
                    assert_eq!(&read.expect("a read").expect("bytes")[..], msg);
                    assert!(armed, "the op stays armed after a message");
                }
                let sent = 11;
                // Past the cap: 16 KiB less what came already, and 100 bytes more.
                let rest = MULTISHOT_BYTES as usize - sent + 100;
                writer.write_all(&vec![9u8; rest]).expect("a write");
                let mut got = sent;
                loop {
                    let (read, armed) = next(&mut reads).await;
                    got += read.expect("a read").expect("bytes").len();
                    if !armed {
                        break;
                    }
                }
                // It ends with the read that reaches the cap.
                let cap = MULTISHOT_BYTES as usize;
                assert!(
                    (cap..cap + RING_BUF_SIZE).contains(&got),
                    "the op ends at its cap: {got} bytes"
                );
                let mut behind = [0u8; 200];
                poll(&src, libc::POLLIN as u32).await.expect("readable");
                let n = crate::relay::sys::recv(src.as_raw_fd(), &mut behind).expect("a recv");
                assert_eq!(
                    n,
                    sent + rest - got,
                    "what is past the cap is still in the socket"
                );
                assert_eq!(held(), base, "every buffer back, no op left");
            })
        });
    }

    /// A cancelled op ends with ECANCELED after what it read; one dropped with reads queued
    /// gives their buffers back and frees its slot once its last completion is in.
    #[test]
    fn cancelled_or_dropped_reads_give_every_buffer_back() {
        exec::on_worker(|| {
            Box::pin(async {
                let l = TcpListener::bind("127.0.0.1:0").expect("a listener");
                let (src, mut writer) = pair(&l);
                let multishot = with(|d| d.multishot).expect("a driver");
                let base = baseline().await;
                let mut op = reads(&src).expect("reads");
                writer.write_all(b"one").expect("a write");
                let (read, armed) = next(&mut op).await;
                assert_eq!(&read.expect("a read").expect("bytes")[..], b"one");
                if multishot {
                    assert!(armed);
                    op.cancel();
                    let (read, armed) = next(&mut op).await;
                    let e = read.err().expect("the cancel's completion");
                    assert_eq!(e.raw_os_error(), Some(libc::ECANCELED));
                    assert!(!armed, "a cancel ends the op");
                }
                drop(op);
                assert_eq!(held(), base);

                // Dropped with a read queued and the op still armed.
                let op = reads(&src).expect("reads");
                writer.write_all(b"two").expect("a write");
                turns_until(|| op.next_queued().is_some()).await;
                assert_eq!(held().0, base.0 + 1, "the queued read holds its buffer");
                drop(op);
                assert_eq!(held().0, base.0, "the drop gives the queued buffer back");
                // The cancel's completion frees the slot.
                turns_until(|| held() == base).await;
                // The bytes went with the dropped op; the socket still works.
                writer.write_all(b"three").expect("a write");
                let mut op = reads(&src).expect("reads");
                let (read, armed) = next(&mut op).await;
                assert_eq!(&read.expect("a read").expect("bytes")[..], b"three");
                if !armed {
                    // A one-shot read ends with its completion.
                    op = reads(&src).expect("reads");
                }
                drop(writer);
                let (read, armed) = next(&mut op).await;
                assert!(read.expect("EOF").is_none(), "EOF after the peer's close");
                assert!(!armed, "EOF ends the op");
                drop(op);
                assert_eq!(held(), base);
            })
        });
    }

    thread_local! {
        /// Makes this thread's multishot reads fail as a kernel that refuses the byte cap
        /// fails them (see [`reads`]).
        pub(super) static REFUSE_CAP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A kernel that says 6.17 or later but refuses the multishot read's byte cap: the relay's
    /// first reads fail with EINVAL having read nothing, the worker switches to one-shot reads
    /// (no byte is lost or reordered, both ways), and every buffer and op slot is back at the
    /// end.
    #[test]
    fn a_refused_byte_cap_switches_the_worker_to_one_shot_reads_and_loses_nothing() {
        exec::on_worker(|| {
            Box::pin(async {
                if !with(|d| d.multishot).expect("a driver") {
                    // A kernel before 6.17: reads are one-shot from the start.
                    return;
                }
                REFUSE_CAP.set(true);
                let l = TcpListener::bind("127.0.0.1:0").expect("a listener");
                let (client, mut client_peer) = pair(&l);
                let (server, mut server_peer) = pair(&l);
                let base = baseline().await;
                let done = Rc::new(std::cell::Cell::new(None));
                let ended = done.clone();
                exec::spawn(async move {
                    let meter = crate::relay::Meter::new();
                    let how = crate::relay::relay(
                        &client,
                        &server,
                        &meter,
                        crate::config::RelayMode::Copy,
                        crate::relay::Head::Nothing,
                    )
                    .await;
                    ended.set(Some((how, meter.bytes_up.get(), meter.bytes_down.get())));
                });
                let mut got = Vec::new();
                for (i, msg) in [&b"first"[..], b"second", b"third"].iter().enumerate() {
                    client_peer.write_all(msg).expect("a write");
                    let mut buf = vec![0u8; msg.len()];
                    read_exact_on_worker(&mut server_peer, &mut buf).await;
                    assert_eq!(&buf[..], *msg, "message {i} up");
                    server_peer.write_all(msg).expect("a write");
                    let mut back = vec![0u8; msg.len()];
                    read_exact_on_worker(&mut client_peer, &mut back).await;
                    got.extend_from_slice(&back);
                }
                assert_eq!(got, b"firstsecondthird");
                assert!(
                    !with(|d| d.multishot).expect("a driver"),
                    "the worker reads with one-shot ops from now on"
                );
                drop(client_peer);
                drop(server_peer);
                turns_until(|| done.get().is_some()).await;
                let (_, up, down) = done.get().expect("the relay's end");
                assert_eq!((up, down), (16, 16));
                turns_until(|| held() == base).await;
                REFUSE_CAP.set(false);
            })
        });
    }

    /// Reads exactly `buf.len()` bytes from a blocking std socket without blocking the worker:
    /// non-blocking reads between loop turns.
    async fn read_exact_on_worker(s: &mut TcpStream, buf: &mut [u8]) {
        s.set_nonblocking(true).expect("non-blocking");
        let mut at = 0;
        turns_until(|| {
            match s.read(&mut buf[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("a read: {e}"),
            }
            at == buf.len()
        })
        .await;
        s.set_nonblocking(false).expect("blocking");
    }

    impl RingSocket {
        async fn wait_writable(self: &Rc<Self>) {
            poll(self, libc::POLLOUT as u32).await.expect("writable");
        }
    }
}
