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
        let (mut server, mut events) = Server::start(config, config_path)?;
        let (mut health, mut health_events) = HealthChecks::new();
        health.sync(&mut server);
        let (mut discovery, mut discovered) = Discovery::new(server.discovery_stats.clone());
        discovery.sync(&server.base);
        let admin = crate::admin::start(&server)?;
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
        systemd.ready(&format!("serving {} frontends", server.config.frontends.len()));
        loop {
            tokio::select! {
                _ = term.recv() => { crate::info!("SIGTERM received: stopping"); break; }
                _ = int.recv() => { crate::info!("SIGINT received: stopping"); break; }
                _ = hup.recv() => {
                    crate::info!("SIGHUP received: reloading");
                    systemd.reloading();
                    let before = server.snapshot();
                    let outcome = server.reload();
                    if let ReloadOutcome::Applied(_) = outcome {
                        health.sync(&mut server);
                        discovery.sync(&server.base);
                    }
                    admin.ops.record_reload(&outcome, &before, &server.snapshot(), server.bound_addresses());
                    server.check_foreign_listeners(admin.bound.get().copied());
                    systemd.ready(&format!("serving {} frontends", server.config.frontends.len()));
                }
                _ = foreign_tick.tick() => server.check_foreign_listeners(admin.bound.get().copied()),
                _ = announce_tick.tick() => announcer.tick(&server.snapshot(), false),
                Some(ev) = events.recv() => handle_event(&mut server, &mut health, ev),
                Some(ev) = health_events.recv() => health.handle(&mut server, ev),
                Some(update) = discovered.recv() => {
                    if crate::discovery::apply(&mut server, update) {
                        health.sync(&mut server);
                    }
                }
            }
        }
        systemd.stopping();
        admin.ops.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        withdraw(&mut announcer, &mut server).await;
        let left = server.drain().await;
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
    announcer.tick(&server.snapshot(), true);
    if !grace.is_zero() {
        crate::info!(
            "stopping: still accepting for {} (grace) while routes are withdrawn",
            crate::config::format_duration(grace)
        );
    }
    // The on_unready commands get until the grace period ends (and at least their own
    // timeout) to finish; new connections are served meanwhile.
    let wait_commands = grace.max(crate::announce::COMMAND_TIMEOUT);
    while announcer.busy() && start.elapsed() < wait_commands {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(left) = grace.checked_sub(start.elapsed()) {
        tokio::time::sleep(left).await;
    }
}

fn handle_event(server: &mut Server, health: &mut HealthChecks, ev: DataEvent) {
    match ev {
        DataEvent::PassiveDown { backend, error } => health.passive_down(server, backend, &error),
    }
}
