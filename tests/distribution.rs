//! Selection: weighted round robin is exact and interleaved; least-connections follows the
//! open-connection counts that all workers share; backups only serve when primaries cannot.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

#[test]
fn round_robin_with_weights_three_one_one_is_exact_over_five_hundred_connections() {
    let a = Backend::start("a", Behaviour::Named);
    let b = Backend::start("b", Behaviour::Named);
    let c = Backend::start("c", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"",
            &[
                ("a", a.addr, "weight = 3"),
                ("b", b.addr, "weight = 1"),
                ("c", c.addr, "weight = 1"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..500 {
        let name = ask_name(lb.addr("web")).unwrap();
        order.push(name.clone());
        *counts.entry(name).or_default() += 1;
    }
    assert_eq!(counts["a"], 300, "{counts:?}");
    assert_eq!(counts["b"], 100, "{counts:?}");
    assert_eq!(counts["c"], 100, "{counts:?}");
    // Smooth, not bursty: never three "a" in a row.
    assert!(
        !order.windows(3).any(|w| w.iter().all(|n| n == "a")),
        "bursty order: {:?}",
        &order[..20]
    );
}

#[test]
fn least_connections_sends_new_connections_to_the_backend_with_fewest_open() {
    let a = Backend::start("a", Behaviour::Named);
    let b = Backend::start("b", Behaviour::Named);
    let c = Backend::start("c", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"least-connections\"",
            &[("a", a.addr, ""), ("b", b.addr, ""), ("c", c.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    // Hold long connections: 4 on whichever backends they land, as placed by ringlb.
    let mut held: Vec<(String, TcpStream)> = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = read_line(&mut s);
        held.push((name, s));
    }
    // Six held connections over three idle backends must spread two each.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (n, _) in &held {
        *counts.entry(n.as_str()).or_default() += 1;
    }
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{counts:?}"
    );
    // Close both connections on "b": it now has the fewest, so the next two new long
    // connections must both go to "b".
    held.retain(|(n, _)| n != "b");
    // The backend closes its side before ringlb has seen that close and counted the
    // connections out: wait for ringlb's own count, which is what it picks by.
    let admin = lb.admin.unwrap();
    assert!(wait_until(SOON, || b.open() == 0 && active(admin, "b") == 0));
    for _ in 0..2 {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = read_line(&mut s);
        assert_eq!(name, "b");
        held.push((name, s));
    }
}

#[test]
fn backup_gets_nothing_while_a_primary_is_up_and_everything_when_primaries_are_gone() {
    let p1 = Backend::start("p1", Behaviour::Named);
    let p2 = Backend::start("p2", Behaviour::Named);
    let spare = Backend::start("spare", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\nretries = 2\n[frontend.health]\nerror_limit = 3",
            &[
                ("p1", p1.addr, "check = false"),
                ("p2", p2.addr, "check = false"),
                ("spare", spare.addr, "backup = true\ncheck = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    for _ in 0..50 {
        assert_ne!(ask_name(lb.addr("web")).unwrap(), "spare");
    }
    assert_eq!(spare.accepted(), 0);
    p1.stop();
    p2.stop();
    // Every connection still succeeds: refused primaries are retried, then marked down.
    for _ in 0..50 {
        assert_eq!(ask_name(lb.addr("web")).unwrap(), "spare");
    }
    assert_eq!(spare.accepted(), 50);
}

/// The open connections ringlb counts on backend `name` of frontend "web" (`/status`).
fn active(admin: std::net::SocketAddr, name: &str) -> u64 {
    let s: serde_json::Value = serde_json::from_str(&get(admin, "/status")).unwrap();
    s["frontends"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .and_then(|b| b["active"].as_u64())
        .unwrap_or_else(|| panic!("no backend {name} in {s}"))
}

fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        out.push(byte[0]);
    }
    String::from_utf8(out).unwrap()
}
