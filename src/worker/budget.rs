//! The fd budget: how many connections fit under the open-file limit.
//!
//! Each relayed connection needs two fds (client and backend). Pipes are lent only while
//! splice bytes are in flight, up to a per-worker limit. Listeners, the admin listener and its
//! clients, health probes and the runtime's own fds need a reserve. At start ringlb raises
//! its soft RLIMIT_NOFILE to the hard limit; if `max_connections` still does not fit it is
//! lowered, with one WARN line naming both numbers and the fix, so running out of fds never
//! surprises anyone at 3 a.m. At the cap the workers stop accepting (see `accept.rs`).
//!
//! The admin listener is always promised [`ADMIN_RESERVE`] connections. It may hold more, up
//! to `admin::conns::MAX_CONNECTIONS`, only out of fds the plan leaves over once the data
//! path has its cap and every reserve: a flood on the admin port never takes an fd that a
//! relayed connection was promised.

use crate::config::{Config, RelayMode};
use crate::relay::pool::PIPES_IN_USE_MAX;

/// fds per relayed connection: the client's socket and the backend's.
pub const FDS_PER_CONNECTION: u64 = 2;
/// The runtime, stdio, the admin listener, a reload's file reads, and room to breathe.
const BASE_RESERVE: u64 = 64;
/// Admin clients served at once, kept out of the data path's share.
pub const ADMIN_RESERVE: u64 = 64;
/// Free pipes a worker may keep besides those on loan (see `relay::pool`).
const FREE_PIPES: u64 = 16;

/// What the limit allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdBudget {
    /// RLIMIT_NOFILE in force (after raising the soft limit).
    pub limit: u64,
    /// The cap on client connections actually used.
    pub max_connections: usize,
    /// Pipes each worker may lend at once.
    pub pipes_per_worker: usize,
    /// fds the connection cap leaves for everything else.
    pub reserve: u64,
    /// Admin connections that may be held at once: the reserve plus what nothing else needs.
    pub admin_connections: usize,
}

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Plans the budget for `config` under `limit` (pure: unit-tested).
pub fn plan(config: &Config, limit: u64) -> FdBudget {
    let workers = config.global.workers.max(1) as u64;
    let listeners: u64 = config
        .frontends
        .iter()
        .map(|f| f.listen.len() as u64 * workers)
        .sum();
    let probes: u64 = config
        .frontends
        .iter()
        .map(|f| f.backends.len() as u64)
        .sum();
    // Listening sockets, and at the cap one accepted connection (two fds once it gets its
    // backend) held by each listener's accept loop (see `accept_loop`).
    let reserve = BASE_RESERVE + ADMIN_RESERVE + 3 * listeners + probes;
    // Pipes take at most an eighth of the limit, and none in copy mode.
    let pipes_per_worker = match config.global.relay {
        RelayMode::Copy => 0,
        RelayMode::Splice | RelayMode::SpliceAuto => ((limit / 8) / (2 * workers))
            .saturating_sub(FREE_PIPES)
            .min(PIPES_IN_USE_MAX as u64),
    };
    let pipe_fds = if pipes_per_worker == 0 {
        0
    } else {
        2 * (pipes_per_worker + FREE_PIPES) * workers
    };
    let fit = (limit.saturating_sub(reserve + pipe_fds) / FDS_PER_CONNECTION).max(1);
    let max_connections = (config.global.max_connections as u64).min(fit);
    let spare = limit.saturating_sub(max_connections * FDS_PER_CONNECTION + reserve + pipe_fds);
    let admin_max = crate::admin::conns::MAX_CONNECTIONS as u64;
    FdBudget {
        limit,
        max_connections: max_connections as usize,
        pipes_per_worker: pipes_per_worker as usize,
        reserve: reserve + pipe_fds,
        admin_connections: (ADMIN_RESERVE + spare).min(admin_max) as usize,
    }
}

impl FdBudget {
    /// The open-file limit `max_connections` would need.
    pub fn needed_for(&self, max_connections: usize) -> u64 {
        max_connections as u64 * FDS_PER_CONNECTION + self.reserve
    }

    /// Logs the WARN line when the config's cap had to be lowered; returns whether it was.
    pub fn warn_if_lowered(&self, configured: usize) -> bool {
        if self.max_connections >= configured {
            return false;
        }
        crate::warn!(
            "global.max_connections = {configured} does not fit the open-file limit {} \
             ({FDS_PER_CONNECTION} fds per connection plus {} reserved): serving at most {} \
             connections. Raise the limit to at least {} (LimitNOFILE= in the systemd unit, \
             or ulimit -n) or lower max_connections",
            self.limit,
            self.reserve,
            self.max_connections,
            self.needed_for(configured)
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(relay: &str, max: usize) -> Config {
        let text = format!(
            "[global]\nworkers = 2\nmax_connections = {max}\nrelay = \"{relay}\"\n\
             [[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\n\
             [[frontend.backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n"
        );
        Config::parse(&text, "test").expect("valid test config")
    }

    #[test]
    fn a_cap_that_fits_is_kept() {
        let b = plan(&config("copy", 1000), 1 << 20);
        assert_eq!(b.max_connections, 1000);
        assert_eq!(b.pipes_per_worker, 0);
    }

    #[test]
    fn a_cap_over_the_limit_is_lowered_to_what_fits() {
        let b = plan(&config("copy", 100_000), 256);
        // 64 + 64 reserved, 2 listeners (x3), 1 probe: (256 - 135) / 2.
        assert_eq!(b.max_connections, 60);
        assert!(b.needed_for(100_000) > 200_000);
        // Nothing left over: the admin listener keeps just its reserve.
        assert_eq!(b.admin_connections, ADMIN_RESERVE as usize + 1);
    }

    #[test]
    fn the_admin_listener_holds_more_only_with_fds_nobody_else_was_promised() {
        let roomy = plan(&config("copy", 1000), 1 << 20);
        assert_eq!(
            roomy.admin_connections,
            crate::admin::conns::MAX_CONNECTIONS
        );
        let tight = plan(&config("copy", 1000), 2500);
        let left = 2500 - tight.needed_for(1000);
        assert_eq!(tight.admin_connections as u64, ADMIN_RESERVE + left);
    }

    #[test]
    fn splice_modes_keep_room_for_their_pipes() {
        let b = plan(&config("splice-auto", 100_000), 24_000);
        assert!(b.pipes_per_worker > 0);
        let used = b.max_connections as u64 * 2 + b.reserve;
        assert!(used <= 24_000, "{b:?}");
        assert!(b.max_connections > 10_000, "{b:?}");
    }
}
