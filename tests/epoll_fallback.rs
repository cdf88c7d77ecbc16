//! io_uring blocked for real: ringlb runs in a child process whose seccomp filter makes
//! io_uring_setup, io_uring_enter and io_uring_register fail with EPERM, as a container
//! runtime's default seccomp profile does. With `io = "auto"` it says why at start and serves
//! on the epoll fallback: relaying in every relay mode, health-checking and reloading. With
//! `io = "io_uring"` it refuses to start.
//!
//! The filter is installed in the forked child just before exec (`pre_exec`), so only the
//! ringlb process is restricted, never the test process. Before exec the hook itself calls
//! io_uring_setup and refuses to go on unless that fails with EPERM, so every test here runs
//! a ringlb that provably cannot create a ring.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// Fast checks: every 200ms, rise 1, fall 1.
const FAST_CHECKS: &str = "[frontend.health]\ninterval = \"200ms\"\nrise = 1\nfall = 1\n";

/// A filter that fails the three io_uring syscalls with EPERM and allows everything else.
fn no_io_uring_filter() -> BpfProgram {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = [
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    // An empty rule list matches the syscall whatever its arguments.
    .map(|nr| (nr, Vec::new()))
    .collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .expect("seccompiler supports this architecture");
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(TryInto::try_into)
    .expect("build the seccomp filter")
}

/// Installs `no_io_uring_filter` on `cmd`'s child before exec, and checks there that it works.
fn block_io_uring(cmd: &mut Command) {
    // Built here, in the parent: between fork and exec the child may not allocate.
    let filter = no_io_uring_filter();
    // SAFETY: the hook runs in the forked child before exec. It only makes raw syscalls
    // (prctl, seccomp, io_uring_setup, close) on memory allocated before the fork, and builds
    // errors from errno without allocating.
    unsafe {
        cmd.pre_exec(move || {
            seccompiler::apply_filter(&filter)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // struct io_uring_params is 120 bytes; zeroed is a valid request for one entry.
            let mut params = [0u8; 120];
            let fd = libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr());
            let errno = std::io::Error::last_os_error().raw_os_error();
            if fd >= 0 {
                libc::close(fd as i32);
            }
            if fd >= 0 || errno != Some(libc::EPERM) {
                // Distinctive, so that the spawn error says the filter did not take.
                return Err(std::io::Error::from_raw_os_error(libc::ENOTRECOVERABLE));
            }
            Ok(())
        });
    }
}

/// Starts ringlb with io_uring blocked, and asserts that the process really runs without it.
fn start_blocked(config: &str) -> Ringlb {
    let lb = Ringlb::start_with(config, block_io_uring);
    assert_no_io_uring(&lb);
    lb
}

/// The kernel's view of the process: a seccomp filter is installed (mode 2), and it holds no
/// io_uring instance (no `anon_inode:[io_uring]` fd, no io-wq or SQPOLL threads).
fn assert_no_io_uring(lb: &Ringlb) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "ringlb runs without a seccomp filter:\n{status}"
    );
    assert_eq!(
        io_uring_fds(lb.pid()),
        0,
        "ringlb holds an io_uring fd despite the filter"
    );
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", lb.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("iou-"))
        .collect();
    assert!(threads.is_empty(), "io_uring kernel threads: {threads:?}");
}

fn io_uring_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains("io_uring"))
        .count()
}

const FALLBACK_WARNING: &str =
    "WARN io_uring is unavailable (Operation not permitted (os error 1)): \
                                using the epoll fallback; check sysctl kernel.io_uring_disabled \
                                and the container's seccomp profile";

#[test]
fn with_io_uring_blocked_the_default_auto_mode_says_why_and_starts_on_epoll() {
    let b = Backend::start("echo", Behaviour::Echo);
    // No `io` key: the default is "auto".
    let cfg = global_toml("") + &frontend_toml("web", "", &[("echo", b.addr, "")]);
    let lb = start_blocked(&cfg);
    let logs = lb.logs();
    assert!(
        logs.iter().any(|l| l.contains(FALLBACK_WARNING)),
        "no fallback warning at start:\n{}",
        logs.join("\n")
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("starting: 2 workers on epoll (copy relay)")),
        "{}",
        logs.join("\n")
    );
    assert!(!logs.iter().any(|l| l.contains("on io_uring")));
    echo_round_trips(lb.addr("web"), 3, 20);
    // Monitoring can see it too, without the logs.
    let body = get(lb.admin.expect("admin listener"), "/metrics");
    assert!(
        body.lines()
            .any(|l| l.starts_with("ringlb_build_info{") && l.contains("io=\"epoll\"")),
        "{body}"
    );

    // The control: the same config without the filter runs on io_uring on this machine, so
    // it is the filter (and nothing else) that moved ringlb to epoll.
    let unfiltered = Ringlb::start(&cfg);
    assert!(
        unfiltered
            .wait_for_log("workers on io_uring (copy relay)", SOON)
            .is_some(),
        "io_uring is unavailable here even without the filter:\n{}",
        unfiltered.logs().join("\n")
    );
    assert!(io_uring_fds(unfiltered.pid()) > 0);
    assert!(!unfiltered
        .logs()
        .iter()
        .any(|l| l.contains("io_uring is unavailable")));
}

#[test]
fn with_io_uring_blocked_io_uring_mode_refuses_to_start_with_a_clear_error() {
    let b = Backend::start("echo", Behaviour::Echo);
    let dir = TempDir::new();
    let path = dir.path.join("ringlb.toml");
    let cfg = global_toml("io = \"io_uring\"") + &frontend_toml("web", "", &[("echo", b.addr, "")]);
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringlb"));
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET");
    block_io_uring(&mut cmd);
    let mut child = KillOnDrop(cmd.spawn().expect("start ringlb"));
    let stderr = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "ringlb did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    let lines = reader.join().unwrap();
    let text = lines.join("\n");
    assert!(!status.success(), "exit {status}:\n{text}");
    assert!(
        text.contains(
            "io_uring is unavailable (Operation not permitted (os error 1)) and the config says \
             io = \"io_uring\""
        ),
        "{text}"
    );
    assert!(!text.contains(" ready"), "{text}");
    assert!(!text.contains("listening on"), "{text}");
}

/// A child process killed and reaped on drop, also when the test panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `conns` connections at once, each doing `trips` echo round trips of varied sizes.
fn echo_round_trips(addr: SocketAddr, conns: usize, trips: usize) {
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(SOON)).unwrap();
                for i in 0..trips {
                    let msg = vec![b'a' + (i % 26) as u8; 1 + (c * 977 + i * 4099) % 20_000];
                    s.write_all(&msg).unwrap();
                    let mut got = vec![0u8; msg.len()];
                    s.read_exact(&mut got).unwrap();
                    assert!(got == msg, "round trip {i} on connection {c} differs");
                }
                s.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn relay_mode(mode: &str) {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg = global_toml(&format!("io = \"auto\"\nrelay = \"{mode}\""))
        + &frontend_toml("web", "", &[("echo", b.addr, "")]);
    let lb = start_blocked(&cfg);
    assert!(lb.wait_for_log(FALLBACK_WARNING, SOON).is_some());
    let started = format!("workers on epoll ({mode} relay)");
    assert!(
        lb.wait_for_log(&started, SOON).is_some(),
        "{}",
        lb.logs().join("\n")
    );
    let addr = lb.addr("web");
    echo_round_trips(addr, 4, 50);
    // 10 MiB each way on two connections at once.
    let bulk: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || bulk_echo(addr, 10 << 20)))
        .collect();
    for h in bulk {
        h.join().unwrap();
    }
    // The mode really was in force on epoll: splice modes lent pipes (returned to the pools
    // when the bytes had moved), copy never made one.
    assert!(wait_until(SOON, || lb
        .metrics()
        .expect("ringlb_relay_pipes_in_use", &[])
        == 0.0));
    let pipes_free = lb.metrics().expect("ringlb_relay_pipes_free", &[]);
    match mode {
        "copy" => assert_eq!(pipes_free, 0.0, "the copy relay made pipes"),
        _ => assert!(pipes_free > 0.0, "the {mode} relay never used a pipe"),
    }
    assert_eq!(
        lb.metrics()
            .expect("ringlb_relay_pipe_unavailable_total", &[]),
        0.0
    );
    assert_no_io_uring(&lb);
}

#[test]
fn with_io_uring_blocked_the_copy_relay_moves_bytes_intact() {
    relay_mode("copy");
}

#[test]
fn with_io_uring_blocked_the_splice_relay_moves_bytes_intact() {
    relay_mode("splice");
}

#[test]
fn with_io_uring_blocked_the_splice_auto_relay_moves_bytes_intact() {
    relay_mode("splice-auto");
}

/// Names answered by `n` connections through `addr`.
fn names(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n).map(|_| ask_name(addr).unwrap()).collect()
}

#[test]
fn with_io_uring_blocked_health_checks_take_a_dead_backend_out_and_bring_it_back() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let b2 = Backend::start("b2", Behaviour::Named);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!("balance = \"round-robin\"\n{FAST_CHECKS}"),
            &[("b1", b1.addr, ""), ("b2", b2.addr, "")],
        );
    let lb = start_blocked(&cfg);
    assert!(lb.wait_for_log(FALLBACK_WARNING, SOON).is_some());
    let addr = lb.addr("web");
    let seen: HashSet<String> = names(addr, 10).into_iter().collect();
    assert_eq!(seen.len(), 2, "round-robin over both: {seen:?}");

    let b2_addr = b2.addr;
    let mark = lb.log_len();
    b2.stop();
    let down = lb
        .wait_for_log_after(mark, "Server web/b2 is DOWN", SOON)
        .unwrap_or_else(|| panic!("no DOWN line:\n{}", lb.logs()[mark..].join("\n")));
    assert!(down.contains("Connection refused"), "{down}");
    assert!(names(addr, 20).iter().all(|n| n == "b1"));

    let mark = lb.log_len();
    let _b2 = Backend::start_on(b2_addr, "b2", Behaviour::Named);
    lb.wait_for_log_after(mark, "Server web/b2 is UP", SOON)
        .unwrap_or_else(|| panic!("no UP line:\n{}", lb.logs()[mark..].join("\n")));
    assert!(
        names(addr, 10).iter().any(|n| n == "b2"),
        "b2 is UP again but gets no traffic"
    );
    assert!(!lb
        .logs()
        .iter()
        .any(|l| l.contains("has no server available")));
    assert_no_io_uring(&lb);
}

#[test]
fn with_io_uring_blocked_a_reload_adds_a_backend_that_then_gets_traffic() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let b2 = Backend::start("b2", Behaviour::Named);
    let config = |backends: &[(&str, SocketAddr, &str)]| {
        global_toml("") + &frontend_toml("web", "balance = \"round-robin\"", backends)
    };
    let lb = start_blocked(&config(&[("b1", b1.addr, "")]));
    assert!(lb.wait_for_log(FALLBACK_WARNING, SOON).is_some());
    let addr = lb.addr("web");
    assert!(names(addr, 10).iter().all(|n| n == "b1"));

    // A connection open across the reload keeps working.
    let mut held = TcpStream::connect(addr).unwrap();
    held.set_read_timeout(Some(SOON)).unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(held.try_clone().unwrap());
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "b1\n");

    let mark = lb.reload(&config(&[("b1", b1.addr, ""), ("b2", b2.addr, "")]));
    lb.wait_for_log_after(mark, "reload: applied: frontend web: +b2", SOON)
        .unwrap_or_else(|| panic!("reload not applied:\n{}", lb.logs()[mark..].join("\n")));
    let after = names(addr, 10);
    assert!(
        after.iter().filter(|n| *n == "b2").count() >= 4,
        "the new backend gets no fair share after the reload: {after:?}"
    );

    held.write_all(b"still here\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    assert_no_io_uring(&lb);
}
