//! Local faults are local: ringlb running out of fds is not blamed on the backends.
//!
//! ringlb runs under an open-file limit of 256 with 1,000 clients at once. It must lower its
//! connection cap to what fits (and say so), stop accepting at that cap instead of failing
//! connects with EMFILE, keep health checks and the admin port working, and serve every one
//! of the 1,000 clients as the earlier ones leave.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const CLIENTS: usize = 1000;

fn raise_own_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
fn under_ulimit_256_a_thousand_clients_are_all_served_and_no_backend_is_blamed() {
    raise_own_nofile();
    let b = Backend::start("echo", Behaviour::Echo);
    // Fast checks, so a probe wrongly failed by EMFILE would show as a DOWN at once.
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\ninterval = \"100ms\"\nrise = 1\nfall = 1\nerror_limit = 1",
            &[("echo", b.addr, "")],
        );
    let lb = Ringlb::start_with_nofile(&cfg, &[], Some(256));
    let warn = lb
        .wait_for_log("does not fit the open-file limit 256", SOON)
        .expect("a start-up WARN names the limit");
    assert!(warn.contains("LimitNOFILE="), "{warn}");
    let admin = lb.admin.expect("admin");

    // 1,000 clients connect and speak; only as many as fit are served, the rest wait.
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let mut s = TcpStream::connect(lb.addr("web")).expect("the kernel queues the client");
            s.write_all(format!("hello {i:04}\n").as_bytes()).unwrap();
            s
        })
        .collect();
    // While they are all held: the admin answers, and nothing is marked down.
    for _ in 0..10 {
        let (code, _, body) = http(admin, "GET", "/healthz");
        assert_eq!(code, 200, "/healthz while the fds are all in use: {body}");
        std::thread::sleep(Duration::from_millis(100)); // polling pace, not synchronisation
    }
    lb.wait_for_log("max_connections (", SOON)
        .expect("the pause at the cap is logged");

    // Each client reads its echo and leaves; every one must be served.
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    s.set_read_timeout(Some(SOON)).unwrap();
                    let mut buf = [0u8; 11];
                    s.read_exact(&mut buf)?;
                    assert_eq!(&buf, format!("hello {i:04}\n").as_bytes());
                    Ok::<_, std::io::Error>(())
                })
                .unwrap()
        })
        .collect();
    let failed = readers
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|r| r.is_err())
        .count();
    assert_eq!(failed, 0, "clients not served");

    let logs = lb.logs().join("\n");
    assert!(!logs.contains("is DOWN"), "a backend was blamed:\n{logs}");
    assert!(!logs.contains("no server available"), "{logs}");
    let m = get(admin, "/metrics");
    let connect_failures = m
        .lines()
        .find(|l| l.starts_with("ringlb_backend_connect_failures_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(connect_failures, Some(0.0), "{m}");
}
