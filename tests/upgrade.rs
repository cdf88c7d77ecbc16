//! Hitless binary upgrade (SIGUSR2, `ringlb ctl upgrade`): the running ringlb starts the
//! binary again with every listening socket, the new process serves new clients while the old
//! one drains its established connections, and a new process that fails to start leaves the
//! old one serving. Which process serves a connection is read from /proc: the process that
//! holds ringlb's side of it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;

/// A config whose shutdown_timeout outlasts a round, so the old process drains until the test
/// closes what it holds.
fn config(backend: SocketAddr) -> String {
    config_with(backend, "io_uring", 2)
}

fn config_with(backend: SocketAddr, io: &str, workers: usize) -> String {
    format!(
        "[global]\nworkers = {workers}\nio = \"{io}\"\nshutdown_timeout = \"60s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n"
    ) + &frontend_toml("web", "", &[("e1", backend, "")])
}

/// Kills, on drop, every process the upgrades started (they are not the test's children).
#[derive(Default)]
struct Pids(Vec<i32>);

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// `addr` as /proc/net/tcp writes it (IPv4, this host's byte order).
fn proc_net_addr(addr: SocketAddr) -> String {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(a.ip().octets()),
        a.port()
    )
}

/// The pid among `pids` that holds ringlb's side of the client connection `client`.
fn served_by(client: &TcpStream, pids: &[i32]) -> Option<i32> {
    // ringlb's side: local = the frontend address, remote = the client's.
    let local = proc_net_addr(client.peer_addr().unwrap());
    let remote = proc_net_addr(client.local_addr().unwrap());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[2] == remote).then(|| f[9].to_string())
    })?;
    let want = format!("socket:[{inode}]");
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == want)
                })
            })
            .unwrap_or(false)
    })
}

/// Starts an upgrade of `pid`: by SIGUSR2, or with `ringlb ctl upgrade` when `admin` is
/// given (whose answer must name the new process). Returns the new process's pid, from the
/// old one's log.
fn upgrade(lb: &Ringlb, pid: i32, admin: Option<SocketAddr>) -> i32 {
    let mark = lb.log_len();
    let ctl_out = match admin {
        None => {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGUSR2,
            )
            .unwrap();
            None
        }
        Some(admin) => Some(
            Command::new(env!("CARGO_BIN_EXE_ringlb"))
                .args(["ctl", "--admin", &admin.to_string(), "upgrade"])
                .output()
                .unwrap(),
        ),
    };
    let line = lb
        .wait_for_log_after(mark, "upgrade: new process ", SOON)
        .unwrap_or_else(|| panic!("no upgrade of {pid}:\n{}", lb.logs()[mark..].join("\n")));
    let new: i32 = line
        .split("upgrade: new process ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(line.contains("is ready"), "{line}");
    if let Some(out) = ctl_out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!(
                "upgraded: process {new} serves; process {pid} drains"
            )),
            "{text}"
        );
    }
    // The old process no longer accepts from here on.
    assert!(
        lb.wait_for_log_after(
            mark,
            &format!("upgrade: process {pid} stopped accepting"),
            SOON
        )
        .is_some(),
        "{pid} did not stop accepting"
    );
    new
}

#[test]
fn twenty_upgrades_under_load_refuse_nothing_and_the_new_process_serves_while_the_old_drains() {
    upgrades_under_load("io_uring", 20);
}

#[test]
fn on_the_epoll_fallback_upgrades_refuse_nothing_too() {
    upgrades_under_load("epoll", 5);
}

fn upgrades_under_load(io: &str, rounds: u32) {
    let echo = Backend::start("e1", Behaviour::Echo);
    let mut lb = Ringlb::start(&config_with(echo.addr, io, 2));
    let addr = lb.addr("web");
    let admin = lb.admin.expect("an admin listener");
    let mut started = Pids::default();

    let load = Churn::start(addr);

    let first = lb.pid();
    let mut current = first;
    for round in 0..rounds {
        assert!(load.flowing(20), "round {round}: no traffic");
        // Established on the current process before the upgrade.
        let mut held = ping(addr).unwrap();
        assert_eq!(served_by(&held, &[current]), Some(current), "round {round}");
        // Every other round through the runtime API (the new process holds the admin
        // listener from the first upgrade on).
        let via_api = (round % 2 == 1).then_some(admin);
        let new = upgrade(&lb, current, via_api);
        started.0.push(new);
        assert_ne!(new, current);

        // The old process drains (it holds `held`) while the new one serves new clients.
        for i in 0..5 {
            let s = ping(addr).unwrap();
            assert_eq!(
                served_by(&s, &[current, new]),
                Some(new),
                "round {round}, connection {i}: not served by the new process"
            );
            assert!(alive(current), "round {round}: the old process is gone");
        }
        // The held connection still moves bytes through the old process.
        echo_checked(
            &mut held,
            round,
            &format!("round {round}: the held connection, during the drain"),
        );
        assert_eq!(served_by(&held, &[current, new]), Some(current));
        drop(held);
        // With its connections done, the old process exits.
        if current == first {
            let status = lb.wait_exit(SOON).expect("the first ringlb did not exit");
            assert!(status.success(), "round {round}: {status:?}");
        } else {
            assert!(
                wait_until(SOON, || !alive(current)),
                "round {round}: the old process {current} did not exit"
            );
        }
        current = new;
    }
    load.stop()
        .assert_clean(&format!("{io}: {rounds} upgrades"));
    // The last process serves the metrics: it was started by an upgrade.
    let metrics = get(admin, "/metrics");
    assert!(
        metrics.contains("ringlb_upgrades_total{result=\"success\"} 1"),
        "{metrics}"
    );
}

#[test]
fn an_upgrade_whose_new_process_fails_leaves_the_old_serving_and_leaks_no_fd() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let good = config(echo.addr);
    let lb = Ringlb::start(&good);
    let addr = lb.addr("web");
    let admin = lb.admin.unwrap();
    // The file the new process reads is broken.
    std::fs::write(
        &lb.config_path,
        good.replace("[[frontend]]", "bogus = 1\n[[frontend]]"),
    )
    .unwrap();
    let fail_once = |round: usize| {
        let mark = lb.log_len();
        let via_api = round % 2 == 1;
        if via_api {
            let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
                .args(["ctl", "--admin", &admin.to_string(), "upgrade"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(5), "{err}");
            assert!(err.contains("upgrade failed, still serving"), "{err}");
        } else {
            lb.signal(nix::sys::signal::Signal::SIGUSR2);
        }
        let line = lb
            .wait_for_log_after(mark, "upgrade failed, still serving", SOON)
            .unwrap_or_else(|| panic!("round {round}:\n{}", lb.logs()[mark..].join("\n")));
        assert!(line.contains("exited before it was ready"), "{line}");
        // The new process's own error names the problem.
        assert!(
            lb.logs()[mark..]
                .iter()
                .any(|l| l.contains("unknown key `bogus`")),
            "{:?}",
            &lb.logs()[mark..]
        );
        // The old one serves on.
        ping(addr).unwrap();
        assert_eq!(get(admin, "/healthz").trim(), "ok");
    };
    // The first failure sets up what every later one reuses (the child reaper).
    fail_once(0);
    let base = lb.fd_count();
    for round in 1..=10 {
        fail_once(round);
    }
    assert!(
        wait_until(SOON, || lb.fd_count() <= base),
        "fds grew from {base} to {} over 10 failed upgrades",
        lb.fd_count()
    );
    let metrics = get(admin, "/metrics");
    assert!(
        metrics.contains("ringlb_upgrades_total{result=\"failure\"} 11"),
        "{metrics}"
    );
    // Mended, the next upgrade goes through.
    std::fs::write(&lb.config_path, &good).unwrap();
    let mut started = Pids::default();
    let new = upgrade(&lb, lb.pid(), None);
    started.0.push(new);
    let s = ping(addr).unwrap();
    assert_eq!(served_by(&s, &[lb.pid(), new]), Some(new));
}

#[test]
fn an_upgrade_to_a_config_without_a_listened_address_is_refused_naming_it() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let cfg = config(echo.addr);
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    let _started = Pids::default();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let moved_to = other.local_addr().unwrap();
    drop(other);
    std::fs::write(
        &lb.config_path,
        cfg.replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"{moved_to}\"]"),
        ),
    )
    .unwrap();
    let mark = lb.log_len();
    lb.signal(nix::sys::signal::Signal::SIGUSR2);
    assert!(lb
        .wait_for_log_after(mark, "upgrade failed, still serving", SOON)
        .is_some());
    let logs = lb.logs()[mark..].join("\n");
    assert!(
        logs.contains(&format!(
            "(frontend web, {addr}) listens on {addr}, which no frontend's listen names"
        )),
        "{logs}"
    );
    ping(addr).unwrap();
}

/// Runs ringlb as an upgrade's child would be run, with `fd` as fd 3 named by `inherit`
/// (`{fd}` stands for 3) and a ready pipe as fd 4; returns its exit status and stderr.
/// Starts ringlb as an upgrade's child would be, with `fd` as its inherited fd 3 and `inherit`
/// as `RINGLB_INHERIT`; it must refuse to start. Returns what it wrote on stderr.
fn refused_as_child(cfg: &str, fd: i32, inherit: &str, parent: u32) -> String {
    let dir = TempDir::new();
    let path = dir.path.join("ringlb.toml");
    std::fs::write(&path, cfg).unwrap();
    let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
    let w = ready_w.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringlb"));
    cmd.args(["run", "--config"])
        .arg(&path)
        .env("RINGLB_INHERIT", inherit)
        .env("RINGLB_UPGRADE_READY", "4")
        .env("RINGLB_UPGRADE_PARENT", parent.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: fcntl and dup2 are async-signal-safe; nothing else runs between fork and exec.
    // Both go out of the way first, so that neither lands on the other's target; dup2 onto
    // another number leaves the copy inheritable.
    unsafe {
        cmd.pre_exec(move || {
            let a = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
            let b = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 100);
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(ready_w);
    let stderr = child.stderr.take().unwrap();
    let mut text = String::new();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    // A child that started anyway would say ready on the pipe: stop it then.
    let mut ready = std::fs::File::from(ready_r);
    let mut byte = [0u8; 1];
    let said_ready = ready.read(&mut byte).unwrap_or(0) > 0;
    if said_ready {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    text.push_str(&reader.join().unwrap());
    assert!(!said_ready, "it started:\n{text}");
    assert!(!status.success(), "{text}");
    text
}

#[test]
fn a_passed_fd_that_is_not_a_listening_socket_is_refused_naming_it() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let file = std::fs::File::open("/dev/null").unwrap();
    let text = refused_as_child(
        &config(echo.addr),
        file.as_raw_fd(),
        "3 listen web 127.0.0.1:0 127.0.0.1:1",
        std::process::id(),
    );
    assert!(
        text.contains("RINGLB_INHERIT: fd 3 (frontend web, 127.0.0.1:1): not a socket"),
        "{text}"
    );
}

#[test]
fn a_passed_socket_on_another_address_than_named_is_refused() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = l.local_addr().unwrap();
    let text = refused_as_child(
        &config(echo.addr),
        l.as_raw_fd(),
        "3 listen web 127.0.0.1:0 127.0.0.1:1",
        std::process::id(),
    );
    assert!(
        text.contains(&format!(
            "RINGLB_INHERIT: fd 3 (frontend web, 127.0.0.1:1): listens on {at}, not on 127.0.0.1:1"
        )),
        "{text}"
    );
}

#[test]
fn a_hand_off_not_from_the_parent_is_refused() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = l.local_addr().unwrap();
    let text = refused_as_child(
        &config(echo.addr),
        l.as_raw_fd(),
        &format!("3 listen web 127.0.0.1:0 {at}"),
        1,
    );
    assert!(
        text.contains("RINGLB_UPGRADE_PARENT is 1, not this process's parent"),
        "{text}"
    );
}

#[test]
fn an_upgrade_to_more_or_fewer_workers_accepts_on_every_passed_socket() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let lb = Ringlb::start(&config_with(echo.addr, "io_uring", 2));
    let addr = lb.addr("web");
    let mut started = Pids::default();
    let mut current = lb.pid();
    // 2 -> 3 workers (one socket shared by two of them), 3 -> 1 (one worker on both).
    for workers in [3, 1] {
        std::fs::write(&lb.config_path, config_with(echo.addr, "io_uring", workers)).unwrap();
        let new = upgrade(&lb, current, None);
        started.0.push(new);
        // SO_REUSEPORT spreads these over both passed sockets: each is accepted on.
        for i in 0..100 {
            let s = ping(addr).unwrap_or_else(|e| panic!("{workers} workers, connection {i}: {e}"));
            assert_eq!(served_by(&s, &[current, new]), Some(new));
        }
        current = new;
    }
}

#[test]
fn the_old_process_names_the_new_one_to_the_service_manager_and_falls_silent() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let echo = Backend::start("e1", Behaviour::Echo);
    let name = format!("ringlb-upgrade-test-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&name).unwrap()).unwrap();
    sock.set_read_timeout(Some(SOON)).unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let lb = Ringlb::start_with_env(
        &config(echo.addr),
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    );
    assert!(next().starts_with("READY=1"));
    let mut started = Pids::default();
    let new = upgrade(&lb, lb.pid(), None);
    started.0.push(new);
    // MAINPID= from the old process, and no READY=1 from the new one (the service is up).
    assert_eq!(
        next(),
        format!("MAINPID={new}\nSTATUS=upgraded: process {new} serves\n")
    );
    // The new process speaks for the service from now on; the old one, still draining
    // (its STOPPING=1 would stop the service), says nothing.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(next().starts_with("RELOADING=1"));
    assert!(next().starts_with("READY=1"));
}
