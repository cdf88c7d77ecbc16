//! Health checks run on a thread of their own: a control thread stuck in a reload (here
//! reading a config file that is a FIFO nobody writes yet, as a slow network file system
//! would) delays no probe.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A listener that records when each connection (each probe) arrived.
fn probe_recorder() -> (SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { break };
            s.lock().unwrap().push(Instant::now());
            drop(c);
        }
    });
    (addr, seen)
}

#[test]
fn probes_keep_their_interval_while_a_reload_is_stuck_reading_the_config_file() {
    let (probed, seen) = probe_recorder();
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\ninterval = \"100ms\"\nspread = 0",
            &[("p", probed, "")],
        );
    let lb = Ringlb::start(&cfg);
    assert!(wait_until(SOON, || seen.lock().unwrap().len() >= 2));

    // The config file becomes a FIFO: the reload's read blocks until someone writes it.
    std::fs::remove_file(&lb.config_path).unwrap();
    nix::unistd::mkfifo(&lb.config_path, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mark = lb.log_len();
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(lb
        .wait_for_log_after(mark, "SIGHUP received", SOON)
        .is_some());
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let during: Vec<Instant> = seen
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|i| *i >= t)
        .collect();
    // Still stuck: the reload has not finished.
    assert!(lb
        .wait_for_log_after(mark, "reload:", Duration::ZERO)
        .is_none());

    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .open(&lb.config_path)
        .unwrap();
    fifo.write_all(cfg.as_bytes()).unwrap();
    drop(fifo);
    assert!(lb
        .wait_for_log_after(mark, "reload: configuration unchanged", SOON)
        .is_some());
    let largest = during
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} probes in 2 s with the control thread stuck (largest gap {largest:?})",
        during.len()
    );
    // 20 are due; a checker on the stuck thread would send none.
    assert!(during.len() >= 10, "{} probes", during.len());
}
