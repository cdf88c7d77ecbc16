//! Prometheus metrics: a `metrics-exporter-prometheus` recorder fed from the atomics the data
//! path already keeps. Names and their HAProxy counterparts are listed in docs/metrics.md.
//!
//! The data path never calls a `metrics` macro (tens of nanoseconds each, contended across
//! cores). Instead [`Exporter::update`] runs on the control thread a few times a second, and
//! before each render, and copies every counter into a cached handle (`counter.absolute`,
//! `gauge.set`). The recorder is built with `build_recorder()` and never installed globally,
//! so several servers in one process (tests, the demo) do not fight over a global.
//!
//! `/metrics` is rendered on a thread of its own ([`spawn_renderer`]), which also runs the
//! periodic update: the render of a large config (50 frontends x 20 backends is 900 KB, tens of
//! milliseconds) never runs on the control thread, where it would delay health checks and
//! reloads. A scrape asks that thread for a render and awaits it ([`Exporter::fresh`]), so its
//! values are as fresh as before; scrapes that arrive together share one render.
//!
//! A series is identified by its labels. When the state behind a series is replaced (a
//! backend's address changed, a frontend was removed and added back) the new counters start
//! from zero, so the exporter adds what the series had counted before: exported counters
//! never go backwards. Series that disappear (a removed backend once drained) stop being
//! updated and the recorder forgets them after [`IDLE_TIMEOUT`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use metrics_util::MetricKindMask;

use crate::admin::api::WriteResult;
use crate::admin::ops::OpsState;
use crate::admin::status::state_word;
use crate::backend::{BackendState, Published};
use crate::config::Backend;
use crate::worker::gate::Reason;
use crate::worker::Shared;

/// How often the renderer thread copies the atomics into the metric handles and renders.
pub const UPDATE_EVERY: Duration = Duration::from_millis(250);
/// The longest pause between renders, however slow they are.
pub const RENDER_AT_LEAST_EVERY: Duration = Duration::from_secs(1);
/// Series not updated for this long are dropped from the output.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a vanished series' last values are remembered, so a series that comes back
/// continues from them instead of going backwards.
const RETIRED_MEMORY: Duration = Duration::from_secs(600);

const META: Metadata<'static> = Metadata::new("ringlb", Level::INFO, Some(module_path!()));

/// A counter of a family, with an optional fixed extra label (e.g. `reason="limit"`).
type CounterDef = (&'static str, Option<(&'static str, &'static str)>);

struct Family {
    counters: &'static [CounterDef],
    gauges: &'static [&'static str],
}

const BACKEND: Family = Family {
    counters: &[
        ("ringlb_backend_connections_total", None),
        ("ringlb_backend_connect_failures_total", None),
        ("ringlb_backend_retries_total", None),
        ("ringlb_backend_connect_hedges_total", None),
        ("ringlb_backend_connect_hedges_won_total", None),
        ("ringlb_backend_bytes_in_total", None),
        ("ringlb_backend_bytes_out_total", None),
        ("ringlb_backend_check_failures_total", None),
        ("ringlb_backend_state_changes_total", None),
        ("ringlb_backend_connections_shut_down_total", None),
    ],
    gauges: &[
        "ringlb_backend_up",
        "ringlb_backend_draining",
        "ringlb_backend_active_connections",
        "ringlb_backend_weight",
        "ringlb_backend_effective_weight",
        "ringlb_backend_check_duration_seconds",
        "ringlb_backend_last_state_change_seconds",
        "ringlb_backend_admin_state",
        "ringlb_backend_connects_pending",
    ],
};

const FRONTEND: Family = Family {
    counters: &[
        ("ringlb_frontend_connections_total", None),
        ("ringlb_frontend_rejected_total", Some(("reason", "limit"))),
        (
            "ringlb_frontend_rejected_total",
            Some(("reason", "no_backend")),
        ),
        ("ringlb_frontend_rejected_total", Some(("reason", "local"))),
        (
            "ringlb_frontend_announce_commands_total",
            Some(("result", "ok")),
        ),
        (
            "ringlb_frontend_announce_commands_total",
            Some(("result", "failed")),
        ),
        // The gate's reasons, in `worker::gate::Reason::ALL` order.
        ("ringlb_frontend_rejected_total", Some(("reason", "proxy"))),
        (
            "ringlb_frontend_rejected_total",
            Some(("reason", "proxy_timeout")),
        ),
        ("ringlb_frontend_rejected_total", Some(("reason", "acl"))),
        (
            "ringlb_frontend_rejected_total",
            Some(("reason", "source_connections")),
        ),
        (
            "ringlb_frontend_rejected_total",
            Some(("reason", "source_rate")),
        ),
        ("ringlb_frontend_source_table_full_total", None),
        (
            "ringlb_frontend_rejected_total",
            Some(("reason", "queue_timeout")),
        ),
        ("ringlb_frontend_queued_total", None),
        ("ringlb_frontend_rejected_total", Some(("reason", "sni"))),
        (
            "ringlb_frontend_rejected_total",
            Some(("reason", "sni_timeout")),
        ),
        ("ringlb_frontend_rebuilds_total", Some(("what", "frontend"))),
        ("ringlb_frontend_rebuilds_total", Some(("what", "schedule"))),
        (
            "ringlb_frontend_rebuilds_total",
            Some(("what", "maglev_table")),
        ),
    ],
    gauges: &[
        "ringlb_frontend_active_connections",
        "ringlb_frontend_ready",
        "ringlb_maglev_table_fingerprint",
        "ringlb_frontend_queue_current",
        "ringlb_frontend_queue_max",
        "ringlb_frontend_queue_time_seconds",
        "ringlb_frontend_enabled",
        "ringlb_maglev_backends_left_out",
    ],
};

const PROCESS: Family = Family {
    counters: &[
        ("ringlb_config_reloads_total", Some(("result", "success"))),
        ("ringlb_config_reloads_total", Some(("result", "failure"))),
        ("ringlb_accept_paused_total", None),
        ("ringlb_relay_pipe_unavailable_total", None),
        ("ringlb_relay_ring_empty_total", None),
        ("ringlb_admin_connections_evicted_total", None),
        ("ringlb_admin_writes_total", Some(("result", "ok"))),
        ("ringlb_admin_writes_total", Some(("result", "bad_request"))),
        (
            "ringlb_admin_writes_total",
            Some(("result", "unauthorized")),
        ),
        ("ringlb_admin_writes_total", Some(("result", "forbidden"))),
        ("ringlb_admin_writes_total", Some(("result", "not_found"))),
        ("ringlb_admin_writes_total", Some(("result", "conflict"))),
        ("ringlb_admin_writes_total", Some(("result", "too_large"))),
        ("ringlb_upgrades_total", Some(("result", "success"))),
        ("ringlb_upgrades_total", Some(("result", "failure"))),
    ],
    gauges: &[
        "ringlb_config_generation",
        "ringlb_config_last_reload_success_timestamp_seconds",
        "ringlb_snapshot_generation",
        "ringlb_active_connections",
        "ringlb_max_connections",
        "ringlb_start_time_seconds",
        "ringlb_fd_limit",
        "ringlb_relay_buffers_in_use",
        "ringlb_relay_buffers_free",
        "ringlb_relay_pipes_in_use",
        "ringlb_relay_pipes_free",
        "ringlb_relay_tails_in_use",
        "ringlb_relay_ring_buffers_in_use",
    ],
};

/// DNS discovery, one series per `discover` entry.
const DISCOVERY: Family = Family {
    counters: &[
        ("ringlb_discovery_lookups_total", Some(("result", "ok"))),
        ("ringlb_discovery_lookups_total", Some(("result", "failed"))),
    ],
    gauges: &["ringlb_discovery_addresses"],
};

/// Local errors (this host out of fds or memory), one series per operation and errno.
const LOCAL: Family = Family {
    counters: &[("ringlb_local_errors_total", None)],
    gauges: &[],
};

/// Connection log sinks, one series per target.
const LOG: Family = Family {
    counters: &[
        ("ringlb_log_lines_total", None),
        ("ringlb_log_dropped_total", None),
    ],
    gauges: &[],
};

/// HELP text for every name, with the HAProxy exporter counterpart where there is one.
const HELP: &[(&str, &str)] = &[
    ("ringlb_backend_connections_total", "Connections relayed to the backend (haproxy_server_sessions_total)."),
    ("ringlb_backend_connect_failures_total", "Failed connects to the backend on real traffic (haproxy_server_connection_errors_total)."),
    ("ringlb_backend_retries_total", "Failed connects to the backend that were retried on another one (haproxy_server_retry_warnings_total)."),
    ("ringlb_backend_connect_hedges_total", "Connects to the backend still pending at the hedge delay, for which a second connect to another backend was opened (connect_hedge)."),
    ("ringlb_backend_connect_hedges_won_total", "Hedged connects to the backend that the other backend's connect beat; the connect to this backend was cancelled."),
    ("ringlb_backend_bytes_in_total", "Bytes from clients to the backend (haproxy_server_bytes_in_total)."),
    ("ringlb_backend_bytes_out_total", "Bytes from the backend to clients (haproxy_server_bytes_out_total)."),
    ("ringlb_backend_check_failures_total", "Failed health checks (haproxy_server_check_failures_total)."),
    ("ringlb_backend_state_changes_total", "UP/DOWN transitions (haproxy_server_check_up_down_total)."),
    ("ringlb_backend_connections_shut_down_total", "Open connections ringlb closed itself: backend removed by a reload (drain_pace or the drain limit), marked down with on_marked_down = \"shutdown-sessions\", or ringlb stopping with a drain_pace."),
        ("ringlb_backend_up", "1 if the backend takes new connections (up, not removed by a reload, not drained or in maintenance), else 0 (haproxy_server_status)."),
    ("ringlb_backend_draining", "1 while a backend removed by a reload still has connections open."),
    ("ringlb_backend_active_connections", "Open connections through the backend (haproxy_server_current_sessions)."),
    ("ringlb_backend_weight", "Weight in force: the configured one, or the one set through the runtime API (haproxy_server_weight)."),
    ("ringlb_backend_effective_weight", "Weight after the slow-start ramp."),
    ("ringlb_backend_check_duration_seconds", "Duration of the last health check (haproxy_server_check_duration_seconds)."),
    ("ringlb_backend_last_state_change_seconds", "Seconds since the last UP/DOWN transition (haproxy_server_check_last_change_seconds)."),
    ("ringlb_backend_connects_pending", "Connects to the backend begun and not yet completed, failed or abandoned (hedges included): high while a backend drops SYNs."),
    ("ringlb_backend_admin_state", "What the runtime API set: 0 ready, 1 drain (no new connections, established ones finish), 2 maint (no new connections, checks paused) (haproxy_server_status DRAIN / MAINT)."),
    ("ringlb_maglev_backends_left_out", "Usable backends a Maglev frontend's tables have no slot for (more than maglev_table_size, as a large discovered set can be): they get no clients. 0 for other balancers."),
    ("ringlb_frontend_enabled", "0 while the runtime API has the frontend disabled (its listeners closed), else 1."),
    ("ringlb_admin_writes_total", "Runtime API writes by result: ok, bad_request, unauthorized (no or wrong token), forbidden (not allowed from this peer), not_found, conflict, too_large."),
    ("ringlb_frontend_connections_total", "Client connections accepted (haproxy_frontend_sessions_total)."),
    ("ringlb_frontend_rejected_total", "Client connections closed without a backend, by reason: no_backend (every backend down or failing), local (this host out of fds or memory for the backend connect), proxy (a malformed, truncated or oversized PROXY protocol header), proxy_timeout (no whole PROXY header within proxy_timeout), acl (source denied by allow/deny), source_connections (max_connections_per_source open), source_rate (over rate_per_source), queue_timeout (every backend at max_connections for queue_timeout), sni (a malformed, truncated or oversized TLS ClientHello on a frontend with SNI routes, or no route and an empty default pool), sni_timeout (no whole ClientHello within sni_timeout) or limit (no longer used: at max_connections new clients wait in the listen queue) (haproxy_frontend_denied_connections_total)."),
    ("ringlb_frontend_source_table_full_total", "New sources admitted without per-source limits because the per-source table (65,536 addresses) was full of sources with open connections or recent ones."),
    ("ringlb_frontend_rebuilds_total", "What publishes rebuilt of the frontend's routing, by what: frontend (its part of the snapshot: a reload or discovery update that changed it, a health change, a slow-start step or a runtime API change of one of its backends; other frontends are not rebuilt), schedule (a round-robin schedule built anew; an unchanged one is kept with its cursor) or maglev_table (a Maglev table built anew: only when the placeable backends, their names or weights change, never for a slow-start step)."),
    ("ringlb_frontend_queued_total", "Clients that waited in the frontend's queue because every backend was at its max_connections."),
    ("ringlb_frontend_queue_current", "Clients waiting now for a backend slot (haproxy_backend_current_queue, qcur)."),
    ("ringlb_frontend_queue_max", "The most clients that waited at once (haproxy_backend_max_queue, qmax)."),
    ("ringlb_frontend_queue_time_seconds", "Average time in the queue of the last ~1024 clients served from it (haproxy_backend_queue_time_average_seconds, qtime)."),
    ("ringlb_frontend_active_connections", "Open client connections (haproxy_frontend_current_sessions)."),
    ("ringlb_frontend_ready", "1 while the frontend is ready for new clients (a backend is available and ringlb is not stopping), as GET /ready/FRONTEND answers; what a BGP speaker announces the VIP on."),
    ("ringlb_frontend_announce_commands_total", "on_ready / on_unready commands run, by result (ok, or failed: could not start, non-zero exit, or killed after 5 s)."),
    ("ringlb_maglev_table_fingerprint", "A 52-bit hash of the Maglev table's routing (every slot's backend name, and the hash key); nodes behind one ECMP route should all show the same value. 0 for other balancers."),
    ("ringlb_config_reloads_total", "Configuration reloads by result."),
    ("ringlb_upgrades_total", "Binary upgrades (SIGUSR2, ringlb ctl upgrade) by result: failure counts this process's upgrades whose new process did not start (it kept serving); success is 1 in a process that an upgrade started and that took over."),
    ("ringlb_config_generation", "1 for the configuration ringlb started with, +1 for each reload that changed it."),
    ("ringlb_config_last_reload_success_timestamp_seconds", "Unix time of the last successful reload, or of the start."),
    ("ringlb_snapshot_generation", "Publications of the routing snapshot (reloads and health transitions)."),
    ("ringlb_active_connections", "Open client connections across all frontends."),
    ("ringlb_max_connections", "The max_connections in force: the configured one, lowered if the open-file limit cannot hold it."),
    ("ringlb_fd_limit", "The open-file limit (RLIMIT_NOFILE) ringlb runs under, after raising the soft limit to the hard one."),
    ("ringlb_accept_paused_total", "Times the workers stopped accepting because max_connections was reached (new clients wait in the listen queue)."),
    ("ringlb_relay_buffers_in_use", "Relay buffers on loan to connections with bytes in flight (0 when every connection is idle)."),
    ("ringlb_relay_buffers_free", "Relay buffers kept in the workers' pools for the next reads."),
    ("ringlb_relay_pipes_in_use", "Splice pipes on loan to connections with bytes in flight (2 fds each)."),
    ("ringlb_relay_pipes_free", "Empty splice pipes kept in the workers' pools (2 fds each)."),
    ("ringlb_relay_tails_in_use", "Small copies (at most 4 KiB) of the unsent bytes of sends waiting for a slow reader, or of a client's first bytes in a send op for one loop turn."),
    ("ringlb_relay_ring_buffers_in_use", "Buffers of the workers' io_uring buffer rings holding bytes between a read and its send's completion (0 when no bytes are in flight)."),
    ("ringlb_relay_pipe_unavailable_total", "Chunks copied instead of spliced because no pipe could be had (per-worker pipe limit, or out of fds)."),
    ("ringlb_relay_ring_empty_total", "Reads that found the worker's io_uring buffer ring empty and were read into a pooled buffer instead."),
    ("ringlb_local_errors_total", "Errors of this host, not of any backend (EMFILE, ENFILE, ENOBUFS, ENOMEM), by operation (accept, connect, probe) and errno; never counted against a backend."),
    ("ringlb_log_lines_total", "Connection log lines written to the target (docs/logging.md)."),
    ("ringlb_log_dropped_total", "Connection log lines lost because the target could not keep up (its queue was full) or a write to it failed."),
    ("ringlb_discovery_lookups_total", "DNS lookups of a discover entry, by result (failed: no answer, an error code, NXDOMAIN, a malformed or empty answer; the last good addresses are kept)."),
    ("ringlb_discovery_addresses", "Addresses a discover entry found last (each one a backend)."),
    ("ringlb_start_time_seconds", "Unix time ringlb started (haproxy_process_start_time_seconds)."),
    ("ringlb_admin_connections_evicted_total", "Admin connections closed to make room for a newer one: the oldest still sending its request, else the oldest being answered."),
    ("ringlb_build_info", "Always 1; labels: version, io (io_uring or epoll, the workers' runtime) and relay (copy, splice or splice-auto) (haproxy_process_build_info)."),
];

struct Handles {
    counters: Vec<Counter>,
    gauges: Vec<Gauge>,
}

struct Series {
    /// The state whose atomics feed this series now, by its serial (identity only).
    owner: u64,
    labels: Vec<Label>,
    /// `None` while the series is retired (its owner vanished).
    handles: Option<Handles>,
    /// What earlier owners counted, added to the current owner's counters.
    base: Vec<u64>,
    /// The values last exported.
    last: Vec<u64>,
    seen_tick: u64,
    retired_at: Option<Instant>,
}

#[derive(Default)]
struct Table {
    tick: u64,
    series: HashMap<String, Series>,
    /// Removed backends reported last tick: one that has finished draining since is copied
    /// once more, so the closes and bytes of its last connections reach its series.
    draining: Vec<crate::admin::ops::Draining>,
}

pub struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    published: Published,
    shared: Arc<Shared>,
    ops: Arc<OpsState>,
    discovery: Arc<crate::discovery::Stats>,
    table: Mutex<Table>,
    /// The text the renderer thread rendered last.
    rendered: arc_swap::ArcSwapOption<String>,
    /// Asks the renderer thread for a render; `None` until it runs.
    requests: Mutex<Option<std::sync::mpsc::Sender<RenderRequest>>>,
}

impl Exporter {
    pub fn new(published: Published, shared: Arc<Shared>, ops: Arc<OpsState>) -> Exporter {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::ALL, Some(IDLE_TIMEOUT))
            .build_recorder();
        let handle = recorder.handle();
        for (name, help) in HELP {
            let key = KeyName::from_const_str(name);
            let help = SharedString::const_str(help);
            if name.ends_with("_total") {
                recorder.describe_counter(key, None, help);
            } else {
                recorder.describe_gauge(key, None, help);
            }
        }
        Exporter {
            recorder,
            handle,
            published,
            shared,
            ops,
            discovery: Arc::default(),
            table: Mutex::new(Table::default()),
            rendered: arc_swap::ArcSwapOption::empty(),
            requests: Mutex::new(None),
        }
    }

    /// Exports the lookup counts of `discover` entries from `stats`.
    pub fn with_discovery(mut self, stats: Arc<crate::discovery::Stats>) -> Exporter {
        self.discovery = stats;
        self
    }

    /// The Prometheus text exposition, with values fresh from the atomics.
    pub fn render(&self) -> String {
        self.update();
        self.handle.render()
    }

    /// Has the renderer thread render the text with values fresh from the atomics, and waits
    /// for it without blocking the caller's thread; without that thread, renders here.
    pub async fn fresh(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|r| r.send(tx).is_ok());
        if !sent || rx.await.is_err() {
            self.rendered.store(Some(Arc::new(self.render())));
        }
    }

    /// What `/metrics` serves: the text of the last render (call [`Exporter::fresh`] first),
    /// or one rendered here if there was none.
    pub fn text(&self) -> Arc<String> {
        match self.rendered.load_full() {
            Some(text) => text,
            None => Arc::new(self.render()),
        }
    }

    /// Periodic maintenance the recorder needs (expiring idle series).
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Copies every live counter into its metric handle.
    pub fn update(&self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.tick += 1;
        let snap = self.published.load();
        let stopping = self.ops.stopping.load(Ordering::Relaxed);
        for fc in &snap.config.frontends {
            let Some(fe) = snap.frontend(&fc.name) else {
                continue;
            };
            let s = &fe.state;
            self.touch(
                &mut t,
                &FRONTEND,
                format!("f\0{}", fc.name),
                s.serial,
                || vec![Label::new("frontend", fc.name.clone())],
                &[
                    s.accepted_total(),
                    s.rejected_limit_total.load(Ordering::Relaxed),
                    s.rejected_no_backend_total.load(Ordering::Relaxed),
                    s.rejected_local_total.load(Ordering::Relaxed),
                    s.announce.ok.load(Ordering::Relaxed),
                    s.announce.failed.load(Ordering::Relaxed),
                    s.gate.rejected(Reason::Proxy),
                    s.gate.rejected(Reason::ProxyTimeout),
                    s.gate.rejected(Reason::Acl),
                    s.gate.rejected(Reason::SourceConnections),
                    s.gate.rejected(Reason::SourceRate),
                    s.gate.sources.full_total.load(Ordering::Relaxed),
                    s.gate.rejected(Reason::QueueTimeout),
                    s.gate.queue.queued_total.load(Ordering::Relaxed),
                    s.gate.rejected(Reason::Sni),
                    s.gate.rejected(Reason::SniTimeout),
                    s.rebuilds.frontend.load(Ordering::Relaxed),
                    s.rebuilds.schedule.load(Ordering::Relaxed),
                    s.rebuilds.maglev_table.load(Ordering::Relaxed),
                ],
                &[
                    s.active() as f64,
                    f64::from(u8::from(crate::announce::is_ready(fe, stopping))),
                    fe.fingerprint().unwrap_or(0) as f64,
                    s.gate.queue.current.load(Ordering::Relaxed) as f64,
                    s.gate.queue.max.load(Ordering::Relaxed) as f64,
                    s.gate.queue.qtime_seconds(),
                    f64::from(u8::from(!s.disabled.load(Ordering::Relaxed))),
                    s.maglev_left_out.load(Ordering::Relaxed) as f64,
                ],
            );
            for b in &fe.backends {
                self.touch_backend(&mut t, &b.config, &b.state);
            }
        }
        // Removed backends keep reporting while they drain, unless a live backend with the
        // same name has taken over their series.
        let now_draining = self.ops.draining();
        let finished: Vec<_> = std::mem::take(&mut t.draining)
            .into_iter()
            .filter(|d| {
                !now_draining
                    .iter()
                    .any(|n| n.state.serial == d.state.serial)
            })
            .collect();
        for d in finished.iter().chain(&now_draining) {
            let key = backend_key(&d.state.frontend, &d.config.name);
            if t.series.get(&key).is_none_or(|s| s.seen_tick != t.tick) {
                self.touch_backend(&mut t, &d.config, &d.state);
            }
        }
        // One series per target: sinks that differ only in framing (two frontends sending to
        // one syslog socket in RFC 5424 and 3164) are summed.
        let mut sinks: Vec<&Arc<crate::connlog::Sink>> = Vec::new();
        for fe in snap.frontends.values() {
            if let Some(l) = &fe.log {
                if !sinks.iter().any(|s| Arc::ptr_eq(s, &l.sink)) {
                    sinks.push(&l.sink);
                }
            }
        }
        sinks.sort_by_key(|s| s.spec.target.to_string());
        for group in sinks.chunk_by(|a, b| a.spec.target == b.spec.target) {
            let target = group[0].spec.target.to_string();
            let sum = |f: fn(&crate::connlog::sink::SinkStats) -> u64| -> u64 {
                group.iter().map(|s| f(&s.stats)).sum()
            };
            self.touch(
                &mut t,
                &LOG,
                format!("g\0{target}"),
                Arc::as_ptr(&group[0].stats) as usize as u64,
                || vec![Label::new("target", target.clone())],
                &[
                    sum(|s| s.written.load(Ordering::Relaxed)),
                    sum(|s| s.dropped.load(Ordering::Relaxed)),
                ],
                &[],
            );
        }
        t.draining = now_draining;
        for ((frontend, entry), st) in self.discovery.all() {
            self.touch(
                &mut t,
                &DISCOVERY,
                format!("d\0{frontend}\0{entry}"),
                Arc::as_ptr(&st) as usize as u64,
                || {
                    vec![
                        Label::new("frontend", frontend.clone()),
                        Label::new("discover", entry.clone()),
                    ]
                },
                &[
                    st.lookups_ok.load(Ordering::Relaxed),
                    st.lookups_failed.load(Ordering::Relaxed),
                ],
                &[st.addresses.load(Ordering::Relaxed) as f64],
            );
        }
        let ops = &self.ops;
        let pools = self.shared.pool_totals();
        for (op, errno, n) in self.shared.local.counts() {
            self.touch(
                &mut t,
                &LOCAL,
                format!("l/{}/{errno}", op.as_str()),
                0,
                || vec![Label::new("op", op.as_str()), Label::new("errno", errno)],
                &[n],
                &[],
            );
        }
        self.touch(
            &mut t,
            &PROCESS,
            "p".to_string(),
            0,
            Vec::new,
            &[
                ops.reloads_ok.load(Ordering::Relaxed),
                ops.reloads_failed.load(Ordering::Relaxed),
                self.shared.accept_paused_total.load(Ordering::Relaxed),
                pools.pipe_unavailable_total,
                pools.ring_empty_total,
                ops.admin_evicted.load(Ordering::Relaxed),
                ops.admin_writes.get(WriteResult::Ok),
                ops.admin_writes.get(WriteResult::BadRequest),
                ops.admin_writes.get(WriteResult::Unauthorized),
                ops.admin_writes.get(WriteResult::Forbidden),
                ops.admin_writes.get(WriteResult::NotFound),
                ops.admin_writes.get(WriteResult::Conflict),
                ops.admin_writes.get(WriteResult::TooLarge),
                ops.upgrades_ok.load(Ordering::Relaxed),
                ops.upgrades_failed.load(Ordering::Relaxed),
            ],
            &[
                ops.config_generation.load(Ordering::Relaxed) as f64,
                ops.last_reload_ok_unix_seconds(),
                snap.generation as f64,
                self.shared.active() as f64,
                self.shared.max_connections.load(Ordering::Relaxed) as f64,
                ops.started_unix_seconds(),
                self.shared.fd_limit as f64,
                pools.buffers_in_use as f64,
                pools.buffers_free as f64,
                pools.pipes_in_use as f64,
                pools.pipes_free as f64,
                pools.tails_in_use as f64,
                pools.ring_buffers_in_use as f64,
            ],
        );
        self.build_info();
        // Series nobody fed this tick: stop updating them so the recorder lets them go.
        let tick = t.tick;
        let now = Instant::now();
        for s in t.series.values_mut() {
            if s.seen_tick != tick && s.retired_at.is_none() {
                s.retired_at = Some(now);
                s.handles = None;
            }
        }
        t.series
            .retain(|_, s| s.retired_at.is_none_or(|at| now - at < RETIRED_MEMORY));
    }

    fn build_info(&self) {
        let key = Key::from_parts(
            "ringlb_build_info",
            vec![
                Label::new("version", env!("CARGO_PKG_VERSION")),
                // So an alert can say "running on the epoll fallback" without reading logs.
                Label::new("io", self.shared.io_name),
                Label::new("relay", self.shared.relay_mode.as_str()),
            ],
        );
        self.recorder.register_gauge(&key, &META).set(1.0);
    }

    fn touch_backend(&self, t: &mut Table, config: &Backend, s: &Arc<BackendState>) {
        let check_secs = s
            .check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_duration_ms
            .map_or(0.0, |ms| ms as f64 / 1000.0);
        let since_change = s
            .last_change
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            .as_secs_f64();
        let word = state_word(config, s);
        self.touch(
            t,
            &BACKEND,
            backend_key(&s.frontend, &config.name),
            s.serial,
            || {
                vec![
                    Label::new("frontend", s.frontend.clone()),
                    Label::new("backend", config.name.clone()),
                ]
            },
            &[
                s.connections_total(),
                s.connect_failures_total.load(Ordering::Relaxed),
                s.retries_total(),
                s.hedges_total.load(Ordering::Relaxed),
                s.hedges_won_total.load(Ordering::Relaxed),
                s.bytes_in_total(),
                s.bytes_out_total(),
                s.check_failures_total.load(Ordering::Relaxed),
                s.state_changes_total.load(Ordering::Relaxed),
                s.shut_down_total.load(Ordering::Relaxed),
            ],
            &[
                f64::from(u8::from(s.is_usable())),
                f64::from(u8::from(word == "draining")),
                s.active.load(Ordering::Relaxed) as f64,
                f64::from(config.weight),
                s.effective_weight_milli(config.weight) as f64 / 1000.0,
                check_secs,
                since_change.floor(),
                s.admin_mode().gauge(),
                s.connecting() as f64,
            ],
        );
    }

    /// Feeds one series; registers its handles on first sight or after it was retired.
    #[allow(clippy::too_many_arguments)]
    fn touch(
        &self,
        t: &mut Table,
        family: &Family,
        key: String,
        owner: u64,
        labels: impl FnOnce() -> Vec<Label>,
        counters: &[u64],
        gauges: &[f64],
    ) {
        let tick = t.tick;
        let s = t.series.entry(key).or_insert_with(|| Series {
            owner,
            labels: labels(),
            handles: None,
            base: vec![0; family.counters.len()],
            last: vec![0; family.counters.len()],
            seen_tick: tick,
            retired_at: None,
        });
        if s.owner != owner || s.retired_at.is_some() {
            // A new state behind a known series: continue from what was exported.
            if s.owner != owner {
                s.base.clone_from(&s.last);
            }
            s.owner = owner;
            s.retired_at = None;
        }
        s.seen_tick = tick;
        let handles = s
            .handles
            .get_or_insert_with(|| register(&self.recorder, family, &s.labels));
        for (i, c) in handles.counters.iter().enumerate() {
            let v = s.base[i] + counters[i];
            // A counter never goes backwards, even if an atomic was read mid-update.
            let v = v.max(s.last[i]);
            s.last[i] = v;
            c.absolute(v);
        }
        for (g, v) in handles.gauges.iter().zip(gauges) {
            g.set(*v);
        }
    }
}

fn backend_key(frontend: &str, backend: &str) -> String {
    format!("b\0{frontend}\0{backend}")
}

fn register(recorder: &PrometheusRecorder, family: &Family, labels: &[Label]) -> Handles {
    let counters = family
        .counters
        .iter()
        .map(|(name, extra)| {
            let mut l = labels.to_vec();
            if let Some((k, v)) = extra {
                l.push(Label::from_static_parts(k, v));
            }
            recorder.register_counter(&Key::from_parts(*name, l), &META)
        })
        .collect();
    let gauges = family
        .gauges
        .iter()
        .map(|name| recorder.register_gauge(&Key::from_parts(*name, labels.to_vec()), &META))
        .collect();
    Handles { counters, gauges }
}

/// A scrape waiting for a render (see [`Exporter::fresh`]).
type RenderRequest = tokio::sync::oneshot::Sender<()>;

/// Starts the `ringlb-metrics` thread: every [`UPDATE_EVERY`] it copies the atomics into the
/// handles and (every 20th time) lets the recorder expire idle series; on each scrape's
/// request it renders the text `/metrics` serves. It ends once the exporter is dropped.
pub fn spawn_renderer(exporter: &Arc<Exporter>) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<RenderRequest>();
    let weak = Arc::downgrade(exporter);
    std::thread::Builder::new()
        .name("ringlb-metrics".into())
        .spawn(move || {
            let mut n: u64 = 0;
            let mut waiting: Vec<RenderRequest> = Vec::new();
            while let Some(e) = weak.upgrade() {
                let start = Instant::now();
                if waiting.is_empty() {
                    e.update();
                } else {
                    // One render answers every scrape that asked before it began.
                    e.rendered.store(Some(Arc::new(e.render())));
                    for w in waiting.drain(..) {
                        let _ = w.send(());
                    }
                }
                n += 1;
                if n % 20 == 0 {
                    e.run_upkeep();
                }
                drop(e);
                match rx.recv_timeout(render_pause(start.elapsed())) {
                    Ok(first) => {
                        waiting.push(first);
                        waiting.extend(rx.try_iter());
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    // The exporter, which holds the sender, is gone.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
    *exporter.requests.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    Ok(())
}

/// The pause after an update that took `took`: [`UPDATE_EVERY`], or longer for a slow one so
/// that the periodic updates take at most a tenth of a core, but never more than
/// [`RENDER_AT_LEAST_EVERY`] between two. A scrape ends the pause at once.
pub fn render_pause(took: Duration) -> Duration {
    let pause = UPDATE_EVERY.max(took.saturating_mul(10));
    pause.min(RENDER_AT_LEAST_EVERY.saturating_sub(took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_render_waits_longer_but_renders_at_least_once_a_second() {
        assert_eq!(render_pause(Duration::from_millis(1)), UPDATE_EVERY);
        assert_eq!(
            render_pause(Duration::from_millis(50)),
            Duration::from_millis(500)
        );
        assert_eq!(
            render_pause(Duration::from_millis(200)),
            Duration::from_millis(800)
        );
        assert_eq!(render_pause(Duration::from_secs(2)), Duration::ZERO);
    }
}
