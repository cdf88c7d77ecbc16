//! A publish rebuilds only the frontend it concerns: a health change on one frontend leaves
//! every other frontend's routing as it was, and a slow-start ramp that publishes every
//! 100 ms neither restarts round robin's schedule (its picks stay even) nor rebuilds the
//! schedule it did not change. Counted by `ringlb_frontend_rebuilds_total`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

fn rebuilds(admin: SocketAddr, frontend: &str, what: &str) -> f64 {
    let labels = [("frontend", frontend), ("what", what)];
    let mut v = None;
    // The exporter's first pass may not have run yet right after start.
    wait_until(SOON, || {
        v = sample(admin, "ringlb_frontend_rebuilds_total", &labels);
        v.is_some()
    });
    v.unwrap_or_else(|| panic!("no rebuilds series for {frontend}/{what}"))
}

fn generation(admin: SocketAddr) -> f64 {
    sample(admin, "ringlb_snapshot_generation", &[]).expect("snapshot generation")
}

/// One connection through `addr`, proven relayed by an echoed byte.
fn echo_once(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
}

#[test]
fn a_health_change_on_one_frontend_rebuilds_only_that_frontend() {
    let steady = Backend::start("s1", Behaviour::Echo);
    let flaky = Backend::start("f1", Behaviour::Echo);
    let other = Backend::start("f2", Behaviour::Echo);
    let fast = "health = { interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1 }";
    let cfg = global_toml("")
        + &frontend_toml("calm", "balance = \"maglev\"", &[("s1", steady.addr, fast)])
        + &frontend_toml(
            "busy",
            "balance = \"round-robin\"",
            &[("f1", flaky.addr, fast), ("f2", other.addr, fast)],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    let calm = (
        rebuilds(admin, "calm", "frontend"),
        rebuilds(admin, "calm", "maglev_table"),
    );
    let busy = rebuilds(admin, "busy", "frontend");
    let mark = lb.log_len();
    flaky.stop();
    lb.wait_for_log_after(mark, "Server busy/f1 is DOWN", SOON)
        .expect("f1 marked down");
    assert!(
        wait_until(SOON, || rebuilds(admin, "busy", "frontend") > busy),
        "the frontend whose backend went down was rebuilt"
    );
    assert!(rebuilds(admin, "busy", "schedule") >= 2.0);
    assert_eq!(
        (
            rebuilds(admin, "calm", "frontend"),
            rebuilds(admin, "calm", "maglev_table")
        ),
        calm,
        "the other frontend was left as it was"
    );
    // And back up: again only busy.
    let busy = rebuilds(admin, "busy", "frontend");
    let back = Backend::start_on(flaky.addr, "f1", Behaviour::Echo);
    lb.wait_for_log_after(mark, "Server busy/f1 is UP", SOON)
        .expect("f1 back up");
    assert!(wait_until(SOON, || rebuilds(admin, "busy", "frontend") > busy));
    assert_eq!(rebuilds(admin, "calm", "frontend"), calm.0);
    drop(back);
}

#[test]
fn round_robin_over_four_backends_stays_even_while_slow_start_publishes_every_100ms() {
    // The four take no health checks, so each one's accept count is its clients alone.
    let four: Vec<Backend> = (0..4)
        .map(|i| Backend::start(&format!("b{i}"), Behaviour::Echo))
        .collect();
    let late = Backend::start("late", Behaviour::Echo);
    let mut list: Vec<(String, SocketAddr, &str)> = four
        .iter()
        .map(|b| (b.name.clone(), b.addr, "check = false"))
        .collect();
    // A backup server coming up with a 2 s ramp: a publish every 100 ms for 2 s, each one
    // rebuilding this frontend (whose primary schedule does not change).
    list.push((
        "late".into(),
        late.addr,
        "backup = true\nslow_start = \"2s\"\n\
         health = { interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1, initial_state = \"down\" }",
    ));
    let refs: Vec<(&str, SocketAddr, &str)> =
        list.iter().map(|(n, a, e)| (n.as_str(), *a, *e)).collect();
    let lb = Ringlb::start(
        &(global_toml("") + &frontend_toml("rr", "balance = \"round-robin\"", &refs)),
    );
    let admin = lb.admin.unwrap();
    let addr = lb.addr("rr");
    lb.wait_for_log("Backup Server rr/late is UP", SOON)
        .expect("late comes up and starts its ramp");
    let gen0 = generation(admin);
    // At least 2000 clients, and as many more as it takes to see 10 publishes meanwhile.
    let mut sent = 0;
    while sent < 2000 || generation(admin) < gen0 + 10.0 {
        for _ in 0..100 {
            echo_once(addr);
        }
        sent += 100;
        assert!(sent < 200_000, "the ramp never published 10 times");
    }
    let publishes = generation(admin) - gen0;
    assert!(
        wait_until(SOON, || four.iter().map(Backend::accepted).sum::<usize>()
            == sent),
        "every client reached one of the four"
    );
    let counts: Vec<usize> = four.iter().map(Backend::accepted).collect();
    let even = sent as f64 / 4.0;
    for (i, &c) in counts.iter().enumerate() {
        assert!(
            (c as f64 - even).abs() <= even * 0.01,
            "b{i} got {c} of {sent} clients over {publishes} publishes, not within 1% of {even}: {counts:?}"
        );
    }
    assert!(
        rebuilds(admin, "rr", "frontend") >= 10.0,
        "the ramp's publishes rebuilt the frontend"
    );
    // The primary schedule once at start; the backup one at start (empty: late is down)
    // and when late came up. No ramp step built one: the primary schedule never changes, and
    // the backup one, of one member, is the same at every ramp weight.
    assert_eq!(rebuilds(admin, "rr", "schedule"), 3.0);
}

#[test]
fn a_slow_start_ramp_on_a_maglev_frontend_rebuilds_no_table() {
    let a = Backend::start("a", Behaviour::Echo);
    let late = Backend::start("late", Behaviour::Echo);
    let cfg = global_toml("")
        + &frontend_toml(
            "mg",
            "balance = \"maglev\"",
            &[
                ("a", a.addr, "check = false"),
                (
                    "late",
                    late.addr,
                    "weight = 2\nslow_start = \"1s\"\n\
                     health = { interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1, initial_state = \"down\" }",
                ),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    lb.wait_for_log("Server mg/late is UP", SOON)
        .expect("late comes up and starts its ramp");
    let weight = || {
        sample(
            admin,
            "ringlb_backend_effective_weight",
            &[("frontend", "mg"), ("backend", "late")],
        )
    };
    // The table at start (a alone) and when late came up (a and late); the ramp's steps to
    // full weight, none.
    assert!(wait_until(SOON, || weight() == Some(2.0)), "the ramp ends");
    assert_eq!(rebuilds(admin, "mg", "maglev_table"), 2.0);
    assert_eq!(rebuilds(admin, "mg", "frontend"), 2.0);
}
