//! The status model behind `GET /status` (JSON) and the status page (`GET /`, see `page.rs`).
//!
//! Built on demand from the published snapshot, the live atomics and the control loop's
//! [`OpsState`]: a read-only view, so a slow admin client never holds anything the data path
//! or the control loop needs.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::history::{self, History, Rates};
use super::ops::OpsState;
use crate::backend::{AdminMode, BackendState, Snapshot};
use crate::config::Backend;
use crate::worker::gate::Reason;
use crate::worker::Shared;

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: f64,
    /// True once a graceful stop has begun.
    pub stopping: bool,
    /// Incremented on every publish of the snapshot (reloads, health transitions).
    pub snapshot_generation: u64,
    /// 1 at start, +1 for each reload that changed the configuration.
    pub config_generation: u64,
    pub reloads: Reloads,
    pub connections: Connections,
    pub frontends: Vec<FrontendStatus>,
}

#[derive(Debug, Serialize)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
    pub last_success_unix_seconds: f64,
    /// The error of the last reload if it failed (cleared by the next success).
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub active: usize,
    pub max: usize,
}

#[derive(Debug, Serialize)]
pub struct FrontendStatus {
    pub name: String,
    /// Addresses actually bound (port 0 resolved).
    pub listen: Vec<String>,
    pub balance: &'static str,
    /// False while the runtime API has it disabled (its listeners closed).
    pub enabled: bool,
    /// True for a frontend a reload removed, listed while its backends drain.
    pub removed: bool,
    /// Ready for new clients (what `GET /ready/NAME` answers).
    pub ready: bool,
    /// Maglev only: the table fingerprint (as `ringlb_maglev_table_fingerprint`), equal on
    /// nodes that route clients alike.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_fingerprint: Option<u64>,
    pub active: u64,
    pub accepted_total: u64,
    pub rejected_total: Rejected,
    /// Clients waiting for a slot (`max_connections`), as HAProxy's qcur, qmax and qtime.
    pub queue: Queue,
    /// Over the last sample interval (2 s); the page's charts cover the last minutes.
    pub rates: Rates,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize, Default)]
pub struct Rejected {
    pub limit: u64,
    pub no_backend: u64,
    /// The traffic controls' reasons (docs/traffic-controls.md).
    pub proxy: u64,
    pub proxy_timeout: u64,
    pub acl: u64,
    pub source_connections: u64,
    pub source_rate: u64,
    pub queue_timeout: u64,
    /// SNI routing's reasons.
    pub sni: u64,
    pub sni_timeout: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct Queue {
    pub current: u64,
    pub max: u64,
    pub time_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    /// "up", "down", "backup" (an up backup server), "drain" or "maint" (set through the
    /// runtime API) or "draining" (removed by a reload, connections still open).
    pub state: &'static str,
    /// What the runtime API set: "ready", "drain" or "maint".
    pub admin_state: &'static str,
    /// "up" or "down": the health verdict, whatever the operator set.
    pub health: &'static str,
    pub backup: bool,
    /// The pool a `[[frontend.route]]` sends clients to; absent for the default pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The weight in force (a runtime one, if set).
    pub weight: u32,
    /// The weight in the config.
    pub configured_weight: u32,
    /// Weight after the slow-start ramp; equals `weight` once the ramp is over.
    pub effective_weight: f64,
    pub active: u64,
    pub connections_total: u64,
    pub connect_failures_total: u64,
    pub retries_total: u64,
    pub bytes_in_total: u64,
    pub bytes_out_total: u64,
    pub check_failures_total: u64,
    pub state_changes_total: u64,
    pub last_check: Option<LastCheck>,
    pub seconds_since_change: f64,
    /// Over the last sample interval (2 s); the page's charts cover the last minutes.
    pub rates: Rates,
}

#[derive(Debug, Serialize)]
pub struct LastCheck {
    pub result: Option<String>,
    pub duration_ms: Option<u64>,
}

/// The state word shown for a backend; draining and the operator's drain and maint win over
/// the health verdict, because such a backend takes no new connections whatever its health.
pub fn state_word(config: &Backend, state: &BackendState) -> &'static str {
    if state.is_draining() {
        "draining"
    } else if state.admin_mode() != AdminMode::Ready {
        state.admin_mode().as_str()
    } else if !state.is_up() {
        "down"
    } else if config.backup {
        "backup"
    } else {
        "up"
    }
}

fn backend_status(config: &Backend, s: &BackendState, rates: Rates) -> BackendStatus {
    let check = s.check.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last_check = if check.last_result.is_some() || check.last_duration_ms.is_some() {
        Some(LastCheck {
            result: check.last_result,
            duration_ms: check.last_duration_ms,
        })
    } else {
        None
    };
    let since = s
        .last_change
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .elapsed();
    BackendStatus {
        name: config.name.clone(),
        address: config.address.to_string(),
        state: state_word(config, s),
        admin_state: s.admin_mode().as_str(),
        health: if s.is_up() { "up" } else { "down" },
        backup: config.backup,
        pool: config.pool.clone(),
        weight: config.weight,
        configured_weight: s
            .peek_runtime_weight()
            .map_or(config.weight, |w| w.configured),
        // `effective_weight_milli` is in thousandths of a weight unit.
        effective_weight: s.effective_weight_milli(config.weight) as f64 / 1000.0,
        active: s.active.load(Ordering::Relaxed),
        connections_total: s.connections_total(),
        connect_failures_total: s.connect_failures_total.load(Ordering::Relaxed),
        retries_total: s.retries_total(),
        bytes_in_total: s.bytes_in_total(),
        bytes_out_total: s.bytes_out_total(),
        check_failures_total: s.check_failures_total.load(Ordering::Relaxed),
        state_changes_total: s.state_changes_total.load(Ordering::Relaxed),
        last_check,
        seconds_since_change: round_ms(since),
        rates,
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

/// Builds the whole status view.
pub fn build(snap: &Snapshot, shared: &Shared, ops: &OpsState, hist: &History) -> Status {
    let mut listeners: HashMap<String, Vec<String>> = HashMap::new();
    for (f, a) in ops.listeners() {
        listeners.entry(f).or_default().push(a.to_string());
    }
    let mut frontends: Vec<FrontendStatus> = snap
        .config
        .frontends
        .iter()
        .filter_map(|fc| snap.frontend(&fc.name))
        .map(|fe| {
            let st = &fe.state;
            FrontendStatus {
                name: fe.config.name.clone(),
                listen: listeners.remove(&fe.config.name).unwrap_or_default(),
                balance: fe.config.balance.as_str(),
                enabled: !st.disabled.load(Ordering::Relaxed),
                removed: false,
                ready: crate::announce::is_ready(fe, ops.stopping.load(Ordering::Relaxed)),
                maglev_fingerprint: fe.fingerprint(),
                active: st.active(),
                accepted_total: st.accepted_total(),
                rejected_total: Rejected {
                    limit: st.rejected_limit_total.load(Ordering::Relaxed),
                    no_backend: st.rejected_no_backend_total.load(Ordering::Relaxed),
                    proxy: st.gate.rejected(Reason::Proxy),
                    proxy_timeout: st.gate.rejected(Reason::ProxyTimeout),
                    acl: st.gate.rejected(Reason::Acl),
                    source_connections: st.gate.rejected(Reason::SourceConnections),
                    source_rate: st.gate.rejected(Reason::SourceRate),
                    queue_timeout: st.gate.rejected(Reason::QueueTimeout),
                    sni: st.gate.rejected(Reason::Sni),
                    sni_timeout: st.gate.rejected(Reason::SniTimeout),
                },
                queue: Queue {
                    current: st.gate.queue.current.load(Ordering::Relaxed),
                    max: st.gate.queue.max.load(Ordering::Relaxed),
                    time_seconds: st.gate.queue.qtime_seconds(),
                },
                rates: hist.rates(&history::frontend_key(&fe.config.name)),
                backends: fe
                    .backends
                    .iter()
                    .map(|b| {
                        let key = history::backend_key(&fe.config.name, &b.config.name);
                        backend_status(&b.config, &b.state, hist.rates(&key))
                    })
                    .collect(),
            }
        })
        .collect();
    // Backends a reload removed appear under their frontend while they drain; a frontend
    // that was removed altogether is listed (marked removed) until its last one is done.
    for d in ops.draining() {
        let row = backend_status(&d.config, &d.state, Rates::default());
        match frontends.iter_mut().find(|f| f.name == d.state.frontend) {
            Some(f) => f.backends.push(row),
            None => frontends.push(FrontendStatus {
                name: d.state.frontend.clone(),
                listen: Vec::new(),
                balance: "",
                enabled: false,
                removed: true,
                ready: false,
                maglev_fingerprint: None,
                active: 0,
                accepted_total: 0,
                rejected_total: Rejected::default(),
                queue: Queue::default(),
                rates: Rates::default(),
                backends: vec![row],
            }),
        }
    }
    Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: round_ms(ops.started_at.elapsed()),
        stopping: ops.stopping.load(Ordering::Relaxed),
        snapshot_generation: snap.generation,
        config_generation: ops.config_generation.load(Ordering::Relaxed),
        reloads: Reloads {
            ok: ops.reloads_ok.load(Ordering::Relaxed),
            failed: ops.reloads_failed.load(Ordering::Relaxed),
            last_success_unix_seconds: ops.last_reload_ok_unix_seconds(),
            last_error: ops.last_reload_error(),
        },
        connections: Connections {
            active: shared.active(),
            max: shared.max_connections.load(Ordering::Relaxed),
        },
        frontends,
    }
}
