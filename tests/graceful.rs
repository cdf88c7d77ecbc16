//! SIGTERM stops accepting at once and lets open connections finish.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn an_open_connection_completes_its_exchange_after_sigterm_and_ringlb_exits_zero() {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg = global_toml("") + &frontend_toml("web", "", &[("echo", b.addr, "")]);
    let mut lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    s.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();

    lb.signal(Signal::SIGTERM);
    lb.wait_for_log("stopping", SOON).expect("stop logged");
    // New clients are turned away once the listeners are shut.
    assert!(wait_until(SOON, || TcpStream::connect(addr).is_err()));
    // The open one still works both ways.
    s.write_all(b"after!").unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    assert!(
        lb.wait_exit(std::time::Duration::from_millis(200))
            .is_none(),
        "exited while a connection was open"
    );
    drop(s);
    let status = lb
        .wait_exit(SOON)
        .expect("ringlb exits once the connection is closed");
    assert!(status.success(), "{status:?}");
}
