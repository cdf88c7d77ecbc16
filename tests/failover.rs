//! Failover under load: backends die while clients hammer ringlb, and clients never notice.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Client-side tallies: answers by backend name, and every error a client saw.
#[derive(Default)]
struct Tally {
    answers: HashMap<String, usize>,
    errors: Vec<String>,
}

#[test]
fn killing_one_backend_and_blackholing_another_under_load_costs_clients_nothing() {
    // Passive and active health race to take the dead backend out; either may win (the
    // passive path alone is tested in tests/health.rs with active checks set very slow).
    failover_scenario("", "reason: ");
}

#[test]
fn with_passive_health_off_the_active_checks_alone_take_dead_backends_out_without_client_errors() {
    failover_scenario("error_limit = 0", "reason: Layer4 ");
}

/// `health` is extra `[frontend.health]` settings; `reason` is expected in both DOWN lines.
fn failover_scenario(health: &str, reason: &str) {
    let backends: Vec<Backend> = (1..=5)
        .map(|i| Backend::start(&format!("b{i}"), Behaviour::Named))
        .collect();
    let list: Vec<(String, SocketAddr)> =
        backends.iter().map(|b| (b.name.clone(), b.addr)).collect();
    let list: Vec<(&str, SocketAddr, &str)> =
        list.iter().map(|(n, a)| (n.as_str(), *a, "")).collect();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!(
                "connect_timeout = \"500ms\"\n[frontend.health]\ninterval = \"300ms\"\nrise = 2\nfall = 2\n{health}"
            ),
            &list,
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    let admin = lb.admin.expect("admin address");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (stop, tally) = (stop.clone(), tally.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = ask_name(addr);
                    let mut t = tally.lock().unwrap();
                    match r {
                        Ok(name) => *t.answers.entry(name).or_default() += 1,
                        Err(e) => t.errors.push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let answered = |name: &str| {
        tally
            .lock()
            .unwrap()
            .answers
            .get(name)
            .copied()
            .unwrap_or(0)
    };

    // Load is flowing to every backend.
    assert!(wait_until(SOON, || (1..=5).all(|i| answered(&format!("b{i}")) > 20)));

    // b1 dies: its port refuses.
    backends[0].stop();
    let down = lb
        .wait_for_log("Server web/b1 is DOWN", SOON)
        .unwrap_or_else(|| panic!("b1 not marked down:\n{}", lb.logs().join("\n")));
    assert!(down.contains(reason), "{down}");
    let served = answered("b2") + answered("b3");
    assert!(wait_until(SOON, || answered("b2") + answered("b3") > served + 1000));

    // b3 stops answering SYNs altogether.
    let b3_addr = backends[2].addr;
    backends[2].stop();
    let _hole = blackhole_on(b3_addr);
    let down = lb
        .wait_for_log("Server web/b3 is DOWN", SOON)
        .unwrap_or_else(|| panic!("b3 not marked down:\n{}", lb.logs().join("\n")));
    assert!(down.contains(reason), "{down}");

    // Once attempts begun before detection have ended (within one connect timeout), ringlb
    // makes no new attempts on either dead backend while traffic keeps flowing.
    // A missing series fails the test.
    let backend_count = |metric: &str, name: &str| {
        sample(admin, metric, &[("backend", name)])
            .unwrap_or_else(|| panic!("no {metric} for {name} in /metrics")) as u64
    };
    let attempts = |name: &str| {
        backend_count("ringlb_backend_connect_failures_total", name)
            + backend_count("ringlb_backend_connections_total", name)
    };
    let pending = |name: &str| backend_count("ringlb_backend_connects_pending", name);
    assert!(
        wait_until(SOON, || pending("b1") == 0 && pending("b3") == 0),
        "connects still pending: b1 {}, b3 {}",
        pending("b1"),
        pending("b3")
    );
    let (b1_before, b3_before) = (attempts("b1"), attempts("b3"));
    let served = answered("b2") + answered("b4") + answered("b5");
    assert!(wait_until(SOON, || answered("b2")
        + answered("b4")
        + answered("b5")
        > served + 3000));
    assert_eq!(
        attempts("b1"),
        b1_before,
        "connects to dead b1 after detection"
    );
    assert_eq!(
        attempts("b3"),
        b3_before,
        "connects to black-holed b3 after detection"
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let t = tally.lock().unwrap();
    let total: usize = t.answers.values().sum();
    eprintln!("answers: {:?}, errors: {}", t.answers, t.errors.len());
    assert!(
        t.errors.is_empty(),
        "{} of {} client connections failed: {:?}",
        t.errors.len(),
        total + t.errors.len(),
        &t.errors[..t.errors.len().min(5)]
    );
}

/// Holds `addr` as a listener whose accept queue is full, so SYNs to it go unanswered.
struct Hole {
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
}

fn blackhole_on(addr: SocketAddr) -> Hole {
    use socket2::{Domain, Socket, Type};
    let listener = (0..250)
        .find_map(|_| {
            let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            l.set_reuse_address(true).unwrap();
            if l.bind(&addr.into()).is_ok() && l.listen(0).is_ok() {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
            None
        })
        .expect("rebind the backend's port");
    let fillers = (0..4)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            s
        })
        .collect();
    assert!(
        wait_until(SOON, || TcpStream::connect_timeout(
            &addr,
            Duration::from_millis(300)
        )
        .is_err()),
        "the black hole still answers"
    );
    Hole {
        _listener: listener,
        _fillers: fillers,
    }
}
