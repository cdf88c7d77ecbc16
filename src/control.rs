//! The control thread's main loop: signals, reloads, data-path events, graceful stop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::announce::Announcer;
use crate::config::Config;
use crate::discovery::Discovery;
use crate::health::HealthChecks;
use crate::server::{ReloadOutcome, Server, StartError};
use crate::worker::DataEvent;

/// How often the control thread looks for other processes listening on our addresses.
const FOREIGN_LISTENER_CHECK: Duration = Duration::from_secs(2);

/// Runs ringlb until SIGTERM or SIGINT, then drains and returns.
/// `on_started` is called once every listener is bound (the demo prints its banner there).
pub fn run(
    config: Config,
    config_path: Option<PathBuf>,
    on_started: impl FnOnce(&Server),
) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ringlb-control")
        .build()
        .map_err(StartError::Workers)?;
    rt.block_on(async move {
        // Signal handlers first, so a signal during start-up is not lost to the default action.
        let mut term = signal(SignalKind::terminate()).map_err(StartError::Workers)?;
        let mut int = signal(SignalKind::interrupt()).map_err(StartError::Workers)?;
        let mut hup = signal(SignalKind::hangup()).map_err(StartError::Workers)?;
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(StartError::Workers)?;
        // Caught for the whole life of the process (its default action ends it): a draining
        // old process ignores it.
        let mut usr2 = signal(SignalKind::user_defined2()).map_err(StartError::Workers)?;
        // Sockets an upgrading ringlb passed, if it started this one.
        let mut passed = crate::upgrade::take_passed().map_err(StartError::Inherited)?;
        let (mut server, mut events) =
            Server::start(config, config_path, std::mem::take(&mut passed.frontends))?;
        // Every address is bound before the first probe or DNS query leaves: a start refused
        // over a taken admin address touches no backend and no resolver.
        let (admin, mut writes) = crate::admin::start(&server, passed.admin.take())?;
        let (mut health, mut health_events) = HealthChecks::new();
        health.sync(&mut server);
        let (mut discovery, mut discovered) = Discovery::new(server.discovery_stats.clone());
        discovery.sync(&server.base);
        server.open_listeners();
        admin.ops.record_listeners(server.bound_addresses());
        let systemd = crate::systemd::start();
        on_started(&server);
        crate::info!("ready");
        // Another process that starts listening on one of our addresses after us is logged
        // within this interval (binding already refused anything that was there before).
        let mut foreign_tick = tokio::time::interval(FOREIGN_LISTENER_CHECK);
        foreign_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announcer = Announcer::new();
        let mut announce_tick = tokio::time::interval(crate::announce::TICK);
        announce_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if passed.is_upgrade() {
            // The old process stops accepting once it reads this, and makes us the service's
            // main process (MAINPID=): the service is already up, so no READY=1 from here.
            passed.announce_ready().map_err(StartError::Inherited)?;
            admin.ops.upgrades_ok.store(1, std::sync::atomic::Ordering::Relaxed);
            crate::info!(
                "upgrade: process {} took over from process {}",
                std::process::id(),
                std::os::unix::process::parent_id()
            );
        } else {
            systemd.ready(&format!("serving {} frontends", server.config.frontends.len()));
        }
        // An upgrade in progress: who waits for its outcome (runtime API callers), and the
        // channel it comes back on. Once the new process serves, the loop ends and this
        // process drains (`handed_to`).
        let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut upgrading: Option<Upgrading> = None;
        let mut handed_to: Option<u32> = None;
        // A reload reads and validates the file (and /etc/hosts) on a thread of its
        // own, so a slow file system or resolver stalls nothing here; the loaded config
        // comes back on this channel. One load at a time; SIGHUPs meanwhile make one more.
        let (loaded_tx, mut loaded_rx) = tokio::sync::mpsc::unbounded_channel();
        let (mut loading, mut again) = (false, false);
        // A reload asked for (or loaded) while an upgrade is in progress waits for its outcome:
        // applied here, it could close a socket the new process already holds. If the upgrade
        // fails, the file is loaded again here; if it succeeds, the new process is sent SIGHUP.
        let mut reload_after_upgrade = false;
        loop {
            tokio::select! {
                _ = term.recv() => { crate::info!("SIGTERM received: stopping"); break; }
                _ = int.recv() => { crate::info!("SIGINT received: stopping"); break; }
                _ = hup.recv() => {
                    if upgrading.is_some() {
                        crate::info!("SIGHUP received during an upgrade: the reload waits for the upgrade's outcome");
                        reload_after_upgrade = true;
                    } else if loading {
                        crate::info!("SIGHUP received: reloading again once the reload in progress is done");
                        again = true;
                    } else {
                        crate::info!("SIGHUP received: reloading");
                        systemd.reloading();
                        start_load(&server, &loaded_tx);
                        loading = true;
                    }
                }
                Some(loaded) = loaded_rx.recv() => {
                    loading = false;
                    if upgrading.is_some() {
                        // Its RELOADING=1 went out when it began; the reload itself comes
                        // after the upgrade (see `reload_after_upgrade`).
                        drop(loaded);
                        reload_after_upgrade = true;
                        systemd.ready(&format!("serving {} frontends", server.config.frontends.len()));
                        continue;
                    }
                    let before = server.snapshot();
                    let outcome = server.finish_reload(loaded);
                    if let ReloadOutcome::Applied(_) = outcome {
                        health.sync(&mut server);
                        discovery.sync(&server.base);
                    }
                    admin.ops.record_reload(&outcome, &before, &server.snapshot(), server.bound_addresses());
                    if let ReloadOutcome::Applied(_) = outcome {
                        // Backends a reload removed leave the saved runtime state.
                        crate::admin::runtime::save_state(&server, admin.state_file.as_deref());
                    }
                    server.check_foreign_listeners(admin.bound.get().copied());
                    systemd.ready(&format!("serving {} frontends", server.config.frontends.len()));
                    if std::mem::take(&mut again) {
                        systemd.reloading();
                        start_load(&server, &loaded_tx);
                        loading = true;
                    }
                }
                _ = usr2.recv() => {
                    crate::info!("SIGUSR2 received: upgrading");
                    start_upgrade(&server, &admin, &upgrade_tx, &mut upgrading, None);
                }
                Some(outcome) = upgrade_rx.recv() => {
                    let waiters = upgrading.take().map(|u| u.waiters).unwrap_or_default();
                    match outcome {
                        Ok(pid) => {
                            admin.ops.upgraded_to.store(pid, std::sync::atomic::Ordering::Relaxed);
                            for w in waiters {
                                let _ = w.send(Ok(()));
                            }
                            handed_to = Some(pid);
                            if reload_after_upgrade {
                                crate::info!("upgrade: passing the SIGHUP received meanwhile to process {pid}");
                                if let Ok(p) = i32::try_from(pid) {
                                    let _ = nix::sys::signal::kill(
                                        nix::unistd::Pid::from_raw(p),
                                        nix::sys::signal::Signal::SIGHUP,
                                    );
                                }
                            }
                            break;
                        }
                        Err(why) => {
                            admin.ops.upgrades_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            crate::error!("upgrade failed, still serving: {why}");
                            for w in waiters {
                                let _ = w.send(Err(crate::admin::runtime::Refused::Conflict(
                                    format!("upgrade failed, still serving: {why}"),
                                )));
                            }
                            if std::mem::take(&mut reload_after_upgrade) && !loading {
                                crate::info!("reloading now: a SIGHUP arrived during the upgrade");
                                systemd.reloading();
                                start_load(&server, &loaded_tx);
                                loading = true;
                            }
                        }
                    }
                }
                _ = usr1.recv() => {
                    // logrotate moved the connection log files: write to new ones.
                    crate::info!("SIGUSR1 received: reopening connection log files");
                    server.registry.log_sinks.reopen_files();
                }
                _ = foreign_tick.tick() => server.check_foreign_listeners(admin.bound.get().copied()),
                _ = announce_tick.tick() => announcer.tick(&server.snapshot(), false),
                Some(ev) = events.recv() => handle_event(&mut server, &mut health, ev),
                Some(ev) = health_events.recv() => health.handle(&mut server, ev),
                Some(w) = writes.recv() => {
                    if w.action == crate::admin::runtime::Action::Upgrade {
                        crate::info!("upgrade requested through the runtime API");
                        start_upgrade(&server, &admin, &upgrade_tx, &mut upgrading, Some(w.reply));
                        continue;
                    }
                    let result = crate::admin::runtime::apply(&mut server, &w.action);
                    if let Ok(true) = result {
                        crate::admin::runtime::save_state(&server, admin.state_file.as_deref());
                        admin.ops.record_listeners(server.bound_addresses());
                    }
                    let _ = w.reply.send(result.map(|_| ()));
                }
                Some(update) = discovered.recv() => {
                    let before = server.snapshot();
                    if crate::discovery::apply(&mut server, update) {
                        health.sync(&mut server);
                        // Vanished addresses drain like backends a reload removed.
                        admin.ops.record_removed(&before, &server.snapshot());
                    }
                }
            }
        }
        admin.ops.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(u) = upgrading.take() {
            // Stopping while a new process starts: it would find its sockets shut. Killed
            // (dropping the wait kills it) before anything here closes.
            crate::warn!(
                "stopping: abandoning the upgrade in progress; new process {} is killed",
                u.pid
            );
            u.wait.abort();
            let _ = u.wait.await;
            for w in u.waiters {
                let _ = w.send(Err(crate::admin::runtime::Refused::Conflict(
                    "ringlb is stopping: the upgrade was abandoned".into(),
                )));
            }
        }
        if let Some(pid) = handed_to {
            // The new process accepts on the same sockets already: stop accepting (nothing
            // is shut down, the queues stay whole) and drain. No grace and no route
            // withdrawal: this node goes on serving through the new process.
            systemd.main_pid(pid);
            admin.stop_accepting.notify_one();
            crate::info!("upgrade: new process {pid} is ready; it is the main process now");
        } else {
            systemd.stopping();
            withdraw(&mut announcer, &mut server).await;
        }
        let left = server.drain(handed_to.is_some()).await;
        // The last connections' log lines, before the process goes.
        crate::connlog::settle(&server.registry.log_sinks, Duration::from_secs(2)).await;
        if left > 0 {
            crate::warn!("stopped with {left} connections still open after shutdown_timeout");
        } else {
            crate::info!("stopped");
        }
        Ok(())
    })
}

/// The first step of a stop: every frontend turns unready (its `on_unready` runs, `/ready`
/// answers 503) while the listeners keep accepting for `grace`, so that whatever routes
/// clients here (a BGP speaker, a balancer in front) stops before new clients are refused.
async fn withdraw(announcer: &mut Announcer, server: &mut Server) {
    let grace = server.config.global.grace;
    let start = Instant::now();
    if !grace.is_zero() {
        crate::info!(
            "stopping: still accepting for {} (grace) while routes are withdrawn",
            crate::config::format_duration(grace)
        );
    }
    // The on_unready commands get until the grace period ends (and at least their own
    // timeout) to finish; new connections are served meanwhile.
    let wait_commands = grace.max(crate::announce::COMMAND_TIMEOUT);
    loop {
        let snap = server.snapshot();
        announcer.tick(&snap, true);
        if announcer.settled(&snap, true) || start.elapsed() >= wait_commands {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(left) = grace.checked_sub(start.elapsed()) {
        tokio::time::sleep(left).await;
    }
}

/// A runtime API caller waiting for an upgrade's outcome.
type UpgradeWaiter = tokio::sync::oneshot::Sender<Result<(), crate::admin::runtime::Refused>>;

/// An upgrade whose new process has not said ready yet.
struct Upgrading {
    pid: u32,
    /// Runtime API callers waiting for the outcome.
    waiters: Vec<UpgradeWaiter>,
    /// The task waiting for the new process; aborting it kills that process.
    wait: tokio::task::JoinHandle<()>,
}

/// Starts the new process of a binary upgrade with every listening socket (the frontends'
/// and the admin listener), and a task that sends its outcome to the control loop. One at a
/// time: a request during one waits for the same outcome.
fn start_upgrade(
    server: &Server,
    admin: &crate::admin::AdminState,
    outcome: &tokio::sync::mpsc::UnboundedSender<Result<u32, String>>,
    upgrading: &mut Option<Upgrading>,
    waiter: Option<UpgradeWaiter>,
) {
    if let Some(u) = upgrading {
        crate::info!(
            "upgrade: already in progress (new process {}): waiting for it",
            u.pid
        );
        u.waiters.extend(waiter);
        return;
    }
    let mut sockets = server.handoff();
    if let (Some((configured, fd)), Some(bound)) = (&admin.handoff, admin.bound.get()) {
        sockets.push(crate::upgrade::Entry {
            fd: *fd,
            kind: crate::upgrade::Kind::Admin,
            frontend: String::new(),
            configured: *configured,
            bound: *bound,
        });
    }
    let program =
        crate::upgrade::program_path().map_or_else(|| "?".to_string(), |p| p.display().to_string());
    match crate::upgrade::spawn(&sockets) {
        Ok(started) => {
            let pid = started.pid;
            crate::info!(
                "upgrade: started new process {pid} ({program}), passing {} listening sockets",
                sockets.len()
            );
            let tx = outcome.clone();
            let wait = tokio::spawn(async move {
                let _ = tx.send(crate::upgrade::wait_ready(started).await);
            });
            *upgrading = Some(Upgrading {
                pid,
                waiters: waiter.into_iter().collect(),
                wait,
            });
        }
        Err(e) => {
            admin
                .ops
                .upgrades_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let why = format!("upgrade failed, still serving: {e}");
            crate::error!("{why}");
            if let Some(w) = waiter {
                let _ = w.send(Err(crate::admin::runtime::Refused::Conflict(why)));
            }
        }
    }
}

/// What a reload's load gave: `None` when there is no config file.
type Loaded = Option<Result<Config, crate::config::ConfigError>>;

/// Loads the config file on a short-lived thread and sends the result to the control loop.
/// A plain thread rather than tokio's blocking pool: a read that never returns (a hung file
/// system) must not keep the runtime from shutting down.
fn start_load(server: &Server, tx: &tokio::sync::mpsc::UnboundedSender<Loaded>) {
    let path = server.config_path.clone();
    let tx2 = tx.clone();
    let spawned = std::thread::Builder::new()
        .name("ringlb-load".into())
        .spawn(move || {
            let _ = tx2.send(path.map(|p| Config::load(&p)));
        });
    if let Err(e) = spawned {
        crate::warn!("cannot start a thread to load the config ({e}): loading it here");
        let _ = tx.send(server.config_path.as_deref().map(Config::load));
    }
}

fn handle_event(server: &mut Server, health: &mut HealthChecks, ev: DataEvent) {
    match ev {
        DataEvent::PassiveDown { backend, error } => health.passive_down(server, backend, &error),
    }
}
