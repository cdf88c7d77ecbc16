//! The io_uring worker's executor: one thread, its tasks, its timers and its ring, parked in
//! one `io_uring_enter` that submits, waits and reaps.
//!
//! tokio's current-thread executor parked in `epoll_wait` on the ring's fd, with a second
//! syscall (the submit) per loop turn and its scheduler's work around both. Here a loop turn
//! is:
//!
//! 1. poll the tasks that were woken, in the order they were woken;
//! 2. take the wakes that came from other threads (a channel's sender on the control thread);
//! 3. fire the timers that are due (`worker::deadline`'s wheel, the worker's only timers);
//! 4. with tasks still ready, submit and reap without waiting; otherwise submit and wait in
//!    the kernel for the first completion, the next timer or a wake from another thread
//!    ([`super::ring::park`]).
//!
//! A task is a boxed future in a slot of the thread's table. Its waker is the task's id
//! (executor, slot, generation) packed in the waker's data word: no allocation and no
//! reference count per task, and a stale waker (of a task that finished) finds nothing.
//! Woken on its own thread, a task goes on the ready queue; woken from another one, on its
//! executor's locked queue, and an eventfd the ring polls wakes the worker if it sleeps. The
//! one `unsafe` is the waker's construction; the futures never leave their thread.
//!
//! Tasks are only ever spawned ([`spawn`]), never joined: a worker's tasks are its accept
//! loops, its connections and its housekeeping, none of which hands back a value.

#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, RawWaker, RawWakerVTable, Waker};

use super::{deadline, ring};

/// Tasks polled before the ring is submitted and reaped again, when tasks keep waking each
/// other: what they queued goes in, and completions get their turn.
const POLLS_PER_TURN: usize = 256;

type Task = Pin<Box<dyn Future<Output = ()>>>;

// A waker is its task's id packed in the waker's data word, no allocation and no count:
// executor (12 bits) | slot (24 bits) | generation (28 bits).
const _: () = assert!(usize::BITS == 64, "task ids are packed in a 64-bit word");
const SLOT_BITS: u32 = 24;
const GEN_BITS: u32 = 28;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
const MAX_EXECUTORS: usize = 1 << (64 - SLOT_BITS - GEN_BITS);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Id {
    exec: u16,
    slot: u32,
    generation: u32,
}

impl Id {
    fn pack(self) -> usize {
        ((self.exec as usize) << (SLOT_BITS + GEN_BITS))
            | ((self.slot as usize) << GEN_BITS)
            | (self.generation & GEN_MASK) as usize
    }

    fn unpack(word: usize) -> Id {
        Id {
            exec: (word >> (SLOT_BITS + GEN_BITS)) as u16,
            slot: ((word >> GEN_BITS) & ((1 << SLOT_BITS) - 1)) as u32,
            generation: (word as u32) & GEN_MASK,
        }
    }

    fn waker(self) -> Waker {
        let raw = RawWaker::new(self.pack() as *const (), &VTABLE);
        // SAFETY: the vtable's functions keep RawWaker's contract: the data word is a plain
        // integer (cloned by copy, nothing to free), and waking from any thread is sound
        // (`wake` touches only this thread's state or locked, shared state).
        unsafe { Waker::from_raw(raw) }
    }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_raw, drop_raw);

fn clone_raw(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}

fn wake_raw(data: *const ()) {
    wake(Id::unpack(data as usize));
}

fn drop_raw(_: *const ()) {}

struct Slot {
    /// Masked to GEN_BITS when compared.
    generation: u32,
    /// On the ready queue: a second local wake before the poll adds nothing.
    queued: Cell<bool>,
    /// `None` while the task is being polled (or once it is done).
    task: Option<Task>,
}

/// The worker's side for other threads: wakes they queue, and the eventfd that rings.
struct Remote {
    woken: Mutex<Vec<Id>>,
    /// Something is in `woken`: the loop looks before it sleeps.
    pending: AtomicBool,
    /// The worker is (about to be) asleep in the kernel: a remote wake must ring.
    sleeping: AtomicBool,
    bell: OwnedFd,
}

impl Remote {
    fn ring_bell(&self) {
        let one: u64 = 1;
        // A full counter (never, at one per sleep) or a closed worker: nothing to wake.
        let _ = nix::unistd::write(self.bell.as_fd(), &one.to_ne_bytes());
    }
}

/// Every running executor's remote side, by its index in a task id (`None` once it ended).
static REMOTES: RwLock<Vec<Option<Arc<Remote>>>> = RwLock::new(Vec::new());

struct Local {
    index: u16,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    ready: RefCell<VecDeque<Id>>,
    remote: Arc<Remote>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
}

fn local() -> Option<Rc<Local>> {
    LOCAL.try_with(|l| l.borrow().clone()).ok().flatten()
}

/// Whether this thread runs on this executor (its tasks spawn with [`spawn`]).
pub fn running() -> bool {
    LOCAL.try_with(|l| l.borrow().is_some()).unwrap_or(false)
}

/// Queues a woken task: on its own thread on the ready queue, from elsewhere on its
/// executor's locked queue (ringing the bell if the worker sleeps). A stale id (a task that
/// finished) is dropped when it comes up.
fn wake(id: Id) {
    let mine = LOCAL
        .try_with(|l| {
            let l = l.borrow();
            let Some(l) = l.as_ref().filter(|l| l.index == id.exec) else {
                return false;
            };
            // The table is borrowed mutably only for moments that never wake; if it is, the
            // wake goes in without the check (a spurious poll at worst).
            if let Ok(slots) = l.slots.try_borrow() {
                match slots.get(id.slot as usize) {
                    Some(s) if s.generation & GEN_MASK == id.generation => {
                        if s.queued.replace(true) {
                            return true;
                        }
                    }
                    _ => return true,
                }
            }
            l.ready.borrow_mut().push_back(id);
            true
        })
        .unwrap_or(false);
    if mine {
        return;
    }
    let remote = REMOTES
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(id.exec as usize)
        .cloned()
        .flatten();
    let Some(r) = remote else {
        return;
    };
    r.woken.lock().unwrap_or_else(|e| e.into_inner()).push(id);
    r.pending.store(true, Ordering::SeqCst);
    if r.sleeping.load(Ordering::SeqCst) {
        r.ring_bell();
    }
}

/// Spawns a task on this thread's executor. Outside one (a thread that runs tokio), it goes
/// to tokio's `spawn_local`.
pub fn spawn(f: impl Future<Output = ()> + 'static) {
    match local() {
        Some(l) => l.spawn(Box::pin(f)),
        None => {
            tokio::task::spawn_local(f);
        }
    }
}

impl Local {
    fn spawn(&self, task: Task) {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None if slots.len() < 1 << SLOT_BITS => {
                slots.push(Slot {
                    generation: 0,
                    queued: Cell::new(false),
                    task: None,
                });
                (slots.len() - 1) as u32
            }
            None => {
                // 16.7 million tasks on one worker: far past any fd limit.
                crate::error!("worker cannot spawn a task: {} are running", slots.len());
                return;
            }
        };
        let Some(slot) = slots.get_mut(index as usize) else {
            return;
        };
        slot.generation = slot.generation.wrapping_add(1);
        slot.queued.set(true);
        slot.task = Some(task);
        self.ready.borrow_mut().push_back(Id {
            exec: self.index,
            slot: index,
            generation: slot.generation & GEN_MASK,
        });
    }

    /// Polls one woken task; false when none is ready.
    fn poll_one(&self) -> bool {
        let Some(id) = self.ready.borrow_mut().pop_front() else {
            return false;
        };
        let taken = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(id.slot as usize) {
                Some(s) if s.generation & GEN_MASK == id.generation => {
                    s.queued.set(false);
                    s.task.take()
                }
                _ => None,
            }
        };
        let Some(mut task) = taken else {
            return true;
        };
        let waker = id.waker();
        let done = task
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready();
        if done {
            // Dropped outside the table's borrow: its drop may spawn or wake.
            drop(task);
            let mut slots = self.slots.borrow_mut();
            if let Some(s) = slots.get_mut(id.slot as usize) {
                s.generation = s.generation.wrapping_add(1);
                s.queued.set(false);
                self.free.borrow_mut().push(id.slot);
            }
        } else if let Some(s) = self.slots.borrow_mut().get_mut(id.slot as usize) {
            s.task = Some(task);
        }
        true
    }

    /// Moves the wakes from other threads onto the ready queue.
    fn take_remote(&self) {
        if !self.remote.pending.swap(false, Ordering::SeqCst) {
            return;
        }
        let woken =
            std::mem::take(&mut *self.remote.woken.lock().unwrap_or_else(|e| e.into_inner()));
        for id in woken {
            wake(id);
        }
    }
}

/// Runs `main` and the tasks it spawns on this thread until `main` returns; the tasks left
/// are dropped then, and their sockets closed. The thread's ring (`ring::init`) must be set
/// up first, and must take a timed wait (`ring::can_park`).
pub fn block_on(main: impl Future<Output = ()> + 'static) -> std::io::Result<()> {
    if !ring::can_park() {
        return Err(std::io::Error::other(
            "the executor needs this thread's io_uring, with timed waits (Linux 5.11)",
        ));
    }
    let bell = nix::sys::eventfd::EventFd::from_value_and_flags(
        0,
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
    )?;
    let remote = Arc::new(Remote {
        woken: Mutex::new(Vec::new()),
        pending: AtomicBool::new(false),
        sleeping: AtomicBool::new(false),
        bell: OwnedFd::from(bell),
    });
    let registered = Registered::new(remote.clone())?;
    let l = Rc::new(Local {
        index: registered.0,
        slots: RefCell::new(Vec::new()),
        free: RefCell::new(Vec::new()),
        ready: RefCell::new(VecDeque::new()),
        remote: remote.clone(),
    });
    LOCAL.with(|x| *x.borrow_mut() = Some(l.clone()));
    deadline::set_fired_by_executor(true);
    let done = Rc::new(Cell::new(false));
    {
        let done = done.clone();
        l.spawn(Box::pin(async move {
            main.await;
            done.set(true);
        }));
    }
    l.spawn(Box::pin(listen_for_bell(remote.clone())));
    let mut due = Vec::new();
    while !done.get() {
        let mut polled = 0;
        while polled < POLLS_PER_TURN && l.poll_one() {
            polled += 1;
            if done.get() {
                break;
            }
        }
        if done.get() {
            break;
        }
        l.take_remote();
        let next = deadline::fire_due(&mut due);
        for w in due.drain(..) {
            w.wake();
        }
        if !l.ready.borrow().is_empty() {
            ring::flush();
            continue;
        }
        remote.sleeping.store(true, Ordering::SeqCst);
        if remote.pending.load(Ordering::SeqCst) {
            remote.sleeping.store(false, Ordering::SeqCst);
            continue;
        }
        let wait = next.map(|at| at.saturating_duration_since(tokio::time::Instant::now()));
        ring::park(wait);
        remote.sleeping.store(false, Ordering::SeqCst);
        ring::reap();
    }
    l.wind_down();
    LOCAL.with(|x| *x.borrow_mut() = None);
    deadline::set_fired_by_executor(false);
    drop(registered);
    Ok(())
}

/// How long the executor's end waits for the ring to finish what the dropped tasks left (their
/// cancels, then their sockets' closes).
const WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(1);

impl Local {
    /// Drops every task left, and drives the ring until what their drops queued (cancels, and
    /// the closes that the cancels' completions release) has completed, or [`WIND_DOWN`] has
    /// passed. Tasks spawned meanwhile are dropped too.
    fn wind_down(&self) {
        let until = std::time::Instant::now() + WIND_DOWN;
        loop {
            let tasks: Vec<Task> = self
                .slots
                .borrow_mut()
                .iter_mut()
                .filter_map(|s| s.task.take())
                .collect();
            let none = tasks.is_empty();
            drop(tasks);
            ring::flush();
            if none && !ring::busy() {
                return;
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                crate::warn!("worker ended with io_uring ops still in flight");
                return;
            }
            ring::park(Some(left.min(std::time::Duration::from_millis(10))));
            ring::reap();
        }
    }
}

/// An executor's place in [`REMOTES`], cleared when dropped (also when `block_on` unwinds).
struct Registered(u16);

impl Registered {
    fn new(remote: Arc<Remote>) -> std::io::Result<Registered> {
        let mut all = REMOTES.write().unwrap_or_else(|e| e.into_inner());
        let index = match all.iter().position(Option::is_none) {
            Some(i) => i,
            None if all.len() < MAX_EXECUTORS => {
                all.push(None);
                all.len() - 1
            }
            None => return Err(std::io::Error::other("too many executors in one process")),
        };
        all[index] = Some(remote);
        Ok(Registered(index as u16))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // The bell closes with the last reference (a poll op still in flight holds one).
        if let Some(r) = REMOTES
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(self.0 as usize)
        {
            *r = None;
        }
    }
}

/// The task that empties the bell: a read poll on the eventfd through the ring, so that a
/// wake from another thread ends the worker's wait in the kernel. What was woken is taken by
/// the loop.
async fn listen_for_bell(remote: Arc<Remote>) {
    let bell = Rc::new(Bell(remote));
    let mut failed = false;
    loop {
        match ring::poll(&bell, libc::POLLIN as u32).await {
            Ok(_) => failed = false,
            Err(e) => {
                // Until the poll is back, a wake from another thread waits for the next
                // completion or timer: try again soon rather than give up.
                if !failed {
                    crate::warn!("worker cannot watch its wake-up eventfd ({e}); retrying");
                }
                failed = true;
                deadline::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let mut count = [0u8; 8];
        let _ = nix::unistd::read(bell.as_raw_fd(), &mut count);
    }
}

/// The eventfd, kept open by the poll op that names it.
struct Bell(Arc<Remote>);

impl AsRawFd for Bell {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.bell.as_raw_fd()
    }
}

/// Runs `f` on a thread of its own with a ring (of 8 buffers) and this executor, as a worker
/// does; a panic in `f` fails the caller.
#[cfg(test)]
pub(crate) fn on_worker(f: impl FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send + 'static) {
    std::thread::spawn(move || {
        ring::init(8).expect("a ring");
        block_on(f()).expect("the executor");
    })
    .join()
    .expect("the worker thread");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn spawned_tasks_run_and_timers_fire_in_order_not_before_their_instant() {
        on_worker(|| {
            Box::pin(async {
                let order = Rc::new(RefCell::new(Vec::new()));
                let start = Instant::now();
                for (name, ms) in [("late", 60), ("soon", 20)] {
                    let order = order.clone();
                    spawn(async move {
                        deadline::sleep(Duration::from_millis(ms)).await;
                        assert!(start.elapsed() >= Duration::from_millis(ms));
                        order.borrow_mut().push(name);
                    });
                }
                let got = deadline::timeout(Duration::from_millis(5), std::future::pending::<()>());
                assert!(got.await.is_err(), "a pending future outlived its timeout");
                while order.borrow().len() < 2 {
                    deadline::sleep(Duration::from_millis(5)).await;
                }
                assert_eq!(*order.borrow(), ["soon", "late"]);
            })
        });
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_sleep_in_the_kernel() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let sender = std::thread::spawn(move || {
            // Long enough for the worker to be asleep in io_uring_enter with no timer set.
            std::thread::sleep(Duration::from_millis(50));
            tx.send(7).expect("the worker waits");
        });
        on_worker(move || {
            Box::pin(async move {
                assert_eq!(rx.await.expect("a value"), 7);
            })
        });
        sender.join().expect("the sender");
    }

    #[test]
    fn finished_tasks_free_their_slots_and_those_left_when_main_returns_are_dropped() {
        use std::sync::atomic::AtomicU32;
        struct Count(Arc<AtomicU32>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let dropped = Arc::new(AtomicU32::new(0));
        let d = dropped.clone();
        on_worker(move || {
            Box::pin(async move {
                for _ in 0..1000 {
                    let c = Count(d.clone());
                    spawn(async move {
                        let _c = c;
                    });
                    // Each finishes at its first poll: one slot serves them all.
                    deadline::sleep(Duration::from_millis(0)).await;
                }
                assert_eq!(d.load(Ordering::Relaxed), 1000);
                let slots = local().map(|l| l.slots.borrow().len()).unwrap_or(0);
                assert!(slots <= 3, "{slots} slots for 1000 short tasks");
                // Never finishes: dropped when this task returns.
                let c = Count(d.clone());
                spawn(async move {
                    let _c = c;
                    std::future::pending::<()>().await;
                });
            })
        });
        assert_eq!(dropped.load(Ordering::Relaxed), 1001);
    }

    #[test]
    fn the_sockets_of_tasks_left_when_main_returns_are_closed() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let mut client = std::net::TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("a connect");
        let (server, _) = listener.accept().expect("an accept");
        on_worker(move || {
            Box::pin(async move {
                let sock = Rc::new(ring::RingSocket::new(socket2::Socket::from(server)));
                spawn(async move {
                    // Bytes that never come: the poll is in flight when main returns.
                    let _ = ring::poll(&sock, libc::POLLIN as u32).await;
                });
                // One loop turn, in which the task starts its poll.
                deadline::sleep(Duration::ZERO).await;
            })
        });
        // The poll's cancel, then the socket's close op, went in before the thread ended.
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a timeout");
        let mut byte = [0u8; 1];
        assert_eq!(client.read(&mut byte).expect("EOF, not a timeout"), 0);
    }
}
