//! Connection logs: each termination state provoked on purpose and read back from the line
//! (letters, backend, exact byte counts); the filters; a file that logrotate moves; a real
//! rsyslog over UDP and a Unix socket; sinks that are gone or full; bad log config.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The JSON lines of a log file so far: the complete ones. A line the writer is still
/// writing (no newline yet) is left for the next read.
fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until the file holds at least `n` lines; returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let ok = wait_until(SOON, || {
        got = json_lines(path);
        got.len() >= n
    });
    assert!(ok, "expected {n} lines in {}, got {got:?}", path.display());
    got
}

/// A ringlb whose frontend "web" logs JSON to `log` (a file), with `settings` on the
/// frontend and `backends`.
fn start(
    dir: &TempDir,
    settings: &str,
    backends: &[(&str, SocketAddr, &str)],
) -> (Ringlb, PathBuf) {
    let log = dir.path.join("conn.log");
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!(
                "{settings}\n[frontend.log]\nformat = \"json\"\ntarget = \"file:{}\"\n",
                log.display()
            ),
            backends,
        );
    (Ringlb::start(&cfg), log)
}

fn exchange(s: &mut TcpStream, n: usize) {
    s.set_read_timeout(Some(SOON)).unwrap();
    let data = vec![b'x'; n];
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; n];
    s.read_exact(&mut back).unwrap();
}

/// Reads until EOF or a reset.
fn wait_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(SOON)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn check_line(v: &Value, termination: &str, backend: Option<&str>, bytes: (u64, u64)) {
    assert_eq!(v["termination"], termination, "{v}");
    match backend {
        Some(b) => assert_eq!(v["backend"], b, "{v}"),
        None => assert!(v["backend"].is_null(), "{v}"),
    }
    assert_eq!(v["bytes_in"], bytes.0, "{v}");
    assert_eq!(v["bytes_out"], bytes.1, "{v}");
    assert_eq!(v["frontend"], "web", "{v}");
    assert_eq!(v["event"], "end", "{v}");
}

#[test]
fn a_normal_end_is_two_dashes_with_exact_byte_counts() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "", &[("a", b.addr, "")]);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    let client = s.local_addr().unwrap();
    exchange(&mut s, 1000);
    exchange(&mut s, 234);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    wait_closed(&mut s);
    let v = &wait_lines(&log, 1)[0];
    check_line(v, "--", Some("a"), (1234, 1234));
    assert_eq!(v["client"], client.to_string());
    assert_eq!(v["retries"], 0);
    assert!(v["tc_ms"].as_i64().unwrap() >= 0, "{v}");
    assert!(
        v["tt_ms"].as_i64().unwrap() >= v["tc_ms"].as_i64().unwrap(),
        "{v}"
    );
    assert!(v["accept_time"].as_str().unwrap().ends_with('Z'), "{v}");
    // Counted while it was still open: this connection itself.
    assert_eq!(v["feconn"], 1, "{v}");
    assert_eq!(v["srvconn"], 1, "{v}");
}

#[test]
fn a_client_reset_is_cd() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "", &[("a", b.addr, "")]);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut s, 10);
    // Linger 0: close sends a reset.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    check_line(&wait_lines(&log, 1)[0], "CD", Some("a"), (10, 10));
}

/// A backend that answers "hello" to 5 bytes, then resets the connection once one more
/// byte arrives (so the answer has reached the client before the reset).
fn resetting_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).is_err() || s.write_all(b"hello").is_err() {
                    return;
                }
                let mut one = [0u8; 1];
                let _ = s.read_exact(&mut one);
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            });
        }
    });
    addr
}

#[test]
fn a_backend_reset_is_sd() {
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "", &[("rst", resetting_backend(), "check = false")]);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut s, 5);
    s.write_all(b"g").unwrap();
    wait_closed(&mut s);
    check_line(&wait_lines(&log, 1)[0], "SD", Some("rst"), (6, 5));
}

#[test]
fn a_refused_connect_is_sc_with_and_without_retries() {
    let dir = TempDir::new();
    let dead = [refused_addr(), refused_addr(), refused_addr()];
    let backends: Vec<_> = ["d1", "d2", "d3"]
        .iter()
        .zip(dead)
        .map(|(n, a)| (*n, a, "check = false"))
        .collect();
    let (lb, log) = start(&dir, "retries = 2\nbalance = \"round-robin\"", &backends);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    wait_closed(&mut s);
    let v = &wait_lines(&log, 1)[0];
    assert_eq!(v["termination"], "SC", "{v}");
    assert_eq!(v["retries"], 2, "{v}");
    assert_eq!(v["tc_ms"], -1, "{v}");
    assert_eq!(v["bytes_in"], 0, "{v}");
    drop(lb);

    let dir = TempDir::new();
    let (lb, log) = start(
        &dir,
        "retries = 0",
        &[("d1", refused_addr(), "check = false")],
    );
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    wait_closed(&mut s);
    let v = &wait_lines(&log, 1)[0];
    check_line(v, "SC", Some("d1"), (0, 0));
    assert_eq!(v["retries"], 0, "{v}");
}

#[test]
fn a_retried_connect_that_succeeds_is_normal_with_its_retry_counted() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    // Round robin from the first backend, which refuses; `only_errors` keeps a retried
    // connection (HAProxy's dontlog-normal does too) and drops a clean one.
    let (lb, log) = start(
        &dir,
        "retries = 1\nbalance = \"round-robin\"\n",
        &[("dead", refused_addr(), "check = false"), ("a", b.addr, "")],
    );
    let mut retried = None;
    for _ in 0..2 {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        exchange(&mut s, 3);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        wait_closed(&mut s);
    }
    for v in wait_lines(&log, 2) {
        check_line(&v, "--", Some("a"), (3, 3));
        if v["retries"] == 1 {
            retried = Some(v);
        }
    }
    assert!(
        retried.is_some(),
        "one of the two went to the refusing backend first"
    );
}

#[test]
fn a_connect_timeout_is_lowercase_sc_and_leaks_no_fd() {
    let hole = Blackhole::start();
    let dir = TempDir::new();
    let (lb, log) = start(
        &dir,
        "retries = 0\nconnect_timeout = \"300ms\"",
        &[("hole", hole.addr, "check = false")],
    );
    let fds = lb.fd_count();
    for _ in 0..5 {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        wait_closed(&mut s);
    }
    for v in &wait_lines(&log, 5) {
        check_line(v, "sC", Some("hole"), (0, 0));
    }
    assert!(
        wait_until(SOON, || lb.fd_count() <= fds),
        "{} fds, {fds} before",
        lb.fd_count()
    );
}

/// The byte counts come from the relay whatever moves the bytes: splice pipes, and the
/// epoll runtime.
#[test]
fn byte_counts_are_exact_with_splice_and_on_epoll() {
    let b = Backend::start("a", Behaviour::Echo);
    for global in [
        "relay = \"splice\"",
        "io = \"epoll\"\nrelay = \"splice-auto\"",
    ] {
        let dir = TempDir::new();
        let log = dir.path.join("conn.log");
        let cfg = global_toml(global)
            + &frontend_toml(
                "web",
                &format!(
                    "[frontend.log]\nformat = \"json\"\ntarget = \"file:{}\"\n",
                    log.display()
                ),
                &[("a", b.addr, "")],
            );
        let lb = Ringlb::start(&cfg);
        bulk_echo(lb.addr("web"), 3_000_017);
        check_line(
            &wait_lines(&log, 1)[0],
            "--",
            Some("a"),
            (3_000_017, 3_000_017),
        );
    }
}

#[test]
fn no_backend_to_pick_is_sc_without_a_backend() {
    let dir = TempDir::new();
    let (lb, log) = start(
        &dir,
        "",
        &[(
            "a",
            refused_addr(),
            "check = false\n[frontend.backend.health]\ninitial_state = \"down\"",
        )],
    );
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    wait_closed(&mut s);
    let v = &wait_lines(&log, 1)[0];
    check_line(v, "SC", None, (0, 0));
}

/// Queue time (`Tw`) for one queue: a client that times out in it is `sQ` with no backend
/// and Tw of at least queue_timeout; a client that waits and is then served logs `--` with
/// Tw of at least the time the test kept it waiting. `settings` holds the limit of one.
fn queue_time_is_logged(settings: &str, backend_extra: &str) {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(
        &dir,
        &format!("queue_timeout = \"300ms\"\n{settings}"),
        &[("a", b.addr, backend_extra)],
    );
    let queued = || {
        let text = get(lb.admin.unwrap(), "/metrics");
        text.lines()
            .filter(|l| l.starts_with("ringlb_frontend_queue_current{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let mut holder = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut holder, 10);
    // Times out in the queue.
    let mut late = TcpStream::connect(lb.addr("web")).unwrap();
    wait_closed(&mut late);
    let v = &wait_lines(&log, 1)[0];
    check_line(v, "sQ", None, (0, 0));
    assert!(v["tw_ms"].as_i64().unwrap() >= 300, "{v}");
    assert_eq!(v["tc_ms"], -1, "{v}");
    assert_eq!(v["client"], late.local_addr().unwrap().to_string(), "{v}");
    // Waits while the holder stays, then is served when it leaves. `held` starts before the
    // connect, so the wait ringlb logs lies within it however long the test takes to see the
    // client queued.
    let held = Instant::now();
    let mut waiter = TcpStream::connect(lb.addr("web")).unwrap();
    assert!(wait_until(SOON, || queued() >= 1.0), "never queued");
    // The wait itself is what the line must show: keep the client queued for 100 ms.
    std::thread::sleep(Duration::from_millis(100));
    holder.shutdown(std::net::Shutdown::Write).unwrap();
    wait_closed(&mut holder);
    exchange(&mut waiter, 5);
    let kept = held.elapsed().as_millis() as i64;
    waiter.shutdown(std::net::Shutdown::Write).unwrap();
    wait_closed(&mut waiter);
    let lines = wait_lines(&log, 3);
    let v = lines
        .iter()
        .find(|v| v["client"] == waiter.local_addr().unwrap().to_string())
        .unwrap();
    check_line(v, "--", Some("a"), (5, 5));
    let tw = v["tw_ms"].as_i64().unwrap();
    assert!((100..=kept + 50).contains(&tw), "Tw {tw}, kept {kept}: {v}");
    assert!(v["tc_ms"].as_i64().unwrap() >= tw, "{v}");
    // The holder never waited.
    let h = lines
        .iter()
        .find(|v| v["client"] == holder.local_addr().unwrap().to_string())
        .unwrap();
    assert_eq!(h["tw_ms"], 0, "{h}");
}

#[test]
fn a_backend_queue_timeout_is_sq_and_queue_time_is_tw() {
    queue_time_is_logged("", "check = false\nmax_connections = 1");
}

#[test]
fn a_frontend_queue_timeout_is_sq_and_queue_time_is_tw() {
    queue_time_is_logged("max_connections = 1", "check = false");
}

#[test]
fn an_idle_timeout_is_lowercase_cd() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "idle_timeout = \"300ms\"", &[("a", b.addr, "")]);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut s, 7);
    wait_closed(&mut s);
    check_line(&wait_lines(&log, 1)[0], "cD", Some("a"), (7, 7));
}

#[test]
fn shutdown_sessions_on_a_backend_marked_down_is_dd() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(
        &dir,
        "on_marked_down = \"shutdown-sessions\"\n[frontend.health]\ninterval = \"200ms\"\nfall = 1",
        &[("a", b.addr, "")],
    );
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut s, 4);
    // Its port now refuses: the next check marks it down, which closes its sessions.
    b.stop();
    wait_closed(&mut s);
    check_line(&wait_lines(&log, 1)[0], "DD", Some("a"), (4, 4));
}

#[test]
fn a_connection_killed_after_its_backend_was_removed_is_kd() {
    let a = Backend::start("a", Behaviour::Echo);
    let b = Backend::start("b", Behaviour::Echo);
    let dir = TempDir::new();
    let log = dir.path.join("conn.log");
    let cfg = |backend: &str, addr: SocketAddr| {
        "[global]\nworkers = 2\nshutdown_timeout = \"300ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"
            .to_string()
            + &frontend_toml(
                "web",
                &format!(
                    "[frontend.log]\nformat = \"json\"\ntarget = \"file:{}\"\n",
                    log.display()
                ),
                &[(backend, addr, "")],
            )
    };
    let lb = Ringlb::start(&cfg("a", a.addr));
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut s, 9);
    lb.reload(&cfg("b", b.addr));
    // Removed, drained for shutdown_timeout, then closed.
    wait_closed(&mut s);
    check_line(&wait_lines(&log, 1)[0], "KD", Some("a"), (9, 9));
}

#[test]
fn filters_skip_null_only_errors_and_sample() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "", &[("a", b.addr, "")]);
    drop(lb);
    let cfg = |extra: &str| {
        global_toml("")
            + &frontend_toml(
                "web",
                &format!(
                    "[frontend.log]\nformat = \"json\"\ntarget = \"file:{}\"\n{extra}",
                    log.display()
                ),
                &[
                    ("a", b.addr, ""),
                    ("dead", refused_addr(), "check = false\nbackup = true"),
                ],
            )
    };
    let one = |lb: &Ringlb, n: usize| {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        if n > 0 {
            exchange(&mut s, n);
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        wait_closed(&mut s);
    };

    // skip_null: a connection on which the client sent nothing is not logged.
    let lb = Ringlb::start(&cfg("skip_null = true"));
    one(&lb, 0);
    one(&lb, 5);
    let lines = wait_lines(&log, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["bytes_in"], 5);
    drop(lb);
    std::fs::remove_file(&log).unwrap();

    // sample = 3: about one in three (each worker counts its own).
    let mut lb = Ringlb::start(&cfg("sample = 3"));
    for _ in 0..12 {
        one(&lb, 1);
    }
    // A graceful stop writes every line before the process exits.
    lb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(lb.wait_exit(SOON).is_some());
    let n = json_lines(&log).len();
    assert!((2..=6).contains(&n), "{n} of 12 logged with sample = 3");
    drop(lb);
    std::fs::remove_file(&log).unwrap();

    // only_errors: a clean connection is not logged, one that found no backend is.
    let lb = Ringlb::start(&cfg("only_errors = true\nlog_connect = true"));
    one(&lb, 2);
    b.stop();
    // The active backend is down once its port refuses; the backup refuses too.
    assert!(wait_until(SOON, || {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        wait_closed(&mut s);
        !json_lines(&log).is_empty()
    }));
    let lines = json_lines(&log);
    assert!(
        lines
            .iter()
            .all(|v| v["termination"] != "--" || v["retries"] != 0),
        "{lines:?}"
    );
}

#[test]
fn log_connect_writes_a_line_when_the_backend_is_connected() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "", &[("a", b.addr, "")]);
    drop(lb);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!(
                "[frontend.log]\nformat = \"json\"\ntarget = \"file:{}\"\nlog_connect = true",
                log.display()
            ),
            &[("a", b.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut s, 3);
    // The connect line comes while the connection is open.
    let v = &wait_lines(&log, 1)[0];
    assert_eq!(v["event"], "connect", "{v}");
    assert_eq!(v["backend"], "a", "{v}");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    wait_closed(&mut s);
    let v = &wait_lines(&log, 2)[1];
    check_line(v, "--", Some("a"), (3, 3));
}

#[test]
fn the_haproxy_format_goes_to_stderr_in_tcplog_order() {
    let b = Backend::start("a", Behaviour::Echo);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.log]\nformat = \"haproxy\"",
            &[("a", b.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    let client = s.local_addr().unwrap();
    exchange(&mut s, 11);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    wait_closed(&mut s);
    let line = lb
        .wait_for_log(&format!("{client} ["), SOON)
        .expect("a connection line on stderr");
    let f: Vec<&str> = line.split(' ').collect();
    // client [date] frontend backend/server Tw/Tc/Tt bytes state counts queues
    assert_eq!(f.len(), 9, "{line}");
    assert!(f[1].starts_with('[') && f[1].ends_with(']'), "{line}");
    assert_eq!(f[2], "web");
    assert_eq!(f[3], "web/a");
    assert_eq!(f[4].split('/').count(), 3, "{line}");
    assert_eq!(f[5], "11", "bytes from the backend: {line}");
    assert_eq!(f[6], "--");
    assert_eq!(f[7], "1/1/1/1/0", "{line}");
    assert_eq!(f[8], "0/0");
}

#[test]
fn a_file_log_survives_a_logrotate_rename_without_losing_or_doubling_a_line() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "", &[("a", b.addr, "")]);
    let fds_before = lb.fd_count();
    // Connection i sends i bytes: each line says which connection it is.
    let run = |range: std::ops::RangeInclusive<usize>| {
        for i in range {
            let mut s = TcpStream::connect(lb.addr("web")).unwrap();
            exchange(&mut s, i);
            s.shutdown(std::net::Shutdown::Write).unwrap();
            wait_closed(&mut s);
        }
    };
    run(1..=40);
    wait_lines(&log, 40);
    let rotated = dir.path.join("conn.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // Lines logged between the rename and the reopen still go to the moved file.
    run(41..=60);
    let mark = lb.log_len();
    lb.signal(nix::sys::signal::Signal::SIGUSR1);
    assert!(lb
        .wait_for_log_after(mark, "reopening connection log files", SOON)
        .is_some());
    assert!(
        wait_until(SOON, || log.exists()),
        "the file was not reopened"
    );
    run(61..=100);
    let mut seen: Vec<u64> = Vec::new();
    assert!(wait_until(SOON, || {
        seen = json_lines(&rotated)
            .iter()
            .chain(json_lines(&log).iter())
            .map(|v| v["bytes_in"].as_u64().unwrap())
            .collect();
        seen.len() >= 100
    }));
    seen.sort_unstable();
    assert_eq!(seen, (1..=100).collect::<Vec<u64>>());
    assert!(!json_lines(&log).is_empty(), "nothing went to the new file");
    assert!(
        wait_until(SOON, || lb.fd_count() <= fds_before),
        "fds leaked"
    );
}

#[test]
fn a_bad_log_config_on_reload_changes_nothing() {
    let b = Backend::start("a", Behaviour::Echo);
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "", &[("a", b.addr, "")]);
    let bad = std::fs::read_to_string(&lb.config_path)
        .unwrap()
        .replace("format = \"json\"", "format = \"xml\"");
    let mark = lb.reload(&bad);
    assert!(lb.wait_for_log_after(mark, "reload failed", SOON).is_some());
    let line = lb
        .wait_for_log_after(mark, "log: format: unknown format \"xml\"", SOON)
        .expect("the problem is named");
    assert!(
        line.contains("ringlb.toml:"),
        "with its file and line: {line}"
    );
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    exchange(&mut s, 2);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    wait_closed(&mut s);
    check_line(&wait_lines(&log, 1)[0], "--", Some("a"), (2, 2));
}

// ---- sinks: rsyslog, gone, full ----

/// A private rsyslogd listening on a loopback UDP port and a Unix socket, writing every
/// message it gets to `out`.
struct Rsyslog {
    child: std::process::Child,
    pub udp: SocketAddr,
    pub sock: PathBuf,
    pub out: PathBuf,
}

impl Rsyslog {
    fn start(dir: &Path, udp_port: Option<u16>) -> Option<Rsyslog> {
        let bin = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        if !tool_available(bin.is_some(), "rsyslogd", "apt-get install rsyslog") {
            return None;
        }
        let port = udp_port.unwrap_or_else(|| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let sock = dir.join("log.sock");
        let out = dir.join("syslog.out");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{d}\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imuxsock\" Socket=\"{s}\")\n\
                 module(load=\"imudp\")\n\
                 input(type=\"imudp\" address=\"127.0.0.1\" port=\"{port}\")\n\
                 template(name=\"raw\" type=\"string\" string=\"%programname% %msg%\\n\")\n\
                 *.* action(type=\"omfile\" file=\"{o}\" template=\"raw\")\n",
                d = dir.display(),
                s = sock.display(),
                o = out.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(bin.unwrap())
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_until(SOON, || sock.exists()), "rsyslogd did not start");
        Some(Rsyslog {
            child,
            udp: SocketAddr::from(([127, 0, 0, 1], port)),
            sock,
            out,
        })
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn syslog_config(b: SocketAddr, udp: SocketAddr, sock: &Path) -> String {
    global_toml("")
        + &frontend_toml(
            "viaudp",
            &format!("[frontend.log]\ntarget = \"syslog+udp://{udp}\""),
            &[("a", b, "")],
        )
        + &frontend_toml(
            "viaunix",
            &format!(
                "[frontend.log]\ntarget = \"syslog+unix:{}\"\nsyslog_format = \"rfc3164\"\nformat = \"json\"",
                sock.display()
            ),
            &[("a", b, "")],
        )
}

fn one_through(lb: &Ringlb, frontend: &str, n: usize) {
    let mut s = TcpStream::connect(lb.addr(frontend)).unwrap();
    exchange(&mut s, n);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    wait_closed(&mut s);
}

#[test]
fn rsyslog_receives_lines_over_udp_and_a_unix_socket_and_again_after_a_restart() {
    let dir = TempDir::new();
    let Some(mut rs) = Rsyslog::start(&dir.path, None) else {
        return;
    };
    let b = Backend::start("a", Behaviour::Echo);
    let lb = Ringlb::start(&syslog_config(b.addr, rs.udp, &rs.sock));
    one_through(&lb, "viaudp", 17);
    one_through(&lb, "viaunix", 23);
    assert!(
        wait_until(SOON, || rs.lines().len() >= 2),
        "rsyslog got {:?}",
        rs.lines()
    );
    let lines = rs.lines();
    let udp = lines
        .iter()
        .find(|l| l.contains(" viaudp viaudp/a "))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(udp.starts_with("ringlb "), "tagged ringlb: {udp}");
    assert!(udp.contains(" 17 -- "), "{udp}");
    let unix = lines
        .iter()
        .find(|l| l.contains("\"frontend\":\"viaunix\""))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(unix.starts_with("ringlb "), "{unix}");
    assert!(unix.contains("\"bytes_in\":23,"), "{unix}");

    // The syslog daemon goes away: lines are dropped and counted, connections go on.
    rs.stop();
    let _ = std::fs::remove_file(&rs.sock);
    // Each target counts its own: the Unix socket is gone (ENOENT), the UDP port answers
    // with ICMP "port unreachable" (ECONNREFUSED on the next send).
    let dropped = |target: String| {
        lb.metrics()
            .sum("ringlb_log_dropped_total", &[("target", target.as_str())])
    };
    let unix_target = format!("syslog+unix:{}", rs.sock.display());
    let udp_target = format!("syslog+udp://{}", rs.udp);
    assert!(
        wait_until(SOON, || {
            one_through(&lb, "viaunix", 1);
            one_through(&lb, "viaudp", 1);
            dropped(unix_target.clone()) >= 1.0 && dropped(udp_target.clone()) >= 1.0
        }),
        "dropped: unix {}, udp {}",
        dropped(unix_target.clone()),
        dropped(udp_target.clone())
    );
    // It comes back: logging resumes.
    let udp_port = rs.udp.port();
    drop(rs);
    let _ = std::fs::remove_file(dir.path.join("syslog.out"));
    let Some(rs) = Rsyslog::start(&dir.path, Some(udp_port)) else {
        return;
    };
    assert!(wait_until(SOON, || {
        one_through(&lb, "viaunix", 29);
        one_through(&lb, "viaudp", 31);
        let l = rs.lines();
        l.iter().any(|l| l.contains("\"bytes_in\":29,")) && l.iter().any(|l| l.contains(" 31 -- "))
    }));
    assert!(lb.metrics().sum("ringlb_log_lines_total", &[]) >= 4.0);
}

#[test]
fn a_sink_that_blocks_costs_dropped_lines_never_a_stalled_connection() {
    // A FIFO nobody reads: the writer thread blocks opening it, as on a hung NFS mount.
    let dir = TempDir::new();
    let fifo = dir.path.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let b = Backend::start("a", Behaviour::Echo);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!("[frontend.log]\ntarget = \"file:{}\"", fifo.display()),
            &[("a", b.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let mut n = 0;
    assert!(
        wait_until(SOON, || {
            for _ in 0..50 {
                one_through(&lb, "web", 1);
                n += 1;
            }
            lb.metrics().sum("ringlb_log_dropped_total", &[]) >= 1.0
        }),
        "no drop after {n} connections"
    );
    // A reader comes: the writer gets through, and lines flow again.
    let reader = std::thread::spawn(move || {
        let f = std::fs::File::open(&fifo).unwrap();
        let mut lines = std::io::BufReader::new(f).lines();
        lines.find(|l| l.as_ref().is_ok_and(|l| l.contains(" 7 -- ")))
    });
    let done = wait_until(SOON, || {
        one_through(&lb, "web", 7);
        reader.is_finished()
    });
    assert!(done, "no line came through after the sink unblocked");
    assert!(reader.join().unwrap().is_some());
}

#[test]
fn a_full_filesystem_drops_and_counts_lines_and_logging_resumes_when_space_returns() {
    let dir = TempDir::new();
    let mnt = dir.path.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a small tmpfs (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let log = mnt.join("conn.log");
    let b = Backend::start("a", Behaviour::Echo);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!("[frontend.log]\ntarget = \"file:{}\"", log.display()),
            &[("a", b.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    one_through(&lb, "web", 1);
    assert!(wait_until(SOON, || lb
        .metrics()
        .sum("ringlb_log_lines_total", &[])
        >= 1.0));
    // Fill the filesystem.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
    assert!(
        wait_until(SOON, || {
            one_through(&lb, "web", 3);
            lb.metrics().sum("ringlb_log_dropped_total", &[]) >= 1.0
        }),
        "no line was counted as dropped on a full filesystem"
    );
    std::fs::remove_file(&filler).unwrap();
    let written = lb.metrics().sum("ringlb_log_lines_total", &[]);
    assert!(wait_until(SOON, || {
        one_through(&lb, "web", 5);
        lb.metrics().sum("ringlb_log_lines_total", &[]) > written
    }));
}

/// A backend that accepts and then runs `each` on every connection in a thread of its own.
fn backend_doing(each: fn(TcpStream)) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || each(s));
        }
    });
    addr
}

#[test]
fn a_client_silent_for_client_timeout_is_cut_lowercase_cd_though_the_backend_talks() {
    // Writes a byte every 50 ms until the connection goes.
    let talker = backend_doing(|mut s| {
        while s.write_all(b".").is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "client_timeout = \"400ms\"", &[("a", talker, "")]);
    let start = Instant::now();
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    wait_closed(&mut s);
    assert!(start.elapsed() >= Duration::from_millis(400), "cut early");
    let v = &wait_lines(&log, 1)[0];
    assert_eq!(v["termination"], "cD", "{v}");
    assert_eq!(v["bytes_in"], 0, "{v}");
    assert!(v["bytes_out"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn a_backend_silent_for_server_timeout_is_cut_lowercase_sd_though_the_client_talks() {
    // Reads everything, answers nothing.
    let sink = backend_doing(|mut s| {
        let mut buf = [0u8; 256];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let dir = TempDir::new();
    let (lb, log) = start(&dir, "server_timeout = \"400ms\"", &[("a", sink, "")]);
    let start = Instant::now();
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        while writer.write_all(b".").is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    wait_closed(&mut s);
    assert!(start.elapsed() >= Duration::from_millis(400), "cut early");
    let v = &wait_lines(&log, 1)[0];
    assert_eq!(v["termination"], "sD", "{v}");
    assert_eq!(v["bytes_out"], 0, "{v}");
}
