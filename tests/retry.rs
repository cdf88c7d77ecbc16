//! A dead backend costs clients nothing: refused and never-answering backends are retried on
//! another backend within the same client connection.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use common::*;

#[test]
fn refused_and_silent_backends_cause_zero_client_failures_over_200_connections() {
    retry_scenario("io_uring");
}

#[test]
fn the_epoll_fallback_retries_refused_and_silent_backends_too() {
    retry_scenario("epoll");
}

fn retry_scenario(io: &str) {
    let good1 = Backend::start("good1", Behaviour::Named);
    let good2 = Backend::start("good2", Behaviour::Named);
    let hole = Blackhole::start();
    let refused = refused_addr();
    // No active checks and no passive marking: every connection meets the dead backends as
    // often as round robin sends it there, so this exercises retries alone. No hedging either:
    // under load a slow connect to a good backend was hedged to the other, and both counted.
    let cfg = global_toml(&format!("io = \"{io}\""))
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\nconnect_timeout = \"300ms\"\nretries = 2\nconnect_hedge = \"off\"\n[frontend.health]\nerror_limit = 0",
            &[
                ("refused", refused, "check = false"),
                ("hole", hole.addr, "check = false"),
                ("good1", good1.addr, "check = false"),
                ("good2", good2.addr, "check = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    let threads: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for _ in 0..20 {
                    match ask_name(addr) {
                        Ok(n) if n == "good1" || n == "good2" => {}
                        other => failures.push(format!("{other:?}")),
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(failures.is_empty(), "client-visible failures: {failures:?}");
    assert_eq!(good1.accepted() + good2.accepted(), 200);
}

#[test]
fn a_backend_that_resets_connections_before_a_byte_is_sent_costs_clients_nothing() {
    // Like a backend killed with connections still in its accept queue: the connect
    // succeeded, then the connection is reset. Nothing was relayed yet, so ringlb retries.
    let slam = Backend::start("slam", Behaviour::Slam);
    let good = Backend::start("good", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\n[frontend.health]\nerror_limit = 0",
            &[
                ("slam", slam.addr, "check = false"),
                ("good", good.addr, "check = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    for _ in 0..100 {
        assert_eq!(ask_name(lb.addr("web")).unwrap(), "good");
    }
    assert!(
        slam.accepted() >= 40,
        "the resetting backend was tried: {}",
        slam.accepted()
    );
}

#[test]
fn a_silent_client_is_closed_at_once_when_every_backend_fails_before_a_byte() {
    // Server-speaks-first clients (SMTP, MySQL) send nothing: ringlb must still close them,
    // and free their fds, when no backend is left to try.
    use std::io::Read;
    let slam = Backend::start("slam", Behaviour::Slam);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "retries = 1\n[frontend.health]\nerror_limit = 0",
            &[("slam", slam.addr, "check = false")],
        );
    let lb = Ringlb::start(&cfg);
    let baseline = lb.fd_count();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = std::net::TcpStream::connect(lb.addr("web")).unwrap();
        c.set_read_timeout(Some(SOON)).unwrap();
        let mut buf = [0u8; 1];
        let r = c.read(&mut buf);
        assert!(
            matches!(r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "client not closed: {r:?}"
        );
        clients.push(c); // keep ours open: ringlb's side must be closed regardless
    }
    assert!(
        wait_until(SOON, || lb.fd_count() <= baseline),
        "fds: baseline {baseline}, now {}",
        lb.fd_count()
    );
}
