//! `/metrics` is off the control loop's critical path: on a 50 frontends x 20 backends config
//! (909 KB of text), scraping it in a loop does not delay the health checks.
//!
//! The test prints what it measured (scrape times, the gaps between the probes one backend
//! received) and asserts only behaviour: the probes kept coming while scrapes ran back to back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn big_config(probed: SocketAddr) -> String {
    let mut cfg = global_toml("");
    for f in 0..50 {
        cfg.push_str(&format!(
            "[[frontend]]\nname = \"f{f}\"\nlisten = [\"127.0.0.1:0\"]\n"
        ));
        for b in 0..20 {
            cfg.push_str(&format!(
                "[[frontend.backend]]\nname = \"b{b}\"\naddress = \"127.0.0.1:{}\"\ncheck = false\n",
                20000 + b
            ));
        }
    }
    cfg.push_str(&format!(
        "[[frontend]]\nname = \"probed\"\nlisten = [\"127.0.0.1:0\"]\n\
         [frontend.health]\ninterval = \"100ms\"\nspread = 0\n\
         [[frontend.backend]]\nname = \"p\"\naddress = \"{probed}\"\n"
    ));
    cfg
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[test]
fn scraping_metrics_in_a_loop_on_50_by_20_backends_does_not_delay_health_checks() {
    let (probed, seen) = probe_recorder();
    let lb = Ringlb::start(&big_config(probed));
    let admin = lb.admin.unwrap();
    let first = get(admin, "/metrics");
    assert!(first.contains("backend=\"b19\""), "{}", first.len());

    // Quiet: probes alone.
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let quiet: Vec<Instant> = seen
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|i| *i >= t)
        .collect();

    // Scrapes back to back, from two clients, for 3 s.
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(Mutex::new(Vec::new()));
    let t = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, scrapes) = (stop.clone(), scrapes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let s = Instant::now();
                    let body = get(admin, "/metrics");
                    scrapes.lock().unwrap().push((s.elapsed(), body.len()));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let busy: Vec<Instant> = seen
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|i| *i >= t && *i <= t + Duration::from_secs(3))
        .collect();

    let mut times: Vec<Duration> = scrapes.lock().unwrap().iter().map(|(d, _)| *d).collect();
    times.sort();
    let size = scrapes.lock().unwrap().first().map_or(0, |(_, n)| *n);
    let max = |g: Vec<Duration>| g.into_iter().max().unwrap_or_default();
    eprintln!(
        "{} scrapes of {size} bytes: median {:?}, max {:?}",
        times.len(),
        times.get(times.len() / 2).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default()
    );
    eprintln!(
        "probes every 100 ms: quiet {} in 2 s (largest gap {:?}); while scraping {} in 3 s (largest gap {:?})",
        quiet.len(),
        max(gaps(&quiet)),
        busy.len(),
        max(gaps(&busy))
    );
    assert!(times.len() >= 4, "{} scrapes", times.len());
    // 30 probes are due in 3 s; a control loop busy rendering would let through far fewer.
    assert!(busy.len() >= 20, "{} probes while scraping", busy.len());
}
