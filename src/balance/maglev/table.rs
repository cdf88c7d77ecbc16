//! The Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4), with weights.
//!
//! Each backend gets a permutation of the `M` slots (M prime) from two hashes of its name:
//! `offset = h1(name) mod M`, `skip = h2(name) mod (M - 1) + 1`, the j-th preference being
//! `(offset + j * skip) mod M`. Backends then take turns claiming their next preferred slot that
//! is still free, until every slot has an owner. Because M is prime, every skip is coprime to
//! M, each permutation visits every slot, and a claim always succeeds while a slot is free.
//!
//! Weights (our extension): in round `r` (from 1), backend `i` claims
//! `c_i(r) - c_i(r - 1)` slots, where `c_i(r) = 1 + floor((r - 1) * w_i / w_max)`. So
//! - in round 1 every backend claims exactly one slot: every backend has at least one slot,
//!   whatever the weights (the table has at least as many slots as backends: validated);
//! - a backend of the largest weight claims exactly one slot per round, any other at most one;
//! - after `r` whole rounds backend `i` owns `c_i(r)` slots, proportional to `w_i` to within one
//!   slot. The last round is cut short when the table fills, which adds at most one more slot
//!   each. With equal weights this is exactly the paper's algorithm: shares differ by at most
//!   one slot.
//!
//! Determinism: the table depends only on the table size and the members' names and weights.
//! Members are sorted by name before they take turns, so the order of backends in the file,
//! which worker or thread builds the table, and when, change nothing. Renaming a backend moves
//! its clients; changing its address does not.

use super::hash::{hash_bytes, reduce, OFFSET_SEED, SKIP_SEED};

/// One backend to place in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    /// What the table stores: the backend's index in the frontend's backend list.
    pub backend: usize,
    /// Placement is a function of the name (unique within a frontend).
    pub name: &'a str,
    /// 1 or more.
    pub weight: u32,
}

/// Slot owners, as narrow as the backend indices allow (a 65537-slot table of `u16` is 128 KiB
/// and stays in L2, where the data path's one random read lands).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Slots {
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

/// A built table: slot -> backend index. Immutable once built; shared by all workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Slots,
}

impl MaglevTable {
    /// Builds the table of `size` slots (a prime, validated by the config) for `members`.
    /// With no members the table is empty and every lookup finds nothing.
    ///
    /// Panics if `size` is not a prime of at least 3: the config rejects such sizes, and with
    /// a size that is not prime some permutations would not cover the table.
    pub fn build(size: usize, members: &[Member<'_>]) -> MaglevTable {
        assert!(
            size >= 3 && is_prime(size),
            "maglev table size {size} is not a prime of at least 3"
        );
        let owners = populate(size, members);
        let wide = members.iter().any(|m| m.backend > usize::from(u16::MAX));
        let slots = if owners.is_empty() {
            Slots::Narrow(Box::new([]))
        } else if wide {
            Slots::Wide(
                owners
                    .iter()
                    .map(|&i| members[i as usize].backend as u32)
                    .collect(),
            )
        } else {
            Slots::Narrow(
                owners
                    .iter()
                    .map(|&i| members[i as usize].backend as u16)
                    .collect(),
            )
        };
        MaglevTable { slots }
    }

    /// Number of slots; 0 when the table has no members.
    #[inline]
    pub fn len(&self) -> usize {
        match &self.slots {
            Slots::Narrow(s) => s.len(),
            Slots::Wide(s) => s.len(),
        }
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot a key hash falls in. The table must not be empty.
    #[inline]
    pub fn slot_of(&self, hash: u64) -> usize {
        reduce(hash, self.len())
    }

    /// The backend owning `slot`.
    #[inline]
    pub fn owner(&self, slot: usize) -> usize {
        match &self.slots {
            Slots::Narrow(s) => usize::from(s[slot]),
            Slots::Wide(s) => s[slot] as usize,
        }
    }

    /// The backend for a key hash: one multiply and one array read.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.is_empty() {
            None
        } else {
            Some(self.owner(self.slot_of(hash)))
        }
    }

    /// The owners of the slots after `slot`, wrapping around, ending just before `slot`:
    /// a client's fallback order when its own backend cannot be used.
    pub fn owners_after(&self, slot: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.len();
        ((slot + 1)..n).chain(0..slot).map(move |s| self.owner(s))
    }

    /// How many slots each backend owns, indexed by backend index (for tests and /status).
    pub fn slot_counts(&self, backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for s in 0..self.len() {
            counts[self.owner(s)] += 1;
        }
        counts
    }
}

/// The population loop; returns, for each slot, a position in `members`.
fn populate(size: usize, members: &[Member<'_>]) -> Vec<u32> {
    if members.is_empty() {
        return Vec::new();
    }
    // Sorting makes the result independent of the listing order. Names are unique within a
    // frontend; the backend index only breaks ties in hand-built inputs.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| {
        (members[a].name, members[a].backend).cmp(&(members[b].name, members[b].backend))
    });
    // More members than slots cannot happen with a validated config; keep the first `size`
    // by name so that the first round can still complete.
    order.truncate(size);

    let m = size as u64;
    let w_max = order
        .iter()
        .map(|&i| u64::from(members[i].weight.max(1)))
        .max()
        .unwrap_or(1);
    struct Cursor {
        member: u32,
        next: u64,
        skip: u64,
        weight: u64,
        credit: u64,
    }
    let mut cursors: Vec<Cursor> = order
        .iter()
        .map(|&i| {
            let name = members[i].name.as_bytes();
            let weight = u64::from(members[i].weight.max(1));
            Cursor {
                member: i as u32,
                next: reduce(hash_bytes(OFFSET_SEED, name), size) as u64,
                skip: reduce(hash_bytes(SKIP_SEED, name), size - 1) as u64 + 1,
                weight,
                // Starts so that round 1 brings every backend to exactly one claim.
                credit: w_max - weight,
            }
        })
        .collect();

    // u32 positions: half the memory of usize for a table that is written at random.
    const FREE: u32 = u32::MAX;
    let mut owners = vec![FREE; size];
    let mut filled = 0;
    loop {
        for c in cursors.iter_mut() {
            c.credit += c.weight;
            while c.credit >= w_max {
                c.credit -= w_max;
                // Walk this backend's permutation to its next free slot. Terminates: the
                // table is not full and the permutation visits every slot.
                loop {
                    let slot = c.next as usize;
                    c.next += c.skip;
                    if c.next >= m {
                        c.next -= m;
                    }
                    if owners[slot] == FREE {
                        owners[slot] = c.member;
                        break;
                    }
                }
                filled += 1;
                if filled == size {
                    return owners;
                }
            }
        }
    }
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}
