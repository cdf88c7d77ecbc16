#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The runtime API on the admin listener: drain, ready, maint, weight, frontend disable, who
//! may write, bad input, and the state kept across SIGHUP and a restart. Real ringlb
//! processes, real backends, real sockets; the non-loopback case runs ringlb in a network
//! namespace of its own.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::*;
use serde_json::Value;

/// One request with optional extra header lines and body; returns (status, body as JSON or
/// `Value::Null` if it is not JSON).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn post(admin: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    request(admin, "POST", path, &[], Some(body))
}

fn backend_state(admin: SocketAddr, fe: &str, be: &str) -> Value {
    let (code, v) = request(admin, "GET", &format!("/api/backends/{fe}/{be}"), &[], None);
    assert_eq!(code, 200, "{v}");
    v
}

/// An open connection through ringlb to a `Named` backend: which one it reached.
struct Session {
    stream: TcpStream,
    backend: String,
}

impl Session {
    fn open(addr: SocketAddr) -> Session {
        Session::open_from(addr, [127, 0, 0, 1])
    }

    /// From a given loopback source address (Maglev hashes the client's address).
    fn open_from(addr: SocketAddr, src: [u8; 4]) -> Session {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let from: SocketAddr = (std::net::Ipv4Addr::from(src), 0).into();
        sock.bind(&from.into()).unwrap();
        sock.connect(&addr.into()).unwrap();
        let mut stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(SOON)).unwrap();
        let mut name = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed before the name");
            if byte[0] == b'\n' {
                break;
            }
            name.push(byte[0]);
        }
        Session {
            stream,
            backend: String::from_utf8(name).unwrap(),
        }
    }

    /// A round trip on the established connection.
    fn echo(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
        let mut back = vec![0u8; text.len()];
        self.stream.read_exact(&mut back).unwrap();
        assert_eq!(back, text.as_bytes());
    }
}

fn three_named() -> Vec<Backend> {
    ["api1", "api2", "api3"]
        .iter()
        .map(|n| Backend::start(n, Behaviour::Named))
        .collect()
}

fn config_for(balance: &str, backends: &[Backend], admin_extra: &str) -> String {
    let list: Vec<(&str, SocketAddr, &str)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.addr, ""))
        .collect();
    let global = global_toml("").replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\n{admin_extra}\n"),
    );
    global + &frontend_toml("web", &format!("balance = \"{balance}\""), &list)
}

#[test]
fn drain_under_load_keeps_new_connections_off_the_backend_and_lets_established_ones_finish() {
    for balance in ["round-robin", "least-connections", "maglev"] {
        let backends = three_named();
        let lb = Ringlb::start(&config_for(balance, &backends, ""));
        let admin = lb.admin.unwrap();
        let addr = lb.addr("web");
        // Maglev places one client address on one backend: sessions come from several
        // loopback source addresses until api3 has some.
        let mut sessions: Vec<(Session, [u8; 4])> = Vec::new();
        for i in 2..120u8 {
            let src = [127, 0, 0, i];
            sessions.push((Session::open_from(addr, src), src));
            if sessions.iter().filter(|(s, _)| s.backend == "api3").count() >= 3 {
                break;
            }
        }
        let api3_clients: Vec<[u8; 4]> = sessions
            .iter()
            .filter(|(s, _)| s.backend == "api3")
            .map(|(_, src)| *src)
            .collect();
        assert!(
            !api3_clients.is_empty(),
            "{balance}: no session reached api3"
        );
        let (code, v) = post(admin, "/api/backends/web/api3", r#"{"state":"drain"}"#);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["state"], "drain");
        lb.wait_for_log("Server web/api3 enters drain state.", SOON)
            .expect("drain line");
        let before = backends[2].accepted();
        for i in 0..60u8 {
            // api3's own clients too: Maglev walks them on to the next entry.
            let src = api3_clients[usize::from(i) % api3_clients.len()];
            let s = Session::open_from(
                addr,
                if i % 2 == 0 {
                    src
                } else {
                    [127, 0, 0, 200 + i % 50]
                },
            );
            assert_ne!(
                s.backend, "api3",
                "{balance}: connection {i} reached a drained api3"
            );
        }
        assert_eq!(backends[2].accepted(), before, "{balance}");
        // Established sessions on api3 are untouched.
        for (s, _) in sessions.iter_mut() {
            s.echo("still here\n");
        }
        let (code, _) = post(admin, "/api/backends/web/api3", r#"{"state":"ready"}"#);
        assert_eq!(code, 200);
        lb.wait_for_log("Server web/api3 is UP (leaving forced drain)", SOON)
            .expect("ready line");
        if balance == "maglev" {
            // The drained backend stayed in the table: its clients land on it again.
            let src = api3_clients[0];
            assert_eq!(Session::open_from(addr, src).backend, "api3", "maglev");
        } else {
            // Least-connections would rightly avoid api3 while it holds more sessions than
            // the others: close them all first.
            sessions.clear();
            assert!(
                wait_until(SOON, || Session::open(addr).backend == "api3"),
                "{balance}: api3 never came back: {}",
                get(admin, "/status")
            );
        }
        drop(sessions);
    }
}

#[test]
fn maint_takes_the_backend_out_pauses_its_checks_and_shows_in_metrics() {
    let backends = three_named();
    let lb = Ringlb::start(&config_for("round-robin", &backends, ""));
    let admin = lb.admin.unwrap();
    let (code, v) = post(admin, "/api/backends/web/api2", r#"{"state":"maint"}"#);
    assert_eq!(code, 200, "{v}");
    lb.wait_for_log("Server web/api2 is going DOWN for maintenance.", SOON)
        .expect("maint line");
    // Checks paused: the backend dies and nobody notices while it is in maintenance.
    backends[1].stop();
    let mark = lb.log_len();
    for _ in 0..30 {
        assert_ne!(Session::open(lb.addr("web")).backend, "api2");
    }
    let metrics = get(admin, "/metrics");
    assert!(
        metrics.contains("ringlb_backend_admin_state{frontend=\"web\",backend=\"api2\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringlb_admin_writes_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    let status: Value = serde_json::from_str(&get(admin, "/status")).unwrap();
    let row = &status["frontends"][0]["backends"][1];
    assert_eq!(row["state"], "maint");
    assert_eq!(row["health"], "up", "a paused check flipped the verdict");
    // Back to ready: checks resume, find it dead, and mark it down.
    post(admin, "/api/backends/web/api2", r#"{"state":"ready"}"#);
    lb.wait_for_log("Server web/api2 is UP (leaving maintenance)", SOON)
        .expect("leaving maintenance line");
    lb.wait_for_log_after(mark, "Server web/api2 is DOWN", SOON)
        .expect("checks resumed");
}

#[test]
fn a_runtime_weight_reaches_the_round_robin_schedule_and_reverts() {
    let backends = three_named();
    let lb = Ringlb::start(&config_for("round-robin", &backends, ""));
    let admin = lb.admin.unwrap();
    let (code, v) = post(admin, "/api/backends/web/api1", r#"{"weight":3}"#);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["weight"], 3);
    assert_eq!(v["configured_weight"], 1);
    lb.wait_for_log("Server web/api1 weight changed from 1 to 3", SOON)
        .expect("weight line");
    // Whole cycles of smooth weighted round robin are exact: 3:1:1.
    let mut counts = std::collections::HashMap::new();
    for _ in 0..50 {
        *counts
            .entry(Session::open(lb.addr("web")).backend)
            .or_insert(0) += 1;
    }
    assert_eq!(counts["api1"], 30, "{counts:?}");
    assert_eq!(counts["api2"], 10, "{counts:?}");
    let metrics = get(admin, "/metrics");
    assert!(
        metrics.contains("ringlb_backend_weight{frontend=\"web\",backend=\"api1\"} 3"),
        "{metrics}"
    );
    post(admin, "/api/backends/web/api1", r#"{"weight":1}"#);
    assert_eq!(backend_state(admin, "web", "api1")["weight"], 1);
}

#[test]
fn a_disabled_frontend_refuses_connections_until_enabled() {
    let backends = three_named();
    let lb = Ringlb::start(&config_for("round-robin", &backends, ""));
    let admin = lb.admin.unwrap();
    let addr = lb.addr("web");
    let mut open = Session::open(addr);
    let (code, v) = post(admin, "/api/frontends/web", r#"{"enabled":false}"#);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["enabled"], false);
    lb.wait_for_log("Paused frontend web.", SOON)
        .expect("pause line");
    assert!(
        wait_until(SOON, || TcpStream::connect(addr).is_err()),
        "still listening"
    );
    open.echo("established connections go on\n");
    let (code, v) = post(admin, "/api/frontends/web", r#"{"enabled":true}"#);
    assert_eq!(code, 200, "{v}");
    lb.wait_for_log("Resumed frontend web.", SOON)
        .expect("resume line");
    // Port 0 in the config: the frontend listens on a new port, shown in the API.
    let new: SocketAddr = v["listen"][0].as_str().unwrap().parse().unwrap();
    Session::open(new);
}

#[test]
fn bad_writes_get_a_clear_4xx_change_nothing_and_the_admin_stays_responsive() {
    let backends = three_named();
    let lb = Ringlb::start(&config_for("round-robin", &backends, ""));
    let admin = lb.admin.unwrap();
    let fds_before = lb.fd_count();
    // Slow clients hold connections open meanwhile.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(admin).unwrap();
            s.write_all(b"POST /api/backends/web/api3 HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sta")
                .unwrap();
            s
        })
        .collect();
    let big = format!("{{\"state\":\"drain\",\"x\":\"{}\"}}", "a".repeat(5000));
    for (path, body, code, says) in [
        ("/api/backends/web/api3", "{\"state\":", 400, "not JSON"),
        (
            "/api/backends/web/api3",
            "{\"state\":\"sleep\"}",
            400,
            "\"sleep\"",
        ),
        (
            "/api/backends/web/nope",
            "{\"state\":\"drain\"}",
            404,
            "no backend \"nope\"",
        ),
        (
            "/api/backends/nope/api3",
            "{\"state\":\"drain\"}",
            404,
            "no frontend \"nope\"",
        ),
        (
            "/api/backends/web/api3",
            "{\"weight\":0}",
            400,
            "out of range",
        ),
        (
            "/api/backends/web/api3",
            "{\"weight\":257}",
            400,
            "out of range",
        ),
        (
            "/api/backends/web/api3",
            "{\"weight\":1e99}",
            400,
            "out of range",
        ),
        (
            "/api/backends/web/api3",
            big.as_str(),
            413,
            "over the limit",
        ),
        (
            "/api/frontends/web",
            "{\"enabled\":\"no\"}",
            400,
            "true or false",
        ),
    ] {
        let (got, v) = post(admin, path, body);
        assert_eq!(got, code, "{path} {body}: {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains(says),
            "{path} {body}: {v}"
        );
    }
    // Not JSON as a content type, no length: refused before any body is read.
    let (code, v) = request(
        admin,
        "POST",
        "/api/backends/web/api3",
        &["Content-Type: text/plain", "Content-Length: 17"],
        None,
    );
    assert_eq!(code, 415, "{v}");
    let (code, v) = request(admin, "POST", "/api/backends/web/api3", &[], None);
    assert_eq!(code, 411, "{v}");
    // From another site's page: refused.
    let (code, v) = request(
        admin,
        "POST",
        "/api/backends/web/api3",
        &["Origin: http://evil.example"],
        Some("{\"state\":\"drain\"}"),
    );
    assert_eq!(code, 403, "{v}");
    // Nothing changed.
    let state = backend_state(admin, "web", "api3");
    assert_eq!(state["state"], "ready");
    assert_eq!(state["weight"], 1);
    assert_eq!(get(admin, "/healthz").trim(), "ok");
    // The slow writers are cut at the request deadline with a 408, and their fds go.
    for s in slow.iter_mut() {
        s.set_read_timeout(Some(SOON)).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    drop(slow);
    assert!(
        wait_until(SOON, || lb.fd_count() <= fds_before),
        "fds before {fds_before}, now {}",
        lb.fd_count()
    );
    let metrics = get(admin, "/metrics");
    assert!(
        metrics.contains("ringlb_admin_writes_total{result=\"bad_request\"} 28"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringlb_admin_writes_total{result=\"ok\"} 0"),
        "{metrics}"
    );
}

#[test]
fn runtime_state_survives_sighup_and_with_a_state_file_a_restart() {
    let backends = three_named();
    let dir = TempDir::new();
    let state_file = dir.path.join("state.json");
    let extra = format!("state_file = \"{}\"", state_file.display());
    let config = config_for("round-robin", &backends, &extra);
    let lb = Ringlb::start(&config);
    let admin = lb.admin.unwrap();
    assert_eq!(
        post(admin, "/api/backends/web/api3", r#"{"state":"drain"}"#).0,
        200
    );
    assert_eq!(
        post(admin, "/api/backends/web/api2", r#"{"weight":7}"#).0,
        200
    );
    assert!(state_file.exists());
    // A reload that keeps the backends keeps their runtime state.
    let reloaded = config.replace(
        "balance = \"round-robin\"",
        "balance = \"round-robin\"\nretries = 1",
    );
    let mark = lb.reload(&reloaded);
    lb.wait_for_log_after(mark, "reload: applied", SOON)
        .expect("reload applied");
    assert_eq!(backend_state(admin, "web", "api3")["state"], "drain");
    assert_eq!(backend_state(admin, "web", "api2")["weight"], 7);
    for _ in 0..20 {
        assert_ne!(Session::open(lb.addr("web")).backend, "api3");
    }
    drop(lb);
    // A restart reads the state file.
    let lb = Ringlb::start(&reloaded);
    let admin = lb.admin.unwrap();
    lb.wait_for_log("Server web/api3 restored from the state file (drain)", SOON)
        .expect("restored line");
    assert_eq!(backend_state(admin, "web", "api3")["state"], "drain");
    assert_eq!(backend_state(admin, "web", "api2")["weight"], 7);
    for _ in 0..20 {
        assert_ne!(Session::open(lb.addr("web")).backend, "api3");
    }
    drop(lb);
    // A corrupt state file is a WARN, not a failed start.
    std::fs::write(&state_file, "{\"version\":1,\"backends\":[").unwrap();
    let lb = Ringlb::start(&reloaded);
    lb.wait_for_log("is corrupt", SOON)
        .expect("corrupt warning");
    assert_eq!(
        backend_state(lb.admin.unwrap(), "web", "api3")["state"],
        "ready"
    );
}

/// A network namespace of this test's own, removed on drop. Inside it `lo` is up and also
/// carries 10.253.0.1, an address that is local but not loopback: an admin listener there
/// is "not on loopback" and its clients' source address is 10.253.0.1. Nothing leaves the
/// namespace (it has no other interface).
struct Netns {
    name: String,
    file: std::fs::File,
}

impl Netns {
    fn create() -> Option<Netns> {
        let ip = std::process::Command::new("ip").arg("-V").output().is_ok();
        if !tool_available(ip, "ip (iproute2)", "apt-get install iproute2") {
            return None;
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            tool_available(false, "root (to create a network namespace)", "run as root")
                .then_some(())?;
        }
        let name = format!("ringlb-rt-{}", std::process::id());
        let run = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &name]);
        run(&["-n", &name, "link", "set", "lo", "up"]);
        run(&["-n", &name, "addr", "add", "10.253.0.1/32", "dev", "lo"]);
        let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        Some(Netns { name, file })
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.file.try_clone().unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// Starts ringlb inside the namespace.
    fn ringlb(&self, config: &str) -> Ringlb {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = self.file.as_raw_fd();
        Ringlb::start_with(config, |cmd| {
            // SAFETY: setns is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn public_admin_config(admin_extra: &str) -> String {
    // The backend is inside the namespace too; it need not be up for these writes.
    format!(
        "[global]\nworkers = 1\n\n[admin]\nlisten = \"10.253.0.1:0\"\nallow_public = true\n{admin_extra}\n\n{}",
        frontend_toml("web", "", &[("api3", "127.0.0.1:9".parse().unwrap(), "")])
    )
}

#[test]
fn a_write_to_a_non_loopback_admin_needs_the_token_and_without_it_changes_nothing() {
    let Some(ns) = Netns::create() else { return };
    // No token configured: every write is refused, from any peer.
    let lb = ns.ringlb(&public_admin_config(""));
    let admin = lb.admin.unwrap();
    assert!(!admin.ip().is_loopback());
    lb.wait_for_log("runtime API writes refused", SOON)
        .expect("start-up line on writes");
    let (code, v, state) = ns.run(move || {
        let (code, v) = post(admin, "/api/backends/web/api3", r#"{"state":"maint"}"#);
        (code, v, backend_state(admin, "web", "api3"))
    });
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("token_file"), "{v}");
    assert_eq!(state["state"], "ready");
    drop(lb);
    // With a token: none or a wrong one is 401, the right one writes.
    let dir = TempDir::new();
    let token = dir.path.join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let lb = ns.ringlb(&public_admin_config(&format!(
        "token_file = \"{}\"",
        token.display()
    )));
    let admin = lb.admin.unwrap();
    let results = ns.run(move || {
        let body = Some(r#"{"state":"maint"}"#);
        let path = "/api/backends/web/api3";
        let none = request(admin, "POST", path, &[], body).0;
        let wrong = request(admin, "POST", path, &["Authorization: Bearer nope"], body).0;
        let after_wrong = backend_state(admin, "web", "api3")["state"].clone();
        let right = request(
            admin,
            "POST",
            path,
            &["Authorization: Bearer s3cret-token"],
            body,
        )
        .0;
        let after_right = backend_state(admin, "web", "api3")["state"].clone();
        (none, wrong, after_wrong, right, after_right)
    });
    assert_eq!(results.0, 401);
    assert_eq!(results.1, 401);
    assert_eq!(results.2, "ready");
    assert_eq!(results.3, 200);
    assert_eq!(results.4, "maint");
}
