//! Workers: one thread per core, each with its own executor and io_uring (pinned to a CPU only
//! when `[global] cpu_affinity` asks).
//!
//! A worker owns its SO_REUSEPORT listeners and every connection it accepts for their whole
//! lives. The control thread talks to it only through [`WorkerCommand`]s and the published
//! snapshot; nothing on a worker blocks on another thread.

mod accept;
pub mod budget;
pub mod conns;
pub mod deadline;
pub mod exec;
pub mod gate;
pub mod hedge;
pub mod io;
pub mod listener;
pub mod local;
pub mod queue;
pub mod ring;
pub mod route;
pub mod sources;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::backend::{BackendState, Published};
use crate::config::{CpuAffinity, IoMode};
use crate::relay::pool::PoolStats;
use io::{Epoll, Io, Uring};

pub use accept::ListenerSlot;

/// What the data path tells the control thread.
#[derive(Debug)]
pub enum DataEvent {
    /// Passive health: `error_limit` consecutive failed connects; the worker already marked
    /// the backend down, the control thread logs it and hands it to the active checks.
    PassiveDown {
        backend: Arc<BackendState>,
        error: String,
    },
}

/// State all workers share.
pub struct Shared {
    pub published: Published,
    /// Open client connections across all workers, for `max_connections`.
    pub active: AtomicUsize,
    /// The cap in force: the config's `max_connections`, lowered to what the fd limit allows.
    pub max_connections: AtomicUsize,
    /// Admin connections that may be held at once (from the fd budget).
    pub admin_connections: AtomicUsize,
    /// Copy, splice or splice-auto; read at start (a change needs a restart).
    pub relay_mode: crate::config::RelayMode,
    /// The workers' runtime: "io_uring", or "epoll" (the fallback).
    pub io_name: &'static str,
    pub events: mpsc::UnboundedSender<DataEvent>,
    /// Accept loops waiting at the cap, and the bell that wakes them when a connection closes.
    pub paused: AtomicUsize,
    pub capacity: Notify,
    /// Times the workers stopped accepting because `max_connections` was reached.
    pub accept_paused_total: AtomicU64,
    last_pause_log: Mutex<Option<Instant>>,
    /// One per worker: rung to make its sweeper look for killed connections now.
    pub kill_bells: Vec<Arc<Notify>>,
    /// One per worker: its buffer and pipe pools.
    pub pools: Vec<Arc<PoolStats>>,
    /// Pipes each worker may lend at once (from the fd budget).
    pub pipe_limit: usize,
    /// RLIMIT_NOFILE in force.
    pub fd_limit: u64,
    pub local: Arc<local::LocalErrors>,
}

/// How often "max_connections reached" may be logged.
const PAUSE_LOG_EVERY: Duration = Duration::from_secs(10);

impl Shared {
    pub fn new(
        published: Published,
        workers: usize,
        budget: &budget::FdBudget,
        (io_name, relay_mode): (&'static str, crate::config::RelayMode),
        events: mpsc::UnboundedSender<DataEvent>,
    ) -> Shared {
        Shared {
            published,
            active: AtomicUsize::new(0),
            max_connections: AtomicUsize::new(budget.max_connections),
            admin_connections: AtomicUsize::new(budget.admin_connections),
            relay_mode,
            io_name,
            events,
            paused: AtomicUsize::new(0),
            capacity: Notify::new(),
            accept_paused_total: AtomicU64::new(0),
            last_pause_log: Mutex::new(None),
            kill_bells: (0..workers).map(|_| Arc::new(Notify::new())).collect(),
            pools: (0..workers).map(|_| Arc::default()).collect(),
            pipe_limit: budget.pipes_per_worker,
            fd_limit: budget.limit,
            local: Arc::default(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Closes every open connection through `backend`, on every worker: spread over `pace`
    /// (a paced drain), or at once if it is zero.
    pub fn kill_connections(&self, backend: &BackendState, pace: Duration) {
        backend.bump_kill_epoch(pace);
        for bell in &self.kill_bells {
            bell.notify_one();
        }
    }

    /// Counts a pause at the cap and logs it at most once per [`PAUSE_LOG_EVERY`].
    fn note_paused(&self) {
        self.accept_paused_total.fetch_add(1, Ordering::Relaxed);
        let mut last = self
            .last_pause_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= PAUSE_LOG_EVERY) {
            *last = Some(Instant::now());
            crate::warn!(
                "max_connections ({}) reached: not accepting new connections until some close; \
                 new clients wait in the listen queue (logged at most once per {}s)",
                self.max_connections.load(Ordering::Relaxed),
                PAUSE_LOG_EVERY.as_secs()
            );
        }
    }

    /// Relay buffers and pipes on loan across all workers (they are lent only while bytes
    /// are in flight, so this is 0 when every connection is idle).
    pub fn pool_totals(&self) -> PoolTotals {
        let mut t = PoolTotals::default();
        for p in &self.pools {
            t.buffers_in_use += p.buffers_in_use.load(Ordering::Relaxed);
            t.buffers_free += p.buffers_free.load(Ordering::Relaxed);
            t.pipes_in_use += p.pipes_in_use.load(Ordering::Relaxed);
            t.pipes_free += p.pipes_free.load(Ordering::Relaxed);
            t.pipe_unavailable_total += p.pipe_unavailable_total.load(Ordering::Relaxed);
            t.ring_empty_total += p.ring_empty_total.load(Ordering::Relaxed);
            t.tails_in_use += p.tails_in_use.load(Ordering::Relaxed);
            t.ring_buffers_in_use += p.ring_buffers_in_use.load(Ordering::Relaxed);
        }
        t
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PoolTotals {
    pub buffers_in_use: usize,
    pub buffers_free: usize,
    pub pipes_in_use: usize,
    pub pipes_free: usize,
    pub pipe_unavailable_total: u64,
    pub ring_empty_total: u64,
    pub tails_in_use: usize,
    pub ring_buffers_in_use: usize,
}

pub enum WorkerCommand {
    /// Start accepting on a bound listener for a frontend; `id` names it for `Unlisten`.
    Listen {
        id: u64,
        frontend: String,
        listener: std::net::TcpListener,
        /// Passed by the service manager: closing only stops accepting (see
        /// `listener::activation`).
        external: bool,
    },
    /// Stop accepting on one listener (the frontend or address was removed), once what its
    /// queue holds is served.
    Unlisten { id: u64 },
    /// Stop accepting on all listeners (graceful stop), once their queues are served; open
    /// connections continue. `done` is dropped when every listener of the worker is closed.
    /// `hand_over` (a binary upgrade): only stop accepting, at once; the new process accepts
    /// on the same sockets, so nothing is shut down and the queues stay whole.
    StopAccepting {
        done: Arc<ListenersClosed>,
        hand_over: bool,
    },
}

/// Rings when the last clone is dropped: every worker has closed its listeners (each worker
/// holds one clone per listener until that listener is closed, then drops it).
pub struct ListenersClosed(Option<tokio::sync::oneshot::Sender<()>>);

impl ListenersClosed {
    pub fn new() -> (Arc<ListenersClosed>, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Arc::new(ListenersClosed(Some(tx))), rx)
    }
}

impl Drop for ListenersClosed {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

pub struct WorkerHandle {
    pub index: usize,
    tx: mpsc::UnboundedSender<WorkerCommand>,
    _thread: JoinHandle<()>,
}

impl WorkerHandle {
    pub fn send(&self, cmd: WorkerCommand) {
        // A worker only goes away when the process does.
        let _ = self.tx.send(cmd);
    }
}

/// Picks the runtime for `mode`: io_uring if allowed, else epoll (only in `auto`).
pub fn choose_io(mode: IoMode) -> std::io::Result<&'static str> {
    match mode {
        IoMode::Epoll => Ok(Epoll::NAME),
        IoMode::IoUring => io::io_uring_available().map(|_| Uring::NAME).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("io_uring is unavailable ({e}) and the config says io = \"io_uring\""),
            )
        }),
        IoMode::Auto => Ok(match io::io_uring_available() {
            Ok(()) => Uring::NAME,
            Err(e) => {
                crate::warn!(
                    "io_uring is unavailable ({e}): using the epoll fallback; check sysctl \
                     kernel.io_uring_disabled and the container's seccomp profile"
                );
                Epoll::NAME
            }
        }),
    }
}

/// Starts `count` workers on the runtime named by `io_name` (from [`choose_io`]), where they
/// run (`affinity`), and with `ring_buffers` in each io_uring buffer ring.
pub fn spawn(
    count: usize,
    io_name: &'static str,
    (affinity, ring_buffers): (&CpuAffinity, u16),
    shared: Arc<Shared>,
) -> std::io::Result<Vec<WorkerHandle>> {
    let allowed = allowed_cpus();
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let cpu = affinity.cpu_for(index, &allowed);
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ringlb-w{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(index, cpu);
                }
                crate::backend::per_worker::set_slot(index);
                let uring = io_name == Uring::NAME;
                if uring {
                    if let Err(e) = ring::init(ring_buffers) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    let _ = ready_tx.send(Ok(()));
                    if let Err(e) = exec::block_on(run::<Uring>(index, rx, shared)) {
                        crate::error!("worker {index} stopped: {e}");
                    }
                    return;
                }
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let local = tokio::task::LocalSet::new();
                rt.block_on(local.run_until(run::<Epoll>(index, rx, shared)));
            })?;
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("worker thread died at start")))?;
        out.push(WorkerHandle {
            index,
            tx,
            _thread: thread,
        });
    }
    Ok(out)
}

/// The epoll fallback's executor: tokio's current-thread runtime. (On io_uring the worker runs
/// its own, `worker::exec`, on a ring set up with DEFER_TASKRUN or COOP_TASKRUN: a completion
/// does not interrupt the worker with an IPI, measured as the difference between 0.6x and
/// 1.0x HAProxy's keep-alive requests per second.)
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The CPUs this process may run on, ascending (its affinity mask, which a cpuset or
/// `taskset` narrows); empty if the kernel will not say.
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Pins the calling worker thread to `cpu` (`[global] cpu_affinity`). Pinning is an
/// optimisation: where the kernel refuses it (a container's cpuset changed under us), the
/// worker runs unpinned and says so.
fn pin_to_cpu(index: usize, cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let pinned = set.set(cpu).is_ok()
        && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_ok();
    if !pinned {
        crate::warn!("worker {index}: cannot pin to CPU {cpu}; it runs unpinned");
    }
}

async fn run<I: Io>(
    index: usize,
    mut rx: mpsc::UnboundedReceiver<WorkerCommand>,
    shared: Arc<Shared>,
) {
    crate::relay::pool::init(shared.pools[index].clone(), shared.pipe_limit);
    I::spawn(conns::sweeper(shared.kill_bells[index].clone()));
    I::spawn(deadline::drive());
    // Usually one slot per listener id; more when an upgrade passed more sockets per address
    // than there are workers.
    let mut listeners: HashMap<u64, Vec<Rc<ListenerSlot<I>>>> = HashMap::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            WorkerCommand::Listen {
                id,
                frontend,
                listener,
                external,
            } => match ListenerSlot::<I>::new(frontend, listener, external, &shared) {
                Ok(slot) => {
                    let slot = Rc::new(slot);
                    I::spawn(accept::accept_loop(slot.clone(), shared.clone()));
                    listeners.entry(id).or_default().push(slot);
                }
                Err(e) => crate::error!("worker cannot use a listener: {e}"),
            },
            WorkerCommand::Unlisten { id } => {
                for slot in listeners.remove(&id).unwrap_or_default() {
                    I::spawn(accept::close_gracefully(slot, shared.clone()));
                }
            }
            WorkerCommand::StopAccepting { done, hand_over } => {
                for slot in listeners.drain().flat_map(|(_, slots)| slots) {
                    if hand_over {
                        slot.stop_accepting();
                        continue;
                    }
                    let (shared, done) = (shared.clone(), done.clone());
                    I::spawn(async move {
                        accept::close_gracefully(slot, shared).await;
                        drop(done);
                    });
                }
                drop(done);
            }
        }
    }
}

/// Shuts a listening socket: stops the kernel queueing connections on it and completes a
/// pending readiness wait on it, so the accept loop ends.
fn shutdown_listener(fd: RawFd) {
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
}
