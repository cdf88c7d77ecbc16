//! A reload stuck reading its file (here a FIFO nobody writes yet, as a hung network file
//! system would leave it) stalls nothing: the file is read on a thread of its own, health
//! checks run on another, and the admin listener keeps answering.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_reload_stuck_reading_its_file_stalls_neither_probes_nor_the_admin_listener() {
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
    // Still stuck: the reload has not finished; the control loop answers meanwhile.
    assert!(lb
        .wait_for_log_after(mark, "reload:", Duration::ZERO)
        .is_none());
    let (code, _, body) = http(lb.admin.unwrap(), "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("ringlb_backend_up"));
    let (code, _, _) = http(lb.admin.unwrap(), "GET", "/status");
    assert_eq!(code, 200);
    // A second SIGHUP meanwhile makes one more reload after this one.
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(lb
        .wait_for_log_after(
            mark,
            "reloading again once the reload in progress is done",
            SOON
        )
        .is_some());

    let write_fifo = || {
        let mut fifo = std::fs::OpenOptions::new()
            .write(true)
            .open(&lb.config_path)
            .unwrap();
        fifo.write_all(cfg.as_bytes()).unwrap();
    };
    write_fifo();
    let first = lb
        .wait_for_log_after(mark, "reload: configuration unchanged", SOON)
        .is_some();
    assert!(first);
    write_fifo();
    assert!(wait_until(SOON, || lb.logs()[mark..]
        .iter()
        .filter(|l| l.contains("reload: configuration unchanged"))
        .count()
        == 2));
    let largest = during
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} probes in 2 s with a reload stuck (largest gap {largest:?})",
        during.len()
    );
    // 20 are due; a checker on the stuck thread would send none.
    assert!(during.len() >= 10, "{} probes", during.len());
}
