//! Restarts that refuse nothing: with the listening socket held by the service manager
//! (systemd socket activation, `LISTEN_FDS`; here the test holds it, as `ringlb.socket`
//! would), a restart queues new connections in the kernel instead of refusing them, and the
//! old process finishes its established transfers before it exits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;

/// A listening socket as the service manager keeps it for ringlb.
fn socket_unit() -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(4096).unwrap();
    s.into()
}

/// Makes `fd` the child's fd 3, inheritable, as the service manager passes it.
fn pass_as_fd3(cmd: &mut Command, fd: i32) {
    // SAFETY: dup2 and fcntl are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

const ACTIVATION: &str = "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web";

fn start_activated(cfg: &str, unit: &TcpListener) -> Ringlb {
    let fd = unit.as_raw_fd();
    Ringlb::start_with_shell_env(cfg, ACTIVATION, |cmd| pass_as_fd3(cmd, fd))
}

fn config(addr: SocketAddr, backend: SocketAddr) -> String {
    config_on("io_uring", addr, backend)
}

fn config_on(io: &str, addr: SocketAddr, backend: SocketAddr) -> String {
    global_toml(&format!("io = \"{io}\""))
        + &frontend_toml("web", "", &[("e1", backend, "")]).replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"{addr}\"]"),
        )
}

#[test]
fn twenty_restarts_under_load_refuse_reset_and_cut_nothing_with_the_socket_held_outside() {
    restarts_under_load("io_uring");
}

#[test]
fn on_the_epoll_fallback_restarts_refuse_reset_and_cut_nothing_too() {
    restarts_under_load("epoll");
}

fn restarts_under_load(io: &str) {
    let echo = Backend::start("e1", Behaviour::Echo);
    let unit = socket_unit();
    let addr = unit.local_addr().unwrap();
    let cfg = config_on(io, addr, echo.addr);
    let mut lb = start_activated(&cfg, &unit);
    assert!(lb
        .logs()
        .iter()
        .any(|l| l.contains("passed by the service manager")));
    assert_eq!(lb.addr("web"), addr);

    let load = Churn::start(addr);
    for round in 0..20 {
        assert!(load.flowing(20), "round {round}: no traffic");
        // A connection established before the stop finishes its transfer after it.
        let mut held = TcpStream::connect(addr).unwrap();
        held.set_read_timeout(Some(SOON)).unwrap();
        let mut one = [0u8; 1];
        held.write_all(b"h").unwrap();
        held.read_exact(&mut one).unwrap();
        lb.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(
            lb.wait_for_log("SIGTERM received", SOON).is_some(),
            "round {round}: the stop did not begin"
        );
        echo_checked(
            &mut held,
            round,
            &format!("round {round}: the held connection, during the stop"),
        );
        drop(held);
        let status = lb.wait_exit(SOON).expect("the old ringlb did not exit");
        assert!(status.success(), "round {round}: {status:?}");
        lb = start_activated(&cfg, &unit);
    }
    load.stop().assert_clean(&format!("{io}: 20 restarts"));
}

/// Starts ringlb with `cfg` and `fd` passed as systemd's fd 3, expects it to refuse to start,
/// and returns what it wrote on stderr.
fn start_refused(cfg: &str, fd: std::os::fd::RawFd) -> String {
    let dir = TempDir::new();
    let path = dir.path.join("ringlb.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{ACTIVATION} exec \"$0\" run --config \"$1\""))
        .arg(env!("CARGO_BIN_EXE_ringlb"))
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    pass_as_fd3(&mut cmd, fd);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{text}");
    text
}

#[test]
fn a_passed_socket_no_frontend_listens_on_is_refused_naming_its_address() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let unit = socket_unit();
    let other = socket_unit();
    // The config listens on `other`'s address; fd 3 listens elsewhere.
    let cfg = config(other.local_addr().unwrap(), echo.addr);
    let text = start_refused(&cfg, unit.as_raw_fd());
    let want = format!(
        "LISTEN_FDS: fd 3 (\"web\") listens on {}, which no frontend's listen names",
        unit.local_addr().unwrap()
    );
    assert!(text.contains(&want), "{text}");
}

#[test]
fn a_passed_fd_that_is_not_a_listening_socket_is_refused() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let unit = socket_unit();
    let cfg = config(unit.local_addr().unwrap(), echo.addr);
    let file = std::fs::File::open("/dev/null").unwrap();
    let text = start_refused(&cfg, file.as_raw_fd());
    assert!(text.contains("LISTEN_FDS: fd 3 (\"web\"): "), "{text}");
}

#[test]
fn a_reload_cannot_drop_a_passed_socket_and_the_old_config_keeps_serving() {
    let echo = Backend::start("e1", Behaviour::Echo);
    let unit = socket_unit();
    let addr = unit.local_addr().unwrap();
    let lb = start_activated(&config(addr, echo.addr), &unit);
    let moved = global_toml("") + &frontend_toml("web", "", &[("e1", echo.addr, "")]);
    let mark = lb.reload(&moved);
    let line = lb
        .wait_for_log_after(mark, "reload failed", SOON)
        .expect("the reload was not refused");
    assert!(
        line.contains(&format!("{addr} was passed by the service manager")),
        "{line}"
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    s.write_all(b"ok").unwrap();
    let mut back = [0u8; 2];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ok");
}
