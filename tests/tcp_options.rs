//! Socket options long-lived TCP needs: `tcp_keepalive` on both of a connection's sockets,
//! `source` for the backend connection's local address, and their config errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;

/// The established TCP sockets of process `pid` as `ss -tinpoH` prints them, one per line.
fn sockets_of(pid: i32) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tnpoH", "state", "established"])
        .output();
    let Ok(out) = out else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .map(str::to_string)
        .collect()
}

#[test]
fn tcp_keepalive_arms_keepalive_timers_on_the_client_and_the_backend_socket() {
    if !tool_available(
        Command::new("ss").arg("-V").output().is_ok(),
        "ss",
        "apt-get install iproute2",
    ) {
        return;
    }
    let b = Backend::start("a", Behaviour::Echo);
    let cfg =
        global_toml("") + &frontend_toml("web", "tcp_keepalive = \"30s\"", &[("a", b.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    s.write_all(b"hi").unwrap();
    let mut back = [0u8; 2];
    s.read_exact(&mut back).unwrap();
    // Both of ringlb's sockets of this connection: the accepted one and the backend one.
    let mine = s.local_addr().unwrap().to_string();
    let mut lines = Vec::new();
    assert!(
        wait_until(SOON, || {
            lines = sockets_of(lb.pid());
            lines
                .iter()
                .filter(|l| l.contains("timer:(keepalive"))
                .count()
                >= 2
        }),
        "expected keepalive timers on both sockets:\n{}",
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&mine) && l.contains("timer:(keepalive")),
        "the client socket has no keepalive timer:\n{}",
        lines.join("\n")
    );

    // Without the key: no keepalive timer.
    let plain = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a", b.addr, "")])));
    let mut s2 = TcpStream::connect(plain.addr("web")).unwrap();
    s2.write_all(b"hi").unwrap();
    s2.read_exact(&mut back).unwrap();
    let lines = sockets_of(plain.pid());
    assert!(lines.len() >= 2, "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("timer:(keepalive")),
        "{lines:?}"
    );
}

#[test]
fn source_sets_the_backend_connections_local_address() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let seen = peers.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            seen.lock().unwrap().push(s.peer_addr().unwrap());
            let mut s = s;
            let _ = s.write_all(b"x");
        }
    });
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "source = \"127.0.0.7\"\n[frontend.health]\ninterval = \"1h\"",
            &[("a", addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    for _ in 0..3 {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
    }
    // Health checks come from anywhere; every relayed connection from the source.
    let got = peers.lock().unwrap().clone();
    let relayed: Vec<_> = got
        .iter()
        .filter(|p| p.ip().to_string() == "127.0.0.7")
        .collect();
    assert!(relayed.len() >= 3, "peers seen by the backend: {got:?}");
    let ports: std::collections::HashSet<_> = relayed.iter().map(|p| p.port()).collect();
    assert_eq!(ports.len(), relayed.len(), "ports reused: {got:?}");
}

#[test]
fn bad_timeouts_keepalive_and_source_are_refused_with_their_keys() {
    let (ok, err) = check_config(
        &(global_toml("")
            + &frontend_toml(
                "web",
                "client_timeout = \"0s\"\nserver_timeout = \"soon\"\ntcp_keepalive = \"500ms\"\nsource = \"::1\"",
                &[("a", "127.0.0.1:9".parse().unwrap(), "")],
            )),
    );
    assert!(!ok);
    for key in [
        "client_timeout",
        "server_timeout",
        "tcp_keepalive",
        "source",
    ] {
        assert!(err.contains(key), "{key} not named:\n{err}");
    }
    assert!(err.contains("both be IPv4 or both IPv6"), "{err}");
    let (ok, err) = check_config(
        &(global_toml("")
            + &frontend_toml(
                "web",
                "source = \"not-an-ip\"",
                &[("a", "127.0.0.1:9".parse().unwrap(), "")],
            )),
    );
    assert!(!ok);
    assert!(err.contains("is not an IP address"), "{err}");
}
