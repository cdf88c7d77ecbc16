//! A listen port is ringlb's alone: another process already listening there is refused at
//! start and on reload, by name; one that joins ringlb's SO_REUSEPORT group later gets no
//! connections and is logged; ringlb's own reloads keep and move listeners as before.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Kills and reaps a child process (by its pid) when dropped, so a failing test leaves none.
/// Runs `ringlb run` on `config` expecting it to refuse to start; returns its stderr.
fn run_refused(config: &str) -> String {
    let dir = TempDir::new();
    let path = dir.path.join("second.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Proc(
        Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .args(["run", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .spawn()
            .unwrap(),
    );
    let mut stderr = String::new();
    // Ends when the process exits (or closes stderr); a ringlb that starts does neither, and
    // its "ready" line fails the test below instead of hanging it.
    let reader = BufReader::new(child.0.stderr.take().unwrap());
    for line in reader.lines().map_while(Result::ok) {
        stderr.push_str(&line);
        stderr.push('\n');
        assert!(
            !line.ends_with(" ready"),
            "the second ringlb started:\n{stderr}"
        );
    }
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit:\n{stderr}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success(), "the second ringlb exited 0:\n{stderr}");
    stderr
}

/// A listener of this (the test) process on `addr` with SO_REUSEPORT: what HAProxy or a
/// second load balancer run by the same user would have.
fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(1024).unwrap();
    s.into()
}

/// Asks `n` new connections for their backend's name; every one must come from `expected`.
fn all_reach(addr: SocketAddr, n: usize, expected: &str) {
    for i in 0..n {
        let name = ask_name(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(name, expected, "connection {i}");
    }
}

/// No connection waits in `l`'s accept queue.
fn nothing_queued(l: &TcpListener) -> bool {
    l.set_nonblocking(true).unwrap();
    let r = l.accept();
    l.set_nonblocking(false).unwrap();
    matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn a_second_ringlb_on_the_same_frontend_or_admin_address_is_refused_naming_the_first() {
    let a = Backend::start("a1", Behaviour::Named);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    let web = lb.addr("web");
    let admin = lb.admin.unwrap();
    let b = Backend::start("b1", Behaviour::Named);

    let same_frontend = global_toml("")
        + &frontend_toml("web", "", &[("b1", b.addr, "")]).replace("127.0.0.1:0", &web.to_string());
    let err = run_refused(&same_frontend);
    assert!(
        err.contains(&format!("cannot listen on {web}")),
        "the address is named:\n{err}"
    );
    // Named once, though it has one socket per worker there.
    assert_eq!(
        err.matches(&format!("pid {} (ringlb)", lb.pid())).count(),
        1,
        "the first ringlb is named once:\n{err}"
    );

    let same_admin = format!(
        "[global]\nworkers = 2\n\n[admin]\nlisten = \"{admin}\"\n\n{}",
        frontend_toml("web", "", &[("b1", b.addr, "")])
    );
    let err = run_refused(&same_admin);
    assert!(
        err.contains(&format!("admin: cannot listen on {admin}")),
        "{err}"
    );
    assert!(err.contains(&format!("pid {} (ringlb)", lb.pid())), "{err}");

    // The first one was not disturbed.
    all_reach(web, 20, "a1");
    assert_eq!(b.accepted(), 0);
}

#[test]
fn a_reuseport_listener_that_joins_after_ringlb_gets_no_connections_and_is_logged() {
    let a = Backend::start("a1", Behaviour::Named);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    let web = lb.addr("web");
    let mark = lb.log_len();
    // The kernel lets it in: same user, SO_REUSEPORT on both sides.
    let intruder = reuseport_listener(web);
    let line = lb
        .wait_for_log_after(mark, "another process also listens on", SOON)
        .unwrap_or_else(|| panic!("not logged:\n{}", lb.logs()[mark..].join("\n")));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&web.to_string()), "{line}");
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "{line}"
    );

    all_reach(web, 500, "a1");
    // (Health probes reach it too.)
    assert!(a.accepted() >= 500);
    assert!(
        nothing_queued(&intruder),
        "a connection reached the intruder"
    );
    // Logged once, not on every check. A reload checks again at once: once the second
    // unchanged reload is logged, the first one's check has run (one thread does both).
    for _ in 0..2 {
        let m = lb.log_len();
        lb.signal(nix::sys::signal::Signal::SIGHUP);
        lb.wait_for_log_after(m, "reload: configuration unchanged", SOON)
            .unwrap();
    }
    let count = lb
        .logs()
        .iter()
        .filter(|l| l.contains("another process also listens on"))
        .count();
    assert_eq!(count, 1, "{:?}", lb.logs());

    // It really was in the group: with ringlb gone, connections reach it.
    stop_and_wait_gone(lb, web, 1);
    let _c = TcpStream::connect(web).unwrap();
    intruder.set_nonblocking(true).unwrap();
    assert!(
        wait_until(SOON, || intruder.accept().is_ok()),
        "the intruder got nothing"
    );
}

#[test]
fn an_haproxy_with_reuseport_started_after_ringlb_gets_none_of_500_connections() {
    let found = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !tool_available(found, "haproxy", "apt-get install -y haproxy") {
        return;
    }
    let a = Backend::start("a1", Behaviour::Named);
    let h = Backend::start("h1", Behaviour::Named);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    let web = lb.addr("web");
    let dir = TempDir::new();
    let cfg = dir.path.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 2000\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\nfrontend f\n  bind {web}\n  \
             default_backend b\nbackend b\n  server h1 {}\n",
            h.addr
        ),
    )
    .unwrap();
    let mark = lb.log_len();
    // -db: stays in the foreground, one process, so its pid is the one we spawned.
    let haproxy = Proc::quiet(Command::new("haproxy").args(["-db", "-f"]).arg(&cfg));
    let needle = format!("pid {} (haproxy)", haproxy.0.id());
    let line = lb
        .wait_for_log_after(mark, &needle, SOON)
        .unwrap_or_else(|| panic!("haproxy not logged:\n{}", lb.logs()[mark..].join("\n")));
    assert!(
        line.contains("ERROR") && line.contains(&web.to_string()),
        "{line}"
    );

    all_reach(web, 500, "a1");
    assert_eq!(h.accepted(), 0, "connections reached HAProxy");
    // (Health probes reach it too.)
    assert!(a.accepted() >= 500);

    // HAProxy was listening all along: with ringlb gone, it serves the port.
    let haproxy_sockets = listen_inodes(web).len() - 2;
    stop_and_wait_gone(lb, web, haproxy_sockets);
    assert!(
        wait_until(SOON, || ask_name(web).is_ok_and(|n| n == "h1")),
        "HAProxy did not take over"
    );
}

#[test]
fn a_reload_adding_an_address_another_process_holds_fails_and_the_old_config_serves() {
    let a = Backend::start("a1", Behaviour::Named);
    let good = global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")]);
    let lb = Ringlb::start(&good);
    let web = lb.addr("web");
    let admin = lb.admin.unwrap();
    // SO_REUSEPORT: the kernel alone would let ringlb bind beside it and share.
    let held = reuseport_listener("127.0.0.1:0".parse().unwrap());
    let taken = held.local_addr().unwrap();
    let more = good.clone()
        + &frontend_toml("more", "", &[("a1", a.addr, "")])
            .replace("127.0.0.1:0", &taken.to_string());
    let mark = lb.reload(&more);
    let line = lb
        .wait_for_log_after(mark, "reload failed", SOON)
        .unwrap_or_else(|| panic!("not refused:\n{}", lb.logs()[mark..].join("\n")));
    assert!(
        line.contains(&format!("cannot listen on {taken}")),
        "{line}"
    );
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "{line}"
    );
    assert!(
        !lb.logs()[mark..]
            .iter()
            .any(|l| l.contains("frontend more listening")),
        "{:?}",
        lb.logs()
    );
    all_reach(web, 20, "a1");
    let body = get(admin, "/metrics");
    assert!(
        body.lines()
            .any(|l| l == "ringlb_config_reloads_total{result=\"failure\"} 1"),
        "{body}"
    );
    // Nothing of ringlb's joined the holder's port: a connection there is the holder's.
    let _c = TcpStream::connect(taken).unwrap();
    held.accept().unwrap();
}

/// The inodes (as `socket:[N]` fd links) of every listening socket on exactly `addr` (IPv4).
fn listen_inodes(addr: SocketAddr) -> Vec<String> {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == want && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect()
}

/// How many listening sockets process `pid` holds on exactly `addr`.
fn listening_sockets(pid: i32, addr: SocketAddr) -> usize {
    let inodes = listen_inodes(addr);
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|l| inodes.iter().any(|i| l.to_str() == Some(i)))
        .count()
}

/// Stops ringlb and waits until its listeners on `addr` are gone from the kernel's table
/// (io_uring may hold a dead process's sockets a little longer), leaving `left` there.
fn stop_and_wait_gone(lb: Ringlb, addr: SocketAddr, left: usize) {
    drop(lb);
    assert!(
        wait_until(SOON, || listen_inodes(addr).len() == left),
        "listeners on {addr}: {:?}",
        listen_inodes(addr)
    );
}

#[test]
fn a_reload_that_moves_an_address_to_another_frontend_serves_it_from_the_new_one() {
    let a = Backend::start("a1", Behaviour::Named);
    let b = Backend::start("b1", Behaviour::Named);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("old", "", &[("a1", a.addr, "")])));
    let addr = lb.addr("old");
    all_reach(addr, 5, "a1");
    let moved = global_toml("")
        + &frontend_toml("new", "", &[("b1", b.addr, "")])
            .replace("127.0.0.1:0", &addr.to_string());
    let mark = lb.reload(&moved);
    lb.wait_for_log_after(mark, "reload: applied", SOON)
        .unwrap_or_else(|| panic!("not applied:\n{}", lb.logs()[mark..].join("\n")));
    lb.wait_for_log_after(mark, "frontend old stopped listening", SOON)
        .unwrap();
    // The workers close the old sockets on their own threads: wait until only the new
    // frontend's two (one per worker) listen there.
    assert!(
        wait_until(SOON, || listening_sockets(lb.pid(), addr) == 2),
        "old sockets still listening: {}",
        listening_sockets(lb.pid(), addr)
    );
    assert!(lb.logs()[mark..]
        .iter()
        .any(|l| l.contains(&format!("frontend new listening on {addr}"))));
    all_reach(addr, 200, "b1");
    // Its own sockets are never "another process".
    assert!(
        !lb.logs().iter().any(|l| l.contains("another process")),
        "{:?}",
        lb.logs()
    );
}
