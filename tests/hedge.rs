//! Hedged connects: a backend whose SYNs vanish costs a client a hedge delay, not a connect
//! timeout; the cancelled connects leave no fd behind; healthy backends are not hedged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The labels of the backend whose SYNs vanish.
const HOLE: [(&str, &str); 2] = [("frontend", "web"), ("backend", "hole")];

/// `threads` clients each make `per_thread` connections, reading the backend's name line;
/// returns each connection's time to that first byte, and the failures.
fn load(addr: SocketAddr, threads: usize, per_thread: usize) -> (Vec<Duration>, Vec<String>) {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut times = Vec::new();
                let mut failures = Vec::new();
                for _ in 0..per_thread {
                    let t = Instant::now();
                    match ask_name(addr) {
                        Ok(n) if n.starts_with("good") => times.push(t.elapsed()),
                        other => failures.push(format!("{other:?}")),
                    }
                }
                (times, failures)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for h in handles {
        let (t, f) = h.join().unwrap();
        times.extend(t);
        failures.extend(f);
    }
    times.sort();
    (times, failures)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[test]
fn with_the_shipped_defaults_a_backend_that_drops_syns_costs_clients_no_connect_timeout() {
    let good1 = Backend::start("good1", Behaviour::Named);
    let good2 = Backend::start("good2", Behaviour::Named);
    let hole = Blackhole::start();
    // Every hedge, timeout and health setting is the shipped default (connect_timeout 2s,
    // connect_hedge "auto", active checks, error_limit 10); round robin only makes sure the
    // silent backend gets its share from the first connection on.
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"",
            &[
                ("hole", hole.addr, ""),
                ("good1", good1.addr, ""),
                ("good2", good2.addr, ""),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.expect("admin");
    let (times, failures) = load(lb.addr("web"), 12, 40);
    assert!(failures.is_empty(), "client-visible failures: {failures:?}");
    assert_eq!(times.len(), 480);
    let worst = *times.last().unwrap();
    eprintln!(
        "first byte over {} connections: p50 {:?}, p99 {:?}, max {worst:?}",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    // Without hedging the clients that land on the hole wait the full 2 s connect timeout
    // (see the "off" test below). The bound is generous: this is a test, not a benchmark.
    assert!(
        worst < Duration::from_millis(1000),
        "a client waited {worst:?} for its first byte"
    );
    let hedges = sample(admin, "ringlb_backend_connect_hedges_total", &HOLE).unwrap_or(0.0);
    let won = sample(admin, "ringlb_backend_connect_hedges_won_total", &HOLE).unwrap_or(0.0);
    assert!(hedges >= 1.0, "the silent backend was never hedged");
    assert_eq!(won, hedges, "every hedge against the silent backend won");
    // Lost races count toward error_limit: the silent backend leaves rotation passively.
    assert!(
        lb.wait_for_log("Server web/hole is DOWN", SOON).is_some(),
        "the silent backend was never marked down"
    );
}

#[test]
fn with_connect_hedge_off_a_backend_that_drops_syns_costs_a_full_connect_timeout() {
    // The counterpart of the test above: what the hedge saves.
    let good = Backend::start("good", Behaviour::Named);
    let hole = Blackhole::start();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\nconnect_timeout = \"400ms\"\nconnect_hedge = \"off\"\n\
             [frontend.health]\nerror_limit = 0",
            &[
                ("hole", hole.addr, "check = false"),
                ("good", good.addr, "check = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let (times, failures) = load(lb.addr("web"), 1, 6);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        *times.last().unwrap() >= Duration::from_millis(400),
        "{times:?}"
    );
    let admin = lb.admin.expect("admin");
    // The series exists once the exporter has seen the backend's connects: a missing one
    // is a failure, not a zero.
    let connects = || sample(admin, "ringlb_backend_connections_total", &HOLE);
    assert!(
        wait_until(SOON, || connects().is_some()),
        "no series for the hole"
    );
    assert_eq!(
        sample(admin, "ringlb_backend_connect_hedges_total", &HOLE)
            .expect("the hole's hedge counter"),
        0.0
    );
}

#[test]
fn connects_pending_counts_each_connect_in_flight_until_it_times_out() {
    let hole = Blackhole::start();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "connect_timeout = \"4s\"\nretries = 0\nconnect_hedge = \"off\"\n\
             [frontend.health]\nerror_limit = 0",
            &[("hole", hole.addr, "check = false")],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.expect("admin");
    let pending = || sample(admin, "ringlb_backend_connects_pending", &HOLE).unwrap_or(0.0);
    let failures = || sample(admin, "ringlb_backend_connect_failures_total", &HOLE).unwrap_or(0.0);
    assert!(
        get(admin, "/metrics").contains("ringlb_backend_connects_pending{"),
        "the series exists before any connect"
    );
    // Five clients, each held on a connect to a backend that drops SYNs.
    let clients: Vec<std::net::TcpStream> = (0..5)
        .map(|_| std::net::TcpStream::connect(lb.addr("web")).unwrap())
        .collect();
    assert!(
        wait_until(SOON, || pending() == 5.0),
        "pending {} with 5 clients held",
        pending()
    );
    assert_eq!(failures(), 0.0, "none has timed out yet");
    // Each connect times out (4 s) and is counted out.
    assert!(
        wait_until(SOON, || pending() == 0.0 && failures() == 5.0),
        "pending {}, failures {} after the connect timeout",
        pending(),
        failures()
    );
    drop(clients);
}

#[test]
fn backends_with_max_connections_are_hedged_each_hedge_on_a_slot_of_its_own() {
    // max_connections 1 on the silent backend: if the slot of a connect abandoned to a hedge
    // were not given back, it would stay full and never be picked (nor hedged) again. 2 on
    // the good one: if hedges' slots leaked there, clients would queue until queue_timeout.
    let good = Backend::start("good", Behaviour::Named);
    let hole = Blackhole::start();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\nconnect_hedge = \"20ms\"\nqueue_timeout = \"5s\"\n\
             [frontend.health]\nerror_limit = 0",
            &[
                ("hole", hole.addr, "check = false\nmax_connections = 1"),
                ("good", good.addr, "check = false\nmax_connections = 2"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let (times, failures) = load(lb.addr("web"), 1, 20);
    assert!(failures.is_empty(), "{failures:?}");
    // Unhedged, each client picked for the hole waits connect_timeout (2 s) for its retry.
    let worst = *times.last().unwrap();
    assert!(worst < Duration::from_millis(1500), "{times:?}");
    let admin = lb.admin.expect("admin");
    let hedges = sample(admin, "ringlb_backend_connect_hedges_total", &HOLE).unwrap_or(0.0);
    assert!(
        hedges >= 5.0,
        "only {hedges} hedges in 20 round-robin picks"
    );
    assert_eq!(
        sample(admin, "ringlb_backend_connect_hedges_won_total", &HOLE).unwrap_or(0.0),
        hedges
    );
}

#[test]
fn ten_thousand_hedged_connects_leave_no_fd_behind() {
    hedged_connects_leave_no_fd_behind("io_uring", 10_000);
}

#[test]
fn hedged_connects_on_the_epoll_fallback_leave_no_fd_behind() {
    hedged_connects_leave_no_fd_behind("epoll", 1_000);
}

fn hedged_connects_leave_no_fd_behind(io: &str, hedged: usize) {
    let good = Backend::start("good", Behaviour::Named);
    let hole = Blackhole::start();
    // The silent backend stays in rotation (no checks, no passive marking), so every other
    // connection is hedged; a short fixed delay keeps the run short.
    let cfg = global_toml(&format!("io = \"{io}\"\nrelay = \"copy\""))
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\nconnect_hedge = \"5ms\"\n[frontend.health]\nerror_limit = 0",
            &[("hole", hole.addr, "check = false"), ("good", good.addr, "check = false")],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.expect("admin");
    let addr = lb.addr("web");
    let (_, failures) = load(addr, 4, 25);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(wait_until(SOON, || good.open() == 0));
    let before = sample(admin, "ringlb_backend_connect_hedges_total", &HOLE).unwrap_or(0.0);
    // Settled: the admin connection just used for the scrape is closed, nothing in flight.
    let mut baseline = lb.fd_count();
    assert!(wait_until(SOON, || {
        std::thread::sleep(Duration::from_millis(100));
        let now = lb.fd_count();
        std::mem::replace(&mut baseline, now) == now
    }));

    // Round robin sends the silent backend about every other connection (each worker keeps
    // its own place in the schedule, so not exactly): 2.2 connections per hedge wanted.
    let done = Arc::new(AtomicUsize::new(0));
    let threads = 32;
    let per_thread = 22 * hedged / 10 / threads + 1;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for _ in 0..per_thread {
                    match ask_name(addr) {
                        Ok(n) if n == "good" => {}
                        other => failures.push(format!("{other:?}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mut after = 0.0;
    assert!(
        wait_until(SOON, || {
            after = sample(admin, "ringlb_backend_connect_hedges_total", &HOLE).unwrap_or(0.0);
            after - before >= hedged as f64
        }),
        "only {} hedges over {} connections",
        after - before,
        done.load(Ordering::Relaxed)
    );
    let won = sample(admin, "ringlb_backend_connect_hedges_won_total", &HOLE).unwrap_or(0.0);
    assert!(won >= hedged as f64, "{won} hedges won");
    assert!(wait_until(SOON, || good.open() == 0));
    let mut now = 0;
    assert!(
        wait_until(SOON, || {
            now = lb.fd_count();
            now <= baseline
        }),
        "{io}: {now} fds after {hedged} hedged connects, {baseline} before: cancelled connects leaked"
    );
}

#[test]
fn with_no_fault_hedges_stay_below_a_tenth_of_a_percent_of_connections() {
    let good1 = Backend::start("good1", Behaviour::Named);
    let good2 = Backend::start("good2", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "",
            &[("good1", good1.addr, ""), ("good2", good2.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.expect("admin");
    let (times, failures) = load(lb.addr("web"), 8, 500);
    assert!(failures.is_empty(), "{failures:?}");
    let mut hedges = HashMap::new();
    assert!(wait_until(SOON, || {
        let m = get(admin, "/metrics");
        m.contains("ringlb_backend_connections_total{frontend=\"web\",backend=\"good2\"}")
    }));
    // The metrics are copied from the atomics every 250 ms: wait for the connection totals.
    assert!(wait_until(SOON, || {
        sample(
            admin,
            "ringlb_backend_connections_total",
            &[("frontend", "web"), ("backend", "good1")],
        )
        .unwrap_or(0.0)
            + sample(
                admin,
                "ringlb_backend_connections_total",
                &[("frontend", "web"), ("backend", "good2")],
            )
            .unwrap_or(0.0)
            >= times.len() as f64
    }));
    for b in ["good1", "good2"] {
        hedges.insert(
            b,
            sample(
                admin,
                "ringlb_backend_connect_hedges_total",
                &[("frontend", "web"), ("backend", b)],
            )
            .unwrap_or_else(|| panic!("no hedge counter for {b}")),
        );
    }
    let total: f64 = hedges.values().sum();
    eprintln!("{total} hedges over {} connections", times.len());
    assert!(
        total < times.len() as f64 / 1000.0,
        "{hedges:?} hedges over {} connections",
        times.len()
    );
}
