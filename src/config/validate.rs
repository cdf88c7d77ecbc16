//! Turns the file types into runtime types, collecting every problem with its path.
//!
//! Paths read like `frontend "web": backend "api3": address: ...` so an operator can find the
//! table without counting. Each problem also carries the TOML path of the key it is about
//! (`frontend.0.backend.2.address`), which `mod.rs` turns into the line and column. Validation
//! never stops at the first problem.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use super::check::{KindName, ProbeLayer};
use super::duration::{format_duration, parse_duration};
use super::file::{FileBackend, FileConfig, FileFrontend, FileHealth, FileWorkers};
use super::problem::{At, Problem};
use super::{
    Admin, Backend, Balance, Config, ConnectHedge, CpuAffinity, Discover, DiscoverTarget, Frontend,
    Global, HashKey, Health, HostLookup, IoMode, OnMarkedDown, ProxyVersion, RelayMode, Token,
};

mod traffic;

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65537;
const MAX_MAGLEV_TABLE_SIZE: i64 = 16_777_259;
const MAX_WEIGHT: i64 = 256;
/// Longest duration any key accepts. Deadlines are computed as `now + duration`; a bound
/// keeps every such sum far from overflowing, and nothing needs more than a month.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Collects problems under a path: `label` for the operator (`frontend "web": backend "a"`),
/// `path` for finding the line (`frontend.0.backend.0`).
pub(super) struct Problems<'a> {
    out: &'a mut Vec<Problem>,
    label: String,
    path: String,
}

fn join(outer: &str, inner: &str, sep: &str) -> String {
    if outer.is_empty() {
        inner.to_string()
    } else {
        format!("{outer}{sep}{inner}")
    }
}

impl<'a> Problems<'a> {
    fn root(out: &'a mut Vec<Problem>) -> Problems<'a> {
        Problems {
            out,
            label: String::new(),
            path: String::new(),
        }
    }

    pub(super) fn push(&mut self, key: &str, msg: impl std::fmt::Display) {
        self.push_at(key, key, msg);
    }

    /// A problem labelled by `key` that points at `at` (a key, or a list element like `listen.1`).
    fn push_at(&mut self, key: &str, at: &str, msg: impl std::fmt::Display) {
        self.out.push(Problem {
            at: At::Path(join(&self.path, at, ".")),
            text: format!("{}: {msg}", join(&self.label, key, ": ")),
        });
    }

    fn nested(&mut self, label: &str, path: &str) -> Problems<'_> {
        Problems {
            label: join(&self.label, label, ": "),
            path: join(&self.path, path, "."),
            out: self.out,
        }
    }

    /// A duration if the key is set and valid; a bad one is reported and gives None.
    fn opt_duration(&mut self, key: &str, value: &Option<String>) -> Option<Duration> {
        let text = value.as_ref()?;
        match parse_duration(text) {
            Ok(d) if d > MAX_DURATION => {
                self.push(
                    key,
                    format!("\"{text}\" is too long: at most 30 days (\"720h\")"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.push(key, e);
                None
            }
        }
    }

    fn duration(&mut self, key: &str, value: &Option<String>, default: Duration) -> Duration {
        self.opt_duration(key, value).unwrap_or(default)
    }

    fn opt_positive_duration(&mut self, key: &str, value: &Option<String>) -> Option<Duration> {
        let d = self.opt_duration(key, value)?;
        if d.is_zero() {
            self.push(key, "must be greater than zero");
            return None;
        }
        Some(d)
    }

    fn positive_duration(
        &mut self,
        key: &str,
        value: &Option<String>,
        default: Duration,
    ) -> Duration {
        self.opt_positive_duration(key, value).unwrap_or(default)
    }

    fn opt_int_in(&mut self, key: &str, value: Option<i64>, lo: i64, hi: i64) -> Option<i64> {
        match value? {
            v if v < lo || v > hi => {
                self.push(key, format!("{v} is out of range: must be {lo} to {hi}"));
                None
            }
            v => Some(v),
        }
    }

    pub(super) fn int_in(
        &mut self,
        key: &str,
        value: Option<i64>,
        default: i64,
        lo: i64,
        hi: i64,
    ) -> i64 {
        self.opt_int_in(key, value, lo, hi).unwrap_or(default)
    }
}

/// Two different addresses on the same port of which one is the other's family's wildcard
/// ("0.0.0.0:9090" and "127.0.0.1:9090"): binding both fails. IPv6 listeners are IPv6-only,
/// so "[::]" does not overlap an IPv4 address.
fn wildcard_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a != b
        && a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The runtime config, or every problem found; `dns` says whether host names are looked up.
pub fn validate(file: FileConfig, dns: HostLookup) -> Result<Config, Vec<Problem>> {
    let mut out = Vec::new();
    let global = validate_global(&file, &mut out);
    let admin = validate_admin(&file, &mut out);

    let mut frontends = Vec::new();
    let mut names = HashSet::new();
    let mut listens: HashSet<SocketAddr> = HashSet::new();
    let mut root = Problems::root(&mut out);
    if file.frontend.is_empty() {
        root.push_at(
            "no frontends",
            "frontend",
            "add at least one [[frontend]] table",
        );
    }
    for (i, ff) in file.frontend.iter().enumerate() {
        let label = match &ff.name {
            Some(n) => format!("frontend \"{n}\""),
            None => format!("frontend #{}", i + 1),
        };
        let mut p = root.nested(&label, &format!("frontend.{i}"));
        if let Some(fe) = validate_frontend(ff, dns, &mut p) {
            if !names.insert(fe.name.clone()) {
                p.push("name", format!("duplicate frontend name \"{}\"", fe.name));
            }
            let written = listen_indexes(ff);
            for addr in &fe.listen {
                if addr.port() != 0 && !listens.insert(*addr) {
                    let at = written
                        .get(addr)
                        .map_or("listen".into(), |i| format!("listen.{i}"));
                    p.push_at(
                        "listen",
                        &at,
                        format!("{addr} is already used by another frontend"),
                    );
                }
            }
            frontends.push(fe);
        }
    }
    if let Some(a) = admin.listen {
        if a.port() != 0 && listens.contains(&a) {
            root.nested("admin", "admin")
                .push("listen", format!("{a} is also a frontend's listen address"));
        } else if let Some(f) = listens.iter().find(|f| wildcard_overlap(**f, a)) {
            root.nested("admin", "admin").push(
                "listen",
                format!(
                    "{a} overlaps the frontend listen address {f} (same port, one of them a \
                     wildcard): they cannot both be bound"
                ),
            );
        }
    }
    if out.is_empty() {
        Ok(Config {
            global,
            admin,
            frontends,
        })
    } else {
        Err(out)
    }
}

/// Where each address is first written in the frontend's `listen` list (`listen.2`), for the
/// line number of a clash; built once per frontend so a long list stays linear.
fn listen_indexes(ff: &FileFrontend) -> HashMap<SocketAddr, usize> {
    let mut at = HashMap::new();
    for (i, text) in ff.listen.iter().flatten().enumerate() {
        if let Ok(a) = text.parse::<SocketAddr>() {
            at.entry(a).or_insert(i);
        }
    }
    at
}

fn validate_global(file: &FileConfig, out: &mut Vec<Problem>) -> Global {
    let g = file.global.as_ref();
    let mut root = Problems::root(out);
    let mut p = root.nested("global", "global");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match g.and_then(|g| g.workers.as_ref()) {
        None => cpus,
        Some(FileWorkers::Word(w)) if w == "auto" => cpus,
        Some(FileWorkers::Word(w)) => {
            p.push("workers", format!("\"{w}\" is not \"auto\" or a number"));
            cpus
        }
        Some(FileWorkers::Count(n)) => p.int_in("workers", Some(*n), 1, 1, 1024) as usize,
    };
    let max_connections = p.int_in(
        "max_connections",
        g.and_then(|g| g.max_connections),
        100_000,
        1,
        10_000_000,
    ) as usize;
    let shutdown_timeout = p.duration(
        "shutdown_timeout",
        &g.and_then(|g| g.shutdown_timeout.clone()),
        Duration::from_secs(30),
    );
    let grace = p.duration("grace", &g.and_then(|g| g.grace.clone()), Duration::ZERO);
    let io = match g.and_then(|g| g.io.as_deref()) {
        None | Some("auto") => IoMode::Auto,
        Some("io_uring") => IoMode::IoUring,
        Some("epoll") => IoMode::Epoll,
        Some(other) => {
            p.push(
                "io",
                format!("unknown mode \"{other}\": use \"auto\", \"io_uring\" or \"epoll\""),
            );
            IoMode::Auto
        }
    };
    let relay = match g.and_then(|g| g.relay.as_deref()) {
        None | Some("copy") => RelayMode::Copy,
        Some("splice") => RelayMode::Splice,
        Some("splice-auto") => RelayMode::SpliceAuto,
        Some(other) => {
            p.push(
                "relay",
                format!("unknown mode \"{other}\": use \"copy\", \"splice\" or \"splice-auto\""),
            );
            RelayMode::Copy
        }
    };
    let cpu_affinity = match g.and_then(|g| g.cpu_affinity.as_deref()) {
        None => CpuAffinity::Off,
        Some(text) => match CpuAffinity::parse(text) {
            Ok(CpuAffinity::Cpus(cpus)) => {
                let allowed = crate::worker::allowed_cpus();
                let outside: Vec<String> = cpus
                    .iter()
                    .filter(|c| !allowed.contains(c))
                    .map(usize::to_string)
                    .collect();
                if !outside.is_empty() && !allowed.is_empty() {
                    p.push(
                        "cpu_affinity",
                        format!(
                            "CPU {} is not one this process may run on (allowed here: {})",
                            outside.join(", "),
                            allowed
                                .iter()
                                .map(usize::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    );
                }
                CpuAffinity::Cpus(cpus)
            }
            Ok(other) => other,
            Err(e) => {
                p.push("cpu_affinity", e);
                CpuAffinity::Off
            }
        },
    };
    let ring_buffers = p.int_in(
        "ring_buffers",
        g.and_then(|g| g.ring_buffers),
        crate::worker::ring::RING_BUFS as i64,
        1,
        32_768,
    );
    if !(ring_buffers as u64).is_power_of_two() {
        p.push(
            "ring_buffers",
            format!(
                "{ring_buffers} is not a power of two (the kernel's buffer rings need one): \
                 use {} or {}",
                (ring_buffers as u64).next_power_of_two() / 2,
                (ring_buffers as u64).next_power_of_two()
            ),
        );
    }
    let mut resolvers = Vec::new();
    for (i, text) in g
        .and_then(|g| g.resolvers.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        // A bare IP address means the DNS port, as in resolv.conf.
        let parsed = text.parse::<SocketAddr>().or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match parsed {
            Ok(a) if a.port() != 0 => resolvers.push(a),
            _ => p.push_at(
                "resolvers",
                &format!("resolvers.{i}"),
                format!("\"{text}\" is not an IP address (with an optional port), like \"127.0.0.1:5353\""),
            ),
        }
    }
    Global {
        workers,
        max_connections,
        shutdown_timeout,
        grace,
        io,
        relay,
        cpu_affinity,
        ring_buffers: ring_buffers as u16,
        resolvers,
    }
}

fn validate_admin(file: &FileConfig, out: &mut Vec<Problem>) -> Admin {
    let a = file.admin.as_ref();
    let mut root = Problems::root(out);
    let mut p = root.nested("admin", "admin");
    let allow_public = a.and_then(|a| a.allow_public).unwrap_or(false);
    let text = a
        .and_then(|a| a.listen.clone())
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
    let listen = if text.is_empty() {
        None
    } else {
        match text.parse::<SocketAddr>() {
            Ok(addr) => {
                if !addr.ip().is_loopback() && !allow_public {
                    p.push(
                        "listen",
                        format!(
                            "{addr} is not a loopback address; the admin listener exposes \
                             status and metrics, so set allow_public = true to serve it there"
                        ),
                    );
                }
                Some(addr)
            }
            Err(_) => {
                p.push(
                    "listen",
                    format!("\"{text}\" is not an IP address with a port, like \"127.0.0.1:9090\""),
                );
                None
            }
        }
    };
    let token_file = a
        .and_then(|a| a.token_file.as_deref())
        .map(std::path::PathBuf::from);
    let token = token_file.as_ref().and_then(|path| match read_token(path) {
        Ok(text) if text.trim().is_empty() => {
            p.push(
                "token_file",
                format!("{} is empty; put the bearer token in it", path.display()),
            );
            None
        }
        Ok(text) if text.trim().chars().any(|c| !c.is_ascii_graphic()) => {
            p.push(
                "token_file",
                format!(
                    "{}: the token must be one word of printable ASCII",
                    path.display()
                ),
            );
            None
        }
        Ok(text) => Some(Token(text.trim().to_string())),
        Err(e) => {
            p.push("token_file", format!("cannot read {}: {e}", path.display()));
            None
        }
    });
    let state_file = a
        .and_then(|a| a.state_file.as_deref())
        .map(std::path::PathBuf::from);
    if let Some(path) = &state_file {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        if path.file_name().is_none() {
            p.push(
                "state_file",
                format!("{} is not a file name", path.display()),
            );
        } else if !dir.is_dir() {
            p.push(
                "state_file",
                format!("directory {} does not exist", dir.display()),
            );
        }
    }
    Admin {
        listen,
        allow_public,
        token,
        token_file,
        state_file,
    }
}

#[allow(clippy::disallowed_methods)]
fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn is_prime(n: i64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// A frontend's or backend's name: present, short, and safe in logs and metric labels.
fn checked_name(name: &Option<String>, kind: &str, p: &mut Problems<'_>) -> String {
    match name {
        None => {
            p.push("name", format!("missing: every {kind} needs a name"));
            String::new()
        }
        Some(n) => {
            if !valid_name(n) {
                p.push(
                    "name",
                    format!("\"{n}\" must be 1-64 letters, digits, '-', '_' or '.'"),
                );
            }
            n.clone()
        }
    }
}

fn validate_frontend(ff: &FileFrontend, dns: HostLookup, p: &mut Problems<'_>) -> Option<Frontend> {
    let name = checked_name(&ff.name, "frontend", p);

    let mut listen = Vec::new();
    let mut seen = HashSet::new();
    match &ff.listen {
        None => p.push(
            "listen",
            "missing: give at least one address, like [\"0.0.0.0:80\"]",
        ),
        Some(l) if l.is_empty() => p.push("listen", "empty: give at least one address"),
        Some(l) => {
            for (i, text) in l.iter().enumerate() {
                let at = format!("listen.{i}");
                match text.parse::<SocketAddr>() {
                    Ok(a) if !seen.insert(a) => {
                        p.push_at("listen", &at, format!("{a} is listed twice"))
                    }
                    Ok(a) => listen.push(a),
                    Err(_) => p.push_at(
                        "listen",
                        &at,
                        format!("\"{text}\" is not an IP address with a port, like \"0.0.0.0:80\" or \"[::]:443\""),
                    ),
                }
            }
        }
    }

    let balance = match ff.balance.as_deref() {
        None | Some("least-connections") | Some("leastconn") => Balance::LeastConnections,
        Some("round-robin") | Some("roundrobin") => Balance::RoundRobin,
        Some("maglev") => Balance::Maglev,
        Some(other) => {
            p.push(
                "balance",
                format!("unknown algorithm \"{other}\": use \"least-connections\", \"round-robin\" or \"maglev\""),
            );
            Balance::LeastConnections
        }
    };
    let connect_timeout = p.positive_duration(
        "connect_timeout",
        &ff.connect_timeout,
        Duration::from_secs(2),
    );
    let connect_hedge = connect_hedge(&ff.connect_hedge, connect_timeout, p);
    let idle_timeout =
        p.positive_duration("idle_timeout", &ff.idle_timeout, Duration::from_secs(600));
    let retries = p.int_in("retries", ff.retries, 2, 0, 100) as u32;
    let hash_key = match ff.hash_key.as_deref() {
        None | Some("ip") => HashKey::Ip,
        Some("ip-port") => HashKey::IpPort,
        Some(other) => {
            p.push(
                "hash_key",
                format!("unknown key \"{other}\": use \"ip\" or \"ip-port\""),
            );
            HashKey::Ip
        }
    };
    let maglev_table_size = match ff.maglev_table_size {
        None => DEFAULT_MAGLEV_TABLE_SIZE,
        Some(m) if !(3..=MAX_MAGLEV_TABLE_SIZE).contains(&m) => {
            p.push(
                "maglev_table_size",
                format!("{m} is out of range: must be a prime from 3 to {MAX_MAGLEV_TABLE_SIZE}"),
            );
            DEFAULT_MAGLEV_TABLE_SIZE
        }
        Some(m) if !is_prime(m) => {
            p.push(
                "maglev_table_size",
                format!("{m} is not a prime (Maglev needs a prime table size, like 65537)"),
            );
            DEFAULT_MAGLEV_TABLE_SIZE
        }
        Some(m) => m as usize,
    };
    let on_marked_down = match ff.on_marked_down.as_deref() {
        None | Some("continue") => OnMarkedDown::Continue,
        Some("shutdown-sessions") => OnMarkedDown::ShutdownSessions,
        Some(other) => {
            p.push(
                "on_marked_down",
                format!("unknown action \"{other}\": use \"continue\" or \"shutdown-sessions\""),
            );
            OnMarkedDown::Continue
        }
    };
    let drain_pace = p.opt_positive_duration("drain_pace", &ff.drain_pace);
    let client_timeout = p.opt_positive_duration("client_timeout", &ff.client_timeout);
    let server_timeout = p.opt_positive_duration("server_timeout", &ff.server_timeout);
    let tcp_keepalive = p.opt_positive_duration("tcp_keepalive", &ff.tcp_keepalive);
    if tcp_keepalive.is_some_and(|k| k < Duration::from_secs(1)) {
        p.push(
            "tcp_keepalive",
            "must be at least 1s (TCP keepalive counts whole seconds)",
        );
    }
    let source = match ff.source.as_deref() {
        None => None,
        Some(text) => {
            match text.parse::<std::net::IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    p.push(
                    "source",
                    format!("\"{text}\" is not an IP address (like \"10.0.0.5\" or \"2001:db8::5\")"),
                );
                    None
                }
            }
        }
    };
    let slow_start = p.duration("slow_start", &ff.slow_start, Duration::ZERO);
    let send_proxy = proxy_version(&ff.send_proxy, None, p);
    let on_ready = command(&ff.on_ready, "on_ready", p);
    let on_unready = command(&ff.on_unready, "on_unready", p);
    let traffic = traffic::validate_traffic(ff, p);
    let sni = traffic::validate_routes(ff, p);
    // The frontend's health keys are checked once, here, where they are written; each
    // backend then checks only the keys it overrides.
    let fe_health = health_layer(ff.health.as_ref(), None, &mut p.nested("health", "health"));
    let log = ff
        .log
        .as_ref()
        .map(|l| super::log::validate_log(l, &mut p.nested("log", "log")));

    let mut backends = Vec::new();
    let mut discover = Vec::new();
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    if ff.backend.is_empty() {
        p.push(
            "backend",
            "none: add at least one [[frontend.backend]] table",
        );
    }
    for (i, fb) in ff.backend.iter().enumerate() {
        let label = match &fb.name {
            Some(n) => format!("backend \"{n}\""),
            None => format!("backend #{}", i + 1),
        };
        let mut bp = p.nested(&label, &format!("backend.{i}"));
        let defaults = BackendDefaults {
            health: &fe_health,
            slow_start,
            send_proxy,
        };
        match validate_backend(fb, &defaults, dns, &mut bp) {
            Some(Entry::Discover(d)) => {
                if !names.insert(d.name.clone()) {
                    bp.push("name", format!("duplicate backend name \"{}\"", d.name));
                }
                discover.push(d);
            }
            Some(Entry::Static(b)) => {
                if !names.insert(b.name.clone()) {
                    bp.push("name", format!("duplicate backend name \"{}\"", b.name));
                }
                if !addrs.insert(b.address) {
                    bp.push(
                        "address",
                        format!("{} is already used by another backend", b.address),
                    );
                }
                backends.push(b);
            }
            None => {}
        }
    }
    if let Some(ip) = source {
        for b in &backends {
            if b.address.is_ipv4() != ip.is_ipv4() {
                p.push(
                    "source",
                    format!(
                        "{ip} cannot reach backend \"{}\" at {}: the source and the backend \
                         must both be IPv4 or both IPv6",
                        b.name, b.address
                    ),
                );
                break;
            }
        }
    }
    if balance == Balance::Maglev && backends.len() > maglev_table_size {
        p.push(
            "maglev_table_size",
            format!(
                "{maglev_table_size} is smaller than the number of backends ({})",
                backends.len()
            ),
        );
    }

    Some(Frontend {
        name,
        listen,
        balance,
        connect_timeout,
        connect_hedge,
        idle_timeout,
        retries,
        hash_key,
        maglev_table_size,
        on_marked_down,
        on_ready,
        on_unready,
        log,
        traffic,
        drain_pace,
        client_timeout,
        server_timeout,
        tcp_keepalive,
        source,
        sni,
        backends,
        discover,
    })
}

/// An announce command: an argv array whose first element names the program.
fn command(v: &Option<Vec<String>>, key: &str, p: &mut Problems) -> Vec<String> {
    match v {
        None => Vec::new(),
        Some(argv) if argv.is_empty() => {
            p.push(
                key,
                "empty: give the program and its arguments, like [\"birdc\", \"enable\", \"vip\"]",
            );
            Vec::new()
        }
        Some(argv) if argv[0].trim().is_empty() => {
            p.push(key, "the first element must name the program to run");
            Vec::new()
        }
        Some(argv) => argv.clone(),
    }
}

/// `connect_hedge`: "auto" (the default), "off", or a duration shorter than `connect_timeout`
/// (a longer one would never start a hedge: the connect times out first).
fn connect_hedge(
    value: &Option<String>,
    connect_timeout: Duration,
    p: &mut Problems<'_>,
) -> ConnectHedge {
    match value.as_deref() {
        None | Some("auto") => ConnectHedge::Auto,
        Some("off") => ConnectHedge::Off,
        Some(text) => match parse_duration(text) {
            Err(_) => {
                p.push(
                    "connect_hedge",
                    format!("\"{text}\" is not \"auto\", \"off\" or a duration like \"50ms\""),
                );
                ConnectHedge::Auto
            }
            Ok(d) if d.is_zero() => {
                p.push(
                    "connect_hedge",
                    "must be greater than zero (write \"off\" for no hedging)",
                );
                ConnectHedge::Auto
            }
            Ok(d) if d >= connect_timeout => {
                p.push(
                    "connect_hedge",
                    format!(
                        "{} is not shorter than connect_timeout ({}): no hedge would ever \
                         start; use a shorter delay, \"auto\" or \"off\"",
                        format_duration(d),
                        format_duration(connect_timeout)
                    ),
                );
                ConnectHedge::Auto
            }
            Ok(d) => ConnectHedge::After(d),
        },
    }
}

/// What `address` names: an address, or a host name the discovery resolver looks up.
enum Address {
    Literal(SocketAddr),
    Name { host: String, port: u16 },
}

/// `address = "ip:port"` or `"host:port"`. A host name is first looked up in /etc/hosts (and
/// `localhost` is 127.0.0.1), as a stub resolver does, which gives a fixed address; any other
/// is left to the discovery resolver (`[global] resolvers`), which asks DNS without blocking
/// and again at the answer's TTL (`discovery`).
fn parse_address(text: &str, dns: HostLookup) -> Result<Address, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(Address::Literal(a));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("\"{text}\" has no port: write it as \"host:port\""));
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("\"{text}\": \"{port}\" is not a port (1-65535)"))?;
    if dns == HostLookup::Refuse {
        return Err(format!(
            "\"{text}\" is a host name, and host names are not looked up here"
        ));
    }
    crate::discovery::dns::check_name(host)
        .map_err(|why| format!("\"{text}\" is not an address or a host name: {why}"))?;
    Ok(match crate::discovery::dns::hosts_address(host) {
        Some(ip) => Address::Literal(SocketAddr::new(ip, port)),
        None => Address::Name {
            host: host.to_string(),
            port,
        },
    })
}

/// What a frontend sets for all its backends (each may override it).
struct BackendDefaults<'a> {
    health: &'a HealthLayer,
    slow_start: Duration,
    send_proxy: Option<ProxyVersion>,
}

/// `send_proxy = "v1" | "v2"`; `default` where the key is absent.
fn proxy_version(
    text: &Option<String>,
    default: Option<ProxyVersion>,
    p: &mut Problems<'_>,
) -> Option<ProxyVersion> {
    match text.as_deref() {
        None => default,
        Some("v1") => Some(ProxyVersion::V1),
        Some("v2") => Some(ProxyVersion::V2),
        Some(other) => {
            p.push(
                "send_proxy",
                format!("unknown version \"{other}\": use \"v1\" or \"v2\""),
            );
            default
        }
    }
}

/// A `[[frontend.backend]]` entry: one backend, or a group found in DNS.
enum Entry {
    Static(Backend),
    Discover(Discover),
}

/// Shortest and longest `resolve_interval`.
const RESOLVE_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));

/// `discover = "host:port"` or `discover_srv = "name"`, checked; `None` when neither is set
/// (or it is wrong, which is reported).
fn discover_target(fb: &FileBackend, p: &mut Problems<'_>) -> Option<DiscoverTarget> {
    if let Some(text) = &fb.discover {
        let Some((host, port)) = text.rsplit_once(':') else {
            p.push(
                "discover",
                format!(
                    "\"{text}\" has no port: write it as \"host:port\", like \"tasks.web:8080\""
                ),
            );
            return None;
        };
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => {
                p.push(
                    "discover",
                    format!("\"{text}\": \"{port}\" is not a port (1-65535)"),
                );
                return None;
            }
            Ok(port) => port,
        };
        if let Err(why) = crate::discovery::dns::check_name(host) {
            p.push("discover", format!("\"{text}\": {why}"));
            return None;
        }
        return Some(DiscoverTarget::Host {
            host: host.to_string(),
            port,
        });
    }
    let text = fb.discover_srv.as_ref()?;
    match crate::discovery::dns::check_name(text) {
        Ok(()) => Some(DiscoverTarget::Srv(text.clone())),
        Err(why) => {
            p.push("discover_srv", format!("\"{text}\": {why}"));
            None
        }
    }
}

fn validate_backend(
    fb: &FileBackend,
    defaults: &BackendDefaults<'_>,
    dns: HostLookup,
    p: &mut Problems<'_>,
) -> Option<Entry> {
    let name = checked_name(&fb.name, "backend", p);
    let sources = [
        ("address", fb.address.is_some()),
        ("discover", fb.discover.is_some()),
        ("discover_srv", fb.discover_srv.is_some()),
    ];
    let given: Vec<&str> = sources
        .iter()
        .filter(|(_, s)| *s)
        .map(|(k, _)| *k)
        .collect();
    if given.len() > 1 {
        p.push(
            given[1],
            format!("{} and {} both given: a backend entry has one of address, discover and discover_srv", given[0], given[1]),
        );
    }
    let mut target = discover_target(fb, p);
    let resolve_interval = p.opt_positive_duration("resolve_interval", &fb.resolve_interval);
    if let Some(d) = resolve_interval {
        let (lo, hi) = RESOLVE_INTERVAL_RANGE;
        if d < lo || d > hi {
            p.push("resolve_interval", "out of range: must be 100ms to 1h");
        }
    }
    let address = match &fb.address {
        None if fb.discover.is_some() || fb.discover_srv.is_some() => {
            target.as_ref()?;
            Some(SocketAddr::from(([0, 0, 0, 0], 0)))
        }
        None => {
            p.push(
                "address",
                "missing: give \"host:port\", like \"10.0.0.11:8080\"",
            );
            None
        }
        Some(text) => match parse_address(text, dns) {
            Ok(Address::Literal(a)) if a.port() == 0 => {
                p.push(
                    "address",
                    format!("\"{text}\": port 0 cannot be connected to"),
                );
                None
            }
            Ok(Address::Name { port: 0, .. }) => {
                p.push(
                    "address",
                    format!("\"{text}\": port 0 cannot be connected to"),
                );
                None
            }
            Ok(Address::Literal(a)) => Some(a),
            Ok(Address::Name { host, port }) => {
                // Only when it is the one source given (else that was reported above).
                if target.is_none() {
                    target = Some(DiscoverTarget::Host { host, port });
                }
                Some(SocketAddr::from(([0, 0, 0, 0], 0)))
            }
            Err(e) => {
                p.push("address", e);
                None
            }
        },
    };
    let single = fb.discover.is_none() && fb.discover_srv.is_none();
    if fb.resolve_interval.is_some() && single && target.is_none() {
        p.push(
            "resolve_interval",
            "only for entries with discover, discover_srv or a host name (not in /etc/hosts) in address",
        );
    }
    let weight = match fb.weight {
        None => 1,
        Some(0) => {
            p.push(
                "weight",
                "0 is not allowed: a backend that should take no traffic is `backup = true` or removed",
            );
            1
        }
        Some(w) => p.int_in("weight", Some(w), 1, 1, MAX_WEIGHT) as u32,
    };
    let slow_start = p.duration("slow_start", &fb.slow_start, defaults.slow_start);
    let send_proxy = proxy_version(&fb.send_proxy, defaults.send_proxy, p);
    if let Some(pool) = fb.pool.as_deref().filter(|n| !valid_name(n)) {
        p.push(
            "pool",
            format!("\"{pool}\" must be 1-64 letters, digits, '-', '_' or '.'"),
        );
    }
    let max_connections = p
        .opt_int_in("max_connections", fb.max_connections, 1, 10_000_000)
        .map(|n| n as u32);
    let own = health_layer(
        fb.health.as_ref(),
        defaults.health.probe.kind(),
        &mut p.nested("health", "health"),
    );
    let mut health = own.over(defaults.health).resolve(fb.check.unwrap_or(true));
    health.send_proxy = send_proxy;
    let backend = Backend {
        name,
        address: address?,
        weight,
        backup: fb.backup.unwrap_or(false),
        slow_start,
        send_proxy,
        max_connections,
        pool: fb.pool.clone(),
        health: health.clone(),
    };
    let Some(target) = target else {
        return Some(Entry::Static(backend));
    };
    if !single {
        // An address new in DNS may not answer yet: it takes traffic once `rise` checks
        // passed. A host name in `address` starts as its health settings say, as a literal
        // address does.
        health.initial_up = !health.check;
    }
    Some(Entry::Discover(Discover {
        name: backend.name.clone(),
        target,
        resolve_interval,
        template: Backend { health, ..backend },
        single,
    }))
}

/// One level's health settings, checked: `None` where that level does not set the key (or
/// set it wrongly, which is reported).
#[derive(Debug, Default, Clone)]
struct HealthLayer {
    interval: Option<Duration>,
    timeout: Option<Duration>,
    fast_interval: Option<Duration>,
    down_interval: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    error_limit: Option<u32>,
    spread: Option<u32>,
    initial_up: Option<bool>,
    /// `kind` and its keys (`check.rs`).
    probe: ProbeLayer,
}

/// `inherited`: the frontend's check kind, for a backend's table.
fn health_layer(
    h: Option<&FileHealth>,
    inherited: Option<KindName>,
    p: &mut Problems<'_>,
) -> HealthLayer {
    let Some(h) = h else {
        return HealthLayer::default();
    };
    let mut key_problems = Vec::new();
    let probe = ProbeLayer::check(h, inherited, &mut key_problems);
    for (key, msg) in key_problems {
        p.push(key, msg);
    }
    let count =
        |p: &mut Problems<'_>, key, v, lo, hi| p.opt_int_in(key, v, lo, hi).map(|v| v as u32);
    HealthLayer {
        interval: p.opt_positive_duration("interval", &h.interval),
        timeout: p.opt_positive_duration("timeout", &h.timeout),
        fast_interval: p.opt_positive_duration("fast_interval", &h.fast_interval),
        down_interval: p.opt_positive_duration("down_interval", &h.down_interval),
        rise: count(p, "rise", h.rise, 1, 100),
        fall: count(p, "fall", h.fall, 1, 100),
        error_limit: count(p, "error_limit", h.error_limit, 0, 1_000_000),
        spread: count(p, "spread", h.spread, 0, 50),
        initial_up: match h.initial_state.as_deref() {
            None => None,
            Some("up") => Some(true),
            Some("down") => Some(false),
            Some(other) => {
                p.push(
                    "initial_state",
                    format!("unknown state \"{other}\": use \"up\" or \"down\""),
                );
                None
            }
        },
        probe,
    }
}

impl HealthLayer {
    /// This layer's keys, and `below`'s where this one leaves them unset.
    fn over(self, below: &HealthLayer) -> HealthLayer {
        HealthLayer {
            interval: self.interval.or(below.interval),
            timeout: self.timeout.or(below.timeout),
            fast_interval: self.fast_interval.or(below.fast_interval),
            down_interval: self.down_interval.or(below.down_interval),
            rise: self.rise.or(below.rise),
            fall: self.fall.or(below.fall),
            error_limit: self.error_limit.or(below.error_limit),
            spread: self.spread.or(below.spread),
            initial_up: self.initial_up.or(below.initial_up),
            probe: self.probe.over(&below.probe),
        }
    }

    /// The documented defaults for what no level sets; the timeouts and intervals default to
    /// the (merged) `interval`.
    fn resolve(self, check: bool) -> Health {
        let interval = self.interval.unwrap_or(Duration::from_secs(2));
        Health {
            check,
            interval,
            timeout: self.timeout.unwrap_or(interval),
            rise: self.rise.unwrap_or(2),
            fall: self.fall.unwrap_or(3),
            fast_interval: self.fast_interval.unwrap_or(interval),
            down_interval: self.down_interval.unwrap_or(interval),
            error_limit: self.error_limit.unwrap_or(10),
            initial_up: self.initial_up.unwrap_or(true),
            spread_percent: self.spread.unwrap_or(10),
            send_proxy: None,
            probe: self.probe.resolve(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn problems(text: &str) -> Vec<String> {
        Config::parse(text, "test.toml").unwrap_err().problems
    }

    const MINIMAL: &str = r#"
[[frontend]]
name = "web"
listen = ["127.0.0.1:8080"]
[[frontend.backend]]
name = "a"
address = "127.0.0.1:9001"
"#;

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        let f = &c.frontends[0];
        assert_eq!(f.retries, 2);
        assert_eq!(f.connect_timeout.as_secs(), 2);
        assert_eq!(f.idle_timeout.as_secs(), 600);
        assert_eq!(f.backends[0].weight, 1);
        assert_eq!(f.backends[0].health.rise, 2);
        assert_eq!(f.backends[0].health.fall, 3);
        assert_eq!(f.backends[0].health.timeout, f.backends[0].health.interval);
        assert_eq!(c.global.max_connections, 100_000);
        assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn cpu_affinity_is_off_by_default_and_parses_auto_and_cpu_lists() {
        use crate::config::CpuAffinity;
        assert_eq!(
            Config::parse(MINIMAL, "t").unwrap().global.cpu_affinity,
            CpuAffinity::Off
        );
        assert_eq!(CpuAffinity::parse("auto"), Ok(CpuAffinity::Auto));
        assert_eq!(CpuAffinity::parse("off"), Ok(CpuAffinity::Off));
        assert_eq!(
            CpuAffinity::parse("0-2, 6,1"),
            Ok(CpuAffinity::Cpus(vec![0, 1, 2, 6]))
        );
        for bad in ["", "2-1", "a", "1,", "-3", "0-1024", "0..3"] {
            let e = CpuAffinity::parse(bad).unwrap_err();
            assert!(e.contains(&format!("\"{bad}\" is not")), "{bad}: {e}");
        }
        // Worker i takes the i-th CPU, wrapping around; "auto" walks the allowed set.
        let allowed = [2, 3];
        let cpus = CpuAffinity::Cpus(vec![5, 7, 9]);
        let got: Vec<_> = (0..4).map(|i| cpus.cpu_for(i, &allowed)).collect();
        assert_eq!(got, [Some(5), Some(7), Some(9), Some(5)]);
        let got: Vec<_> = (0..3)
            .map(|i| CpuAffinity::Auto.cpu_for(i, &allowed))
            .collect();
        assert_eq!(got, [Some(2), Some(3), Some(2)]);
        assert_eq!(CpuAffinity::Auto.cpu_for(0, &[]), None);
        assert_eq!(CpuAffinity::Off.cpu_for(0, &allowed), None);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let p = problems(
            r#"
[[frontend]]
name = "web"
listen = ["nonsense"]
connect_timeout = "2x"
[[frontend.backend]]
name = "a"
address = "127.0.0.1:9001"
weight = 0
[[frontend.backend]]
name = "a"
address = "no-port"
"#,
        );
        let all = p.join("\n");
        assert!(
            all.contains("frontend \"web\": listen: \"nonsense\""),
            "{all}"
        );
        assert!(
            all.contains("frontend \"web\": connect_timeout: bad duration \"2x\""),
            "{all}"
        );
        assert!(
            all.contains("frontend \"web\": backend \"a\": weight: 0 is not allowed"),
            "{all}"
        );
        assert!(
            all.contains("backend \"a\": address: \"no-port\" has no port"),
            "{all}"
        );
        assert_eq!(p.len(), 4, "{all}");
    }

    #[test]
    fn backend_health_overrides_the_frontend_defaults() {
        let c = Config::parse(
            r#"
[[frontend]]
name = "web"
listen = ["127.0.0.1:8080"]
[frontend.health]
interval = "5s"
rise = 4
[[frontend.backend]]
name = "a"
address = "127.0.0.1:9001"
[frontend.backend.health]
rise = 1
"#,
            "t",
        )
        .unwrap();
        let h = &c.frontends[0].backends[0].health;
        assert_eq!(h.rise, 1);
        assert_eq!(h.interval.as_secs(), 5);
    }

    #[test]
    fn a_bad_frontend_health_value_is_reported_once_where_it_is_written() {
        let p = problems(
            r#"
[[frontend]]
name = "web"
listen = ["127.0.0.1:8080"]
[frontend.health]
fall = 0
[[frontend.backend]]
name = "a"
address = "127.0.0.1:9001"
[[frontend.backend]]
name = "b"
address = "127.0.0.1:9002"
"#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("test.toml:6:8: frontend \"web\": health: fall: 0 is out of range"),
            "{p:?}"
        );
    }

    #[test]
    fn a_frontend_without_backends_still_has_its_health_checked() {
        let p = problems(
            "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\n[frontend.health]\ninterval = \"0s\"\n",
        );
        let all = p.join("\n");
        assert!(
            all.contains(
                "test.toml:5:12: frontend \"web\": health: interval: must be greater than zero"
            ),
            "{all}"
        );
        assert!(all.contains("backend: none"), "{all}");
    }
}
