//! The control side of a running ringlb: owns the config, the registry, the workers and their
//! listeners; publishes snapshots; applies reloads; runs the graceful stop.
//!
//! It runs on the control thread (a plain tokio runtime). Workers never call into it; they
//! read the published snapshot and send [`DataEvent`]s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::backend::{BackendState, Published, Rebuild, Registry, Snapshot};
use crate::config::{self, Config, ConfigError};
use crate::discovery;
use crate::worker::{
    self, budget,
    listener::{activation::Inherited, bind_reuseport, ForeignWatch},
    DataEvent, Shared, WorkerCommand, WorkerHandle,
};

/// The listeners of one (frontend, configured address): one socket per worker.
struct ListenerGroup {
    id: u64,
    bound: SocketAddr,
    /// Passed by the service manager (`LISTEN_FDS`): never shut down by ringlb, and not
    /// removable by a reload.
    external: bool,
    /// The workers' fds for these sockets, for a binary upgrade to pass on (`crate::upgrade`).
    /// Numbers only, not owned: a worker closes its listener only after `Unlisten` or
    /// `StopAccepting`, which are sent once the group has left `Server::listeners`, so the
    /// numbers name these sockets for as long as the group is there. (A worker that could
    /// not use a listener closes it at once; the new process then finds that number closed or
    /// not a listener on this address, and refuses the hand-off naming it.) Copies would cost
    /// an fd per socket.
    handoff: Vec<std::os::fd::RawFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start workers: {0} (is io_uring available? see docs/operations.md)")]
    Workers(std::io::Error),
    #[error("frontend \"{frontend}\": cannot listen on {addr}: {source}")]
    Bind {
        frontend: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Inherited(String),
    #[error("admin: cannot listen on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a reload did, for logs, metrics and tests.
#[derive(Debug)]
pub enum ReloadOutcome {
    Unchanged,
    Applied(config::ConfigDiff),
    Failed(String),
}

pub struct Server {
    pub config_path: Option<PathBuf>,
    pub config: Arc<Config>,
    pub registry: Registry,
    pub published: Published,
    pub shared: Arc<Shared>,
    pub generation: u64,
    /// RLIMIT_NOFILE in force; `max_connections` is planned against it at start and reload.
    pub fd_limit: u64,
    workers: Vec<WorkerHandle>,
    listeners: HashMap<(String, SocketAddr), ListenerGroup>,
    next_listener_id: u64,
    foreign: ForeignWatch,
    /// The config as loaded, before `discover` entries are expanded; `config` is this
    /// expanded with `discovered` (`discovery::expand`).
    pub base: Arc<Config>,
    /// The addresses each `discover` entry found last.
    pub discovered: discovery::Found,
    pub discovery_stats: Arc<discovery::Stats>,
    /// Bound (or passed) at start, accepted on from [`Server::open_listeners`].
    unopened: Vec<(String, SocketAddr, Vec<std::net::TcpListener>, bool)>,
}

impl Server {
    /// Starts workers and binds every listener. Must run inside a tokio runtime (the control
    /// thread's) because the data path reports to it over a tokio channel.
    /// `passed` are the frontends' sockets an upgrading ringlb passed (`upgrade::take_passed`).
    pub fn start(
        config: Config,
        config_path: Option<PathBuf>,
        passed: Vec<(crate::upgrade::Entry, socket2::Socket)>,
    ) -> Result<(Server, mpsc::UnboundedReceiver<DataEvent>), StartError> {
        let config = Arc::new(config);
        let mut registry = Registry::default();
        if let Some(path) = &config.admin.state_file {
            // The registry creates each backend's live state as a snapshot is built; the saved
            // runtime state (drain, maint, weights, disabled frontends) goes onto those states
            // before the snapshot the workers first see.
            let _ = Snapshot::build(config.clone(), &mut registry, 0);
            crate::admin::statefile::restore(path, &registry);
        }
        let snapshot = Snapshot::build(config.clone(), &mut registry, 1);
        let published: Published = Arc::new(ArcSwap::from_pointee(snapshot));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let fd_limit = budget::raise_nofile_limit();
        let fds = budget::plan(&config, fd_limit);
        fds.warn_if_lowered(config.global.max_connections);
        let io_name = worker::choose_io(config.global.io).map_err(StartError::Workers)?;
        let shared = Arc::new(Shared::new(
            published.clone(),
            config.global.workers,
            &fds,
            (io_name, config.global.relay),
            events_tx,
        ));
        let workers = worker::spawn(
            config.global.workers,
            io_name,
            (&config.global.cpu_affinity, config.global.ring_buffers),
            shared.clone(),
        )
        .map_err(StartError::Workers)?;
        let mut server = Server {
            config_path,
            config: config.clone(),
            registry,
            published,
            shared,
            generation: 1,
            fd_limit,
            workers,
            listeners: HashMap::new(),
            next_listener_id: 1,
            foreign: ForeignWatch::default(),
            base: config.clone(),
            discovered: discovery::Found::new(),
            discovery_stats: Arc::default(),
            unopened: Vec::new(),
        };
        crate::info!(
            "ringlb {} starting: {} workers on {io_name} ({} relay), {}, {} frontends, \
             max_connections {} (open-file limit {})",
            env!("CARGO_PKG_VERSION"),
            config.global.workers,
            config.global.relay.as_str(),
            config.global.cpu_affinity.describe(config.global.workers),
            config.frontends.len(),
            fds.max_connections,
            fd_limit
        );
        // Sockets passed by the service manager first, so that one no frontend names is
        // reported as such before anything is bound.
        let mut inherited = Inherited::take(passed).map_err(StartError::Inherited)?;
        let count = server.workers.len();
        let mut passed = Vec::new();
        for f in &config.frontends {
            for &addr in &f.listen {
                passed.push(inherited.take_for(&f.name, addr, count));
            }
        }
        if let Some(e) = inherited.leftover() {
            return Err(StartError::Inherited(e));
        }
        let mut passed = passed.into_iter();
        let mut pending = Vec::new();
        for f in &config.frontends {
            if server.registry.frontend_disabled(&f.name) {
                crate::warn!(
                    "frontend {} is disabled (saved runtime state): not listening",
                    f.name
                );
                continue;
            }
            for &addr in &f.listen {
                let bind_error = |source| StartError::Bind {
                    frontend: f.name.clone(),
                    addr,
                    source,
                };
                let (sockets, external) = match passed.next().flatten() {
                    Some(shared) => {
                        let (sockets, external) = shared.map_err(bind_error)?;
                        if !external {
                            let at = sockets
                                .first()
                                .and_then(|s| s.local_addr().ok())
                                .unwrap_or(addr);
                            crate::info!(
                                "frontend {}: {} sockets on {at} passed by process {} (upgrade)",
                                f.name,
                                sockets.len(),
                                std::os::unix::process::parent_id()
                            );
                        }
                        (sockets, external)
                    }
                    None => (bind_reuseport(addr, count).map_err(bind_error)?, false),
                };
                pending.push((f.name.clone(), addr, sockets, external));
            }
        }
        server.unopened = pending;
        Ok((server, events_rx))
    }

    /// Starts accepting on the listeners [`Server::start`] bound or took over. Separate, so
    /// that the start can still fail (the admin listener) before any client is accepted: a
    /// new process of an upgrade that accepted and then failed would cut what it accepted.
    pub fn open_listeners(&mut self) {
        for (frontend, addr, sockets, external) in std::mem::take(&mut self.unopened) {
            self.install_listeners(frontend, addr, sockets, external);
        }
    }

    fn install_listeners(
        &mut self,
        frontend: String,
        addr: SocketAddr,
        sockets: Vec<std::net::TcpListener>,
        external: bool,
    ) {
        let id = self.next_listener_id;
        self.next_listener_id += 1;
        let bound = sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(addr);
        let mut handoff = Vec::with_capacity(sockets.len());
        // Socket i to worker i % workers: one each, or several when an upgrade passed more.
        for (i, socket) in sockets.into_iter().enumerate() {
            handoff.push(std::os::fd::AsRawFd::as_raw_fd(&socket));
            if let Some(w) = self.workers.get(i % self.workers.len().max(1)) {
                w.send(WorkerCommand::Listen {
                    id,
                    frontend: frontend.clone(),
                    listener: socket,
                    external,
                });
            }
        }
        if external {
            crate::info!("frontend {frontend}: {bound} passed by the service manager");
        }
        crate::info!("frontend {frontend} listening on {bound}");
        self.listeners.insert(
            (frontend, addr),
            ListenerGroup {
                id,
                bound,
                external,
                handoff,
            },
        );
    }

    /// The addresses actually bound, by frontend (port 0 resolved).
    pub fn bound_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|((f, _), g)| (f.clone(), g.bound))
            .collect()
    }

    /// Logs, once each, listeners of other processes on our addresses (or clashing with them
    /// through a wildcard); `admin` is the admin listener's bound address, if any. Binding
    /// refuses such addresses, so this finds what came after us.
    pub fn check_foreign_listeners(&mut self, admin: Option<SocketAddr>) {
        let mut ours: Vec<(String, SocketAddr)> = self
            .listeners
            .iter()
            .map(|((f, _), g)| (format!("frontend \"{f}\""), g.bound))
            .collect();
        ours.extend(admin.map(|a| ("admin".to_string(), a)));
        self.foreign.check(&ours);
    }

    /// Rebuilds only `frontend`'s part of the snapshot (after a health change, a slow-start
    /// step or a runtime API change of one of its backends) and publishes it; the other
    /// frontends' parts, their round-robin cursors and Maglev tables, are untouched.
    pub fn publish_frontend(&mut self, frontend: &str) {
        self.publish_only(Rebuild::Only(&[frontend]));
    }

    fn publish_only(&mut self, which: Rebuild<'_>) {
        self.generation += 1;
        let snap = self.published.load().next(
            self.config.clone(),
            &mut self.registry,
            self.generation,
            which,
        );
        self.published.store(Arc::new(snap));
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.published.load_full()
    }

    /// Re-reads the config file and applies it; on any problem nothing changes.
    pub fn reload(&mut self) -> ReloadOutcome {
        let loaded = self.config_path.as_deref().map(Config::load);
        self.finish_reload(loaded)
    }

    /// Applies what loading the config file gave (`None`: there is no file), then logs and
    /// counts the outcome. The control loop loads off its thread and calls this.
    pub fn finish_reload(&mut self, loaded: Option<Result<Config, ConfigError>>) -> ReloadOutcome {
        let outcome = match loaded {
            None => return ReloadOutcome::Failed("no config file to reload".into()),
            Some(Err(e)) => ReloadOutcome::Failed(e.to_string()),
            Some(Ok(new)) => self.apply(new),
        };
        match &outcome {
            ReloadOutcome::Unchanged => crate::info!("reload: configuration unchanged"),
            ReloadOutcome::Applied(d) => crate::info!("reload: applied: {}", d.summary()),
            ReloadOutcome::Failed(why) => {
                crate::error!("reload failed, still serving the previous configuration: {why}");
            }
        }
        outcome
    }

    /// Applies a validated config (see [`Server::apply_diff`]), keeping what the `discover`
    /// entries it still has found.
    pub fn apply(&mut self, new: Config) -> ReloadOutcome {
        let found = discovery::kept(&self.discovered, &new);
        self.apply_expanded(new, found, true)
    }

    /// Applies the loaded config with a new set of discovered addresses.
    pub fn apply_discovered(&mut self, found: discovery::Found) -> ReloadOutcome {
        let base = (*self.base).clone();
        self.apply_expanded(base, found, false)
    }

    /// Applies `base` expanded with `found`; `reload` says whether this is a new config
    /// file, whose warnings are then logged again.
    fn apply_expanded(
        &mut self,
        base: Config,
        found: discovery::Found,
        reload: bool,
    ) -> ReloadOutcome {
        let (new, d) = discovery::plan(&self.config, &base, &found);
        if d.is_empty() {
            return ReloadOutcome::Unchanged;
        }
        match self.apply_diff(new, &d, reload) {
            Ok(()) => {
                self.base = Arc::new(base);
                self.discovered = found;
                ReloadOutcome::Applied(d)
            }
            Err(why) => ReloadOutcome::Failed(why),
        }
    }

    /// Applies `d`, the diff from the running config to `new`, and nothing else: binds the
    /// listen addresses it adds before touching anything (all or nothing), drains the
    /// backends it removes, publishes a snapshot in which only the frontends it changed are
    /// rebuilt, then starts the new listeners and closes those it removes.
    fn apply_diff(
        &mut self,
        new: Config,
        d: &config::ConfigDiff,
        reload: bool,
    ) -> Result<(), String> {
        for key in &d.restart_only {
            crate::warn!("reload: global.{key} changed; it takes effect at the next restart");
        }
        // 1. Bind every new listen address before touching anything.
        let mut bound = Vec::new();
        for (frontend, addr) in d.listens_added() {
            // Disabled through the runtime API: stays closed until enabled.
            if self.registry.frontend_disabled(frontend)
                || self.listeners.contains_key(&(frontend.to_string(), addr))
            {
                continue;
            }
            match bind_reuseport(addr, self.workers.len()) {
                Ok(s) => bound.push((frontend.to_string(), addr, s)),
                // Dropping `bound` closes what was bound so far.
                Err(e) => {
                    return Err(format!(
                        "frontend \"{frontend}\": cannot listen on {addr}: {e}"
                    ))
                }
            }
        }
        // A socket the service manager passed stays open in it whatever ringlb does: dropped
        // here, it would queue connections that nobody accepts.
        let closing = d.listens_removed();
        for &(frontend, addr) in &closing {
            if self
                .listeners
                .get(&(frontend.to_string(), addr))
                .is_some_and(|g| g.external)
            {
                return Err(format!(
                    "frontend \"{frontend}\": {addr} was passed by the service manager \
                     (LISTEN_FDS, the socket unit): remove it from the socket unit and restart \
                     instead of dropping it by reload"
                ));
            }
        }
        // 2. Publish the new topology; removed backends start draining.
        let old_config = std::mem::replace(&mut self.config, Arc::new(new));
        self.generation += 1;
        let (snap, removed) = self.published.load().apply(
            d,
            self.config.clone(),
            &mut self.registry,
            self.generation,
        );
        let fds = budget::plan(&self.config, self.fd_limit);
        if reload {
            fds.warn_if_lowered(self.config.global.max_connections);
        }
        self.shared
            .max_connections
            .store(fds.max_connections, Ordering::Relaxed);
        self.shared
            .admin_connections
            .store(fds.admin_connections, Ordering::Relaxed);
        // A raised cap lets paused accept loops go on.
        self.shared.capacity.notify_waiters();
        self.published.store(Arc::new(snap));
        // 3. Start the new listeners, then stop the removed ones.
        for (frontend, addr, sockets) in bound {
            self.install_listeners(frontend, addr, sockets, false);
        }
        for (frontend, addr) in closing {
            if let Some(g) = self.listeners.remove(&(frontend.to_string(), addr)) {
                for w in &self.workers {
                    w.send(WorkerCommand::Unlisten { id: g.id });
                }
                crate::info!("frontend {frontend} stopped listening on {}", g.bound);
            }
        }
        // 4. Connections on removed backends finish on their own, up to shutdown_timeout,
        // or are closed spread over their frontend's drain_pace.
        let limit = self.config.global.shutdown_timeout;
        for b in &removed {
            let pace = self
                .config
                .frontend(&b.frontend)
                .or_else(|| old_config.frontend(&b.frontend))
                .and_then(|f| f.drain_pace);
            if let Some(pace) = pace {
                paced_close(&self.shared, b, pace.min(limit), "removed by reload");
            }
        }
        if !removed.is_empty() {
            spawn_drain_limit(self.shared.clone(), removed, limit);
        }
        Ok(())
    }

    /// Closes (`listening = false`) or binds again every listener of `frontend`, for the
    /// runtime API's disable and enable. Open connections are not touched. Binding is all or
    /// nothing: if one address cannot be bound (another process took it meanwhile), none is.
    pub fn set_frontend_listening(
        &mut self,
        frontend: &str,
        listening: bool,
    ) -> Result<(), String> {
        let config = self.config.clone();
        let Some(f) = config.frontend(frontend) else {
            return Err(format!("no frontend \"{frontend}\""));
        };
        if !listening {
            let ours: Vec<(String, SocketAddr)> = self
                .listeners
                .keys()
                .filter(|(name, _)| name == frontend)
                .cloned()
                .collect();
            for key in ours {
                if let Some(g) = self.listeners.remove(&key) {
                    for w in &self.workers {
                        w.send(WorkerCommand::Unlisten { id: g.id });
                    }
                    crate::info!("frontend {} stopped listening on {}", key.0, g.bound);
                }
            }
            return Ok(());
        }
        let mut bound = Vec::new();
        for &addr in &f.listen {
            if self.listeners.contains_key(&(f.name.clone(), addr)) {
                continue;
            }
            let sockets = bind_reuseport(addr, self.workers.len())
                .map_err(|e| format!("frontend \"{frontend}\": cannot listen on {addr}: {e}"))?;
            bound.push((addr, sockets));
        }
        for (addr, sockets) in bound {
            self.install_listeners(f.name.clone(), addr, sockets, false);
        }
        Ok(())
    }

    /// The listening sockets a binary upgrade passes on, as `upgrade::Entry`s naming this
    /// process's fds (see `ListenerGroup::handoff`: valid until the next change of
    /// listeners, so use them at once).
    pub fn handoff(&self) -> Vec<crate::upgrade::Entry> {
        let mut out = Vec::new();
        for ((frontend, configured), g) in &self.listeners {
            for &fd in &g.handoff {
                out.push(crate::upgrade::Entry {
                    fd,
                    kind: if g.external {
                        crate::upgrade::Kind::SocketUnit
                    } else {
                        crate::upgrade::Kind::Listen
                    },
                    frontend: frontend.clone(),
                    configured: *configured,
                    bound: g.bound,
                });
            }
        }
        out
    }

    /// Stops accepting everywhere, once what the listen queues hold is served; open
    /// connections continue. The receiver completes when every listener is closed. With
    /// `hand_over` (a binary upgrade: the new process accepts on the same sockets) the
    /// listeners only stop accepting: nothing is shut down, and the queues stay whole.
    pub fn stop_accepting(&mut self, hand_over: bool) -> tokio::sync::oneshot::Receiver<()> {
        let (done, closed) = worker::ListenersClosed::new();
        for w in &self.workers {
            w.send(WorkerCommand::StopAccepting {
                done: done.clone(),
                hand_over,
            });
        }
        self.listeners.clear();
        closed
    }

    /// Graceful stop: stop accepting, wait for open connections up to `shutdown_timeout`.
    /// Returns the number of connections still open at the deadline. `hand_over`: see
    /// [`Server::stop_accepting`].
    pub async fn drain(&mut self, hand_over: bool) -> usize {
        let closed = self.stop_accepting(hand_over);
        let limit = self.config.global.shutdown_timeout;
        let start = Instant::now();
        // The listeners serve their queues first; a worker gone away counts as done.
        let _ = tokio::time::timeout(limit, closed).await;
        if hand_over {
            crate::info!(
                "upgrade: process {} stopped accepting; draining its {} open connections for \
                 up to {}",
                std::process::id(),
                self.shared.active(),
                config::format_duration(limit)
            );
        }
        // Frontends with a drain_pace close their connections spread over it (within the
        // limit); the others wait for theirs to end.
        let snap = self.snapshot();
        let left = limit.saturating_sub(start.elapsed());
        for fe in snap.frontends.values() {
            if let Some(pace) = fe.config.drain_pace {
                for b in &fe.backends {
                    paced_close(&self.shared, &b.state, pace.min(left), "stopping");
                }
            }
        }
        let open = self.shared.active();
        if open > 0 {
            crate::info!(
                "stopping: waiting up to {} for {open} open connections",
                config::format_duration(limit)
            );
        }
        while self.shared.active() > 0 && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.active()
    }
}

/// Starts closing `b`'s open connections spread over `pace`, and says so.
fn paced_close(shared: &Shared, b: &BackendState, pace: Duration, why: &str) {
    let open = b.active.load(Ordering::Relaxed);
    if open == 0 {
        return;
    }
    crate::info!(
        "Server {}/{} {why}: closing its {open} open connections over {} (drain_pace)",
        b.frontend,
        b.name,
        config::format_duration(pace)
    );
    shared.kill_connections(b, pace);
}

/// Closes whatever is still open on removed backends once `limit` has passed.
fn spawn_drain_limit(shared: Arc<Shared>, removed: Vec<Arc<BackendState>>, limit: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        for b in removed {
            let open = b.active.load(Ordering::Relaxed);
            // Not draining any more: a later reload added it back.
            if open > 0 && b.is_draining() {
                crate::warn!(
                    "Server {}/{} removed by reload: closing {open} connections still open after {}",
                    b.frontend,
                    b.name,
                    config::format_duration(limit)
                );
                shared.kill_connections(&b, Duration::ZERO);
            }
        }
    });
}
