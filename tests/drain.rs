//! Paced drain: when ringlb closes a backend's open connections itself (marked down with
//! shutdown-sessions, removed by a reload, ringlb stopping), `drain_pace` spreads the closes
//! over a window, so clients reconnect as a trickle and not a storm; each close is counted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// Enough fds for this process's side of many connections (clients and backend threads).
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// `n` long-lived connections through `addr`, each proven relayed by one echoed byte; each
/// reports the instant it is closed (EOF or reset) on the returned channel.
fn hold(addr: SocketAddr, n: usize) -> mpsc::Receiver<Instant> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (closed_tx, closed_rx) = mpsc::channel();
    for _ in 0..n {
        let (ready_tx, closed_tx) = (ready_tx.clone(), closed_tx.clone());
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut b = [0u8; 1];
                s.write_all(b"x").unwrap();
                s.read_exact(&mut b).unwrap();
                ready_tx.send(()).unwrap();
                // Idle until ringlb closes it.
                let r = s.read(&mut b);
                assert!(!matches!(r, Ok(n) if n > 0), "unexpected bytes");
                // The test may be over (and the receiver gone) already.
                let _ = closed_tx.send(Instant::now());
            })
            .unwrap();
    }
    for _ in 0..n {
        ready_rx
            .recv_timeout(SOON)
            .expect("a connection did not get relayed");
    }
    closed_rx
}

/// Waits for `n` closes; returns their instants, sorted.
fn closes(rx: &mpsc::Receiver<Instant>, n: usize, within: Duration) -> Vec<Instant> {
    let deadline = Instant::now() + within;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(t) => out.push(t),
            Err(_) => panic!(
                "only {} of {n} connections closed within {within:?}",
                out.len()
            ),
        }
    }
    out.sort();
    out
}

/// How many closes fall in each second from the first one.
fn per_second(times: &[Instant]) -> Vec<usize> {
    let first = times[0];
    let mut buckets = vec![0usize; 1 + (times[times.len() - 1] - first).as_secs() as usize];
    for t in times {
        buckets[(*t - first).as_secs() as usize] += 1;
    }
    buckets
}

fn shut_down_total(admin: SocketAddr, backend: &str) -> f64 {
    let text = get(admin, "/metrics");
    let want = format!(
        "ringlb_backend_connections_shut_down_total{{frontend=\"web\",backend=\"{backend}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(want.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn marked_down_config(a: SocketAddr, b: SocketAddr, pace: &str) -> String {
    global_toml("")
        + &frontend_toml(
            "web",
            &format!(
                // No hedging: a connect slowed by the load of 2,000 at once must not move a
                // connection to the other backend, or the halves are not exact.
                "balance = \"round-robin\"\nconnect_hedge = \"off\"\non_marked_down = \"shutdown-sessions\"\n{pace}\n\
                 [frontend.health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2"
            ),
            // b1 unchecked: its open count is then exactly the clients' connections (a probe
            // in flight would be one more).
            &[("a1", a, ""), ("b1", b, "check = false")],
        )
}

#[test]
fn a_thousand_connections_on_a_backend_marked_down_close_spread_over_drain_pace() {
    raise_nofile();
    let a = Backend::start("a1", Behaviour::Echo);
    let b = Backend::start("b1", Behaviour::Echo);
    let lb = Ringlb::start(&marked_down_config(a.addr, b.addr, "drain_pace = \"5s\""));
    let admin = lb.admin.unwrap();
    // Round robin: half of them on a1.
    let rx = hold(lb.addr("web"), 2000);
    assert!(wait_until(SOON, || a.open() == 1000));
    a.stop();
    let down = lb
        .wait_for_log("Server web/a1 is DOWN", SOON)
        .expect("a1 not marked down");
    assert!(down.contains("1000 sessions active"), "{down}");
    let times = closes(&rx, 1000, Duration::from_secs(30));
    let span = times[999] - times[0];
    let buckets = per_second(&times);
    eprintln!("1000 closes over {span:?}; per second: {buckets:?}");
    assert!(
        span >= Duration::from_millis(4000) && span <= Duration::from_millis(7000),
        "closes spread over {span:?}, not about 5 s"
    );
    assert!(
        buckets.iter().all(|&n| n <= 300),
        "a second with more than 30% of the closes: {buckets:?}"
    );
    assert!(
        wait_until(SOON, || shut_down_total(admin, "a1") == 1000.0),
        "counted: {}",
        shut_down_total(admin, "a1")
    );
    // The other backend's connections are untouched.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    assert_eq!(b.open(), 1000);
    assert_eq!(shut_down_total(admin, "b1"), 0.0);
}

#[test]
fn without_drain_pace_shutdown_sessions_closes_them_all_at_once() {
    let a = Backend::start("a1", Behaviour::Echo);
    let b = Backend::start("b1", Behaviour::Echo);
    let lb = Ringlb::start(&marked_down_config(a.addr, b.addr, ""));
    let admin = lb.admin.unwrap();
    let rx = hold(lb.addr("web"), 200);
    assert!(wait_until(SOON, || a.open() == 100));
    a.stop();
    let times = closes(&rx, 100, SOON);
    assert!(
        times[99] - times[0] < Duration::from_secs(1),
        "{:?}",
        times[99] - times[0]
    );
    assert!(wait_until(SOON, || shut_down_total(admin, "a1") == 100.0));
}

#[test]
fn a_backend_removed_by_reload_with_drain_pace_closes_its_connections_spread_and_counted() {
    let a = Backend::start("a1", Behaviour::Echo);
    let b = Backend::start("b1", Behaviour::Echo);
    let cfg = |backends: &[(&str, SocketAddr, &str)]| {
        global_toml("")
            + &frontend_toml(
                "web",
                "connect_hedge = \"off\"\ndrain_pace = \"2s\"",
                backends,
            )
    };
    let lb = Ringlb::start(&cfg(&[("a1", a.addr, "")]));
    let admin = lb.admin.unwrap();
    let rx = hold(lb.addr("web"), 100);
    let mark = lb.reload(&cfg(&[("b1", b.addr, "")]));
    lb.wait_for_log_after(mark, "closing its 100 open connections over 2s", SOON)
        .expect("no paced drain logged");
    let times = closes(&rx, 100, SOON);
    let span = times[99] - times[0];
    assert!(span >= Duration::from_millis(1500), "{span:?}");
    assert!(wait_until(SOON, || shut_down_total(admin, "a1") == 100.0));
    // New connections go to the backend that replaced it.
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    s.write_all(b"y").unwrap();
    let mut c = [0u8; 1];
    s.read_exact(&mut c).unwrap();
    assert!(wait_until(SOON, || b.open() == 1));
    assert_eq!(a.open(), 0);
}

#[test]
fn a_backend_added_back_during_its_paced_drain_keeps_the_connections_left() {
    let a = Backend::start("a1", Behaviour::Echo);
    let b = Backend::start("b1", Behaviour::Echo);
    let cfg = |backends: &[(&str, SocketAddr, &str)]| {
        global_toml("")
            + &frontend_toml(
                "web",
                "connect_hedge = \"off\"\ndrain_pace = \"4s\"",
                backends,
            )
    };
    // Unchecked: a1's open count is then exactly the clients' connections (a probe in flight
    // would be one more).
    let with_a = cfg(&[("a1", a.addr, "check = false")]);
    let lb = Ringlb::start(&with_a);
    let rx = hold(lb.addr("web"), 100);
    let mark = lb.reload(&cfg(&[("b1", b.addr, "")]));
    lb.wait_for_log_after(mark, "closing its 100 open connections over 4s", SOON)
        .unwrap();
    // Some have been closed by now, most not.
    let first = rx.recv_timeout(SOON).expect("the drain closes none");
    let mark = lb.reload(&with_a);
    lb.wait_for_log_after(mark, "reload: applied", SOON)
        .unwrap();
    let mut closed = 1;
    // Past the window and the drain limit (shutdown_timeout, 5 s): nothing more closes.
    let settle = first + Duration::from_secs(7);
    while let Ok(t) = rx.recv_timeout(settle.saturating_duration_since(Instant::now())) {
        assert!(
            t - first < Duration::from_secs(2),
            "a close long after the re-add"
        );
        closed += 1;
    }
    assert!(
        closed < 60,
        "{closed} of 100 closed although the backend came back"
    );
    assert_eq!(a.open(), 100 - closed);
}

#[test]
fn on_stop_drain_pace_spreads_the_closes_and_the_process_exits() {
    let a = Backend::start("a1", Behaviour::Echo);
    let cfg = global_toml("") + &frontend_toml("web", "drain_pace = \"2s\"", &[("a1", a.addr, "")]);
    let mut lb = Ringlb::start(&cfg);
    let rx = hold(lb.addr("web"), 100);
    let start = Instant::now();
    lb.signal(nix::sys::signal::Signal::SIGTERM);
    let times = closes(&rx, 100, SOON);
    let span = times[99] - times[0];
    assert!(span >= Duration::from_millis(1500), "{span:?}");
    let status = lb.wait_exit(SOON).expect("ringlb did not exit");
    assert!(status.success(), "{status:?}");
    // Within shutdown_timeout (5 s in the tests' global settings), not at its end.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(lb
        .logs()
        .iter()
        .any(|l| l.contains("stopping: closing its 100 open connections")));
}
