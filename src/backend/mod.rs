//! Backends: their live state (shared by all workers and kept across reloads) and the
//! published snapshot the data path reads.
//!
//! Ownership: the control thread owns the [`Registry`] and builds [`Snapshot`]s from it; the
//! workers only `load()` the current snapshot and touch the atomics in [`BackendState`].

pub mod per_worker;
mod snapshot;
mod state;

pub use snapshot::{BackendRef, FrontendSnap, Published, Rebuild, Snapshot};
pub use state::{
    pace_clock_ms, pace_ms_at, ActiveGuard, AdminMode, BackendCounts, BackendState, CacheLine,
    FrontendCounts, FrontendState, RebuildCounts, Registry, RuntimeWeight, FULL_RAMP,
};
