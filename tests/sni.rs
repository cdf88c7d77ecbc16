//! SNI routing of TLS passthrough (`[[frontend.route]]`), end to end with real processes:
//! `openssl s_client` through one ringlb port to `openssl s_server` backends, each with its
//! own self-signed certificate made here, and the certificate each handshake presented
//! checked; clients without a server name, with an unrouted one, or not speaking TLS at all
//! go to the default pool; broken, oversized and slow ClientHellos are closed with a counted
//! reason within `sni_timeout`, and leave no fd behind.
//!
//! openssl is Debian's package (`.ci/run` installs it); without it the tests say SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ringlb::relay::sni::{records, sample_hello};

/// `openssl s_server -www` with a fresh self-signed certificate for `cn`.
fn tls_server(openssl: &Path, dir: &Path, cn: &str) -> (Proc, SocketAddr) {
    let (cert, key) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    let made = Command::new(openssl)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "openssl req for {cn} failed");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = Proc::quiet(
        Command::new(openssl)
            .args(["s_server", "-www", "-accept", &addr.to_string()])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key),
    );
    assert!(wait_until(SOON, || TcpStream::connect(addr).is_ok()));
    (server, addr)
}

/// Runs `openssl s_client` through `addr` with `servername` (`None`: no SNI at all), asks
/// for `/` and returns the certificate's subject and whether s_server's page came back.
fn handshake(openssl: &Path, addr: SocketAddr, servername: Option<&str>) -> (String, bool) {
    let mut cmd = Command::new(openssl);
    cmd.args(["s_client", "-connect", &addr.to_string(), "-ign_eof"]);
    match servername {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let subject = text
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no certificate from {servername:?}:\n{text}"))
        .replace(' ', "");
    (subject, text.contains("HTTP/1.0 200 ok"))
}

fn rejected(lb: &Ringlb, frontend: &str, reason: &str) -> f64 {
    lb.metrics().expect(
        "ringlb_frontend_rejected_total",
        &[("frontend", frontend), ("reason", reason)],
    )
}

fn openssl() -> Option<PathBuf> {
    let found = on_path("openssl");
    if !tool_available(found.is_some(), "openssl", "apt-get install openssl") {
        return None;
    }
    found
}

#[test]
fn server_names_pick_their_tls_backend_and_the_rest_go_to_the_default_pool() {
    let Some(openssl) = openssl() else { return };
    let dir = TempDir::new();
    let (_a, a_addr) = tls_server(&openssl, &dir.path, "a.example");
    let (_b, b_addr) = tls_server(&openssl, &dir.path, "b.example");
    let (_d, d_addr) = tls_server(&openssl, &dir.path, "default.example");
    let routes = "[[frontend.route]]\nsni = [\"a.example\"]\npool = \"a\"\n\
                  [[frontend.route]]\nsni = [\"b.example\", \"*.b.example\"]\npool = \"b\"\n";
    let cfg = global_toml("")
        + &frontend_toml(
            "tls",
            routes,
            &[
                ("a", a_addr, "pool = \"a\"\ncheck = false"),
                ("b", b_addr, "pool = \"b\"\ncheck = false"),
                ("default", d_addr, "check = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("tls");
    for (name, want) in [
        (Some("a.example"), "CN=a.example"),
        (Some("b.example"), "CN=b.example"),
        // A wildcard covers one label, not two; names are matched without case.
        (Some("x.b.example"), "CN=b.example"),
        (Some("X.B.Example"), "CN=b.example"),
        (Some("y.x.b.example"), "CN=default.example"),
        (Some("c.example"), "CN=default.example"),
        (None, "CN=default.example"),
    ] {
        let (subject, answered) = handshake(&openssl, addr, name);
        assert_eq!(subject, want, "server name {name:?}");
        assert!(answered, "server name {name:?}: no answer over TLS");
    }
    assert_eq!(rejected(&lb, "tls", "sni"), 0.0);
}

/// Sends `bytes` in pieces of `piece` bytes, each its own segment, then reads the echo.
fn send_in_pieces(s: &mut TcpStream, bytes: &[u8], piece: usize) {
    s.set_nodelay(true).unwrap();
    for chunk in bytes.chunks(piece) {
        s.write_all(chunk).unwrap();
        // Not synchronisation: spaces the pieces so they arrive in separate reads.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads until EOF or an error; returns what came and how long it took.
fn read_to_close(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(SOON)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn echoed(addr: SocketAddr, bytes: &[u8], piece: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    send_in_pieces(&mut s, bytes, piece);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    read_to_close(&mut s).0
}

#[test]
fn bytes_read_for_routing_reach_the_backend_first_and_intact_and_bad_hellos_are_closed_and_counted()
{
    routing_bytes_and_bad_hellos("auto");
}

#[test]
fn on_the_epoll_fallback_too_bytes_are_replayed_and_bad_hellos_closed_without_a_leak() {
    routing_bytes_and_bad_hellos("epoll");
}

fn routing_bytes_and_bad_hellos(io: &str) {
    let echo_default = Backend::start("default", Behaviour::Echo);
    let echo_a = Backend::start("a", Behaviour::Echo);
    let strict_a = Backend::start("strict-a", Behaviour::Echo);
    let routes = "sni_timeout = \"1s\"\n[[frontend.route]]\nsni = [\"a.example\"]\npool = \"a\"\n";
    let cfg = global_toml(&format!("io = \"{io}\""))
        + &frontend_toml(
            "mixed",
            routes,
            &[
                ("a", echo_a.addr, "pool = \"a\"\ncheck = false"),
                ("default", echo_default.addr, "check = false"),
            ],
        )
        + "\n"
        // Every backend in a named pool: no default pool.
        + &frontend_toml(
            "strict",
            routes,
            &[("a", strict_a.addr, "pool = \"a\"\ncheck = false")],
        );
    let lb = Ringlb::start(&cfg);
    let (mixed, strict) = (lb.addr("mixed"), lb.addr("strict"));

    // A ClientHello in one-byte records, sent in 40-byte pieces, then more bytes: all of it
    // reaches pool a's backend, in order.
    let mut hello = records(&sample_hello(Some("a.example"), 300)[5..], 1);
    hello.extend_from_slice(b"\x17\x03\x03\x00\x05after");
    assert_eq!(echoed(mixed, &hello, 40), hello);
    assert_eq!(echo_a.accepted(), 1);
    // Not TLS, and an unrouted name: the default pool, bytes intact.
    let http = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec();
    assert_eq!(echoed(mixed, &http, 1000), http);
    let other = sample_hello(Some("zzz.example"), 0);
    assert_eq!(echoed(mixed, &other, 50), other);
    assert_eq!(echo_default.accepted(), 2);
    assert_eq!(echo_a.accepted(), 1);
    // On the frontend without a default pool, a routed name still goes through.
    let ok = sample_hello(Some("a.example"), 0);
    assert_eq!(echoed(strict, &ok, 1000), ok);

    // Warm: the workers' pools and tables hold what they keep; now count fds.
    let fds_before = lb.fd_count();
    let hello = sample_hello(Some("a.example"), 200);
    let oversized = sample_hello(Some("a.example"), 16_500);
    let broken = {
        let mut h = sample_hello(Some("a.example"), 0);
        h[5] = 2; // a ServerHello
        h
    };
    let mut closed_sni = 0.0;
    for (what, bytes, eof) in [
        ("truncated", &hello[..hello.len() / 2], true),
        ("oversized", &oversized[..], false),
        ("not a ClientHello", &broken[..], false),
    ] {
        let mut s = TcpStream::connect(mixed).unwrap();
        // The oversized one is refused from its length, before it is all read: the write may
        // meet the reset.
        let _ = s.write_all(bytes);
        if eof {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let (got, took) = read_to_close(&mut s);
        assert!(got.is_empty(), "{what}: the client got {got:?}");
        assert!(
            took < Duration::from_millis(900),
            "{what}: closed after {took:?}"
        );
        closed_sni += 1.0;
    }
    // Half a ClientHello, then silence: closed at sni_timeout.
    let mut slow = TcpStream::connect(mixed).unwrap();
    slow.write_all(&hello[..40]).unwrap();
    let (got, took) = read_to_close(&mut slow);
    assert!(got.is_empty());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "a slow ClientHello was closed after {took:?}"
    );
    // Without a default pool: no server name, and not TLS, are closed.
    for bytes in [sample_hello(None, 0), http.clone()] {
        let mut s = TcpStream::connect(strict).unwrap();
        s.write_all(&bytes).unwrap();
        let (got, _) = read_to_close(&mut s);
        assert!(got.is_empty());
    }
    // None of these reached a backend.
    assert_eq!(echo_default.accepted(), 2);
    assert_eq!(echo_a.accepted(), 1);
    assert_eq!(strict_a.accepted(), 1);
    assert!(wait_until(SOON, || rejected(&lb, "mixed", "sni") == closed_sni));
    assert!(wait_until(SOON, || rejected(&lb, "mixed", "sni_timeout") == 1.0));
    assert!(wait_until(SOON, || rejected(&lb, "strict", "sni") == 2.0));
    assert!(
        wait_until(SOON, || lb.fd_count() <= fds_before),
        "fds: {} before, {} after",
        fds_before,
        lb.fd_count()
    );
    let line = lb
        .wait_for_log(
            "rejected: no whole TLS ClientHello within sni_timeout (1s)",
            SOON,
        )
        .expect("a log line for the slow ClientHello");
    assert!(line.contains("frontend mixed"), "{line}");
}

#[test]
fn a_proxy_header_is_read_before_the_client_hello_and_sent_before_it() {
    let echo = Backend::start("a", Behaviour::Echo);
    let other = Backend::start("other", Behaviour::Echo);
    let cfg = global_toml("")
        + &frontend_toml(
            "tls",
            "accept_proxy = true\n[[frontend.route]]\nsni = [\"a.example\"]\npool = \"a\"\n",
            &[
                (
                    "a",
                    echo.addr,
                    "pool = \"a\"\nsend_proxy = \"v1\"\ncheck = false",
                ),
                ("other", other.addr, "check = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let header = b"PROXY TCP4 203.0.113.7 198.51.100.1 4000 443\r\n";
    let hello = sample_hello(Some("a.example"), 0);
    let mut sent = header.to_vec();
    sent.extend_from_slice(&hello);
    // The header as ringlb sends it on names the declared client: the same line.
    assert_eq!(echoed(lb.addr("tls"), &sent, 30), sent);
    assert_eq!((echo.accepted(), other.accepted()), (1, 0));
}

#[test]
fn a_reload_that_adds_a_route_moves_its_name_to_the_new_pool() {
    let first = Backend::start("first", Behaviour::Named);
    let second = Backend::start("second", Behaviour::Named);
    let cfg = |routed: bool| {
        let (settings, pool) = if routed {
            (
                "balance = \"round-robin\"\n\
                 [[frontend.route]]\nsni = [\"*.b.example\"]\npool = \"b\"\n",
                "pool = \"b\"\ncheck = false",
            )
        } else {
            ("balance = \"round-robin\"\n", "check = false")
        };
        global_toml("")
            + &frontend_toml(
                "tls",
                settings,
                &[
                    ("first", first.addr, "check = false"),
                    ("second", second.addr, pool),
                ],
            )
    };
    let lb = Ringlb::start(&cfg(false));
    let addr = lb.addr("tls");
    let name_for = |server: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&sample_hello(Some(server), 0)).unwrap();
        s.set_read_timeout(Some(SOON)).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    };
    // Without routes, both take turns whatever the name.
    let mut seen: Vec<String> = (0..6).map(|_| name_for("x.b.example")).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["first", "second"]);
    let mark = lb.reload(&cfg(true));
    let line = lb
        .wait_for_log_after(mark, "reload: applied", SOON)
        .unwrap_or_else(|| panic!("no reload line: {:?}", lb.logs()));
    assert!(
        line.contains("settings") && line.contains("~second"),
        "{line}"
    );
    for _ in 0..5 {
        assert_eq!(name_for("x.b.example"), "second");
        assert_eq!(name_for("c.example"), "first");
    }
}

#[test]
fn a_pool_whose_backends_are_all_down_says_so_and_its_clients_are_not_sent_elsewhere() {
    let other = Backend::start("other", Behaviour::Echo);
    let dead = refused_addr();
    let cfg = global_toml("")
        + &frontend_toml(
            "tls",
            "retries = 1\n[frontend.health]\ninterval = \"100ms\"\nfall = 1\n\
             [[frontend.route]]\nsni = [\"a.example\"]\npool = \"a\"\n",
            &[
                ("a1", dead, "pool = \"a\""),
                ("other", other.addr, "check = false"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let line = lb
        .wait_for_log("pool a has no server available!", SOON)
        .unwrap_or_else(|| panic!("no pool line: {:?}", lb.logs()));
    assert!(line.contains("frontend tls pool a"), "{line}");
    // Pool a's client is closed, not sent to the default pool's backend.
    let mut s = TcpStream::connect(lb.addr("tls")).unwrap();
    s.write_all(&sample_hello(Some("a.example"), 0)).unwrap();
    let (got, _) = read_to_close(&mut s);
    assert!(got.is_empty());
    assert_eq!(other.accepted(), 0);
    assert!(wait_until(SOON, || lb.metrics().expect(
        "ringlb_frontend_rejected_total",
        &[("frontend", "tls"), ("reason", "no_backend")]
    ) == 1.0));
}

#[test]
fn a_client_queued_for_one_pool_does_not_hold_back_a_client_of_another() {
    let a = Backend::start("a", Behaviour::Echo);
    let b = Backend::start("b", Behaviour::Echo);
    let routes = "queue_timeout = \"30s\"\n\
                  [[frontend.route]]\nsni = [\"a.example\"]\npool = \"a\"\n\
                  [[frontend.route]]\nsni = [\"b.example\"]\npool = \"b\"\n";
    let cfg = global_toml("")
        + &frontend_toml(
            "tls",
            routes,
            &[
                (
                    "a",
                    a.addr,
                    "pool = \"a\"\ncheck = false\nmax_connections = 1",
                ),
                (
                    "b",
                    b.addr,
                    "pool = \"b\"\ncheck = false\nmax_connections = 1",
                ),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("tls");
    let queued = || {
        lb.metrics()
            .expect("ringlb_frontend_queue_current", &[("frontend", "tls")])
    };
    // Sends a ClientHello for `name` and reads its echo: the client reached its backend.
    let hello = |name: &str| sample_hello(Some(name), 0);
    let echo = |s: &mut TcpStream, bytes: &[u8]| {
        s.set_read_timeout(Some(SOON)).unwrap();
        let mut back = vec![0u8; bytes.len()];
        s.read_exact(&mut back).map(|()| back == bytes)
    };
    let mut holder = TcpStream::connect(addr).unwrap();
    holder.write_all(&hello("a.example")).unwrap();
    assert!(echo(&mut holder, &hello("a.example")).unwrap());
    // Pool a is full: the next client for it waits in the frontend's queue.
    let mut waiter = TcpStream::connect(addr).unwrap();
    waiter.write_all(&hello("a.example")).unwrap();
    assert!(wait_until(SOON, || queued() == 1.0), "never queued");
    // A client for pool b, which has room, is served at once: it does not queue behind the
    // client of pool a (before, it waited behind it until queue_timeout).
    let mut other = TcpStream::connect(addr).unwrap();
    other.write_all(&hello("b.example")).unwrap();
    assert!(echo(&mut other, &hello("b.example")).expect("pool b's client was held back"));
    assert_eq!(queued(), 1.0);
    // b's slot, freed, is not handed to a's client (it could not use it)...
    drop(other);
    assert!(wait_until(SOON, || b
        .open
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0));
    assert_eq!(queued(), 1.0);
    // ...a's is, when its holder leaves.
    drop(holder);
    assert!(echo(&mut waiter, &hello("a.example")).unwrap());
    assert!(wait_until(SOON, || queued() == 0.0));
}
