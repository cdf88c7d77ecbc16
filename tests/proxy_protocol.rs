//! PROXY protocol towards backends: `send_proxy = "v1" | "v2"` puts the header before the
//! client's first byte, naming the client's real address and the address it connected to.
//!
//! The backend is a plain echo server, so what comes back is exactly what it received: the
//! header, then the client's bytes.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

fn through(send_proxy: &str, on: &str) -> (Ringlb, Backend) {
    let b = Backend::start("echo", Behaviour::Echo);
    let (fe, be) = match on {
        "frontend" => (format!("send_proxy = \"{send_proxy}\""), String::new()),
        _ => (String::new(), format!("send_proxy = \"{send_proxy}\"")),
    };
    let lb =
        Ringlb::start(&(global_toml("") + &frontend_toml("web", &fe, &[("echo", b.addr, &be)])));
    (lb, b)
}

#[test]
fn v1_tells_the_backend_the_client_address_before_the_clients_bytes() {
    let (lb, _b) = through("v1", "backend");
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"hello").unwrap();
    let want = format!(
        "PROXY TCP4 {} {} {} {}\r\nhello",
        me.ip(),
        lb.addr("web").ip(),
        me.port(),
        lb.addr("web").port()
    );
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[test]
fn v2_set_on_the_frontend_sends_the_binary_header_for_every_backend() {
    let (lb, _b) = through("v2", "frontend");
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"hi").unwrap();
    let mut got = [0u8; 16 + 12 + 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
    assert_eq!(
        &got[12..16],
        &[0x21, 0x11, 0, 12],
        "PROXY, TCP over IPv4, 12 bytes"
    );
    assert_eq!(&got[16..20], &[127, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([got[24], got[25]]), me.port());
    assert_eq!(
        u16::from_be_bytes([got[26], got[27]]),
        lb.addr("web").port()
    );
    assert_eq!(&got[28..], b"hi");
}

#[test]
fn a_bad_version_is_refused_with_its_place() {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg =
        global_toml("") + &frontend_toml("web", "", &[("echo", b.addr, "send_proxy = \"v3\"")]);
    let (ok, err) = check_config(&cfg);
    assert!(!ok);
    assert!(
        err.contains("send_proxy") && err.contains("unknown version \"v3\""),
        "{err}"
    );
}
