//! Configuration: the TOML text -> `walk` (against `schema`) -> `file` (serde types) ->
//! `validate` -> these runtime types.
//!
//! The runtime types are plain values, compared with `==` by the reload diff (`diff.rs`), so
//! every field here is something that changes behaviour. Loading never half-succeeds: it
//! returns a whole `Config` or every problem found, each with its key path and, where it comes
//! from the file, `file:line:column`.

mod check;
mod diff;
mod duration;
mod file;
mod log;
mod problem;
mod schema;
mod suggest;
pub mod traffic;
mod validate;
mod walk;

pub use check::{HttpProbe, Pattern, Probe, SendExpect, StatusRange};
pub use diff::{diff, BackendChange, BackendId, ConfigDiff, FrontendChange};
pub use duration::{format_duration, parse_duration};
pub use log::{ConnLog, LogFormat, LogTarget, SinkSpec, SyslogFormat};
pub use validate::DEFAULT_ADMIN_LISTEN;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub global: Global,
    pub admin: Admin,
    pub frontends: Vec<Frontend>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Number of worker threads, resolved from "auto" at load time.
    pub workers: usize,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    /// On SIGTERM, how long to keep accepting while readiness says "stopping", so that a BGP
    /// speaker or a balancer in front withdraws this node before it stops accepting.
    pub grace: Duration,
    pub io: IoMode,
    pub relay: RelayMode,
    /// Which CPU each worker thread runs on.
    pub cpu_affinity: CpuAffinity,
    /// Buffers of 16 KiB in each worker's io_uring buffer ring (a power of two).
    pub ring_buffers: u16,
    /// DNS servers that `discover` entries ask; empty: those of /etc/resolv.conf.
    pub resolvers: Vec<SocketAddr>,
}

/// How the workers move bytes (on io_uring and on the epoll fallback alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// recv/send through a pooled user-space buffer.
    Copy,
    /// splice(2) through a pooled pipe: the bytes never enter user space.
    Splice,
    /// Copy short exchanges; splice a direction while it carries bulk.
    SpliceAuto,
}

impl RelayMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayMode::Copy => "copy",
            RelayMode::Splice => "splice",
            RelayMode::SpliceAuto => "splice-auto",
        }
    }
}

/// Where the worker threads run. Unpinned by default, as HAProxy (no `cpu-map`) and nginx (no
/// `worker_cpu_affinity`): on a machine that also runs clients, backends or interrupt-heavy
/// work, the scheduler moving a worker off a busy core took more connections per second than
/// pinning did (docs/performance.md).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CpuAffinity {
    /// The scheduler places the workers.
    #[default]
    Off,
    /// Worker i on the i-th CPU this process may run on (wrapping around).
    Auto,
    /// Worker i on `cpus[i % cpus.len()]`.
    Cpus(Vec<usize>),
}

impl CpuAffinity {
    /// The CPU worker `index` is pinned to, if any; `allowed` is the process's CPU set in
    /// ascending order.
    pub fn cpu_for(&self, index: usize, allowed: &[usize]) -> Option<usize> {
        let list = match self {
            CpuAffinity::Off => return None,
            CpuAffinity::Auto => allowed,
            CpuAffinity::Cpus(cpus) => cpus.as_slice(),
        };
        (!list.is_empty()).then(|| list[index % list.len()])
    }

    /// For the start line: "unpinned" or "pinned to CPUs 0,1".
    pub fn describe(&self, workers: usize) -> String {
        let allowed = crate::worker::allowed_cpus();
        let cpus: Vec<String> = (0..workers)
            .filter_map(|i| self.cpu_for(i, &allowed))
            .map(|c| c.to_string())
            .collect();
        if cpus.is_empty() {
            "unpinned".to_string()
        } else {
            format!("pinned to CPUs {}", cpus.join(","))
        }
    }

    /// Parses `"off"`, `"auto"` or a CPU list (`"0-3,6"`); the message says what is wrong.
    pub fn parse(text: &str) -> Result<CpuAffinity, String> {
        match text {
            "off" => return Ok(CpuAffinity::Off),
            "auto" => return Ok(CpuAffinity::Auto),
            _ => {}
        }
        let bad = || format!("\"{text}\" is not \"off\", \"auto\" or a CPU list like \"0-3,6\"");
        let mut cpus = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (part, part),
            };
            let (Ok(lo), Ok(hi)) = (lo.parse::<usize>(), hi.parse::<usize>()) else {
                return Err(bad());
            };
            if lo > hi || hi >= MAX_CPUS {
                return Err(bad());
            }
            for cpu in lo..=hi {
                if !cpus.contains(&cpu) {
                    cpus.push(cpu);
                }
            }
        }
        Ok(CpuAffinity::Cpus(cpus))
    }
}

/// CPUs a CPU list may name (the kernel's CPU set size for sched_setaffinity).
pub const MAX_CPUS: usize = 1024;

/// Which kernel interface the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when the kernel allows it, else the epoll fallback (with a warning).
    Auto,
    /// io_uring or refuse to start.
    IoUring,
    /// Always the epoll fallback.
    Epoll,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// `None` when the config says `listen = ""` (admin listener disabled).
    pub listen: Option<SocketAddr>,
    pub allow_public: bool,
    /// The runtime API's bearer token, read from `token_file` when the config is loaded.
    pub token: Option<Token>,
    pub token_file: Option<std::path::PathBuf>,
    pub state_file: Option<std::path::PathBuf>,
}

/// A secret that never shows in a `Debug` print (a config is logged in diffs and errors).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    LeastConnections,
    RoundRobin,
    Maglev,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastConnections => "least-connections",
            Balance::RoundRobin => "round-robin",
            Balance::Maglev => "maglev",
        }
    }
}

/// What Maglev hashes to pick a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address: every connection of one client goes to one backend.
    Ip,
    /// IP and source port: spreads one client's connections.
    IpPort,
}

/// When a second connect is opened to another backend while the first is still pending
/// (`connect_hedge`; see `worker::hedge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectHedge {
    /// A multiple of the backend's observed connect-time p99, clamped between 10 ms and half
    /// of `connect_timeout`.
    Auto,
    /// A fixed delay.
    After(Duration),
    /// Never: a connect waits for its own timeout, then is retried.
    Off,
}

/// What happens to open connections when their backend is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMarkedDown {
    /// They continue (HAProxy's default).
    Continue,
    /// They are closed (HAProxy's `on-marked-down shutdown-sessions`).
    ShutdownSessions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Frontend {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub connect_hedge: ConnectHedge,
    pub idle_timeout: Duration,
    /// Extra connect attempts on other backends after the first fails.
    pub retries: u32,
    pub hash_key: HashKey,
    pub maglev_table_size: usize,
    pub on_marked_down: OnMarkedDown,
    /// Commands (argv, no shell) run when the frontend becomes ready / stops being ready, and
    /// repeated while it stays so: how a BGP speaker is told to announce or withdraw its VIP.
    pub on_ready: Vec<String>,
    pub on_unready: Vec<String>,
    /// `[frontend.log]`: `None` writes no connection log (and costs nothing).
    pub log: Option<ConnLog>,
    /// PROXY protocol in, source ACLs, per-source limits: all off by default.
    pub traffic: traffic::Traffic,
    /// Close a backend's open connections spread over this window instead of all at once,
    /// when ringlb closes them (backend removed, marked down with shutdown-sessions, stop).
    pub drain_pace: Option<Duration>,
    /// Close a connection whose client has sent nothing for this long (HAProxy's `timeout
    /// client`, counted on what the client sends).
    pub client_timeout: Option<Duration>,
    /// Close a connection whose backend has sent nothing for this long (`timeout server`).
    pub server_timeout: Option<Duration>,
    /// TCP keepalive probes on client and backend sockets after this much silence.
    pub tcp_keepalive: Option<Duration>,
    /// The local address backend connections are made from (HAProxy's `source`).
    pub source: Option<std::net::IpAddr>,
    /// `[[frontend.route]]`: route by the TLS server name; `None` without routes (and then
    /// nothing is read before the backend is picked).
    pub sni: Option<traffic::SniRouting>,
    /// The backends: those written with `address`, then (once the control loop has expanded
    /// the config, see `discovery::expand`) one per address each `discover` entry found.
    pub backends: Vec<Backend>,
    /// Backend groups found in DNS (`discover` / `discover_srv` entries).
    pub discover: Vec<Discover>,
}

/// A `[[frontend.backend]]` entry with `discover` or `discover_srv` instead of `address`: a
/// group of backends whose addresses come from DNS and change while ringlb runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Discover {
    /// The entry's name; the backend for address A is named `NAME-A` (`web-10.0.0.5:8080`).
    pub name: String,
    pub target: DiscoverTarget,
    /// How often to ask again; `None`: when the answer's TTL runs out (clamped).
    pub resolve_interval: Option<Duration>,
    /// Everything a discovered backend gets but its name and address (`address` here is the
    /// unspecified address and unused). Its health starts down unless `check = false`: an
    /// address new in DNS takes traffic only once `rise` checks have passed.
    pub template: Backend,
    /// A host name in `address` (not in /etc/hosts): one backend named as the entry, at the
    /// lowest address found (IPv4 before IPv6), with its health as configured (up at once by
    /// default, as a literal address is); re-resolved like `discover`.
    pub single: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DiscoverTarget {
    /// A and AAAA records of `host`, each with `port`.
    Host { host: String, port: u16 },
    /// SRV records of the name: each target's addresses with the record's port.
    Srv(String),
}

impl fmt::Display for DiscoverTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoverTarget::Host { host, port } => write!(f, "{host}:{port}"),
            DiscoverTarget::Srv(name) => write!(f, "SRV {name}"),
        }
    }
}

/// Health-check settings for one backend (frontend defaults with the backend's overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// `check = false` turns active probes off; passive health still applies.
    pub check: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub fast_interval: Duration,
    pub down_interval: Duration,
    /// Consecutive failed real connects that mark the backend down (0 disables).
    pub error_limit: u32,
    pub initial_up: bool,
    /// Random spread applied to each interval, in percent (HAProxy's spread-checks).
    pub spread_percent: u32,
    /// What the check says on its connection (`kind` and its keys).
    pub probe: Probe,
    /// The backend's `send_proxy`: an application check sends a PROXY header first, with no
    /// addresses (v2 `LOCAL`, v1 `UNKNOWN`: the connection is ringlb's own), as HAProxy's
    /// checks of a `send-proxy` server do; a backend that requires the header would refuse
    /// the check's request otherwise. The Layer4 check sends nothing.
    pub send_proxy: Option<ProxyVersion>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub slow_start: Duration,
    /// PROXY protocol header sent to the backend before any client byte (HAProxy's
    /// `send-proxy` / `send-proxy-v2`); `None` sends nothing.
    pub send_proxy: Option<ProxyVersion>,
    /// Most connections open to this backend at once (HAProxy's `maxconn` on a `server`);
    /// beyond it the backend is skipped, and clients wait in the frontend's queue when
    /// every backend is full.
    pub max_connections: Option<u32>,
    /// The pool a route sends clients to; `None` is the default pool.
    pub pool: Option<String>,
    pub health: Health,
}

/// PROXY protocol version (haproxy.org's proxy-protocol.txt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The human-readable line: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// Every problem found in a config file, one line each: `file:line:column: key path: what`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Whether backend host names are accepted while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostLookup {
    /// Look them up in /etc/hosts, and leave any other to the discovery resolver at run time
    /// (what `run`, `check` and reloads do).
    System,
    /// Report each one as a problem instead: for fuzzing, where a lookup per case would make
    /// the run slow and depend on the network.
    Refuse,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        // Blocking, on purpose: `check` runs it on the main thread, and a reload on a thread of
        // its own (`control::start_load`), so a slow file system stalls no async thread.
        #[allow(clippy::disallowed_methods)]
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Config::parse_bytes(&bytes, &name, HostLookup::System)
    }

    /// Parses and validates config text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, source_name, HostLookup::System)
    }

    /// Parses and validates the bytes of a config file, which must be UTF-8 (as TOML is).
    pub fn parse_bytes(
        bytes: &[u8],
        source_name: &str,
        dns: HostLookup,
    ) -> Result<Config, ConfigError> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Config::parse_with(text, source_name, dns),
            Err(e) => {
                let good = String::from_utf8_lossy(&bytes[..e.valid_up_to()]);
                let (line, col) = problem::Lines::new(&good).position(good.len());
                Err(ConfigError {
                    source_name: source_name.to_string(),
                    problems: vec![format!(
                        "{source_name}:{line}:{col}: not UTF-8 text (TOML files must be UTF-8)"
                    )],
                })
            }
        }
    }

    /// Parses and validates config text, accepting host names or not.
    pub fn parse_with(
        text: &str,
        source_name: &str,
        dns: HostLookup,
    ) -> Result<Config, ConfigError> {
        let lines = problem::Lines::new(text);
        let error = |problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        };
        // A syntax error leaves the rest of the file's structure unknown, so it is the one
        // problem reported; everything after parsing is collected in full.
        let doc = toml_edit::ImDocument::parse(text)
            .map_err(|e| error(vec![syntax_error(&e, &lines, source_name)]))?;
        let walked = walk::walk(&doc);
        let mut problems = walked.problems;
        match file::FileConfig::deserialize(toml::Value::Table(walked.table)) {
            Ok(file) => match validate::validate(file, dns) {
                Ok(config) if problems.is_empty() => return Ok(config),
                Ok(_) => {}
                // A problem inside a key the walk already reported is a follow-on of it.
                Err(more) => problems.extend(more.into_iter().filter(|p| match &p.at {
                    problem::At::Path(path) => !problem::is_within_any(path, &walked.reported),
                    _ => true,
                })),
            },
            // The walk hands serde only keys and types the schema accepts, so this is a bug in
            // the schema; say so rather than panic or pass.
            Err(e) => problems.push(problem::Problem {
                at: problem::At::Nowhere,
                text: format!("internal error: the config schema and its types disagree: {e}"),
            }),
        }
        Err(error(located(problems, &walked.spans, &lines, source_name)))
    }

    pub fn frontend(&self, name: &str) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.name == name)
    }
}

/// `file:line:column: TOML syntax error: ...`, with the line and a caret under the spot.
fn syntax_error(e: &toml_edit::TomlError, lines: &problem::Lines<'_>, source_name: &str) -> String {
    let message = one_line(&e.message().trim_end().replace('\n', "; "));
    match e.span() {
        Some(s) => {
            let (line, col) = lines.position(s.start);
            format!("{source_name}:{line}:{col}: TOML syntax error: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

/// Each problem as one line, in the order of the file: `file:line:column: text` where the file
/// says where, else the text alone (the header line names the file).
fn located(
    problems: Vec<problem::Problem>,
    spans: &problem::Spans,
    lines: &problem::Lines<'_>,
    source_name: &str,
) -> Vec<String> {
    let mut out: Vec<(Option<(usize, usize)>, String)> = problems
        .into_iter()
        .map(|p| {
            let span = match p.at {
                problem::At::Span(s) => Some(s),
                problem::At::Path(path) => spans.find(&path),
                problem::At::Nowhere => None,
            };
            (span.map(|s| lines.position(s.start)), one_line(&p.text))
        })
        .collect();
    // Stable: problems on one spot keep the order they were found in; unplaced ones go last.
    out.sort_by_key(|(pos, _)| pos.unwrap_or((usize::MAX, 0)));
    out.into_iter()
        .map(|(pos, text)| match pos {
            Some((line, col)) => format!("{source_name}:{line}:{col}: {text}"),
            None => text,
        })
        .collect()
}

/// The text with control characters escaped (`\n`, `\u{1b}`): messages quote keys and values
/// from the file, and one of those must not break the one-problem-per-line output or send
/// escape sequences to a terminal.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
