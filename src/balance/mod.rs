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
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backend::{BackendRef, RebuildCounts};
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

    /// Usable backends the selector cannot place (more than a Maglev table has slots); they
    /// get no clients.
    fn left_out(&self) -> usize {
        0
    }

    /// For [`build`], to find what a rebuild can keep of the selector it replaces.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Builds the selector for `members` (indices into `backends`) with the frontend's algorithm,
/// from `prev`, the one it replaces, if any: a selector whose inputs did not change is kept
/// as it is (a round-robin schedule with its cursor, a Maglev table), and a new round-robin
/// schedule goes on from the old cursor. `built` counts what had to be built anew (over at
/// least one member).
pub fn build(
    frontend: &Frontend,
    backends: &[BackendRef],
    members: &[usize],
    prev: Option<&Arc<dyn BackendSelection>>,
    built: &RebuildCounts,
) -> Arc<dyn BackendSelection> {
    match frontend.balance {
        Balance::RoundRobin => {
            let schedule = round_robin::schedule(backends, members);
            let old = prev.and_then(|p| {
                p.as_any()
                    .downcast_ref::<round_robin::SmoothRoundRobin>()
                    .map(|rr| (p, rr))
            });
            if let Some((p, rr)) = old {
                if rr.schedule() == schedule.as_slice() {
                    return p.clone();
                }
            }
            count(&built.schedule, members);
            let cursor = old.map_or(0, |(_, rr)| rr.cursor());
            Arc::new(round_robin::SmoothRoundRobin::resume(schedule, cursor))
        }
        Balance::LeastConnections => {
            if let Some(p) = prev {
                let same = p
                    .as_any()
                    .downcast_ref::<least_conn::LeastConnections>()
                    .is_some_and(|lc| lc.members() == members);
                if same {
                    return p.clone();
                }
            }
            Arc::new(least_conn::LeastConnections::new(members))
        }
        Balance::Maglev => {
            let inputs = maglev::Inputs::of(frontend, backends, members);
            if let Some(p) = prev {
                let same = p
                    .as_any()
                    .downcast_ref::<maglev::MaglevSelector>()
                    .is_some_and(|m| *m.inputs() == inputs);
                if same {
                    return p.clone();
                }
            }
            count(&built.maglev_table, members);
            Arc::new(maglev::MaglevSelector::from_inputs(inputs, backends))
        }
    }
}

/// Counts a selector built anew; one over no members (a pool without backup servers) is
/// nothing to speak of.
fn count(counter: &std::sync::atomic::AtomicU64, members: &[usize]) {
    if !members.is_empty() {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// True if `idx` may be picked: usable now, not already tried for this connection, and not
/// at its `max_connections`.
#[inline]
pub(crate) fn eligible(backends: &[BackendRef], tried: &[usize], idx: usize) -> bool {
    let b = &backends[idx];
    b.state.is_usable() && !tried.contains(&idx) && !b.full()
}
