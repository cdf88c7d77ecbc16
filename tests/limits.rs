//! Idle timeout, max_connections, and no fd leaks on any path.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn echo_once(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

#[test]
fn idle_timeout_closes_a_silent_connection_but_not_an_active_one() {
    idle_scenario("");
}

#[test]
fn idle_timeout_ends_a_silent_splice_relay_too() {
    idle_scenario("relay = \"splice\"");
}

fn idle_scenario(global: &str) {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg = global_toml(global)
        + &frontend_toml("web", "idle_timeout = \"1s\"", &[("echo", b.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let mut silent = TcpStream::connect(lb.addr("web")).unwrap();
    echo_once(&mut silent).unwrap();
    silent.set_read_timeout(Some(SOON)).unwrap();
    let mut busy = TcpStream::connect(lb.addr("web")).unwrap();
    busy.set_read_timeout(Some(SOON)).unwrap();
    // The busy one pings every 200ms for 2.5 idle timeouts; it must never be cut.
    let pinger = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2500) {
            echo_once(&mut busy)?;
            std::thread::sleep(Duration::from_millis(200)); // traffic pacing, not synchronisation
        }
        Ok::<_, std::io::Error>(busy)
    });
    let start = Instant::now();
    // The silent one is closed by ringlb: read returns EOF (or a reset), not our timeout.
    let mut buf = [0u8; 1];
    let r = silent.read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
    );
    assert!(start.elapsed() < SOON);
    let _busy = pinger
        .join()
        .unwrap()
        .expect("the busy connection stayed open");
    assert!(
        wait_until(SOON, || b.open() == 1),
        "the idle connection was closed on the backend side too; only the busy one is open"
    );
}

#[test]
fn at_max_connections_a_new_client_waits_in_the_listen_queue_and_is_served_when_one_closes() {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg =
        // No health checks: every connection the backend accepts is a client's.
        global_toml("max_connections = 3")
            + &frontend_toml("web", "", &[("echo", b.addr, "check = false")]);
    let lb = Ringlb::start(&cfg);
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(lb.addr("web")).unwrap();
            s.set_read_timeout(Some(SOON)).unwrap();
            echo_once(&mut s).unwrap();
            s
        })
        .collect();
    // The fourth completes its handshake with the kernel but ringlb does not accept it: it is
    // neither served nor closed while the cap holds.
    let mut extra = TcpStream::connect(lb.addr("web")).unwrap();
    extra.write_all(b"ping").unwrap();
    assert!(
        lb.wait_for_log("max_connections (3) reached", SOON)
            .is_some(),
        "the pause is logged"
    );
    extra
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4];
    let r = extra.read(&mut buf);
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut),
        "a client over the cap must wait, not be served or closed: {r:?}"
    );
    assert_eq!(
        b.accepted(),
        3,
        "nothing reached the backend for the waiting client"
    );
    // The held ones are untouched.
    for s in &mut held {
        echo_once(s).unwrap();
    }
    // Closing one lets the waiting client in, with the bytes it already sent.
    held.pop();
    extra.set_read_timeout(Some(SOON)).unwrap();
    extra.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    let m = get(lb.admin.expect("admin"), "/metrics");
    assert!(
        m.lines()
            .any(|l| l.starts_with("ringlb_accept_paused_total") && !l.ends_with(" 0")),
        "the pause is counted"
    );
}

#[test]
fn an_idle_connection_holds_two_fds_and_no_pool_resources_in_every_relay_mode() {
    for relay in ["copy", "splice", "splice-auto"] {
        let b = Backend::start("echo", Behaviour::Echo);
        let cfg = global_toml(&format!("relay = \"{relay}\""))
            + &frontend_toml("web", "", &[("echo", b.addr, "")]);
        let lb = Ringlb::start(&cfg);
        let mut warm = TcpStream::connect(lb.addr("web")).unwrap();
        warm.set_read_timeout(Some(SOON)).unwrap();
        echo_once(&mut warm).unwrap();
        drop(warm);
        assert!(wait_until(SOON, || b.open() == 0));
        let baseline = lb.fd_count();
        const N: usize = 200;
        let held: Vec<TcpStream> = (0..N)
            .map(|_| {
                let mut s = TcpStream::connect(lb.addr("web")).unwrap();
                s.set_read_timeout(Some(SOON)).unwrap();
                // A bulk exchange first, so the splice modes have used pipes.
                let big = vec![7u8; 256 * 1024];
                s.write_all(&big).unwrap();
                let mut back = vec![0u8; big.len()];
                s.read_exact(&mut back).unwrap();
                s
            })
            .collect();
        let per_conn = (lb.fd_count() - baseline) as f64 / N as f64;
        assert!(
            per_conn <= 2.1,
            "{relay}: {per_conn:.2} fds per idle connection (baseline {baseline})"
        );
        // The last echo reached its client before the worker saw its send complete and gave
        // the buffer (or pipe) back: wait for that, then every connection is idle.
        let admin = lb.admin.expect("admin");
        for gauge in ["ringlb_relay_buffers_in_use", "ringlb_relay_pipes_in_use"] {
            let mut now = None;
            assert!(
                wait_until(SOON, || {
                    now = sample(admin, gauge, &[]);
                    now == Some(0.0)
                }),
                "{relay}: {gauge} is {now:?} while every connection is idle"
            );
        }
        drop(held);
        assert!(
            wait_until(SOON, || lb.fd_count() <= baseline + 2 * 2 * 16),
            "{relay}: fds back to baseline plus at most the free pipe pool"
        );
    }
}

#[test]
fn open_fds_return_to_baseline_after_2000_connections_to_refused_silent_and_live_backends() {
    fd_scenario("io = \"io_uring\"");
}

#[test]
fn the_epoll_fallback_leaks_no_fds_either() {
    fd_scenario("io = \"epoll\"");
}

#[test]
fn the_splice_relay_leaks_no_fds_either() {
    fd_scenario("relay = \"splice\"");
}

#[test]
fn the_splice_auto_relay_leaks_no_fds_either() {
    fd_scenario("relay = \"splice-auto\"");
}

fn fd_scenario(global: &str) {
    let good = Backend::start("good", Behaviour::Echo);
    let hole = Blackhole::start();
    let refused = refused_addr();
    let cfg = global_toml(global)
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\nconnect_timeout = \"100ms\"\nretries = 2\n[frontend.health]\nerror_limit = 0",
            &[
                ("refused", refused, "check = false"),
                ("hole", hole.addr, "check = false"),
                ("good", good.addr, "check = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    let load = |connections: usize| {
        let threads: Vec<_> = (0..20)
            .map(|i| {
                std::thread::spawn(move || {
                    for j in 0..connections / 20 {
                        let mut s = TcpStream::connect(addr).unwrap();
                        s.set_read_timeout(Some(SOON)).unwrap();
                        if (i + j) % 4 == 0 {
                            // Some clients leave mid-connect or mid-relay without a word.
                            drop(s);
                        } else {
                            echo_once(&mut s).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    // Warm up with the same concurrency: per-worker resources that are created lazily and
    // kept (io_uring rings, the bounded pool of free pipes) reach their size here.
    load(200);
    assert!(wait_until(SOON, || good.open() == 0));
    let baseline = lb.fd_count();
    let baseline_by_kind = lb.fd_count_by_kind();
    load(2000);
    if global.contains("splice") {
        // Pipes are lent only while bytes are in flight; each worker keeps at most 16 free
        // ones (2 fds each): sockets must return to baseline exactly, pipes to that bound.
        let (base_pipes, base_others) = baseline_by_kind;
        let ok = wait_until(SOON, || {
            let (pipes, others) = lb.fd_count_by_kind();
            others <= base_others && pipes <= 2 * 2 * 16
        });
        let now = lb.fd_count_by_kind();
        assert!(
            ok,
            "fds (pipes, others): baseline ({base_pipes}, {base_others}), now {now:?}"
        );
        return;
    }
    let settled = wait_until(SOON, || lb.fd_count() <= baseline);
    assert!(settled, "fds: baseline {baseline}, now {}", lb.fd_count());
}
