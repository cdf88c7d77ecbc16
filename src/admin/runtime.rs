//! The runtime API's changes, applied on the control loop (the only place that owns the
//! `Server`): set a backend ready / drain / maint, change its weight, enable or disable a
//! frontend.
//!
//! The admin handlers (`admin::api`) parse and authorize a request, then send an [`Action`]
//! over a channel and wait for the loop's answer, so a change is serialized with reloads and
//! health transitions and every change republishes the backend's frontend (rebuilding its
//! round-robin schedule or Maglev table if the change touches them) before it is answered.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::backend::{AdminMode, BackendState, RuntimeWeight};
use crate::health::report;
use crate::server::Server;

/// Highest weight the runtime API accepts (the config's own cap, HAProxy's too).
pub const MAX_WEIGHT: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Backend {
        frontend: String,
        backend: String,
        mode: Option<AdminMode>,
        weight: Option<u32>,
    },
    Frontend {
        frontend: String,
        enabled: bool,
    },
    /// Start a binary upgrade; answered once the new process serves (or failed). The
    /// control loop runs it (`crate::upgrade`), not [`apply`].
    Upgrade,
}

/// Why a change was refused, as the HTTP status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    NotFound(String),
    BadRequest(String),
    /// Valid, but it cannot be done now (a port taken, ringlb stopping).
    Conflict(String),
}

/// What the admin handler sends the control loop.
pub struct Request {
    pub action: Action,
    pub reply: oneshot::Sender<Result<(), Refused>>,
}

/// Applies `action`; on `Err` nothing changed. Returns whether anything changed (a no-op,
/// like draining a drained backend, is answered 200 but neither logged nor saved).
pub fn apply(server: &mut Server, action: &Action) -> Result<bool, Refused> {
    match action {
        Action::Backend {
            frontend,
            backend,
            mode,
            weight,
        } => set_backend(server, frontend, backend, *mode, *weight),
        Action::Frontend { frontend, enabled } => set_frontend(server, frontend, *enabled),
        Action::Upgrade => Err(Refused::Conflict(
            "an upgrade is run by the control loop, not applied here".into(),
        )),
    }
}

fn set_backend(
    server: &mut Server,
    frontend: &str,
    backend: &str,
    mode: Option<AdminMode>,
    weight: Option<u32>,
) -> Result<bool, Refused> {
    let config = server.config.clone();
    let Some(fe) = config.frontend(frontend) else {
        return Err(Refused::NotFound(format!("no frontend \"{frontend}\"")));
    };
    let Some(bc) = fe.backends.iter().find(|b| b.name == backend) else {
        return Err(Refused::NotFound(format!(
            "frontend \"{frontend}\" has no backend \"{backend}\""
        )));
    };
    if let Some(w) = weight {
        if !(1..=MAX_WEIGHT).contains(&w) {
            return Err(Refused::BadRequest(format!(
                "weight {w} is out of range: 1 to {MAX_WEIGHT} (to stop new connections, drain it)"
            )));
        }
    }
    let state = server.registry.backend(frontend, bc);
    let mut changed = false;
    if let Some(w) = weight {
        let old = state.runtime_weight(bc.weight).unwrap_or(bc.weight);
        if old != w {
            // Setting it back to the configured weight clears the override.
            state.set_runtime_weight((w != bc.weight).then_some(RuntimeWeight {
                weight: w,
                configured: bc.weight,
            }));
            crate::info!(
                "{} {frontend}/{backend} weight changed from {old} to {w} (runtime API)",
                prefix(bc.backup)
            );
            changed = true;
        }
    }
    let mut old_mode = None;
    if let Some(m) = mode {
        let old = state.set_admin_mode(m);
        if old != m {
            old_mode = Some(old);
            changed = true;
        }
    }
    if !changed {
        return Ok(false);
    }
    server.publish_frontend(frontend);
    if let (Some(old), Some(new)) = (old_mode, mode) {
        log_mode_change(server, &state, bc.backup, old, new);
    }
    Ok(true)
}

fn prefix(backup: bool) -> &'static str {
    if backup {
        "Backup Server"
    } else {
        "Server"
    }
}

/// HAProxy's lines for the same changes (`set server ... state`), with the same tail of
/// servers left and sessions.
fn log_mode_change(
    server: &Server,
    state: &Arc<BackendState>,
    backup: bool,
    old: AdminMode,
    new: AdminMode,
) {
    let snap = server.snapshot();
    let Some(fe) = snap.frontend(&state.frontend) else {
        return;
    };
    let (active, backups) = fe.usable_counts();
    let sessions = state.active.load(Ordering::Relaxed);
    let who = format!("{} {}/{}", prefix(backup), state.frontend, state.name);
    let left = format!(
        "{active} active and {backups} backup servers left. \
         {sessions} sessions active, 0 requeued, 0 remaining in queue."
    );
    match new {
        AdminMode::Drain => crate::warn!("{who} enters drain state. {left}"),
        AdminMode::Maint => {
            crate::warn!("{who} is going DOWN for maintenance. {left}");
            // As HAProxy: established sessions are cut in maintenance only with
            // on-marked-down shutdown-sessions; otherwise they finish.
            if fe.config.on_marked_down == crate::config::OnMarkedDown::ShutdownSessions {
                server
                    .shared
                    .kill_connections(state, fe.config.drain_pace.unwrap_or_default());
            }
        }
        AdminMode::Ready => {
            let what = if old == AdminMode::Maint {
                "leaving maintenance"
            } else {
                "leaving forced drain"
            };
            let verdict = if state.is_up() { "UP" } else { "DOWN" };
            crate::info!(
                "{who} is {verdict} ({what}). {active} active and {backups} backup servers online. \
                 0 sessions requeued, 0 total in queue."
            );
            if state.is_up() {
                fe.state.no_server_logged.store(false, Ordering::Relaxed);
            }
        }
    }
    if new != AdminMode::Ready
        && active + backups == 0
        && !fe.state.no_server_logged.swap(true, Ordering::Relaxed)
    {
        crate::error!("{}", report::no_server_line(&state.frontend));
    }
}

fn set_frontend(server: &mut Server, frontend: &str, enabled: bool) -> Result<bool, Refused> {
    if server.config.frontend(frontend).is_none() {
        return Err(Refused::NotFound(format!("no frontend \"{frontend}\"")));
    }
    let state = server.registry.frontend(frontend);
    let disabled = state.disabled.load(Ordering::Relaxed);
    if disabled != enabled {
        return Ok(false);
    }
    server
        .set_frontend_listening(frontend, enabled)
        .map_err(Refused::Conflict)?;
    state.disabled.store(!enabled, Ordering::Relaxed);
    if enabled {
        crate::info!("Resumed frontend {frontend}.");
    } else {
        crate::warn!("Paused frontend {frontend}.");
    }
    Ok(true)
}

/// Saves the runtime state if a state file is configured; a failed write is logged (the
/// change itself stands: it is live, only not durable).
pub fn save_state(server: &Server, path: Option<&std::path::Path>) {
    let Some(path) = path else { return };
    let state = super::statefile::collect(&server.registry);
    if let Err(e) = super::statefile::save(path, &state) {
        crate::error!(
            "admin: cannot write state file {}: {e}; the change is live but will not survive a restart",
            path.display()
        );
    }
}
