//! Relay buffers and splice pipes are lent only while bytes are in flight, and every way a
//! connection can end gives them back: EOF, a reset, the idle timeout, and a reload that
//! removes the backend and then closes what is left on it (forced shutdown mid-transfer).
//!
//! Each scenario stalls a transfer on purpose: the client writes and never reads, so ringlb's
//! sends block and it must hold a buffer (or a pipe) with bytes in it. Then the connection
//! ends, and the pools' gauges must return to 0 and the fds to their baseline.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const MODES: [&str; 3] = ["copy", "splice", "splice-auto"];

/// Missing gauges are NaN, so that a sum with one of them is no number and equals none.
fn lent(lb: &Ringlb) -> f64 {
    let m = lb.metrics();
    let gauge = |name: &str| m.get(name, &[]).unwrap_or(f64::NAN);
    gauge("ringlb_relay_buffers_in_use")
        + gauge("ringlb_relay_pipes_in_use")
        + gauge("ringlb_relay_tails_in_use")
        + gauge("ringlb_relay_ring_buffers_in_use")
}

/// Starts a client that writes without ever reading; returns a handle to end it abruptly.
fn stalled_client(lb: &Ringlb) -> TcpStream {
    let s = TcpStream::connect(lb.addr("web")).unwrap();
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 256 * 1024];
        // Blocks once every buffer on the way is full; ends with an error when ringlb closes.
        while w.write_all(&chunk).is_ok() {}
    });
    s
}

enum End {
    ClientReset,
    IdleTimeout,
    ReloadRemovesBackend,
}

fn scenario(relay: &str, end: End) {
    scenario_on("auto", relay, end)
}

fn scenario_on(io: &str, relay: &str, end: End) {
    let b = Backend::start("echo", Behaviour::Echo);
    let spare = Backend::start("spare", Behaviour::Echo);
    let global = format!(
        "[global]\nworkers = 2\nshutdown_timeout = \"1s\"\nrelay = \"{relay}\"\nio = \"{io}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n"
    );
    let frontend = |backend: (&str, std::net::SocketAddr)| {
        frontend_toml(
            "web",
            "idle_timeout = \"2s\"",
            &[(backend.0, backend.1, "")],
        )
    };
    let lb = Ringlb::start(&(global.clone() + &frontend(("echo", b.addr))));
    let baseline = lb.fd_count();
    let client = stalled_client(&lb);
    assert!(
        wait_until(SOON, || lent(&lb) > 0.0),
        "{relay}: a blocked transfer holds a buffer or a pipe with its bytes"
    );
    // Not a ring buffer: a direction whose reader is slow has its read op cancelled, and what
    // the op had read is copied aside with the unsent rest.
    let ring = |lb: &Ringlb| lb.metrics().get("ringlb_relay_ring_buffers_in_use", &[]);
    assert!(
        wait_until(SOON, || ring(&lb) == Some(0.0)),
        "{relay}: a blocked transfer holds no ring buffer, {:?} held",
        ring(&lb)
    );
    match end {
        End::ClientReset => {
            socket2::SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(client);
        }
        // Nothing moves while both sides are blocked: the idle timeout ends it.
        End::IdleTimeout => {}
        End::ReloadRemovesBackend => {
            let mark = lb.reload(&(global + &frontend(("spare", spare.addr))));
            lb.wait_for_log_after(mark, "closing 1 connections still open", SOON)
                .expect("the drain limit closes the stalled connection");
        }
    }
    assert!(
        wait_until(SOON, || lent(&lb) == 0.0),
        "{relay}: every buffer and pipe back in the pool, {} lent",
        lent(&lb)
    );
    // Free pipes stay pooled (at most 16 per worker, 2 fds each); sockets all close.
    assert!(
        wait_until(SOON, || {
            let (pipes, others) = lb.fd_count_by_kind();
            others + pipes <= baseline + 2 * 2 * 16 && others <= baseline
        }),
        "{relay}: fds {:?}, baseline {baseline}",
        lb.fd_count_by_kind()
    );
}

#[test]
fn a_reset_mid_transfer_returns_every_buffer_and_pipe() {
    for relay in MODES {
        scenario(relay, End::ClientReset);
    }
}

#[test]
fn the_idle_timeout_mid_transfer_returns_every_buffer_and_pipe() {
    for relay in MODES {
        scenario(relay, End::IdleTimeout);
    }
}

#[test]
fn a_reload_that_closes_a_transfer_returns_every_buffer_and_pipe() {
    for relay in MODES {
        scenario(relay, End::ReloadRemovesBackend);
    }
}

#[test]
fn the_epoll_fallback_returns_them_too() {
    for relay in MODES {
        scenario_on("epoll", relay, End::IdleTimeout);
        scenario_on("epoll", relay, End::ClientReset);
    }
}

/// One buffer in each worker's io_uring buffer ring: reads that find it empty wait and read
/// into a pooled buffer instead (counted), every byte still arrives in order, and when the
/// clients are done every ring buffer and pooled buffer is back and the fds are at baseline.
#[test]
fn an_empty_buffer_ring_falls_back_to_pooled_buffers_and_loses_nothing() {
    let b = Backend::start("echo", Behaviour::Echo);
    let cfg = global_toml("io = \"io_uring\"\nring_buffers = 1")
        + &frontend_toml("web", "", &[("echo", b.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let baseline = lb.fd_count();
    let addr = lb.addr("web");
    // Many connections in lockstep: their reads complete together, more than one per loop
    // turn of a worker, so most find the ring's one buffer taken.
    let clients: Vec<_> = (0..32u8)
        .map(|id| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(SOON)).unwrap();
                for round in 0..200u32 {
                    let msg = format!("client {id} round {round}\n");
                    s.write_all(msg.as_bytes()).unwrap();
                    let mut back = vec![0u8; msg.len()];
                    std::io::Read::read_exact(&mut s, &mut back).unwrap();
                    assert_eq!(back, msg.as_bytes(), "client {id} round {round}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let empty = lb
        .metric("ringlb_relay_ring_empty_total", &[])
        .expect("the counter is exported");
    assert!(
        empty > 0.0,
        "32 clients in lockstep never found the one-buffer ring empty"
    );
    assert!(
        wait_until(SOON, || lent(&lb) == 0.0),
        "every ring buffer and pooled buffer back, {} lent",
        lent(&lb)
    );
    assert!(
        wait_until(SOON, || lb.fd_count() <= baseline),
        "fds {} against a baseline of {baseline}",
        lb.fd_count()
    );
}
