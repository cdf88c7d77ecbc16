//! Turns the file types into runtime types, collecting every problem with its path.
//!
//! Paths read like `frontend "web": backend "api3": address: ...` so an operator can find the
//! line without counting tables. Validation never stops at the first problem.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::duration::parse_duration;
use super::file::{FileBackend, FileConfig, FileFrontend, FileHealth, FileWorkers};
use super::{
    Admin, Backend, Balance, Config, Frontend, Global, HashKey, Health, IoMode, OnMarkedDown,
    RelayMode,
};

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65537;
const MAX_MAGLEV_TABLE_SIZE: i64 = 16_777_259;
const MAX_WEIGHT: i64 = 256;
/// Longest duration any key accepts. Deadlines are computed as `now + duration`; a bound
/// keeps every such sum far from overflowing, and nothing needs more than a month.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Collects problems under a path prefix.
struct Problems<'a> {
    out: &'a mut Vec<String>,
    path: String,
}

impl<'a> Problems<'a> {
    fn push(&mut self, key: &str, msg: impl std::fmt::Display) {
        if self.path.is_empty() {
            self.out.push(format!("{key}: {msg}"));
        } else {
            self.out.push(format!("{}: {key}: {msg}", self.path));
        }
    }

    fn nested(&mut self, more: &str) -> Problems<'_> {
        let path = if self.path.is_empty() {
            more.to_string()
        } else {
            format!("{}: {more}", self.path)
        };
        Problems {
            out: self.out,
            path,
        }
    }

    fn duration(&mut self, key: &str, value: &Option<String>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(text) => match parse_duration(text) {
                Ok(d) if d > MAX_DURATION => {
                    self.push(
                        key,
                        format!("\"{text}\" is too long: at most 30 days (\"720h\")"),
                    );
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.push(key, e);
                    default
                }
            },
        }
    }

    fn positive_duration(
        &mut self,
        key: &str,
        value: &Option<String>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(key, value, default);
        if d.is_zero() {
            self.push(key, "must be greater than zero");
            return default;
        }
        d
    }

    fn int_in(&mut self, key: &str, value: Option<i64>, default: i64, lo: i64, hi: i64) -> i64 {
        match value {
            None => default,
            Some(v) if v < lo || v > hi => {
                self.push(key, format!("{v} is out of range: must be {lo} to {hi}"));
                default
            }
            Some(v) => v,
        }
    }
}

pub fn validate(file: FileConfig) -> Result<Config, Vec<String>> {
    let mut out = Vec::new();
    let global = validate_global(&file, &mut out);
    let admin = validate_admin(&file, &mut out);

    let mut frontends = Vec::new();
    let mut names = HashSet::new();
    let mut listens: HashSet<SocketAddr> = HashSet::new();
    if file.frontend.is_empty() {
        out.push("no frontends: add at least one [[frontend]] table".to_string());
    }
    for (i, ff) in file.frontend.iter().enumerate() {
        let label = match &ff.name {
            Some(n) => format!("frontend \"{n}\""),
            None => format!("frontend #{}", i + 1),
        };
        let mut p = Problems {
            out: &mut out,
            path: label,
        };
        if let Some(fe) = validate_frontend(ff, &mut p) {
            if !names.insert(fe.name.clone()) {
                p.push("name", format!("duplicate frontend name \"{}\"", fe.name));
            }
            for addr in &fe.listen {
                if addr.port() != 0 && !listens.insert(*addr) {
                    p.push(
                        "listen",
                        format!("{addr} is already used by another frontend"),
                    );
                }
            }
            frontends.push(fe);
        }
    }
    if let Some(a) = admin.listen {
        if a.port() != 0 && listens.contains(&a) {
            out.push(format!(
                "admin: listen: {a} is also a frontend's listen address"
            ));
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

fn validate_global(file: &FileConfig, out: &mut Vec<String>) -> Global {
    let g = file.global.as_ref();
    let mut p = Problems {
        out,
        path: "global".to_string(),
    };
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
    Global {
        workers,
        max_connections,
        shutdown_timeout,
        io,
        relay,
    }
}

fn validate_admin(file: &FileConfig, out: &mut Vec<String>) -> Admin {
    let a = file.admin.as_ref();
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
                    out.push(format!(
                        "admin: listen: {addr} is not a loopback address; the admin listener exposes \
                         status and metrics, so set allow_public = true to serve it there"
                    ));
                }
                Some(addr)
            }
            Err(_) => {
                out.push(format!(
                    "admin: listen: \"{text}\" is not an IP address with a port, like \"127.0.0.1:9090\""
                ));
                None
            }
        }
    };
    Admin {
        listen,
        allow_public,
    }
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

fn validate_frontend(ff: &FileFrontend, p: &mut Problems<'_>) -> Option<Frontend> {
    let name = checked_name(&ff.name, "frontend", p);

    let mut listen = Vec::new();
    match &ff.listen {
        None => p.push(
            "listen",
            "missing: give at least one address, like [\"0.0.0.0:80\"]",
        ),
        Some(l) if l.is_empty() => p.push("listen", "empty: give at least one address"),
        Some(l) => {
            for text in l {
                match text.parse::<SocketAddr>() {
                    Ok(a) if listen.contains(&a) => {
                        p.push("listen", format!("{a} is listed twice"))
                    }
                    Ok(a) => listen.push(a),
                    Err(_) => p.push(
                        "listen",
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
    let slow_start = p.duration("slow_start", &ff.slow_start, Duration::ZERO);
    let default_health = FileHealth::default();
    let fe_health = ff.health.as_ref().unwrap_or(&default_health);

    let mut backends = Vec::new();
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
        let mut bp = p.nested(&label);
        if let Some(b) = validate_backend(fb, fe_health, slow_start, &mut bp) {
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
        idle_timeout,
        retries,
        hash_key,
        maglev_table_size,
        on_marked_down,
        backends,
    })
}

fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !text.contains(':') {
        return Err(format!("\"{text}\" has no port: write it as \"host:port\""));
    }
    match text.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("\"{text}\" resolved to no address")),
        Err(e) => Err(format!("\"{text}\" is not an address ({e})")),
    }
}

fn validate_backend(
    fb: &FileBackend,
    fe_health: &FileHealth,
    fe_slow_start: Duration,
    p: &mut Problems<'_>,
) -> Option<Backend> {
    let name = checked_name(&fb.name, "backend", p);
    let address = match &fb.address {
        None => {
            p.push(
                "address",
                "missing: give \"host:port\", like \"10.0.0.11:8080\"",
            );
            None
        }
        Some(text) => match resolve(text) {
            Ok(a) if a.port() == 0 => {
                p.push(
                    "address",
                    format!("\"{text}\": port 0 cannot be connected to"),
                );
                None
            }
            Ok(a) => Some(a),
            Err(e) => {
                p.push("address", e);
                None
            }
        },
    };
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
    let slow_start = p.duration("slow_start", &fb.slow_start, fe_slow_start);
    let merged = merge_health(fe_health, fb.health.as_ref());
    let health = validate_health(&merged, fb.check.unwrap_or(true), p);
    Some(Backend {
        name,
        address: address?,
        weight,
        backup: fb.backup.unwrap_or(false),
        slow_start,
        health,
    })
}

fn merge_health(fe: &FileHealth, be: Option<&FileHealth>) -> FileHealth {
    let Some(be) = be else { return fe.clone() };
    FileHealth {
        interval: be.interval.clone().or_else(|| fe.interval.clone()),
        timeout: be.timeout.clone().or_else(|| fe.timeout.clone()),
        rise: be.rise.or(fe.rise),
        fall: be.fall.or(fe.fall),
        fast_interval: be
            .fast_interval
            .clone()
            .or_else(|| fe.fast_interval.clone()),
        down_interval: be
            .down_interval
            .clone()
            .or_else(|| fe.down_interval.clone()),
        error_limit: be.error_limit.or(fe.error_limit),
        initial_state: be
            .initial_state
            .clone()
            .or_else(|| fe.initial_state.clone()),
        spread: be.spread.or(fe.spread),
    }
}

fn validate_health(h: &FileHealth, check: bool, p: &mut Problems<'_>) -> Health {
    let mut p = p.nested("health");
    let interval = p.positive_duration("interval", &h.interval, Duration::from_secs(2));
    let timeout = p.positive_duration("timeout", &h.timeout, interval);
    let fast_interval = p.positive_duration("fast_interval", &h.fast_interval, interval);
    let down_interval = p.positive_duration("down_interval", &h.down_interval, interval);
    let rise = p.int_in("rise", h.rise, 2, 1, 100) as u32;
    let fall = p.int_in("fall", h.fall, 3, 1, 100) as u32;
    let error_limit = p.int_in("error_limit", h.error_limit, 10, 0, 1_000_000) as u32;
    let spread_percent = p.int_in("spread", h.spread, 10, 0, 50) as u32;
    let initial_up = match h.initial_state.as_deref() {
        None | Some("up") => true,
        Some("down") => false,
        Some(other) => {
            p.push(
                "initial_state",
                format!("unknown state \"{other}\": use \"up\" or \"down\""),
            );
            true
        }
    };
    Health {
        check,
        interval,
        timeout,
        rise,
        fall,
        fast_interval,
        down_interval,
        error_limit,
        initial_up,
        spread_percent,
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
}
