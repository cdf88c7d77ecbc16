//! systemd: the unit file verifies, and ringlb speaks sd_notify (READY, RELOADING with
//! MONOTONIC_USEC, STOPPING, watchdog pings) to the socket in $NOTIFY_SOCKET, by path or
//! abstract name.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// The datagrams ringlb sends, as a test-side service manager sees them.
struct NotifySocket {
    socket: UnixDatagram,
    /// What to put in NOTIFY_SOCKET.
    name: String,
    _dir: TempDir,
}

impl NotifySocket {
    fn on_path() -> NotifySocket {
        let dir = TempDir::new();
        let path = dir.path.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            socket,
            name: path.display().to_string(),
            _dir: dir,
        }
    }

    fn abstract_name() -> NotifySocket {
        let dir = TempDir::new();
        let name = format!(
            "ringlb-test-notify-{}",
            dir.path.file_name().unwrap().to_string_lossy()
        );
        let socket =
            UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&name).unwrap()).unwrap();
        NotifySocket {
            socket,
            name: format!("@{name}"),
            _dir: dir,
        }
    }

    /// The next message, skipping watchdog pings unless `pings` is set.
    fn next(&self, pings: bool) -> Option<String> {
        let deadline = Instant::now() + SOON;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.socket.set_read_timeout(Some(left)).unwrap();
            let n = self.socket.recv(&mut buf).ok()?;
            // A message may end with a newline after its last line (sd-notify writes one).
            let msg = String::from_utf8_lossy(&buf[..n])
                .trim_end_matches('\n')
                .to_owned();
            if pings || msg != "WATCHDOG=1" {
                return Some(msg);
            }
        }
    }

    fn expect(&self, starts_with: &str) -> String {
        let msg = self
            .next(false)
            .unwrap_or_else(|| panic!("no {starts_with:?} message"));
        assert!(
            msg.starts_with(starts_with),
            "expected {starts_with:?}, got {msg:?}"
        );
        msg
    }
}

fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

fn config(b: &Backend) -> String {
    global_toml("") + &frontend_toml("web", "", &[("a1", b.addr, "")])
}

#[test]
fn ready_reloading_and_stopping_reach_the_notify_socket_in_order() {
    let b = Backend::start("a1", Behaviour::Named);
    let sock = NotifySocket::on_path();
    let mut lb = Ringlb::start_with_env(&config(&b), &[("NOTIFY_SOCKET", &sock.name)]);
    let ready = sock.expect("READY=1");
    assert!(ready.contains("STATUS=serving 1 frontends"), "{ready:?}");
    // READY=1 means the listeners are bound.
    assert_eq!(ask_name(lb.addr("web")).unwrap(), "a1");

    // A reload: RELOADING=1 with the current monotonic time, then READY=1 again.
    let before = monotonic_usec();
    lb.reload(&(config(&b) + "\n"));
    let msg = sock.expect("RELOADING=1\nMONOTONIC_USEC=");
    let usec: u64 = msg
        .rsplit('=')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{msg:?}"));
    assert!(
        usec >= before && usec <= monotonic_usec(),
        "MONOTONIC_USEC {usec} not between {before} and now"
    );
    sock.expect("READY=1");

    // A reload that fails still ends with READY=1: the old config keeps serving.
    let mark = lb.reload("[[frontend]\n");
    sock.expect("RELOADING=1");
    sock.expect("READY=1");
    assert!(lb.wait_for_log_after(mark, "reload failed", SOON).is_some());
    assert_eq!(ask_name(lb.addr("web")).unwrap(), "a1");

    lb.signal(Signal::SIGTERM);
    sock.expect("STOPPING=1");
    let status = lb.wait_exit(SOON).expect("ringlb exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn an_abstract_notify_socket_works_and_the_watchdog_is_pinged_at_half_its_interval() {
    let b = Backend::start("a1", Behaviour::Named);
    let sock = NotifySocket::abstract_name();
    // WATCHDOG_USEC of 0.4 s: a ping every 0.2 s.
    let lb = Ringlb::start_with_env(
        &config(&b),
        &[("NOTIFY_SOCKET", &sock.name), ("WATCHDOG_USEC", "400000")],
    );
    assert!(lb
        .wait_for_log("systemd watchdog enabled: pinging every 200ms", SOON)
        .is_some());
    let mut ready = false;
    let mut pings = 0;
    while pings < 5 {
        match sock.next(true).as_deref() {
            Some("WATCHDOG=1") => pings += 1,
            Some(m) if m.starts_with("READY=1") => ready = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ready, "no READY=1 before the pings");
}

#[test]
fn a_watchdog_meant_for_another_process_is_not_pinged() {
    let b = Backend::start("a1", Behaviour::Named);
    let sock = NotifySocket::on_path();
    // systemd sets WATCHDOG_PID to the main process; a child that inherited it must not ping.
    let lb = Ringlb::start_with_env(
        &config(&b),
        &[
            ("NOTIFY_SOCKET", &sock.name),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    sock.expect("READY=1");
    // Ten ping intervals without a ping.
    sock.socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 256];
    if let Ok(n) = sock.socket.recv(&mut buf) {
        panic!("unexpected {:?}", String::from_utf8_lossy(&buf[..n]));
    }
    assert!(!lb.logs().iter().any(|l| l.contains("watchdog enabled")));
}

/// Finds systemd-analyze (see `tool_available` for what happens when it is missing).
fn systemd_analyze() -> Option<&'static str> {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    tool_available(ok, "systemd-analyze", "apt-get install systemd").then_some("systemd-analyze")
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify_and_its_commands_work() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/ringlb.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStartPre=/usr/bin/ringlb check --config /etc/ringlb/ringlb.toml",
        "ExecStart=/usr/bin/ringlb run --config /etc/ringlb/ringlb.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "DynamicUser=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LimitNOFILE=",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(line)),
            "the unit has no {line:?}"
        );
    }
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // verify checks that every Exec* binary exists: point them at the one just built.
    let bin = env!("CARGO_BIN_EXE_ringlb");
    let dir = TempDir::new();
    let copy = dir.path.join("ringlb.service");
    std::fs::write(&copy, unit.replace("/usr/bin/ringlb", bin)).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("ringlb.service"),
        "systemd-analyze verify warns about the unit:\n{stderr}"
    );
    // The ExecStartPre command accepts the example config and refuses a broken one.
    let check = |config: &Path| {
        Command::new(bin)
            .args(["check", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let example = check(&root.join("config/ringlb.toml"));
    assert!(
        example.status.success(),
        "{}",
        String::from_utf8_lossy(&example.stderr)
    );
    let broken = dir.path.join("broken.toml");
    std::fs::write(&broken, "[[frontend]]\nname = \"web\"\n").unwrap();
    assert_eq!(check(&broken).status.code(), Some(1));
}

#[test]
fn under_journald_each_reload_is_one_line_with_a_priority() {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;

    let a = Backend::start("a1", Behaviour::Named);
    let b = Backend::start("b1", Behaviour::Named);
    let dir = TempDir::new();
    let path = dir.path.join("ringlb.toml");
    std::fs::write(&path, config(&a)).unwrap();
    // JOURNAL_STREAM is how systemd tells a service its stderr goes to the journal.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["run", "--config"])
        .arg(&path)
        .env("JOURNAL_STREAM", "8:12345")
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Kills ringlb if the test fails half-way.
    let mut child = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| -> Vec<String> {
        let deadline = Instant::now() + SOON;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            let done = line.contains(needle);
            seen.push(line);
            if done {
                return seen;
            }
        }
        panic!("no {needle:?} in {seen:?}");
    };
    let start = wait_for("<6>ready");
    assert!(
        start.iter().all(|l| l.starts_with('<')),
        "lines without a priority: {start:?}"
    );
    std::fs::write(
        &path,
        global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, ""), ("b1", b.addr, "")]),
    )
    .unwrap();
    nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    let lines = wait_for("reload: applied");
    assert_eq!(
        lines.last().unwrap(),
        "<6>reload: applied: frontend web: +b1",
        "{lines:?}"
    );
    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    wait_for("<6>stopped");
    assert!(child.0.wait().unwrap().success());
}
