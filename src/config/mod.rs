//! Configuration: `file` (what the TOML says) -> `validate` -> these runtime types.
//!
//! The runtime types are plain values, compared with `==` by the reload diff (`diff.rs`), so
//! every field here is something that changes behaviour. Loading never half-succeeds: it
//! returns a whole `Config` or every problem found, each with its path.

mod diff;
mod duration;
mod file;
mod validate;

pub use diff::{diff, BackendChange, ConfigDiff, FrontendChange};
pub use duration::{format_duration, parse_duration};

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

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
    pub io: IoMode,
    pub relay: RelayMode,
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
    pub idle_timeout: Duration,
    /// Extra connect attempts on other backends after the first fails.
    pub retries: u32,
    pub hash_key: HashKey,
    pub maglev_table_size: usize,
    pub on_marked_down: OnMarkedDown,
    pub backends: Vec<Backend>,
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub slow_start: Duration,
    pub health: Health,
}

/// Every problem found in a config file, each with its path.
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

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Config::parse(&text, &name)
    }

    /// Parses and validates config text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let file: file::FileConfig = toml::from_str(text).map_err(|e| ConfigError {
            source_name: source_name.to_string(),
            problems: vec![e.to_string().trim_end().replace('\n', "\n  ")],
        })?;
        validate::validate(file).map_err(|problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        })
    }

    pub fn frontend(&self, name: &str) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.name == name)
    }
}
