//! Backend selection: one trait, one type per mechanism.
//!
//! A selector is built on the control thread for one frontend's primary (or backup) servers
//! whenever the usable set or the weights change, and published inside the snapshot. The data
//! path calls [`BackendSelection::select`] once per connect attempt; it only reads atomics.
//!
//! - [`round_robin::SmoothRoundRobin`]: nginx-style smooth weighted round robin, precomputed.
//! - [`least_conn::LeastConnections`]: weighted, over the cross-worker active counts.
//! - [`maglev::MaglevSelector`]: Maglev consistent hashing of the client address.
//!
//! Each of a frontend's [`pools::Pool`]s (SNI routing) has its own selectors; a frontend
//! without routes has one pool.

pub mod least_conn;
pub mod maglev;
pub mod pools;
pub mod round_robin;

use std::net::SocketAddr;

use crate::backend::BackendRef;
use crate::config::{Balance, Frontend};

/// Picks a backend for a new connection.
pub trait BackendSelection: Send + Sync {
    /// Returns an index into `backends`, never one in `tried` (attempts that already failed
    /// for this connection) and never one that is not usable; `None` when nothing is left.
    fn select(
        &self,
        client: &SocketAddr,
        backends: &[BackendRef],
        tried: &[usize],
    ) -> Option<usize>;

    /// A hash of the routing, for selectors whose choice is the same on every node given
    /// the same config and health (Maglev); `None` for the others.
    fn fingerprint(&self) -> Option<u64> {
        None
    }
}

/// Builds the selector for `members` (indices into `backends`) with the frontend's algorithm.
pub fn build(
    frontend: &Frontend,
    backends: &[BackendRef],
    members: &[usize],
) -> Box<dyn BackendSelection> {
    match frontend.balance {
        Balance::RoundRobin => Box::new(round_robin::SmoothRoundRobin::new(backends, members)),
        Balance::LeastConnections => Box::new(least_conn::LeastConnections::new(members)),
        Balance::Maglev => Box::new(maglev::MaglevSelector::new(frontend, backends, members)),
    }
}

/// True if `idx` may be picked: usable now, not already tried for this connection, and not
/// at its `max_connections`.
#[inline]
pub(crate) fn eligible(backends: &[BackendRef], tried: &[usize], idx: usize) -> bool {
    let b = &backends[idx];
    b.state.is_usable() && !tried.contains(&idx) && !b.full()
}
