//! Maglev: how long the control thread takes to build a table, and what a lookup costs the
//! data path per connection.
//!
//! Run: `cargo bench --bench maglev` (release profile). A plain `std::time` harness rather than
//! criterion: the figures wanted are coarse (milliseconds per build against a 5 ms target,
//! nanoseconds per lookup), and criterion's dependency tree would add minutes of compile time
//! on a small shared machine for statistics we do not need. Each figure is the minimum and the
//! median over repeated runs; the minimum is the least disturbed by other load.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ringlb::backend::{FrontendSnap, Registry};
use ringlb::balance::maglev::hash::{hash_client, mix64};
use ringlb::balance::maglev::{MaglevTable, Member};
use ringlb::config::{Config, HashKey};

const M: usize = 65537;

fn main() {
    println!("maglev table build, M = {M}");
    for n in [10usize, 100, 1000] {
        let names: Vec<String> = (0..n).map(|i| format!("backend-{i}")).collect();
        let members: Vec<Member<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Member {
                backend: i,
                name,
                weight: 1,
            })
            .collect();
        let (min, median) = repeat(Duration::from_secs(2), 20, || {
            black_box(MaglevTable::build(M, black_box(&members)));
        });
        println!(
            "  N = {n:>4}: min {:>6.3} ms, median {:>6.3} ms",
            ms(min),
            ms(median)
        );
    }

    println!("disruption (share of slots, so of keys, that change owner), M = {M}");
    for n in [10usize, 100, 1000] {
        let names: Vec<String> = (0..=n).map(|i| format!("backend-{i}")).collect();
        let all: Vec<Member<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Member {
                backend: i,
                name,
                weight: 1,
            })
            .collect();
        let base = MaglevTable::build(M, &all[..n]);
        let grown = MaglevTable::build(M, &all);
        let without: Vec<Member<'_>> = all[1..n].to_vec();
        let shrunk = MaglevTable::build(M, &without);
        let (mut extra_remove, mut extra_add) = (0, 0);
        for s in 0..M {
            if base.owner(s) != 0 && shrunk.owner(s) != base.owner(s) {
                extra_remove += 1;
            }
            if grown.owner(s) != n && grown.owner(s) != base.owner(s) {
                extra_add += 1;
            }
        }
        println!(
            "  N = {n:>4}: removing one moves {:.3}% of the other backends' slots; adding one moves {:.3}% of slots between old backends",
            100.0 * extra_remove as f64 / (M - base.slot_counts(n)[0]) as f64,
            100.0 * extra_add as f64 / M as f64
        );
    }

    let clients = clients(1 << 20);
    println!(
        "lookup per connection ({} distinct IPv4 clients)",
        clients.len()
    );
    for n in [10usize, 100, 1000] {
        let fe = frontend(n);
        let snap = FrontendSnap::build(&fe, &mut Registry::default());
        let names: Vec<String> = (0..n).map(|i| format!("backend-{i}")).collect();
        let members: Vec<Member<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Member {
                backend: i,
                name,
                weight: 1,
            })
            .collect();
        let table = MaglevTable::build(M, &members);
        let (raw, _) = repeat(Duration::from_secs(1), 5, || {
            for c in &clients {
                black_box(table.lookup(hash_client(black_box(c), HashKey::Ip)));
            }
        });
        let (select, _) = repeat(Duration::from_secs(1), 5, || {
            for c in &clients {
                black_box(snap.select(black_box(c), &[]));
            }
        });
        // One backend down and the table not yet rebuilt: its clients walk to the next slot.
        snap.backends[0].state.set_up(false);
        let (down, _) = repeat(Duration::from_secs(1), 5, || {
            for c in &clients {
                black_box(snap.select(black_box(c), &[]));
            }
        });
        let per = |d: Duration| d.as_nanos() as f64 / clients.len() as f64;
        println!(
            "  N = {n:>4}: hash + table read {:>5.1} ns; select() {:>5.1} ns; select() with one backend down, not rebuilt {:>5.1} ns",
            per(raw),
            per(select),
            per(down)
        );
    }
}

/// Runs `f` at least `min_runs` times and for at least `budget`; returns (min, median).
fn repeat(budget: Duration, min_runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    f(); // warm caches and the allocator
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs || start.elapsed() < budget {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    (times[0], times[times.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Fixed-seed splitmix64 IPv4 clients.
fn clients(n: usize) -> Vec<SocketAddr> {
    let mut state = 0x00be_ef00_u64;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let r = mix64(state);
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(r as u32)), (r >> 48) as u16)
        })
        .collect()
}

fn frontend(n: usize) -> ringlb::config::Frontend {
    let mut text = String::from(
        "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nbalance = \"maglev\"\n",
    );
    for i in 0..n {
        text.push_str(&format!(
            "[[frontend.backend]]\nname = \"backend-{i}\"\naddress = \"127.0.0.1:{}\"\n",
            20000 + i
        ));
    }
    Config::parse(&text, "bench").unwrap().frontends.remove(0)
}
