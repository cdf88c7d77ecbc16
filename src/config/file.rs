//! The config file as written: serde types that mirror the TOML one to one.
//!
//! Every field is optional here so that validation (in `validate.rs`) can report every missing
//! or bad value at once with its path, instead of serde stopping at the first. Unknown keys and
//! wrong types never reach serde: the walk (`walk.rs`, against `schema.rs`) reports each one and
//! leaves it out. `deny_unknown_fields` stays as a second guard: were the schema ever to accept
//! a key these types lack, loading fails with an internal error instead of ignoring the key (a
//! misspelt key silently ignored is an outage waiting).

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub global: Option<FileGlobal>,
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub frontend: Vec<FileFrontend>,
}

/// `workers = "auto"` or `workers = 4`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileWorkers {
    Count(i64),
    Word(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGlobal {
    pub workers: Option<FileWorkers>,
    pub max_connections: Option<i64>,
    pub shutdown_timeout: Option<String>,
    pub grace: Option<String>,
    pub io: Option<String>,
    pub relay: Option<String>,
    /// `"off"`, `"auto"` or a CPU list like `"0-3,6"`.
    pub cpu_affinity: Option<String>,
    /// Buffers in each worker's io_uring buffer ring (a power of two).
    pub ring_buffers: Option<i64>,
    /// DNS servers for `discover` (`"127.0.0.1:5353"`); absent: /etc/resolv.conf.
    pub resolvers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: Option<String>,
    /// The admin listener refuses non-loopback addresses unless this is true.
    pub allow_public: Option<bool>,
    /// A file holding the bearer token that runtime API writes must present.
    pub token_file: Option<String>,
    /// Where the runtime API's changes are saved, to survive a restart.
    pub state_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFrontend {
    pub name: Option<String>,
    pub listen: Option<Vec<String>>,
    pub balance: Option<String>,
    pub connect_timeout: Option<String>,
    /// "auto", "off" or a duration.
    pub connect_hedge: Option<String>,
    pub idle_timeout: Option<String>,
    pub retries: Option<i64>,
    pub hash_key: Option<String>,
    pub maglev_table_size: Option<i64>,
    pub on_marked_down: Option<String>,
    pub drain_pace: Option<String>,
    pub client_timeout: Option<String>,
    pub server_timeout: Option<String>,
    pub tcp_keepalive: Option<String>,
    pub source: Option<String>,
    pub slow_start: Option<String>,
    pub send_proxy: Option<String>,
    pub on_ready: Option<Vec<String>>,
    pub on_unready: Option<Vec<String>>,
    pub accept_proxy: Option<bool>,
    pub proxy_timeout: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub max_connections_per_source: Option<i64>,
    pub rate_per_source: Option<String>,
    pub queue_timeout: Option<String>,
    pub max_connections: Option<i64>,
    /// How long a routed frontend waits for a whole TLS ClientHello.
    pub sni_timeout: Option<String>,
    pub health: Option<FileHealth>,
    pub log: Option<FileLog>,
    /// `[[frontend.route]]`: SNI routes to named pools of backends.
    #[serde(default)]
    pub route: Vec<FileRoute>,
    #[serde(default)]
    pub backend: Vec<FileBackend>,
}

/// `[[frontend.route]]`: clients whose TLS server name is in `sni` go to the backends with
/// `pool = <pool>` (docs/traffic-controls.md, "SNI routing").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub sni: Option<Vec<String>>,
    pub pool: Option<String>,
}

/// `[frontend.log]`: the connection log (see docs/logging.md).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    pub format: Option<String>,
    pub target: Option<String>,
    pub syslog_format: Option<String>,
    pub facility: Option<String>,
    pub only_errors: Option<bool>,
    pub skip_null: Option<bool>,
    pub sample: Option<i64>,
    pub log_connect: Option<bool>,
}

/// Health settings; in a frontend they are the defaults, in a backend they override.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    pub fast_interval: Option<String>,
    pub down_interval: Option<String>,
    pub error_limit: Option<i64>,
    pub initial_state: Option<String>,
    pub spread: Option<i64>,
    /// The check's kind and its keys (`config::check`).
    pub kind: Option<String>,
    pub path: Option<String>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<String>,
    pub expect_body: Option<String>,
    pub send: Option<String>,
    pub expect: Option<String>,
    pub expect_regex: Option<String>,
    pub sni: Option<String>,
    pub tls: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    pub name: Option<String>,
    pub address: Option<String>,
    /// `"host:port"` whose A/AAAA records are the backends (instead of `address`).
    pub discover: Option<String>,
    /// An SRV name whose records are the backends (instead of `address`).
    pub discover_srv: Option<String>,
    pub resolve_interval: Option<String>,
    pub weight: Option<i64>,
    pub backup: Option<bool>,
    pub check: Option<bool>,
    pub slow_start: Option<String>,
    pub send_proxy: Option<String>,
    pub max_connections: Option<i64>,
    /// The pool a `[[frontend.route]]` names; without it the backend is in the default pool.
    pub pool: Option<String>,
    pub health: Option<FileHealth>,
}
