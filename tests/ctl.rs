#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! `ringlb ctl` against a real ringlb: drain under load, ready, maint, weight, enable and
//! disable, status in text and JSON, the token, the state kept across SIGHUP and a restart,
//! and exit codes a script can use.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .arg("ctl")
        .args(args)
        .output()
        .expect("run ringlb ctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs ctl and asserts its exit code; returns stdout.
fn ctl_ok(args: &[&str]) -> String {
    let o = ctl(args);
    assert_eq!(o.status.code(), Some(0), "ctl {args:?}: {}", stderr(&o));
    stdout(&o)
}

/// Connects, reads the `Named` backend's name line; returns the stream and the name.
fn open(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before the name");
        if byte[0] == b'\n' {
            break;
        }
        name.push(byte[0]);
    }
    (s, String::from_utf8(name).unwrap())
}

fn echo(s: &mut TcpStream, text: &[u8]) {
    s.write_all(text).unwrap();
    let mut back = vec![0u8; text.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, text);
}

struct Setup {
    lb: Ringlb,
    backends: Vec<Backend>,
    config: String,
    config_path: String,
    _dir: TempDir,
}

/// ringlb (round robin) in front of api1..api3, with its admin on a fixed port that the
/// config names, so that `ctl --config` finds it. `admin_extra` goes into `[admin]`. No
/// health checks: a drained backend is still checked, and a probe would count in its
/// `accepted()` as if a client had reached it.
fn setup(admin_extra: &str) -> Setup {
    let backends: Vec<Backend> = ["api1", "api2", "api3"]
        .iter()
        .map(|n| Backend::start(n, Behaviour::Named))
        .collect();
    let list: Vec<(&str, SocketAddr, &str)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.addr, "check = false"))
        .collect();
    let port = free_port();
    let config = global_toml("").replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:{port}\"\n{admin_extra}\n"),
    ) + &frontend_toml("web", "balance = \"round-robin\"", &list);
    let lb = Ringlb::start(&config);
    // ctl reads the same file ringlb runs with.
    let dir = TempDir::new();
    let config_path = dir.path.join("ringlb.toml");
    std::fs::write(&config_path, &config).unwrap();
    Setup {
        lb,
        backends,
        config,
        config_path: config_path.display().to_string(),
        _dir: dir,
    }
}

#[test]
fn ctl_drain_under_load_keeps_new_connections_off_api3_and_ready_brings_it_back() {
    let s = setup("");
    let addr = s.lb.addr("web");
    let cfg = s.config_path.as_str();
    // Established sessions, some on api3, kept busy by a thread for the whole test.
    let mut sessions: Vec<(TcpStream, String)> = (0..9).map(|_| open(addr)).collect();
    assert!(sessions.iter().any(|(_, n)| n == "api3"));
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (stream, _) in sessions.iter_mut() {
                    echo(stream, format!("round {rounds}\n").as_bytes());
                }
                rounds += 1;
            }
            (sessions, rounds)
        })
    };
    // Load: new connections all the time, each noting whether it began after the drain.
    let drained = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(bool, String)>>> = Arc::default();
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, drained, seen) = (stop.clone(), drained.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let after = drained.load(Ordering::SeqCst);
                    let (_, name) = open(addr);
                    seen.lock().unwrap().push((after, name));
                }
            })
        })
        .collect();
    assert!(wait_until(SOON, || seen.lock().unwrap().len() > 30));
    let out = ctl_ok(&["--config", cfg, "drain", "web/api3"]);
    assert!(out.contains("api3") && out.contains("drain"), "{out}");
    drained.store(true, Ordering::SeqCst);
    let accepted = s.backends[2].accepted();
    assert!(wait_until(SOON, || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(after, _)| *after)
            .count()
            > 100
    }));
    let status = ctl_ok(&["--config", cfg, "status"]);
    assert!(status.contains("drain"), "{status}");
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let (mut sessions, rounds) = busy.join().unwrap();
    assert!(rounds > 0);
    let seen = seen.lock().unwrap();
    let after: Vec<&String> = seen.iter().filter(|(a, _)| *a).map(|(_, n)| n).collect();
    assert!(
        after.iter().all(|n| *n != "api3"),
        "a connection begun after the drain reached api3"
    );
    assert!(
        seen.iter().any(|(a, n)| !*a && n == "api3"),
        "load never reached api3 before"
    );
    assert_eq!(
        s.backends[2].accepted(),
        accepted,
        "api3 accepted a new connection"
    );
    // The established ones are untouched: still echoing, then they finish cleanly.
    for (stream, _) in sessions.iter_mut() {
        echo(stream, b"after the drain\n");
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    let out = ctl_ok(&["--config", cfg, "ready", "web/api3"]);
    assert!(out.contains("ready"), "{out}");
    assert!(wait_until(SOON, || open(addr).1 == "api3"));
    s.lb.wait_for_log("Server web/api3 is UP (leaving forced drain)", SOON)
        .expect("ready line");
}

#[test]
fn ctl_status_weight_maint_enable_disable_in_text_and_json() {
    let s = setup("");
    let cfg = s.config_path.as_str();
    let out = ctl_ok(&["--config", cfg, "weight", "web/api2", "50"]);
    assert!(out.contains("weight 50 (configured 1)"), "{out}");
    let out = ctl_ok(&["--config", cfg, "maint", "web/api1"]);
    assert!(out.contains("maint"), "{out}");
    let text = ctl_ok(&["--config", cfg, "status"]);
    assert!(text.contains("frontend web: enabled"), "{text}");
    let api1 = text.lines().find(|l| l.contains("api1")).unwrap();
    assert!(api1.contains("maint"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["--config", cfg, "--json", "status"])).unwrap();
    assert_eq!(json["frontends"][0]["backends"][1]["weight"], 50);
    assert_eq!(json["frontends"][0]["backends"][0]["state"], "maint");
    let out = ctl_ok(&["--config", cfg, "disable", "web"]);
    assert!(out.contains("frontend web: disabled"), "{out}");
    let out = ctl_ok(&["--admin", &s.lb.admin.unwrap().to_string(), "enable", "web"]);
    assert!(
        out.contains("frontend web: enabled, listening on 127.0.0.1:"),
        "{out}"
    );
}

#[test]
fn ctl_exit_codes_tell_refused_usage_unreachable_and_not_allowed_apart() {
    let dir = TempDir::new();
    let token = dir.path.join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let wrong = dir.path.join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let s = setup(&format!("token_file = \"{}\"", token.display()));
    let cfg = s.config_path.as_str();
    let admin = s.lb.admin.unwrap().to_string();
    // Refused by ringlb: 1, with its reason.
    let o = ctl(&["--config", cfg, "weight", "web/api3", "999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("out of range"), "{}", stderr(&o));
    let o = ctl(&["--config", cfg, "drain", "web/nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no backend \"nope\""), "{}", stderr(&o));
    // Usage: 2.
    let o = ctl(&["--config", cfg, "drain", "api3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("FRONTEND/BACKEND"), "{}", stderr(&o));
    let o = ctl(&["--config", "/nonexistent/ringlb.toml", "status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read /nonexistent/ringlb.toml"));
    // Unreachable: 3.
    let closed = format!("127.0.0.1:{}", free_port());
    let o = ctl(&["--admin", &closed, "status"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains(&format!("cannot reach the admin listener at {closed}")),
        "{}",
        stderr(&o)
    );
    // Not allowed: 4. The token in the config is used; a wrong one or none is refused.
    let o = ctl(&["--admin", &admin, "drain", "web/api3"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    let o = ctl(&[
        "--config",
        cfg,
        "--token-file",
        &wrong.display().to_string(),
        "drain",
        "web/api3",
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["--config", cfg, "--json", "status"])).unwrap();
    assert_eq!(json["frontends"][0]["backends"][2]["state"], "ready");
    ctl_ok(&["--config", cfg, "drain", "web/api3"]);
}

#[test]
fn ctl_changes_survive_sighup_and_with_a_state_file_a_restart() {
    let dir = TempDir::new();
    let state = dir.path.join("state.json");
    let s = setup(&format!("state_file = \"{}\"", state.display()));
    let cfg_path = s.config_path.clone();
    let cfg = cfg_path.as_str();
    ctl_ok(&["--config", cfg, "drain", "web/api3"]);
    // kill -HUP with the same file: the runtime state stays.
    let mark = s.lb.reload(&s.config);
    s.lb.wait_for_log_after(mark, "reload: configuration unchanged", SOON)
        .expect("reload done");
    assert!(ctl_ok(&["--config", cfg, "status"])
        .lines()
        .any(|l| l.contains("api3") && l.contains("drain")));
    let Setup { lb, config, .. } = s;
    drop(lb);
    assert!(Path::new(&state).exists());
    // The same config (same admin port) started again: api3 is still drained.
    let lb = Ringlb::start(&config);
    assert!(ctl_ok(&["--config", cfg, "status"])
        .lines()
        .any(|l| l.contains("api3") && l.contains("drain")));
    for _ in 0..20 {
        assert_ne!(open(lb.addr("web")).1, "api3");
    }
}
