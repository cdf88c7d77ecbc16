//! Idle timeout, max_connections, and no fd leaks on any path.

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
fn max_connections_rejects_the_excess_and_keeps_serving_the_rest() {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg =
        global_toml("max_connections = 3") + &frontend_toml("web", "", &[("echo", b.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(lb.addr("web")).unwrap();
            s.set_read_timeout(Some(SOON)).unwrap();
            echo_once(&mut s).unwrap();
            s
        })
        .collect();
    // The fourth is accepted by the kernel and closed at once by ringlb.
    let mut extra = TcpStream::connect(lb.addr("web")).unwrap();
    extra.set_read_timeout(Some(SOON)).unwrap();
    let mut buf = [0u8; 4];
    let r = extra.write_all(b"ping").and_then(|_| extra.read(&mut buf));
    assert!(
        matches!(r, Ok(0)) || r.is_err(),
        "excess connection was served: {r:?}"
    );
    // The held ones are untouched.
    for s in &mut held {
        echo_once(s).unwrap();
    }
    // Closing one frees a slot for a new client.
    held.pop();
    assert!(wait_until(SOON, || {
        let Ok(mut s) = TcpStream::connect(lb.addr("web")) else {
            return false;
        };
        s.set_read_timeout(Some(SOON)).unwrap();
        echo_once(&mut s).is_ok()
    }));
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
    // kept (io_uring rings, the splice relay's bounded pipe pool) reach their size here.
    load(200);
    assert!(wait_until(SOON, || good.open() == 0));
    let baseline = lb.fd_count();
    let baseline_by_kind = lb.fd_count_by_kind();
    load(2000);
    if global.contains("splice") {
        // The splice relay keeps a pool of empty pipes per worker whose size follows peak
        // concurrency (at most 256 per worker, 2 fds each): sockets must return to baseline
        // exactly, pipes must stay within the pool's bound.
        let (base_pipes, base_others) = baseline_by_kind;
        let ok = wait_until(SOON, || {
            let (pipes, others) = lb.fd_count_by_kind();
            others <= base_others && pipes <= 2 * 2 * 256
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
