//! SIGHUP reload: applied without cutting a connection or failing a new one, each new topology
//! in effect once the reload is logged; a bad file changes nothing and is counted; an
//! unchanged file is a no-op; removed backends and frontends drain within shutdown_timeout.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn status(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get(admin, "/status")).unwrap()
}

/// Waits for the reload that `mark` started to be logged as applied (or unchanged).
fn wait_reload(lb: &Ringlb, mark: usize, needle: &str) {
    if lb.wait_for_log_after(mark, needle, SOON).is_none() {
        panic!(
            "no {needle:?} after the reload:\n{}",
            lb.logs()[mark..].join("\n")
        );
    }
}

/// The (frontend "web") backend configuration at one step of the reload storm: a rotating
/// four of the six backends, weights that change every step.
fn web_backends(step: usize) -> Vec<(usize, u32)> {
    (0..6)
        .filter(|j| (step + j) % 3 != 0)
        .map(|j| (j, 1 + ((step * (j + 1)) % 3) as u32))
        .collect()
}

#[test]
fn twenty_reloads_under_load_cut_no_connection_fail_no_new_one_and_each_takes_effect() {
    let pool: Vec<Backend> = (0..6)
        .map(|i| Backend::start(&format!("n{i}"), Behaviour::Named))
        .collect();
    let extra_backend = Backend::start("x0", Behaviour::Named);
    let config = |step: usize| {
        let members = web_backends(step);
        let weights: Vec<String> = members
            .iter()
            .map(|(_, w)| format!("weight = {w}"))
            .collect();
        let backends: Vec<(&str, SocketAddr, &str)> = members
            .iter()
            .zip(&weights)
            .map(|((j, _), w)| (pool[*j].name.as_str(), pool[*j].addr, w.as_str()))
            .collect();
        // Long drains, so that no connection on a removed backend is closed by the limit.
        let mut c = "[global]\nworkers = 2\nshutdown_timeout = \"120s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n"
            .to_string();
        c += &frontend_toml("web", "balance = \"round-robin\"", &backends);
        // A second frontend comes and goes.
        if step % 4 == 1 || step % 4 == 2 {
            c += &frontend_toml("extra", "", &[("x0", extra_backend.addr, "")]);
        }
        c
    };
    let lb = Ringlb::start(&config(0));
    let admin = lb.admin.unwrap();
    let web = lb.addr("web");
    let stop = Arc::new(AtomicBool::new(false));
    let total_rounds = Arc::new(AtomicUsize::new(0));
    let broken = Arc::new(Mutex::new(Vec::<String>::new()));

    // Long-lived connections streaming data both ways the whole time.
    let streams: Vec<_> = (0..6)
        .map(|i| {
            let (stop, broken, total) = (stop.clone(), broken.clone(), total_rounds.clone());
            std::thread::spawn(move || -> usize {
                let run = || -> std::io::Result<usize> {
                    let mut s = TcpStream::connect(web)?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    let mut name = [0u8; 3];
                    s.read_exact(&mut name)?;
                    let mut rounds = 0;
                    let mut back = vec![0u8; 16 * 1024];
                    while !stop.load(Ordering::SeqCst) {
                        let chunk: Vec<u8> = (0..back.len())
                            .map(|k| (k * 31 + rounds * 7 + i) as u8)
                            .collect();
                        s.write_all(&chunk)?;
                        s.read_exact(&mut back)?;
                        if back != chunk {
                            return Err(std::io::Error::other("echo differs"));
                        }
                        rounds += 1;
                        total.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    s.shutdown(Shutdown::Write)?;
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest)?;
                    Ok(rounds)
                };
                run().unwrap_or_else(|e| {
                    broken.lock().unwrap().push(format!("stream {i}: {e}"));
                    0
                })
            })
        })
        .collect();
    // New connections arriving the whole time.
    let asked = Arc::new(AtomicUsize::new(0));
    let askers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, broken, asked) = (stop.clone(), broken.clone(), asked.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match ask_name(web) {
                        Ok(_) => {
                            asked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => broken.lock().unwrap().push(format!("new connection: {e}")),
                    }
                }
            })
        })
        .collect();

    for step in 1..=20 {
        // Every reload lands while the streams are moving data.
        let before = total_rounds.load(Ordering::SeqCst);
        assert!(
            wait_until(SOON, || total_rounds.load(Ordering::SeqCst) >= before + 12),
            "streams stalled before step {step}"
        );
        let mark = lb.reload(&config(step));
        wait_reload(&lb, mark, "reload: applied");
        // The configuration in effect is the new one, weights included...
        let want: BTreeMap<String, u64> = web_backends(step)
            .iter()
            .map(|(j, w)| (format!("n{j}"), u64::from(*w)))
            .collect();
        let s = status(admin);
        let fe = s["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "web")
            .unwrap();
        let got: BTreeMap<String, u64> = fe["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["state"] != "draining")
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["weight"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "step {step}");
        // ...and new connections go to its backends, every one of them, and nowhere else.
        let mut seen = HashSet::new();
        for _ in 0..300 {
            let name = ask_name(web).unwrap_or_else(|e| panic!("step {step}: {e}"));
            assert!(
                want.contains_key(&name),
                "step {step}: {name} is not in {want:?}"
            );
            seen.insert(name);
            if seen.len() == want.len() {
                break;
            }
        }
        assert_eq!(
            seen.len(),
            want.len(),
            "step {step}: only {seen:?} of {want:?}"
        );
        if step % 4 == 1 {
            let line = lb
                .wait_for_log_after(mark, "frontend extra listening on ", SOON)
                .unwrap();
            let addr: SocketAddr = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert_eq!(ask_name(addr).unwrap(), "x0", "step {step}");
        }
        if step % 4 == 3 {
            lb.wait_for_log_after(mark, "frontend extra stopped listening", SOON)
                .unwrap_or_else(|| panic!("step {step}: extra frontend not removed"));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let rounds: Vec<usize> = streams.into_iter().map(|t| t.join().unwrap()).collect();
    for a in askers {
        a.join().unwrap();
    }
    let broken = broken.lock().unwrap();
    assert!(
        broken.is_empty(),
        "{} failures: {:?}",
        broken.len(),
        &broken[..broken.len().min(10)]
    );
    assert!(
        rounds.iter().all(|&r| r > 0),
        "a stream made no progress: {rounds:?}"
    );
    assert!(asked.load(Ordering::SeqCst) > 0);
    assert_eq!(
        sample(
            admin,
            "ringlb_config_reloads_total",
            &[("result", "success")]
        ),
        Some(20.0)
    );
    assert_eq!(
        sample(
            admin,
            "ringlb_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(0.0)
    );
    assert_eq!(sample(admin, "ringlb_config_generation", &[]), Some(21.0));
    eprintln!(
        "reload storm: {} echo rounds on 6 streams, {} new connections, 0 failures",
        rounds.iter().sum::<usize>(),
        asked.load(Ordering::SeqCst)
    );
}

#[test]
fn a_broken_config_is_refused_logged_and_counted_while_the_old_one_keeps_serving() {
    let a = Backend::start("a1", Behaviour::Named);
    let good = global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")]);
    let lb = Ringlb::start(&good);
    let admin = lb.admin.unwrap();
    let web = lb.addr("web");
    let mut held = TcpStream::connect(web).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut name = [0u8; 3];
    held.read_exact(&mut name).unwrap();

    // A TOML syntax error, a valid file with invalid values, and a listener that cannot bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cannot_bind = global_toml("")
        + &frontend_toml("web", "", &[("a1", a.addr, "")])
        + &format!(
            "[[frontend]]\nname = \"more\"\nlisten = [\"{}\"]\n[[frontend.backend]]\nname = \"a1\"\naddress = \"{}\"\n",
            taken.local_addr().unwrap(),
            a.addr
        );
    let bad = [
        ("[[frontend]\nname = ", "reload failed"),
        (
            &*(global_toml("")
                + &frontend_toml(
                    "web",
                    "retries = -1\nconect_timeout = \"1s\"",
                    &[("a1", a.addr, "weight = 0")],
                )),
            "reload failed",
        ),
        (&*cannot_bind, "cannot listen on"),
    ];
    for (n, (text, needle)) in bad.iter().enumerate() {
        let mark = lb.reload(text);
        let line = lb
            .wait_for_log_after(mark, needle, SOON)
            .unwrap_or_else(|| {
                panic!("case {n}: no {needle:?}:\n{}", lb.logs()[mark..].join("\n"))
            });
        assert!(line.contains("ERROR"), "{line}");
        assert!(
            lb.wait_for_log_after(mark, "still serving the previous configuration", SOON)
                .is_some(),
            "case {n}"
        );
        assert_eq!(ask_name(web).unwrap(), "a1", "case {n}");
        assert_eq!(
            sample(
                admin,
                "ringlb_config_reloads_total",
                &[("result", "failure")]
            ),
            Some(n as f64 + 1.0)
        );
    }
    // Every problem of the invalid file is reported, each with its line, column and path, as
    // `ringlb check` reports them (global_toml takes lines 1-8, the frontend starts at 9).
    let log = lb.logs().join("\n");
    assert!(
        log.contains(":12:11: frontend \"web\": retries: -1 is out of range"),
        "{log}"
    );
    assert!(
        log.contains(":13:1: frontend \"web\": unknown key `conect_timeout`: did you mean `connect_timeout`?"),
        "{log}"
    );
    assert!(
        log.contains(": frontend \"web\": backend \"a1\": weight: 0 is not allowed"),
        "{log}"
    );
    let s = status(admin);
    assert_eq!(s["reloads"]["failed"], 3);
    assert!(s["reloads"]["last_error"]
        .as_str()
        .unwrap()
        .contains("cannot listen"));
    assert_eq!(sample(admin, "ringlb_config_generation", &[]), Some(1.0));
    assert_eq!(
        sample(
            admin,
            "ringlb_config_reloads_total",
            &[("result", "success")]
        ),
        Some(0.0)
    );
    // The connection open all along still works; a good file then applies normally.
    held.write_all(b"hi").unwrap();
    let mut back = [0u8; 2];
    held.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hi");
    let b = Backend::start("b1", Behaviour::Named);
    let mark = lb.reload(
        &(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, ""), ("b1", b.addr, "")])),
    );
    wait_reload(&lb, mark, "reload: applied: frontend web: +b1");
    assert_eq!(
        sample(
            admin,
            "ringlb_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    assert!(status(admin)["reloads"]["last_error"].is_null());
}

#[test]
fn an_unchanged_file_is_a_no_op_and_kept_backends_keep_their_counters() {
    let a = Backend::start("a1", Behaviour::Named);
    let cfg = global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    for _ in 0..3 {
        assert_eq!(ask_name(lb.addr("web")).unwrap(), "a1");
    }
    let a1_total = |admin| {
        sample(
            admin,
            "ringlb_backend_connections_total",
            &[("frontend", "web"), ("backend", "a1")],
        )
    };
    assert!(wait_until(SOON, || a1_total(admin) == Some(3.0)));
    let generation = status(admin)["snapshot_generation"].as_u64().unwrap();

    let mark = lb.reload(&cfg);
    wait_reload(&lb, mark, "reload: configuration unchanged");
    let s = status(admin);
    assert_eq!(
        s["snapshot_generation"].as_u64().unwrap(),
        generation,
        "republished"
    );
    assert_eq!(s["config_generation"], 1);
    assert_eq!(s["reloads"]["ok"], 1);
    let line = |l: &String| l.contains("listening on") || l.contains("stopped listening");
    assert!(!lb.logs()[mark..].iter().any(line), "listeners touched");

    // Adding a backend keeps a1's state and counters.
    let b = Backend::start("b1", Behaviour::Named);
    let mark = lb.reload(
        &(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, ""), ("b1", b.addr, "")])),
    );
    wait_reload(&lb, mark, "reload: applied");
    assert_eq!(a1_total(admin), Some(3.0));
    let s = status(admin);
    let a1 = &s["frontends"][0]["backends"][0];
    assert_eq!(
        (a1["name"].as_str(), a1["connections_total"].as_u64()),
        (Some("a1"), Some(3))
    );
    assert_eq!(s["config_generation"], 2);
}

#[test]
fn a_removed_frontend_stops_listening_and_its_open_connections_finish() {
    let a = Backend::start("a1", Behaviour::Named);
    let o = Backend::start("o1", Behaviour::Named);
    let both = global_toml("")
        + &frontend_toml("web", "", &[("a1", a.addr, "")])
        + &frontend_toml("old", "", &[("o1", o.addr, "")]);
    let lb = Ringlb::start(&both);
    let old = lb.addr("old");
    let mut held = TcpStream::connect(old).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut name = [0u8; 3];
    held.read_exact(&mut name).unwrap();
    assert_eq!(&name, b"o1\n");

    let mark = lb.reload(&(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    wait_reload(&lb, mark, "reload: applied: frontend old removed");
    lb.wait_for_log_after(mark, "frontend old stopped listening", SOON)
        .unwrap();
    assert!(
        wait_until(SOON, || TcpStream::connect(old).is_err()),
        "the removed frontend still accepts"
    );
    let s = status(lb.admin.unwrap());
    let removed = s["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "old")
        .expect("the removed frontend is listed while it drains");
    assert_eq!(removed["removed"], true);
    assert_eq!(removed["backends"][0]["state"], "draining");
    for _ in 0..3 {
        held.write_all(b"still here").unwrap();
        let mut back = [0u8; 10];
        held.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"still here");
    }
    assert_eq!(ask_name(lb.addr("web")).unwrap(), "a1");
}

#[test]
fn connections_on_a_removed_backend_are_closed_once_shutdown_timeout_passes() {
    let a = Backend::start("a1", Behaviour::Named);
    let b = Backend::start("b1", Behaviour::Named);
    let global =
        "[global]\nworkers = 2\nshutdown_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n";
    let lb =
        Ringlb::start(&(global.to_string() + &frontend_toml("web", "", &[("b1", b.addr, "")])));
    let mut held = TcpStream::connect(lb.addr("web")).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut name = [0u8; 3];
    held.read_exact(&mut name).unwrap();

    let mark = lb.reload(&(global.to_string() + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    wait_reload(&lb, mark, "reload: applied");
    lb.wait_for_log_after(
        mark,
        "Server web/b1 removed by reload: closing 1 connections",
        SOON,
    )
    .expect("the drain limit is logged");
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(ask_name(lb.addr("web")).unwrap(), "a1");
}

#[test]
fn a_backend_added_back_before_its_drain_limit_keeps_its_connections_and_counters() {
    let a = Backend::start("a1", Behaviour::Named);
    let b = Backend::start("b1", Behaviour::Named);
    let global =
        "[global]\nworkers = 2\nshutdown_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n";
    let with_b = global.to_string() + &frontend_toml("web", "", &[("b1", b.addr, "")]);
    let lb = Ringlb::start(&with_b);
    let admin = lb.admin.unwrap();
    let mut held = TcpStream::connect(lb.addr("web")).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut name = [0u8; 3];
    held.read_exact(&mut name).unwrap();
    assert_eq!(&name, b"b1\n");

    // Removed, then back (say, an edit undone) well within the 1 s drain limit.
    let mark = lb.reload(&(global.to_string() + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    wait_reload(&lb, mark, "reload: applied");
    let mark = lb.reload(&with_b);
    wait_reload(&lb, mark, "reload: applied");
    let s = status(admin);
    let rows = s["frontends"][0]["backends"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{s}");
    assert_eq!(rows[0]["state"], "up");
    assert_eq!(
        rows[0]["active"], 1,
        "the open connection is counted on the re-added backend"
    );
    assert_eq!(rows[0]["connections_total"], 1);

    // Past the drain limit, the connection is still open and working.
    std::thread::sleep(Duration::from_millis(2500));
    held.write_all(b"ok?").unwrap();
    let mut back = [0u8; 3];
    held.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ok?");
    assert!(
        !lb.logs()[mark..]
            .iter()
            .any(|l| l.contains("removed by reload: closing")),
        "{:?}",
        lb.logs()
    );
}

#[test]
fn a_frontend_moved_to_another_address_serves_there_and_its_open_connections_finish() {
    let a = Backend::start("a1", Behaviour::Named);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    let old = lb.addr("web");
    let mut held = TcpStream::connect(old).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut name = [0u8; 3];
    held.read_exact(&mut name).unwrap();

    // Same frontend, now on 127.0.0.2 (still loopback) instead of 127.0.0.1.
    let moved = global_toml("")
        + &frontend_toml("web", "", &[("a1", a.addr, "")])
            .replace("listen = [\"127.0.0.1:0\"]", "listen = [\"127.0.0.2:0\"]");
    let mark = lb.reload(&moved);
    let applied = lb
        .wait_for_log_after(mark, "reload: applied", SOON)
        .unwrap();
    assert!(
        applied.contains("+listen 127.0.0.2:0") && applied.contains("-listen 127.0.0.1:0"),
        "{applied}"
    );
    let line = lb
        .wait_for_log_after(mark, "frontend web listening on ", SOON)
        .unwrap();
    let new: SocketAddr = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(new.ip().to_string(), "127.0.0.2");
    // The new listener was bound before the old one was closed.
    let logs = lb.logs();
    let pos = |needle: &str| {
        logs.iter()
            .skip(mark)
            .position(|l| l.contains(needle))
            .unwrap()
    };
    assert!(pos("frontend web listening on 127.0.0.2") < pos("frontend web stopped listening on"));
    assert_eq!(ask_name(new).unwrap(), "a1");
    assert!(wait_until(SOON, || TcpStream::connect(old).is_err()));
    held.write_all(b"abc").unwrap();
    let mut back = [0u8; 3];
    held.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"abc");
}

#[test]
fn a_backend_marked_down_by_checks_stays_down_across_a_reload_that_keeps_it() {
    let a = Backend::start("a1", Behaviour::Named);
    let dead = refused_addr();
    let fast = "health = { interval = \"100ms\", rise = 1, fall = 1 }";
    let cfg = |extra: &[(&str, SocketAddr, &str)]| {
        let mut backends = vec![("a1", a.addr, fast), ("d1", dead, fast)];
        backends.extend_from_slice(extra);
        global_toml("") + &frontend_toml("web", "", &backends)
    };
    let lb = Ringlb::start(&cfg(&[]));
    let admin = lb.admin.unwrap();
    let d1 = |s: &serde_json::Value| {
        s["frontends"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "d1")
            .unwrap()
            .clone()
    };
    assert!(wait_until(SOON, || d1(&status(admin))["state"] == "down"));
    let changes = d1(&status(admin))["state_changes_total"].clone();

    let b = Backend::start("b1", Behaviour::Named);
    let mark = lb.reload(&cfg(&[("b1", b.addr, "")]));
    wait_reload(&lb, mark, "reload: applied: frontend web: +b1");
    // Right after the reload: still down, same history, and no traffic sent to it.
    let s = d1(&status(admin));
    assert_eq!(s["state"], "down", "{s}");
    assert_eq!(s["state_changes_total"], changes);
    for _ in 0..10 {
        assert_ne!(ask_name(lb.addr("web")).unwrap(), "d1");
    }
    assert_eq!(d1(&status(admin))["connect_failures_total"], 0);
}

/// 200 clients keep connecting to frontend "web" on its first address, each exchanging a few
/// bytes per connection, until one of their connects is refused; meanwhile a reload takes the
/// address away (`moved`: the frontend listens elsewhere; otherwise the frontend is removed).
/// Every connection the kernel accepted is served; the clients after the close are refused,
/// never reset.
fn clients_connecting_through_a_listener_removal_are_served_or_refused(moved: bool, io: &str) {
    let global = global_toml(&format!("io = \"{io}\""));
    let echo = Backend::start("e1", Behaviour::Echo);
    let other = Backend::start("o1", Behaviour::Named);
    let keep = frontend_toml("other", "", &[("o1", other.addr, "")]);
    let web = frontend_toml("web", "", &[("e1", echo.addr, "")]);
    let lb = Ringlb::start(&(global.clone() + &web + &keep));
    let old = lb.addr("web");
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let served = served.clone();
            std::thread::spawn(move || -> Result<usize, String> {
                let mut refused_after = 0;
                loop {
                    let mut s = match TcpStream::connect_timeout(&old, Duration::from_secs(20)) {
                        Ok(s) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            return Ok(refused_after);
                        }
                        Err(e) => return Err(format!("connect: {e}")),
                    };
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut back = [0u8; 4];
                    s.write_all(b"ping")
                        .and_then(|()| s.read_exact(&mut back))
                        .map_err(|e| format!("accepted, then: {e}"))?;
                    if &back != b"ping" {
                        return Err(format!("got {back:?}"));
                    }
                    served.fetch_add(1, Ordering::Relaxed);
                    refused_after += 1;
                }
            })
        })
        .collect();
    assert!(
        wait_until(SOON, || served.load(Ordering::Relaxed) >= 2000),
        "the clients do not get going"
    );
    let next = if moved {
        web.replace("listen = [\"127.0.0.1:0\"]", "listen = [\"127.0.0.2:0\"]") + &keep
    } else {
        keep.clone()
    };
    let mark = lb.reload(&(global + &next));
    wait_reload(&lb, mark, "reload: applied");
    let mut failures = Vec::new();
    for c in clients {
        if let Err(e) = c.join().unwrap() {
            failures.push(e);
        }
    }
    eprintln!(
        "{} connections served; {} of 200 clients failed",
        served.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of 200 clients saw a failure, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(ask_name(lb.addr("other")).unwrap(), "o1");
}

#[test]
fn a_frontend_moved_off_an_address_serves_its_listen_queue_then_refuses_cleanly() {
    clients_connecting_through_a_listener_removal_are_served_or_refused(true, "io_uring");
}

#[test]
fn on_the_epoll_fallback_a_moved_listener_serves_its_queue_then_refuses_cleanly() {
    clients_connecting_through_a_listener_removal_are_served_or_refused(true, "epoll");
}

#[test]
fn a_removed_frontend_serves_its_listen_queue_then_refuses_cleanly() {
    clients_connecting_through_a_listener_removal_are_served_or_refused(false, "io_uring");
}

#[test]
fn a_backend_removed_and_added_back_continues_its_counters_instead_of_jumping() {
    // A -> B -> A: the backend's state is gone in between (nothing held it), so it comes back
    // with fresh atomics; its Prometheus series must continue from what it had exported.
    let a = Backend::start("a1", Behaviour::Named);
    let b = Backend::start("b1", Behaviour::Named);
    let with_a = global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")]);
    let with_b = global_toml("") + &frontend_toml("web", "", &[("b1", b.addr, "")]);
    let lb = Ringlb::start(&with_a);
    let admin = lb.admin.unwrap();
    let (name, labels) = (
        "ringlb_backend_connections_total",
        [("frontend", "web"), ("backend", "a1")],
    );
    let series = format!("{name} {labels:?}");
    let mut exported = Vec::new();
    for round in 0..3 {
        for _ in 0..20 {
            assert_eq!(ask_name(lb.addr("web")).unwrap(), "a1");
        }
        let want = 20.0 * (round + 1) as f64;
        assert!(
            wait_until(SOON, || sample(admin, name, &labels) == Some(want)),
            "round {round}: {series} = {:?}, want {want} (earlier: {exported:?})",
            sample(admin, name, &labels)
        );
        exported.push(want);
        let mark = lb.reload(&with_b);
        wait_reload(&lb, mark, "reload: applied");
        assert!(wait_until(SOON, || a.open() == 0));
        // Drained: the removed backend is no longer listed.
        assert!(wait_until(SOON, || {
            !status(admin).to_string().contains("\"a1\"")
        }));
        let mark = lb.reload(&with_a);
        wait_reload(&lb, mark, "reload: applied");
        assert!(
            sample(admin, name, &labels).unwrap_or(want) >= want,
            "went backwards"
        );
    }
}

#[test]
fn a_changed_frontend_keeps_its_listening_sockets() {
    let a = Backend::start("a1", Behaviour::Named);
    let b = Backend::start("b1", Behaviour::Named);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")])));
    let addr = lb.addr("web");
    // The inodes of the sockets listening on the frontend's port (/proc/net/tcp: local
    // address, state 0A = LISTEN, inode in the tenth column).
    let inodes = || {
        let port = format!(":{:04X}", addr.port());
        let mut v: Vec<u64> = std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].ends_with(&port) && f[3] == "0A").then(|| f[9].parse().unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let before = inodes();
    // A client waiting in the listen queue across the reload.
    let queued = TcpStream::connect(addr).unwrap();
    let changed = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\nretries = 1",
            &[("a1", a.addr, "weight = 2"), ("b1", b.addr, "")],
        );
    let mark = lb.reload(&changed);
    wait_reload(&lb, mark, "reload: applied: frontend web:");
    assert!(
        !lb.logs()[mark..].iter().any(|l| l.contains("listening on")),
        "{:?}",
        &lb.logs()[mark..]
    );
    assert_eq!(before.len(), 2, "one listener per worker");
    assert_eq!(
        inodes(),
        before,
        "the reload replaced the listening sockets"
    );
    let mut queued = queued;
    queued.set_read_timeout(Some(SOON)).unwrap();
    let mut name = [0u8; 3];
    queued.read_exact(&mut name).unwrap();
    assert_eq!(&name, b"a1\n");
}
