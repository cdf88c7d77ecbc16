//! Maglev consistent hashing of the client's address (Eisenbud et al., NSDI 2016, 3.4).
//!
//! A client keeps its backend while the pool is stable, a change in the pool moves as few
//! clients as possible, and several ringlb nodes (behind ECMP or a floating VIP) agree without
//! talking to each other: the table is a pure function of the config and the usable set.
//!
//! - [`hash`]: our own fixed hashes (never `RandomState`).
//! - [`table`]: the weighted lookup table, built on the control thread.
//! - [`MaglevSelector`]: the data path's side: one hash, one array read, and a deterministic
//!   fallback order when the client's backend cannot be used.
//!
//! Slow start does not apply to Maglev: the table uses the configured weights, so that it
//! changes only when the usable set or the config changes, and every node builds the same one.

pub mod hash;
pub mod table;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use super::{eligible, BackendSelection};
use crate::backend::BackendRef;
use crate::config::{Frontend, HashKey};
pub use table::{MaglevTable, Member};

pub struct MaglevSelector {
    table: MaglevTable,
    key: HashKey,
    /// The backends placed in the table (those usable when it was built), checked before a
    /// long fallback walk so that a pool with nothing left answers at once.
    members: Vec<usize>,
    /// A hash of the table's routing (see [`fingerprint`]).
    fingerprint: u64,
    /// What the table was built from: a rebuild with equal inputs keeps this selector.
    inputs: Inputs,
}

/// Everything a Maglev table depends on: its size, the hash key, and the placeable members
/// with their names and configured weights. Not their slow-start ramp, nor whether an
/// operator drained one: a slow-start step never rebuilds a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    size: usize,
    key: HashKey,
    /// (index in the frontend's backends, name, weight), in member order.
    placed: Vec<(usize, String, u32)>,
}

impl Inputs {
    /// The inputs of the table over the members of `members` that are placeable now (up and
    /// configured; drained or in maintenance or not).
    pub fn of(frontend: &Frontend, backends: &[BackendRef], members: &[usize]) -> Inputs {
        Inputs {
            size: frontend.maglev_table_size,
            key: frontend.hash_key,
            placed: members
                .iter()
                .filter(|&&i| backends[i].state.is_placeable())
                .map(|&i| {
                    (
                        i,
                        backends[i].config.name.clone(),
                        backends[i].config.weight,
                    )
                })
                .collect(),
        }
    }
}

impl MaglevSelector {
    /// Builds the table over the members of `members` that are placeable now. Called on the
    /// control thread when the frontend's part of the snapshot is rebuilt and the inputs
    /// changed (reload, health transition, runtime API weight). A drained backend stays in
    /// the table and `select` skips it to the next entry, so only its own clients move, and
    /// they come back when it is ready again.
    pub fn new(frontend: &Frontend, backends: &[BackendRef], members: &[usize]) -> MaglevSelector {
        MaglevSelector::from_inputs(Inputs::of(frontend, backends, members), backends)
    }

    pub fn from_inputs(inputs: Inputs, backends: &[BackendRef]) -> MaglevSelector {
        let placed: Vec<Member<'_>> = inputs
            .placed
            .iter()
            .map(|(i, name, weight)| Member {
                backend: *i,
                name,
                weight: *weight,
            })
            .collect();
        let table = MaglevTable::build(inputs.size, &placed);
        MaglevSelector {
            fingerprint: fingerprint(&table, backends, inputs.key),
            table,
            key: inputs.key,
            members: inputs.placed.iter().map(|p| p.0).collect(),
            inputs,
        }
    }

    pub fn table(&self) -> &MaglevTable {
        &self.table
    }

    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }
}

/// A hash of what the table routes where: for every slot, the name of its owner, and the hash
/// key. Addresses are left out, as the table leaves them out: nodes may reach one backend by
/// different addresses. Two nodes with the same fingerprint send every client to the same
/// backend; nodes behind one ECMP route that disagree (a config that differs, or a different
/// view of which backends are up) show it here, in `ringlb_maglev_table_fingerprint`.
/// 52 bits, so that a Prometheus float holds it exactly.
pub fn fingerprint(table: &MaglevTable, backends: &[BackendRef], key: HashKey) -> u64 {
    let per_backend: Vec<u64> = backends
        .iter()
        .map(|b| hash::hash_bytes(0x6d61_676c_6576, b.config.name.as_bytes()))
        .collect();
    let mut h = hash::mix64(table.len() as u64 ^ ((key == HashKey::IpPort) as u64) << 63);
    for slot in 0..table.len() {
        h = hash::mix64(h ^ per_backend[table.owner(slot)]);
    }
    h >> 12
}

impl BackendSelection for MaglevSelector {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// The table holds at most one backend per slot, the first by name: the rest (a
    /// discovered set larger than `maglev_table_size`) are left out.
    fn left_out(&self) -> usize {
        self.inputs.placed.len().saturating_sub(self.inputs.size)
    }

    fn fingerprint(&self) -> Option<u64> {
        Some(self.fingerprint)
    }

    /// The client's slot decides. If its backend went down since the table was built, or a
    /// connect to it already failed (`tried`), the client's preference order continues with
    /// the owners of the following slots, wrapping around: the first of those that is usable
    /// and not tried. That order depends only on the table and the client, so retries land on
    /// the same backend on every node, and a dead backend's clients spread over the others in
    /// proportion to their slots. No allocation; the walk only runs when the first pick fails.
    fn select(
        &self,
        client: &SocketAddr,
        backends: &[BackendRef],
        tried: &[usize],
    ) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let slot = self.table.slot_of(hash::hash_client(client, self.key));
        let first = self.table.owner(slot);
        if eligible(backends, tried, first) {
            return Some(first);
        }
        // Without this check a pool whose every member is down or tried would walk all the
        // slots on each connect until the control thread publishes the rebuilt table.
        if !self.members.iter().any(|&i| eligible(backends, tried, i)) {
            return None;
        }
        self.table
            .owners_after(slot)
            .find(|&i| eligible(backends, tried, i))
    }
}
