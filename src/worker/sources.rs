//! The per-source table of a frontend's gate: open connections
//! (`max_connections_per_source`) and a token bucket (`rate_per_source`) per client address,
//! sharded by address so workers admitting different sources rarely meet on one lock, and
//! bounded so an address spray cannot grow it without limit (docs/traffic-controls.md).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::gate::Reason;
use crate::config::traffic::Rate;

/// Shards of the per-source table: one lock each, picked by address, so workers admitting
/// different sources rarely meet on one lock.
const SHARDS: usize = 64;
/// Sources tracked per shard (65,536 in all). A shard that is full sweeps out sources with no
/// open connection and a full bucket; if none can go, the new source is admitted untracked
/// and counted (`ringlb_frontend_source_table_full_total`): an address spray must not turn
/// the limits into a refusal of every new client.
const SHARD_CAP: usize = 1024;
/// A full shard sweeps at most this often; between sweeps new sources go untracked.
const SWEEP_EVERY_MS: u64 = 100;

/// The table: its shards, and the sources it could not track.
#[derive(Debug)]
pub struct SourceTable {
    shards: [Mutex<Shard>; SHARDS],
    /// Sources admitted untracked because their shard of the table was full.
    pub full_total: AtomicU64,
    start: Instant,
}

impl Default for SourceTable {
    fn default() -> Self {
        SourceTable {
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
            full_total: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    // RandomState on purpose: the keys are chosen by clients (any IPv6 address), and a fixed
    // hash would let them pick colliding ones. Nothing here decides placement.
    map: HashMap<IpAddr, Source>,
    last_sweep_ms: u64,
}

/// One source address's open connections and rate bucket.
#[derive(Debug)]
struct Source {
    open: u32,
    tokens: f64,
    /// When `tokens` was last brought up to date (ms since the table's start).
    at_ms: u64,
    /// When the bucket will be full again; 0 without a rate. With `open == 0` and this
    /// passed, the entry says nothing a fresh one would not: it can go.
    full_at_ms: u64,
}

impl Source {
    fn idle(&self, now_ms: u64) -> bool {
        self.open == 0 && now_ms >= self.full_at_ms
    }
}

impl SourceTable {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<Shard> {
        // A fixed mix of the address bytes: only spreads the locks, decides nothing else.
        let h = match ip {
            IpAddr::V4(a) => u64::from(u32::from(*a)),
            IpAddr::V6(a) => {
                let v = u128::from(*a);
                (v as u64) ^ ((v >> 64) as u64)
            }
        };
        let h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    /// Takes a connection slot and a rate token for `ip`, or says which limit refused it.
    pub(super) fn take(
        &self,
        ip: IpAddr,
        max_open: Option<u32>,
        rate: Option<Rate>,
    ) -> Result<bool, Reason> {
        let now = self.now_ms();
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if !shard.map.contains_key(&ip) && shard.map.len() >= SHARD_CAP {
            if now.saturating_sub(shard.last_sweep_ms) < SWEEP_EVERY_MS {
                self.full_total.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            shard.last_sweep_ms = now;
            shard.map.retain(|_, s| !s.idle(now));
            if shard.map.len() >= SHARD_CAP {
                self.full_total.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
        }
        let src = shard.map.entry(ip).or_insert_with(|| Source {
            open: 0,
            tokens: rate.map_or(0.0, |r| f64::from(r.count)),
            at_ms: now,
            full_at_ms: 0,
        });
        if max_open.is_some_and(|max| src.open >= max) {
            return Err(Reason::SourceConnections);
        }
        if let Some(r) = rate {
            let per_ms = f64::from(r.count) / r.per.as_millis().max(1) as f64;
            let cap = f64::from(r.count);
            let elapsed = now.saturating_sub(src.at_ms) as f64;
            src.tokens = (src.tokens + elapsed * per_ms).min(cap);
            src.at_ms = now;
            if src.tokens < 1.0 {
                return Err(Reason::SourceRate);
            }
            src.tokens -= 1.0;
            src.full_at_ms = now + ((cap - src.tokens) / per_ms).ceil() as u64;
        }
        if max_open.is_some() {
            src.open += 1;
        }
        Ok(max_open.is_some())
    }

    pub(super) fn release(&self, ip: IpAddr) {
        let now = self.now_ms();
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(src) = shard.map.get_mut(&ip) {
            src.open = src.open.saturating_sub(1);
            if src.idle(now) {
                shard.map.remove(&ip);
            }
        }
    }

    /// Sources tracked now (for tests and the status of the table).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn the_source_table_stays_bounded_and_empties_when_connections_close() {
        let g = SourceTable::default();
        let n = (SHARDS * SHARD_CAP + 5000) as u32;
        let mut tracked = Vec::new();
        for i in 0..n {
            if g.take(ip(i), Some(1), None) == Ok(true) {
                tracked.push(ip(i));
            }
        }
        assert!(g.tracked() <= SHARDS * SHARD_CAP);
        assert_eq!(
            g.full_total.load(Ordering::Relaxed) as usize,
            n as usize - tracked.len()
        );
        // A tracked source is at its limit of one.
        assert_eq!(
            g.take(tracked[0], Some(1), None),
            Err(Reason::SourceConnections)
        );
        for a in tracked {
            g.release(a);
        }
        assert_eq!(g.tracked(), 0, "idle sources were kept");
    }

    #[test]
    fn a_source_with_a_draining_bucket_is_kept_until_the_bucket_is_full_again() {
        let s = Source {
            open: 0,
            tokens: 1.0,
            at_ms: 10,
            full_at_ms: 500,
        };
        assert!(!s.idle(499));
        assert!(s.idle(500));
        let busy = Source { open: 1, ..s };
        assert!(!busy.idle(10_000));
    }

    #[test]
    fn the_rate_is_a_burst_of_count_then_count_per_period() {
        let g = SourceTable::default();
        let rate = Some(Rate {
            count: 3,
            per: Duration::from_secs(3600),
        });
        for _ in 0..3 {
            assert_eq!(g.take(ip(1), None, rate), Ok(false));
        }
        assert_eq!(g.take(ip(1), None, rate), Err(Reason::SourceRate));
        assert_eq!(g.take(ip(2), None, rate), Ok(false));
        // Kept (its bucket is not full), though it holds no connection.
        assert_eq!(g.tracked(), 2);
    }
}
