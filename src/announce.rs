//! Readiness per frontend, and the commands that tell a routing daemon about it.
//!
//! A frontend is *ready* when at least one of its backends (primary or backup) takes new
//! connections and ringlb is not stopping. `GET /ready/NAME` on the admin listener answers
//! 200 or 503 with that verdict (`/ready`: every frontend), and `ringlb_frontend_ready`
//! exports it. That is what a node behind ECMP needs to tell its BGP speaker: announce the
//! VIP while ready, withdraw it otherwise (docs/scale-out.md).
//!
//! For a speaker that is driven by commands (BIRD's `birdc enable`/`disable` of a static
//! protocol, ExaBGP's API), a frontend may name `on_ready` and `on_unready` commands. The
//! control thread runs the matching one (argv, no shell, with a timeout) when the verdict
//! changes, and again every [`REFRESH`] while it holds, so a speaker that restarted learns
//! the state within that time. One command per frontend runs at a time; a verdict that
//! changes while one runs is acted on when it ends.
//!
//! On SIGTERM every frontend turns unready first and its `on_unready` runs; ringlb keeps
//! accepting for `[global] grace`, so the route is gone before the listeners close, and only
//! then stops accepting and drains.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{FrontendSnap, Snapshot};

/// How often a held verdict's command runs again.
pub const REFRESH: Duration = Duration::from_secs(10);
/// How long one command may run before it is killed and counted as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the control thread looks at the verdicts.
pub const TICK: Duration = Duration::from_millis(200);

/// Ready for new clients: not stopping, and some backend takes new connections.
pub fn is_ready(fe: &FrontendSnap, stopping: bool) -> bool {
    !stopping && fe.backends.iter().any(|b| b.state.is_usable())
}

/// Counted outcomes of the announce commands of one frontend (exported per frontend).
#[derive(Debug, Default)]
pub struct AnnounceCounts {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

struct Frontend {
    /// The verdict the last command that ran announced (`None`: none ran yet).
    announced: Option<bool>,
    /// The verdict last seen, for the transition log line.
    seen: Option<bool>,
    last_run: Option<Instant>,
    running: Arc<AtomicBool>,
}

/// The control thread's side: call [`Announcer::tick`] every [`TICK`].
#[derive(Default)]
pub struct Announcer {
    frontends: HashMap<String, Frontend>,
}

impl Announcer {
    pub fn new() -> Announcer {
        Announcer::default()
    }

    /// Logs verdict changes and starts the commands that are due.
    pub fn tick(&mut self, snap: &Snapshot, stopping: bool) {
        self.frontends
            .retain(|name, _| snap.frontends.contains_key(name));
        for fc in &snap.config.frontends {
            let Some(fe) = snap.frontend(&fc.name) else {
                continue;
            };
            let ready = is_ready(fe, stopping);
            let st = self
                .frontends
                .entry(fc.name.clone())
                .or_insert_with(|| Frontend {
                    announced: None,
                    seen: None,
                    last_run: None,
                    running: Arc::new(AtomicBool::new(false)),
                });
            if st.seen != Some(ready) {
                if st.seen.is_some() || !ready {
                    let why = if ready {
                        "a backend is available"
                    } else if stopping {
                        "stopping"
                    } else {
                        "no backend is available"
                    };
                    crate::info!(
                        "frontend {} is {}: {why}",
                        fc.name,
                        if ready { "ready" } else { "not ready" }
                    );
                }
                st.seen = Some(ready);
            }
            let argv = if ready { &fc.on_ready } else { &fc.on_unready };
            if argv.is_empty() || st.running.load(Ordering::Acquire) {
                continue;
            }
            let due =
                st.announced != Some(ready) || st.last_run.is_none_or(|at| at.elapsed() >= REFRESH);
            if !due {
                continue;
            }
            let first = st.announced != Some(ready);
            st.announced = Some(ready);
            st.last_run = Some(Instant::now());
            st.running.store(true, Ordering::Release);
            let running = st.running.clone();
            let counts = fe.state.announce.clone();
            let argv = argv.clone();
            let label = format!(
                "frontend {}: {}",
                fc.name,
                if ready { "on_ready" } else { "on_unready" }
            );
            tokio::spawn(async move {
                let result = run(&argv).await;
                match result {
                    Ok(()) => {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                        if first {
                            crate::info!("{label}: ran {}", argv.join(" "));
                        }
                    }
                    Err(e) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        crate::warn!("{label}: {} failed: {e}", argv.join(" "));
                    }
                }
                running.store(false, Ordering::Release);
            });
        }
    }

    /// Whether every frontend's last verdict has been acted on: its command for it ran to
    /// the end, or it has none. The stop path ticks until this holds, so an `on_unready` is
    /// not skipped because an `on_ready` was still running when SIGTERM came.
    pub fn settled(&self, snap: &Snapshot, stopping: bool) -> bool {
        snap.config.frontends.iter().all(|fc| {
            let Some(fe) = snap.frontend(&fc.name) else {
                return true;
            };
            let ready = is_ready(fe, stopping);
            let argv = if ready { &fc.on_ready } else { &fc.on_unready };
            argv.is_empty()
                || self.frontends.get(&fc.name).is_some_and(|st| {
                    st.announced == Some(ready) && !st.running.load(Ordering::Acquire)
                })
        })
    }
}

/// Runs one command to completion within [`COMMAND_TIMEOUT`]; its output is discarded
/// except for the first line of stderr on failure.
async fn run(argv: &[String]) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("no program")?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "still running after {}s: killed",
            COMMAND_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let first = stderr.lines().next().unwrap_or("").trim();
            Err(if first.is_empty() {
                format!("{}", out.status)
            } else {
                format!("{}: {first}", out.status)
            })
        }
    }
}
