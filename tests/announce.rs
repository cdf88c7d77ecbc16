//! Readiness for route announcement: `/ready` follows the backends' health, `on_ready` /
//! `on_unready` commands run on each change, and a SIGTERM'd ringlb turns unready first and
//! keeps accepting for `grace` before it stops (docs/scale-out.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const FAST_CHECKS: &str = "[frontend.health]\ninterval = \"100ms\"\nrise = 1\nfall = 1\n";

/// The lines the announce commands appended to `file`.
fn announced(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn ready_status(r: &Ringlb, path: &str) -> u16 {
    http(r.admin.unwrap(), "GET", path).0
}

fn config(backend: std::net::SocketAddr, file: &Path, global: &str) -> String {
    let settings = format!(
        "balance = \"maglev\"\n\
         on_ready = [\"sh\", \"-c\", \"echo ready >> {f}\"]\n\
         on_unready = [\"sh\", \"-c\", \"echo unready >> {f}\"]\n{FAST_CHECKS}",
        f = file.display()
    );
    global_toml(global) + &frontend_toml("web", &settings, &[("b1", backend, "")])
}

#[test]
fn readiness_follows_the_backends_and_runs_the_commands() {
    let dir = TempDir::new();
    let file = dir.path.join("announce.log");
    let b1 = Backend::start("b1", Behaviour::Named);
    let addr = b1.addr;
    let r = Ringlb::start(&config(addr, &file, ""));
    assert!(
        wait_until(SOON, || announced(&file).first().map(String::as_str)
            == Some("ready")),
        "on_ready did not run: {:?}\n{}",
        announced(&file),
        r.logs().join("\n")
    );
    assert_eq!(ready_status(&r, "/ready/web"), 200);
    assert_eq!(ready_status(&r, "/ready"), 200);
    assert_eq!(ready_status(&r, "/ready/nope"), 404);
    let metrics = get(r.admin.unwrap(), "/metrics");
    assert!(
        metrics.contains("ringlb_frontend_ready{frontend=\"web\"} 1"),
        "{metrics}"
    );
    let fp = metrics
        .lines()
        .find(|l| l.starts_with("ringlb_maglev_table_fingerprint{frontend=\"web\"}"))
        .unwrap_or_else(|| panic!("no fingerprint: {metrics}"));
    assert!(!fp.ends_with(" 0"), "{fp}");

    // The only backend dies: not ready, on_unready runs.
    b1.stop();
    assert!(
        wait_until(SOON, || announced(&file).last().map(String::as_str)
            == Some("unready")),
        "on_unready did not run: {:?}",
        announced(&file)
    );
    assert_eq!(ready_status(&r, "/ready/web"), 503);
    assert_eq!(ready_status(&r, "/ready"), 503);
    assert!(r
        .wait_for_log("frontend web is not ready: no backend is available", SOON)
        .is_some());

    // It comes back: ready again.
    let _b1 = Backend::start_on(addr, "b1", Behaviour::Named);
    assert!(
        wait_until(SOON, || announced(&file).last().map(String::as_str)
            == Some("ready")),
        "on_ready did not run again: {:?}",
        announced(&file)
    );
    assert_eq!(ready_status(&r, "/ready/web"), 200);
    // A command is counted once ringlb has reaped it, after the line it wrote is in the file.
    let mut metrics = String::new();
    assert!(
        wait_until(SOON, || {
            metrics = get(r.admin.unwrap(), "/metrics");
            metrics.contains(
                "ringlb_frontend_announce_commands_total{frontend=\"web\",result=\"ok\"} 3",
            ) || metrics.contains(
                "ringlb_frontend_announce_commands_total{result=\"ok\",frontend=\"web\"} 3",
            )
        }),
        "{metrics}"
    );
}

#[test]
fn a_failing_command_is_logged_and_counted() {
    let b1 = Backend::start("b1", Behaviour::Named);
    let settings = format!(
        "on_ready = [\"sh\", \"-c\", \"echo no such protocol >&2; exit 3\"]\n{FAST_CHECKS}"
    );
    let r = Ringlb::start(
        &(global_toml("") + &frontend_toml("web", &settings, &[("b1", b1.addr, "")])),
    );
    let line = r
        .wait_for_log("frontend web: on_ready:", SOON)
        .unwrap_or_else(|| panic!("no failure logged:\n{}", r.logs().join("\n")));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("exit status: 3: no such protocol"), "{line}");
    assert!(wait_until(SOON, || get(r.admin.unwrap(), "/metrics")
        .lines()
        .any(|l| l
            .starts_with("ringlb_frontend_announce_commands_total")
            && l.contains("failed")
            && !l.ends_with(" 0"))));
}

#[test]
fn sigterm_turns_unready_first_and_keeps_accepting_for_the_grace_period() {
    let dir = TempDir::new();
    let file = dir.path.join("announce.log");
    let b1 = Backend::start("b1", Behaviour::Named);
    let mut r = Ringlb::start(&config(b1.addr, &file, "grace = \"2s\""));
    assert!(wait_until(SOON, || announced(&file)
        .first()
        .map(String::as_str)
        == Some("ready")));
    let front = r.addr("web");
    r.signal(nix::sys::signal::Signal::SIGTERM);
    let term = Instant::now();
    assert!(
        wait_until(SOON, || announced(&file).last().map(String::as_str)
            == Some("unready")),
        "on_unready did not run on SIGTERM: {:?}",
        announced(&file)
    );
    assert_eq!(ready_status(&r, "/ready/web"), 503);
    // Withdrawn, but still serving new clients until the grace period ends.
    let mut served = 0;
    while term.elapsed() < Duration::from_millis(1500) {
        assert_eq!(ask_name(front).unwrap(), "b1");
        served += 1;
    }
    assert!(served > 0);
    let status = r.wait_exit(SOON).expect("ringlb did not stop");
    assert!(status.success(), "{status:?}");
    assert!(
        term.elapsed() >= Duration::from_secs(2),
        "stopped before the grace period ended"
    );
    assert!(r
        .logs()
        .iter()
        .any(|l| l.contains("still accepting for 2s (grace)")));
}

#[test]
fn bad_announce_config_is_refused_with_its_key() {
    let (ok, err) = check_config(
        "[global]\ngrace = \"soon\"\n[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\non_ready = []\n\
         [[frontend.backend]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n",
    );
    assert!(!ok);
    assert!(err.contains("grace"), "{err}");
    assert!(err.contains("on_ready"), "{err}");
    assert!(err.contains("empty"), "{err}");
}
