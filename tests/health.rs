//! Health checks against real sockets: dead backends are taken out with HAProxy's log lines,
//! returning ones are brought back, passive health and backups work, slow start ramps, and
//! thousands of failed checks leak no fds.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// Fast checks so that tests finish quickly: every 200ms, rise 2, fall 3.
const FAST_CHECKS: &str = "[frontend.health]\ninterval = \"200ms\"\nrise = 2\nfall = 3\n";

/// Opens a client connection through ringlb and reads the backend's name line.
fn open_named(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        name.push(byte[0]);
    }
    (s, String::from_utf8(name).unwrap())
}

/// Names answered by `n` connections through `addr`.
fn names(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n).map(|_| ask_name(addr).unwrap()).collect()
}

fn share(names: &[String], who: &str) -> f64 {
    names.iter().filter(|n| *n == who).count() as f64 / names.len() as f64
}

#[test]
fn a_backend_that_stops_listening_is_marked_down_with_the_connection_problem_line() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let b2 = Backend::start("b2", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            FAST_CHECKS,
            &[("b1", b1.addr, ""), ("b2", b2.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    b2.stop();
    let line = lb
        .wait_for_log(
            "Server web/b2 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: ",
            SOON,
        )
        .unwrap_or_else(|| panic!("no DOWN line:\n{}", lb.logs().join("\n")));
    assert!(
        line.contains("ms. 1 active and 0 backup servers left. 0 sessions active, 0 requeued, 0 remaining in queue."),
        "{line}"
    );
    assert!(names(lb.addr("web"), 20).iter().all(|n| n == "b1"));
    assert!(!lb
        .logs()
        .iter()
        .any(|l| l.contains("has no server available")));
}

#[test]
fn a_backend_that_never_answers_is_marked_down_with_the_layer4_timeout_line() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let hole = Blackhole::start();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\ninterval = \"300ms\"\ntimeout = \"300ms\"",
            &[("b1", b1.addr, ""), ("hole", hole.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let line = lb
        .wait_for_log(
            "Server web/hole is DOWN, reason: Layer4 timeout, check duration: ",
            SOON,
        )
        .unwrap_or_else(|| panic!("no DOWN line:\n{}", lb.logs().join("\n")));
    assert!(
        line.contains("1 active and 0 backup servers left"),
        "{line}"
    );
    assert!(names(lb.addr("web"), 20).iter().all(|n| n == "b1"));
}

#[test]
fn a_backend_that_starts_listening_is_marked_up_and_receives_connections() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let later = refused_addr();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            FAST_CHECKS,
            &[("b1", b1.addr, ""), ("b2", later, "")],
        );
    let lb = Ringlb::start(&cfg);
    // Configured up by default; the first failed check takes it out.
    lb.wait_for_log("Server web/b2 is DOWN", SOON)
        .expect("b2 marked down");
    let mark = lb.log_len();
    let _b2 = Backend::start_on(later, "b2", Behaviour::Named);
    let line = lb
        .wait_for_log_after(mark, "Server web/b2 is UP", SOON)
        .unwrap_or_else(|| panic!("no UP line:\n{}", lb.logs().join("\n")));
    assert!(
        line.contains("is UP, reason: Layer4 check passed, check duration: ")
            && line.ends_with(
                "ms. 2 active and 0 backup servers online. 0 sessions requeued, 0 total in queue."
            ),
        "{line}"
    );
    let got = names(lb.addr("web"), 20);
    assert!(got.iter().any(|n| n == "b2"), "{got:?}");
}

#[test]
fn passive_health_marks_a_refusing_backend_down_after_error_limit_failures() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let dead = refused_addr();
    // Active checks so slow they never run during the test, until passive health hands the
    // backend to them: then they run every down_interval (while down) and fast_interval
    // (while rising).
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\ninterval = \"1h\"\ndown_interval = \"200ms\"\nfast_interval = \"200ms\"\nerror_limit = 3",
            &[("b1", b1.addr, ""), ("b2", dead, "")],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    let line = {
        let mut found = None;
        assert!(
            wait_until(SOON, || {
                // Clients never see the refusals: ringlb retries on b1.
                assert_eq!(ask_name(addr).unwrap(), "b1");
                found = lb
                    .logs()
                    .into_iter()
                    .find(|l| l.contains("Server web/b2 is DOWN"));
                found.is_some()
            }),
            "no passive DOWN line:\n{}",
            lb.logs().join("\n")
        );
        found.unwrap()
    };
    assert!(
        line.contains("reason: Health analyze, info: \"Detected ")
            && line
                .contains("consecutive errors (error_limit), last one was: Connection refused\"")
            && line.contains("1 active and 0 backup servers left"),
        "{line}"
    );
    // The active check takes over and brings it back once it listens again.
    let mark = lb.log_len();
    let _b2 = Backend::start_on(dead, "b2", Behaviour::Named);
    lb.wait_for_log_after(mark, "Server web/b2 is UP", SOON)
        .unwrap_or_else(|| panic!("no UP line:\n{}", lb.logs().join("\n")));
    assert!(wait_until(SOON, || ask_name(addr).unwrap() == "b2"));
}

#[test]
fn a_backup_serves_only_while_every_primary_is_down_and_traffic_returns_to_a_primary() {
    let p1 = Backend::start("p1", Behaviour::Named);
    let spare = Backend::start("spare", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            FAST_CHECKS,
            &[("p1", p1.addr, ""), ("spare", spare.addr, "backup = true")],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    assert!(names(addr, 10).iter().all(|n| n == "p1"));
    let p1_addr = p1.addr;
    p1.stop();
    let line = lb
        .wait_for_log("Server web/p1 is DOWN", SOON)
        .expect("p1 marked down");
    assert!(
        line.contains("0 active and 1 backup servers left"),
        "{line}"
    );
    assert!(names(addr, 10).iter().all(|n| n == "spare"));
    let mark = lb.log_len();
    let p1_again = Backend::start_on(p1_addr, "p1", Behaviour::Named);
    let up = lb
        .wait_for_log_after(mark, "Server web/p1 is UP", SOON)
        .expect("p1 back up");
    assert!(up.contains("1 active and 1 backup servers online"), "{up}");
    assert!(names(addr, 10).iter().all(|n| n == "p1"));
    // The backup itself going down is named as a backup, and then nothing is left.
    let mark = lb.log_len();
    drop(p1_again);
    spare.stop();
    lb.wait_for_log_after(mark, "Backup Server web/spare is DOWN", SOON)
        .unwrap_or_else(|| panic!("{}", lb.logs().join("\n")));
    lb.wait_for_log_after(mark, "frontend web has no server available!", SOON)
        .unwrap_or_else(|| panic!("{}", lb.logs().join("\n")));
}

#[test]
fn shutdown_sessions_closes_open_connections_of_a_backend_marked_down() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let b2 = Backend::start("b2", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!("on_marked_down = \"shutdown-sessions\"\n{FAST_CHECKS}"),
            &[("b1", b1.addr, ""), ("b2", b2.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let (mut client, name) = open_named(lb.addr("web"));
    let victim = if name == "b1" { &b1 } else { &b2 };
    // Only the listener closes; the backend would keep serving this connection.
    victim.stop();
    let line = lb
        .wait_for_log(&format!("Server web/{name} is DOWN"), SOON)
        .expect("marked down");
    assert!(line.contains("1 sessions active"), "{line}");
    let mut buf = [0u8; 16];
    let closed = match client.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    assert!(closed, "connection still open after mark-down");
}

#[test]
fn by_default_open_connections_of_a_backend_marked_down_continue() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let b2 = Backend::start("b2", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            FAST_CHECKS,
            &[("b1", b1.addr, ""), ("b2", b2.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let (mut client, name) = open_named(lb.addr("web"));
    let victim = if name == "b1" { &b1 } else { &b2 };
    victim.stop();
    lb.wait_for_log(&format!("Server web/{name} is DOWN"), SOON)
        .expect("marked down");
    client.write_all(b"still here\n").unwrap();
    let mut buf = [0u8; 11];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here\n");
}

#[test]
fn slow_start_gives_a_returning_backend_a_growing_share_but_none_at_process_start() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let b2 = Backend::start("b2", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!("balance = \"round-robin\"\nslow_start = \"8s\"\n{FAST_CHECKS}"),
            &[("b1", b1.addr, ""), ("b2", b2.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    // At process start both serve a full share at once.
    let start_share = share(&names(addr, 40), "b2");
    assert!(start_share > 0.35, "b2 share at start {start_share}");

    let b2_addr = b2.addr;
    b2.stop();
    lb.wait_for_log("Server web/b2 is DOWN", SOON)
        .expect("down");
    let mark = lb.log_len();
    let _b2 = Backend::start_on(b2_addr, "b2", Behaviour::Named);
    lb.wait_for_log_after(mark, "Server web/b2 is UP", SOON)
        .expect("up");
    // Just back: a small share (about 5-15% in the first second of an 8s ramp).
    let early = share(&names(addr, 40), "b2");
    assert!(
        early < 0.3,
        "b2 took {early} of the traffic right after coming back"
    );
    // The share grows to about half once the ramp ends.
    let mut late = 0.0;
    assert!(
        wait_until(SOON, || {
            late = share(&names(addr, 40), "b2");
            late > 0.4
        }),
        "b2 share stayed at {late}"
    );
}

#[test]
fn thousands_of_failed_and_timed_out_checks_leak_no_fds() {
    let refused: Vec<SocketAddr> = (0..8).map(|_| refused_addr()).collect();
    let holes: Vec<Blackhole> = (0..4).map(|_| Blackhole::start()).collect();
    let mut backends: Vec<(String, SocketAddr)> = refused
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("r{i}"), *a))
        .collect();
    backends.extend(
        holes
            .iter()
            .enumerate()
            .map(|(i, h)| (format!("h{i}"), h.addr)),
    );
    let list: Vec<(&str, SocketAddr, &str)> =
        backends.iter().map(|(n, a)| (n.as_str(), *a, "")).collect();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\ninterval = \"10ms\"\ntimeout = \"10ms\"",
            &list,
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.expect("admin address");
    assert!(
        wait_until(SOON, || lb
            .logs()
            .iter()
            .any(|l| l.contains("has no server available"))),
        "{}",
        lb.logs().join("\n")
    );
    let baseline = lb.fd_count();
    let failures = || metrics(admin).sum("ringlb_backend_check_failures_total", &[]);
    let first = failures();
    assert!(
        wait_until(Duration::from_secs(60), || failures() >= first + 3000.0),
        "checks did not run: {} failures",
        failures()
    );
    let after = lb.fd_count();
    eprintln!(
        "fds: {baseline} before, {after} after {} failed checks",
        failures() - first
    );
    // In-flight probes (one per backend at most) and admin connections explain small moves.
    assert!(
        after <= baseline + 16,
        "fds grew from {baseline} to {after} over {} failed checks",
        failures() - first
    );
}

#[test]
fn a_backend_without_checks_that_passive_health_takes_out_is_checked_until_it_returns() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let dead = refused_addr();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\ninterval = \"200ms\"\nerror_limit = 3",
            &[("b1", b1.addr, ""), ("b2", dead, "check = false")],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    assert!(
        wait_until(SOON, || {
            assert_eq!(ask_name(addr).unwrap(), "b1");
            lb.logs()
                .iter()
                .any(|l| l.contains("Server web/b2 is DOWN, reason: Health analyze"))
        }),
        "{}",
        lb.logs().join("\n")
    );
    let mark = lb.log_len();
    let _b2 = Backend::start_on(dead, "b2", Behaviour::Named);
    lb.wait_for_log_after(
        mark,
        "Server web/b2 is UP, reason: Layer4 check passed",
        SOON,
    )
    .unwrap_or_else(|| panic!("no UP line:\n{}", lb.logs().join("\n")));
}

#[test]
fn a_backend_added_by_a_reload_is_checked_and_one_removed_is_forgotten() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let dead = refused_addr();
    let one = global_toml("") + &frontend_toml("web", FAST_CHECKS, &[("b1", b1.addr, "")]);
    let two = global_toml("")
        + &frontend_toml("web", FAST_CHECKS, &[("b1", b1.addr, ""), ("b2", dead, "")]);
    let lb = Ringlb::start(&one);
    let mark = lb.reload(&two);
    lb.wait_for_log_after(
        mark,
        "Server web/b2 is DOWN, reason: Layer4 connection problem",
        SOON,
    )
    .unwrap_or_else(|| panic!("added backend not checked:\n{}", lb.logs().join("\n")));
    let mark = lb.reload(&one);
    lb.wait_for_log_after(mark, "reload: applied", SOON)
        .expect("reload applied");
    assert!(names(lb.addr("web"), 10).iter().all(|n| n == "b1"));
    // Something listens on the removed backend's port now; b1's own checks (which land in
    // its accept count) show that several check rounds pass without one reaching it.
    let b2 = Backend::start_on(dead, "b2", Behaviour::Named);
    let b1_seen = b1.accepted();
    assert!(wait_until(SOON, || b1.accepted() >= b1_seen + 8));
    assert_eq!(b2.accepted(), 0, "a removed backend is still checked");
}
