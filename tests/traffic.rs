//! Traffic controls on a frontend: PROXY protocol from an upstream balancer
//! (`accept_proxy`), source ACLs (`allow`, `deny`) and per-source limits
//! (`max_connections_per_source`, `rate_per_source`).
//!
//! Most tests put `send_proxy = "v1"` towards a plain echo backend: what comes back first is
//! the header ringlb sent on, so the client reads the address ringlb believes it has.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// ringlb with `settings` on frontend "web" before one echo backend without health checks
/// (so the backend's accept count is client connections only).
fn start(settings: &str) -> (Ringlb, Backend) {
    let b = Backend::start("echo", Behaviour::Echo);
    let lb = Ringlb::start(
        &(global_toml("") + &frontend_toml("web", settings, &[("echo", b.addr, "check = false")])),
    );
    (lb, b)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A connection from a chosen local address (loopback holds all of 127.0.0.0/8).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let from = SocketAddr::new(from.parse().unwrap(), 0);
    let domain = if from.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(SOON)).unwrap();
    s
}

/// Reads exactly `n` bytes, as text.
fn read_text(s: &mut TcpStream, n: usize) -> String {
    let mut got = vec![0u8; n];
    s.read_exact(&mut got).unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether ringlb closed the connection (EOF or reset) rather than leaving it open.
fn closed_by_ringlb(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return e.kind() == ErrorKind::ConnectionReset,
        }
    }
}

/// An echo round trip through `s`, after the PROXY line ringlb sends on; returns that line.
fn proxied_line(s: &mut TcpStream, payload: &[u8]) -> String {
    s.write_all(payload).unwrap();
    read_back(s, payload)
}

/// Reads the PROXY line ringlb sent on, then the echo of `payload`; returns the line.
fn read_back(s: &mut TcpStream, payload: &[u8]) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        s.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    let mut echoed = vec![0u8; payload.len()];
    s.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, payload, "the client's bytes came back changed");
    String::from_utf8(line).unwrap().trim_end().to_string()
}

fn rejected(lb: &Ringlb, reason: &str) -> f64 {
    lb.metrics().expect(
        "ringlb_frontend_rejected_total",
        &[("frontend", "web"), ("reason", reason)],
    )
}

fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[ver_cmd, family]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

fn v2_tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut body = src.to_vec();
    body.extend_from_slice(&dst);
    body.extend_from_slice(&sport.to_be_bytes());
    body.extend_from_slice(&dport.to_be_bytes());
    v2(0x21, 0x11, &body)
}

// ----- PROXY protocol in -----

#[test]
fn the_address_a_v1_or_v2_header_declares_is_the_client_ringlb_sends_on() {
    let (lb, _b) = start("accept_proxy = true\nsend_proxy = \"v1\"");
    let web = lb.addr("web");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"PROXY TCP4 203.0.113.7 198.51.100.1 4000 443\r\n".to_vec(),
            "PROXY TCP4 203.0.113.7 198.51.100.1 4000 443",
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n".to_vec(),
            "PROXY TCP6 2001:db8::7 2001:db8::1 4000 443",
        ),
        (
            v2_tcp4([192, 0, 2, 9], [192, 0, 2, 1], 51000, 80),
            "PROXY TCP4 192.0.2.9 192.0.2.1 51000 80",
        ),
        (
            {
                let mut body = Vec::new();
                body.extend_from_slice(
                    &"2001:db8::9"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                );
                body.extend_from_slice(
                    &"2001:db8::1"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                );
                body.extend_from_slice(&7u16.to_be_bytes());
                body.extend_from_slice(&8u16.to_be_bytes());
                // A TLV (NOOP, 3 bytes) after the addresses is skipped.
                body.extend_from_slice(&[0x04, 0, 3, 1, 2, 3]);
                v2(0x21, 0x21, &body)
            },
            "PROXY TCP6 2001:db8::9 2001:db8::1 7 8",
        ),
    ];
    for (header, want) in cases {
        let mut s = connect(web);
        // Header and payload in one write: the parser must stop at the header's end.
        let mut first = header.clone();
        first.extend_from_slice(b"hello");
        s.write_all(&first).unwrap();
        assert_eq!(read_back(&mut s, b"hello"), want);
    }
}

#[test]
fn a_header_dribbled_one_byte_at_a_time_is_read_whole_and_the_payload_follows_intact() {
    let (lb, _b) = start("accept_proxy = true\nsend_proxy = \"v1\"");
    for header in [
        b"PROXY TCP4 10.1.2.3 10.0.0.1 1111 80\r\n".to_vec(),
        v2_tcp4([10, 1, 2, 3], [10, 0, 0, 1], 1111, 80),
    ] {
        let mut s = connect(lb.addr("web"));
        for byte in &header {
            s.write_all(&[*byte]).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            proxied_line(&mut s, b"payload"),
            "PROXY TCP4 10.1.2.3 10.0.0.1 1111 80"
        );
    }
}

#[test]
fn v2_local_and_v1_unknown_stand_for_the_real_peer() {
    let (lb, _b) = start("accept_proxy = true\nsend_proxy = \"v1\"");
    let web = lb.addr("web");
    for header in [v2(0x20, 0x00, &[]), b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut s = connect(web);
        let me = s.local_addr().unwrap();
        s.write_all(&header).unwrap();
        let want = format!(
            "PROXY TCP4 {} {} {} {}",
            me.ip(),
            web.ip(),
            me.port(),
            web.port()
        );
        assert_eq!(proxied_line(&mut s, b"x"), want);
    }
}

#[test]
fn a_chain_of_two_ringlbs_keeps_the_original_client_address() {
    let b = Backend::start("echo", Behaviour::Echo);
    let inner = Ringlb::start(
        &(global_toml("")
            + &frontend_toml(
                "web",
                "accept_proxy = true\nsend_proxy = \"v1\"",
                &[("echo", b.addr, "check = false")],
            )),
    );
    let outer = Ringlb::start(
        &(global_toml("")
            + &frontend_toml(
                "edge",
                "send_proxy = \"v2\"",
                &[("inner", inner.addr("web"), "check = false")],
            )),
    );
    let mut s = connect_from("127.0.0.3", outer.addr("edge"));
    let me = s.local_addr().unwrap();
    let edge = outer.addr("edge");
    assert_eq!(
        proxied_line(&mut s, b"through two"),
        format!(
            "PROXY TCP4 127.0.0.3 {} {} {}",
            edge.ip(),
            me.port(),
            edge.port()
        )
    );
}

fn haproxy_found() -> bool {
    let found = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    tool_available(found, "haproxy", "apt-get install -y haproxy")
}

/// Stops a child with SIGTERM and reaps it: nginx's master then stops its workers (SIGKILL
/// would leave them running).
struct Terminate(std::process::Child);

impl Drop for Terminate {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if !wait_until(SOON, || self.0.try_wait().ok().flatten().is_some()) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn haproxy_send_proxy_and_send_proxy_v2_in_front_tell_ringlb_the_clients_address() {
    if !haproxy_found() {
        return;
    }
    let (lb, _b) = start("accept_proxy = true\nsend_proxy = \"v1\"");
    let web = lb.addr("web");
    for option in ["send-proxy", "send-proxy-v2"] {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = TempDir::new();
        let cfg = dir.path.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 30s\n  timeout server 30s\nfrontend f\n  bind 127.0.0.1:{port}\n  \
                 default_backend b\nbackend b\n  server lb {web} {option}\n"
            ),
        )
        .unwrap();
        let _haproxy = Proc::quiet(Command::new("haproxy").args(["-db", "-f"]).arg(&cfg));
        let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(
            wait_until(SOON, || TcpStream::connect(front).is_ok()),
            "haproxy did not start listening"
        );
        let mut s = connect_from("127.0.0.4", front);
        let me = s.local_addr().unwrap();
        assert_eq!(
            proxied_line(&mut s, b"via haproxy"),
            format!("PROXY TCP4 127.0.0.4 127.0.0.1 {} {port}", me.port()),
            "{option}"
        );
    }
}

#[test]
fn bad_truncated_oversized_and_slow_headers_are_closed_counted_and_leak_no_fd() {
    let (lb, b) = start("accept_proxy = true\nproxy_timeout = \"300ms\"");
    let web = lb.addr("web");
    // One good connection first, so that anything pooled is in the baseline.
    let mut s = connect(web);
    s.write_all(b"PROXY UNKNOWN\r\nping").unwrap();
    assert_eq!(read_text(&mut s, 4), "ping");
    drop(s);
    assert!(wait_until(SOON, || b.open() == 0));
    let baseline = lb.fd_count();
    let served = b.accepted();

    let bad: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
        [b"PROXY ".to_vec(), vec![b'A'; 200]].concat(),
        v2(0x21, 0x11, &[0; 11]),
        v2(0x21, 0x12, &[0; 12]),
        v2(0x31, 0x11, &[0; 12]),
        v2(0x21, 0x11, &vec![0; 1000]),
        [
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec(),
            vec![0; 300],
        ]
        .concat(),
    ];
    for header in &bad {
        let mut s = connect(web);
        s.write_all(header).unwrap();
        assert!(
            closed_by_ringlb(&mut s),
            "{:?} was not closed",
            String::from_utf8_lossy(header)
        );
    }
    // Truncated: the client closes its side inside the header.
    for header in [
        &b"PROXY TCP4 1.2.3.4"[..],
        &v2_tcp4([1, 2, 3, 4], [5, 6, 7, 8], 1, 2)[..20],
    ] {
        let mut s = connect(web);
        s.write_all(header).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(closed_by_ringlb(&mut s));
    }
    // Slow: half a header, then nothing; and a client that sends nothing at all.
    let mut slow = Vec::new();
    for header in [&b"PROXY TCP4 1.2.3.4 5.6.7."[..], &[][..]] {
        let mut s = connect(web);
        s.write_all(header).unwrap();
        slow.push(s);
    }
    for s in &mut slow {
        assert!(closed_by_ringlb(s), "a slow header was not timed out");
    }

    assert_eq!(rejected(&lb, "proxy"), (bad.len() + 2) as f64);
    assert_eq!(rejected(&lb, "proxy_timeout"), 2.0);
    assert_eq!(b.accepted(), served, "a bad header reached the backend");
    drop(slow);
    assert!(
        wait_until(SOON, || lb.fd_count() <= baseline),
        "fds: {} now, {baseline} before",
        lb.fd_count()
    );
    // Logged at a bounded rate: one line per reason so far (the interval is 10 s).
    let lines = lb.logs();
    let proxy_lines = lines
        .iter()
        .filter(|l| l.contains("rejected") && l.contains("PROXY") && !l.contains("within"))
        .count();
    assert_eq!(proxy_lines, 1, "{lines:#?}");
}

#[test]
fn on_the_epoll_fallback_headers_are_read_the_same_and_bad_ones_closed() {
    let b = Backend::start("echo", Behaviour::Echo);
    let lb = Ringlb::start(
        &(global_toml("io = \"epoll\"")
            + &frontend_toml(
                "web",
                "accept_proxy = true\nproxy_timeout = \"300ms\"\nsend_proxy = \"v1\"",
                &[("echo", b.addr, "check = false")],
            )),
    );
    let web = lb.addr("web");
    let mut s = connect(web);
    for byte in v2_tcp4([10, 9, 8, 7], [10, 0, 0, 1], 999, 80) {
        s.write_all(&[byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        proxied_line(&mut s, b"epoll"),
        "PROXY TCP4 10.9.8.7 10.0.0.1 999 80"
    );
    let mut bad = connect(web);
    bad.write_all(b"PROXY TCP9 x\r\n").unwrap();
    assert!(closed_by_ringlb(&mut bad));
    let mut slow = connect(web);
    slow.write_all(b"PROXY TCP4 ").unwrap();
    assert!(closed_by_ringlb(&mut slow));
    assert_eq!(rejected(&lb, "proxy"), 1.0);
    assert_eq!(rejected(&lb, "proxy_timeout"), 1.0);
}

// ----- Source ACLs -----

/// Whether a connection from `from` gets an echo through, or is closed by ringlb.
fn served(from: &str, to: SocketAddr) -> bool {
    let mut s = connect_from(from, to);
    // A write to a connection ringlb has already closed may fail: that is a refusal too.
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut got = [0u8; 4];
    match s.read_exact(&mut got) {
        Ok(()) => {
            assert_eq!(&got, b"ping");
            true
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ),
                "{e}"
            );
            false
        }
    }
}

#[test]
fn an_allow_list_admits_its_addresses_and_denied_ones_never_reach_a_backend() {
    let (lb, b) = start("allow = [\"127.0.0.0/30\", \"127.0.5.5\"]\ndeny = [\"127.0.0.2\"]");
    let web = lb.addr("web");
    for from in ["127.0.0.1", "127.0.0.3", "127.0.5.5"] {
        assert!(served(from, web), "{from} was refused");
    }
    let denied = ["127.0.0.2", "127.0.0.4", "127.0.5.6", "127.1.0.1"];
    for from in denied {
        assert!(!served(from, web), "{from} was served");
    }
    assert_eq!(b.accepted(), 3, "a denied client reached the backend");
    assert_eq!(rejected(&lb, "acl"), denied.len() as f64);
    // Four refusals inside 10 s: one log line.
    let lines: Vec<_> = lb
        .logs()
        .into_iter()
        .filter(|l| l.contains("denied by the ACL"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("127.0.0.2"), "{}", lines[0]);
}

#[test]
fn ipv6_clients_are_matched_by_their_prefixes_on_an_ipv6_listener() {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg = |acl: &str| {
        global_toml("")
            + &format!(
                "[[frontend]]\nname = \"web\"\nlisten = [\"[::1]:0\"]\n{acl}\n\
                 [[frontend.backend]]\nname = \"echo\"\naddress = \"{}\"\ncheck = false\n",
                b.addr
            )
    };
    let lb = Ringlb::start(&cfg("deny = [\"::1\"]"));
    assert!(!served("::1", lb.addr("web")));
    assert_eq!(rejected(&lb, "acl"), 1.0);
    drop(lb);
    let lb = Ringlb::start(&cfg("allow = [\"::/127\"]"));
    assert!(served("::1", lb.addr("web")));
    drop(lb);
    assert_eq!(b.accepted(), 1);
}

#[test]
fn the_acl_judges_the_address_a_proxy_header_declares() {
    let (lb, b) = start(
        "accept_proxy = true\nsend_proxy = \"v1\"\n\
         deny = [\"2001:db8::/32\", \"::ffff:198.51.100.0/120\"]",
    );
    let web = lb.addr("web");
    let try_header = |h: &str| {
        let mut s = connect(web);
        s.write_all(h.as_bytes()).unwrap();
        s.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        match s.read(&mut got) {
            Ok(n) => n > 0,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => false,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(!try_header("PROXY TCP6 2001:db8::5 2001:db8::1 1 2\r\n"));
    // An IPv4-mapped IPv6 client is matched as IPv4: ::ffff:198.51.100.0/120 is 198.51.100.0/24.
    assert!(!try_header("PROXY TCP4 198.51.100.77 192.0.2.1 1 2\r\n"));
    assert!(!try_header("PROXY TCP6 ::ffff:198.51.100.9 ::1 1 2\r\n"));
    assert!(try_header("PROXY TCP6 2001:db9::5 2001:db8::1 1 2\r\n"));
    assert!(try_header("PROXY TCP4 198.51.101.1 192.0.2.1 1 2\r\n"));
    assert_eq!(rejected(&lb, "acl"), 3.0);
    assert_eq!(b.accepted(), 2);
}

#[test]
fn bad_acl_entries_are_refused_with_their_place() {
    let dir = TempDir::new();
    let path = dir.path.join("bad.toml");
    let b = Backend::start("echo", Behaviour::Echo);
    std::fs::write(
        &path,
        global_toml("")
            + &frontend_toml(
                "web",
                "allow = [\"10.0.0.0/8\", \"10.0.0.0/33\", \"example.com\"]\ndeny = []\n\
                 rate_per_source = \"lots\"\nproxy_timeout = \"1s\"",
                &[("echo", b.addr, "")],
            ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "allow: \"10.0.0.0/33\": the prefix length must be 0 to 32",
        "allow: \"example.com\" is not an address or a prefix",
        "rate_per_source: \"lots\" is not a rate",
        "proxy_timeout: set without accept_proxy = true",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

// ----- Per-source limits -----

/// A connection from `from` that got an echo through, held open; `None` if ringlb closed it.
fn hold(from: &str, to: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from(from, to);
    if s.write_all(b"ping").is_err() {
        return None;
    }
    let mut got = [0u8; 4];
    s.read_exact(&mut got).ok().map(|()| s)
}

#[test]
fn max_connections_per_source_holds_across_workers_and_frees_a_slot_when_one_closes() {
    // Two workers: a source's connections land on both, and the count is one table.
    let (lb, b) = start("max_connections_per_source = 3");
    let web = lb.addr("web");
    let held: Vec<TcpStream> = (0..8).filter_map(|_| hold("127.0.0.1", web)).collect();
    assert_eq!(held.len(), 3, "connections admitted from one source");
    assert_eq!(rejected(&lb, "source_connections"), 5.0);
    // Another source has its own three.
    let other: Vec<TcpStream> = (0..4).filter_map(|_| hold("127.0.0.2", web)).collect();
    assert_eq!(other.len(), 3);
    assert_eq!(b.accepted(), 6);
    // One closes: its slot comes back (once ringlb has seen the close).
    let mut held = held;
    held.pop();
    let mut again = None;
    assert!(wait_until(SOON, || {
        again = hold("127.0.0.1", web);
        again.is_some()
    }));
    assert!(hold("127.0.0.1", web).is_none(), "a fourth was admitted");
    assert_eq!(
        lb.metrics().expect(
            "ringlb_frontend_source_table_full_total",
            &[("frontend", "web")]
        ),
        0.0
    );
}

#[test]
fn rate_per_source_admits_a_burst_then_refuses_until_the_bucket_refills() {
    let (lb, _b) = start("rate_per_source = \"3/m\"");
    let web = lb.addr("web");
    for i in 0..3 {
        assert!(served("127.0.0.1", web), "connection {i} of the burst");
    }
    assert!(!served("127.0.0.1", web), "over the rate, and served");
    assert!(served("127.0.0.2", web), "another source was refused");
    assert_eq!(rejected(&lb, "source_rate"), 1.0);
    drop(lb);
    // A fast rate refills while we wait: "2/s" lets one more in within a second or so.
    let (lb, _b) = start("rate_per_source = \"2/s\"");
    let web = lb.addr("web");
    assert!(served("127.0.0.1", web) && served("127.0.0.1", web));
    assert!(wait_until(SOON, || served("127.0.0.1", web)));
}

#[test]
fn per_source_limits_count_the_address_a_proxy_header_declares() {
    let (lb, b) = start("accept_proxy = true\nmax_connections_per_source = 1");
    let web = lb.addr("web");
    let open = |h: &str| {
        let mut s = connect(web);
        s.write_all(h.as_bytes()).unwrap();
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).ok().map(|()| s)
    };
    // Both arrive from 127.0.0.1, as from one balancer; they are two clients.
    let a = open("PROXY TCP4 192.0.2.1 192.0.2.100 1000 80\r\n");
    let c = open("PROXY TCP4 192.0.2.2 192.0.2.100 1000 80\r\n");
    assert!(a.is_some() && c.is_some());
    assert!(open("PROXY TCP4 192.0.2.1 192.0.2.100 1001 80\r\n").is_none());
    assert_eq!(rejected(&lb, "source_connections"), 1.0);
    assert_eq!(b.accepted(), 2);
}

// ----- Backend max_connections and the queue -----

/// A backend that reads one byte (the client's number), notes the order it came in, holds
/// the connection for `hold`, answers with the byte and closes; it records the most
/// connections it ever had open at once.
struct SlowBackend {
    addr: SocketAddr,
    max_open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn slow_backend(hold: Duration, order: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> SlowBackend {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let m = max_open.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let n = open.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(n, Ordering::SeqCst);
            let (open, order) = (open.clone(), order.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() {
                    order.lock().unwrap().push(b[0]);
                    std::thread::sleep(hold);
                }
                // Counted closed before the close, so ringlb can never see a slot free
                // while this still counts it open.
                open.fetch_sub(1, Ordering::SeqCst);
                let _ = c.write_all(&b);
            });
        }
    });
    SlowBackend { addr, max_open }
}

#[test]
fn maxconn_2_and_50_slow_clients_nobody_above_2_served_in_arrival_order() {
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = slow_backend(Duration::from_millis(60), order.clone());
    let b = slow_backend(Duration::from_millis(60), order.clone());
    let lb = Ringlb::start(
        &(global_toml("")
            + &frontend_toml(
                "web",
                "queue_timeout = \"60s\"",
                &[
                    ("a", a.addr, "check = false\nmax_connections = 2"),
                    ("b", b.addr, "check = false\nmax_connections = 2"),
                ],
            )),
    );
    let web = lb.addr("web");
    let queue_current = || {
        lb.metrics()
            .expect("ringlb_frontend_queue_current", &[("frontend", "web")]) as usize
    };
    let mut clients = Vec::new();
    for i in 0..50u8 {
        let mut s = connect(web);
        s.write_all(&[i]).unwrap();
        clients.push(std::thread::spawn(move || {
            let mut got = [0u8; 1];
            s.read_exact(&mut got).map(|()| got[0])
        }));
        // Each client is taken in (counted just before its pick) before the next connects,
        // so arrival order is known although the two workers accept independently.
        let accepted = || {
            lb.metrics()
                .expect("ringlb_frontend_connections_total", &[("frontend", "web")])
        };
        assert!(wait_until(SOON, || accepted() > f64::from(i)));
    }
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap().unwrap(), i as u8, "client {i} not served");
    }
    assert!(a.max_open.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    assert!(b.max_open.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    // FIFO: with four slots, a client reaches a backend within four places of its arrival.
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 50);
    for (pos, &client) in order.iter().enumerate() {
        assert!(
            (pos as i64 - i64::from(client)).abs() < 4,
            "client {client} served {pos}th: {order:?}"
        );
    }
    assert!(wait_until(SOON, || queue_current() == 0));
    assert!(
        lb.metrics()
            .expect("ringlb_frontend_queued_total", &[("frontend", "web")])
            >= 20.0
    );
    assert!(
        lb.metrics()
            .expect("ringlb_frontend_queue_max", &[("frontend", "web")])
            >= 2.0
    );
    assert!(
        lb.metrics()
            .expect("ringlb_frontend_queue_time_seconds", &[("frontend", "web")])
            > 0.0
    );
    assert_eq!(rejected(&lb, "queue_timeout"), 0.0);
    // The same figures on /status and the status page.
    let status: serde_json::Value =
        serde_json::from_str(&get(lb.admin.unwrap(), "/status")).unwrap();
    let q = &status["frontends"][0]["queue"];
    assert!(q["max"].as_u64().unwrap() >= 2, "{q}");
    assert!(q["time_seconds"].as_f64().unwrap() > 0.0, "{q}");
    assert!(get(lb.admin.unwrap(), "/").contains("queue: current 0, max "));
}

#[test]
fn clients_still_queued_at_queue_timeout_are_closed_counted_and_leak_no_fd() {
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = slow_backend(Duration::from_secs(3), order.clone());
    let lb = Ringlb::start(
        &(global_toml("")
            + &frontend_toml(
                "web",
                "queue_timeout = \"300ms\"",
                &[("a", a.addr, "check = false\nmax_connections = 2")],
            )),
    );
    let web = lb.addr("web");
    let baseline = lb.fd_count();
    let mut clients: Vec<TcpStream> = (0..10u8)
        .map(|i| {
            let mut s = connect(web);
            s.write_all(&[i]).unwrap();
            s
        })
        .collect();
    // The two with a slot are answered after 3 s; the eight others are closed at 300 ms.
    let (mut closed, mut answered) = (0, 0);
    for s in &mut clients {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => closed += 1,
            Ok(_) => answered += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(answered, 2);
    assert_eq!(closed, 8);
    assert_eq!(
        order.lock().unwrap().len(),
        2,
        "a timed-out client reached the backend"
    );
    assert!(a.max_open.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    assert_eq!(rejected(&lb, "queue_timeout"), 8.0);
    assert_eq!(
        lb.metrics()
            .expect("ringlb_frontend_queue_current", &[("frontend", "web")]),
        0.0
    );
    drop(clients);
    assert!(
        wait_until(SOON, || lb.fd_count() <= baseline),
        "fds: {} now, {baseline} before",
        lb.fd_count()
    );
}

#[test]
fn maglev_sends_a_client_whose_backend_is_full_to_the_next_one_in_its_table() {
    let a = Backend::start("a", Behaviour::Named);
    let b = Backend::start("b", Behaviour::Named);
    let lb = Ringlb::start(
        &(global_toml("")
            + &frontend_toml(
                "web",
                "balance = \"maglev\"\nqueue_timeout = \"200ms\"",
                &[
                    ("a", a.addr, "check = false\nmax_connections = 1"),
                    ("b", b.addr, "check = false\nmax_connections = 1"),
                ],
            )),
    );
    let web = lb.addr("web");
    let name = |s: &mut TcpStream| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    };
    // One address: Maglev gives every connection the same first choice.
    let mut first = connect_from("127.0.0.9", web);
    let mut second = connect_from("127.0.0.9", web);
    let (n1, n2) = (name(&mut first), name(&mut second));
    assert_ne!(n1, n2, "the full backend took a second connection");
    let mut third = connect_from("127.0.0.9", web);
    assert!(closed_by_ringlb(&mut third));
    assert_eq!(rejected(&lb, "queue_timeout"), 1.0);
    // A slot frees: the client's own first choice again.
    drop(first);
    let mut again = None;
    assert!(wait_until(SOON, || {
        let mut s = connect_from("127.0.0.9", web);
        let n = name(&mut s);
        let ok = !n.is_empty();
        again = Some(n);
        ok
    }));
    assert_eq!(again.unwrap(), n1);
}

#[test]
fn a_frontends_max_connections_queues_the_next_client_until_one_closes_or_queue_timeout() {
    let (lb, b) = start("max_connections = 2\nqueue_timeout = \"2s\"");
    let web = lb.addr("web");
    let first = hold("127.0.0.1", web).expect("first");
    let _second = hold("127.0.0.1", web).expect("second");
    // A third waits, and is closed at queue_timeout.
    let mut third = connect(web);
    third.write_all(b"ping").unwrap();
    assert!(closed_by_ringlb(&mut third));
    assert_eq!(rejected(&lb, "queue_timeout"), 1.0);
    assert_eq!(b.accepted(), 2);
    // A fourth waits too; when the first closes, it gets the slot.
    let mut fourth = connect(web);
    fourth.write_all(b"pong").unwrap();
    assert!(wait_until(SOON, || lb.metrics().expect(
        "ringlb_frontend_queue_current",
        &[("frontend", "web")]
    ) == 1.0));
    drop(first);
    assert_eq!(read_text(&mut fourth, 4), "pong");
    assert_eq!(b.accepted(), 3);
    assert_eq!(rejected(&lb, "queue_timeout"), 1.0);
}

// ----- Reload -----

#[test]
fn a_reload_changes_the_controls_for_new_clients_and_a_bad_one_keeps_the_old() {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg = |settings: &str| {
        global_toml("") + &frontend_toml("web", settings, &[("echo", b.addr, "check = false")])
    };
    let lb = Ringlb::start(&cfg(""));
    let web = lb.addr("web");
    let open = hold("127.0.0.2", web).expect("served before the reload");
    let mark = lb.reload(&cfg("deny = [\"127.0.0.2\"]"));
    assert!(lb
        .wait_for_log_after(mark, "reload: applied: frontend web: settings", SOON)
        .is_some());
    assert!(!served("127.0.0.2", web), "denied after the reload");
    assert!(served("127.0.0.1", web));
    let mark = lb.reload(&cfg("deny = [\"127.0.0.2/40\"]"));
    assert!(lb
        .wait_for_log_after(mark, "still serving the previous configuration", SOON)
        .is_some());
    assert!(!served("127.0.0.2", web), "the old ACL stopped applying");
    // A connection admitted before the reload is not judged again.
    let mut open = open;
    open.write_all(b"again").unwrap();
    assert_eq!(read_text(&mut open, 5), "again");
}

#[test]
fn nginx_stream_with_proxy_protocol_on_in_front_tells_ringlb_the_clients_address() {
    let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
    let found = Command::new("nginx")
        .arg("-v")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && std::path::Path::new(module).exists();
    if !tool_available(
        found,
        "nginx with the stream module",
        "apt-get install -y nginx libnginx-mod-stream",
    ) {
        return;
    }
    let (lb, _b) = start("accept_proxy = true\nsend_proxy = \"v1\"");
    let web = lb.addr("web");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = TempDir::new();
    let d = dir.path.display();
    let conf = dir.path.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module {module};\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{}}\nstream {{\n  server {{\n    \
             listen 127.0.0.1:{port};\n    proxy_pass {web};\n    proxy_protocol on;\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let _nginx = Terminate(
        Command::new("nginx")
            .args(["-e", &format!("{d}/error.log"), "-g", "daemon off;", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_until(SOON, || TcpStream::connect(front).is_ok()),
        "nginx did not start listening: {:?}",
        std::fs::read_to_string(dir.path.join("error.log"))
    );
    let mut s = connect_from("127.0.0.5", front);
    let me = s.local_addr().unwrap();
    assert_eq!(
        proxied_line(&mut s, b"via nginx"),
        format!("PROXY TCP4 127.0.0.5 127.0.0.1 {} {port}", me.port())
    );
}

#[test]
fn maglev_hashes_the_address_a_proxy_header_declares() {
    let a = Backend::start("a", Behaviour::Named);
    let b = Backend::start("b", Behaviour::Named);
    let lb = Ringlb::start(
        &(global_toml("")
            + &frontend_toml(
                "web",
                "balance = \"maglev\"\naccept_proxy = true",
                &[
                    ("a", a.addr, "check = false"),
                    ("b", b.addr, "check = false"),
                ],
            )),
    );
    let web = lb.addr("web");
    let pick = |client: &str| {
        let mut s = connect(web);
        s.write_all(format!("PROXY TCP4 {client} 192.0.2.1 5000 80\r\n").as_bytes())
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    };
    // Every connection comes from 127.0.0.1; the declared clients spread, each one sticking.
    let mut seen = std::collections::HashSet::new();
    for i in 1..=20 {
        let client = format!("198.51.100.{i}");
        let first = pick(&client);
        assert_eq!(pick(&client), first, "{client} moved");
        seen.insert(first);
    }
    assert_eq!(
        seen.len(),
        2,
        "twenty declared clients all hashed to one backend"
    );
}
