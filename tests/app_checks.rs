//! Application health checks against real servers: an HTTP app whose /health turns 503, a
//! server that accepts and never answers, a real redis-server paused while its port still
//! accepts, a real PostgreSQL, `openssl s_server`, and servers that answer garbage, too much,
//! too slowly or half a line. Each is judged in HAProxy's Layer7/Layer6 words within the check
//! timeout, leaks no fd, and a bad check config is refused by `check` and by a reload.
//!
//! redis-server, PostgreSQL and openssl are Debian's packages (`.ci/run` installs them);
//! without them those tests say SKIPPED, or fail when CI is set.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

// ----- Servers the tests start -----

/// A tiny HTTP app: `/health` answers with the status it is set to, any other path answers
/// 200 with the app's name (and is counted as a client request). A request that is not HTTP
/// gets a 400, as web servers answer a TLS hello.
struct HttpApp {
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    clients: Arc<AtomicUsize>,
}

impl HttpApp {
    fn start(name: &str) -> HttpApp {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let health = Arc::new(AtomicU16::new(200));
        let clients = Arc::new(AtomicUsize::new(0));
        let (h, c, name) = (health.clone(), clients.clone(), name.to_string());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { break };
                let (h, c, name) = (h.clone(), c.clone(), name.clone());
                std::thread::spawn(move || http_answer(s, &h, &c, &name));
            }
        });
        HttpApp {
            addr,
            health,
            clients,
        }
    }
}

fn http_answer(mut s: TcpStream, health: &AtomicU16, clients: &AtomicUsize, name: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if !got.starts_with(b"GET ") && !got.starts_with(b"HEAD ") && got.len() >= 4 {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
            return;
        }
    }
    let (code, body) = if got.starts_with(b"GET /health ") {
        let code = health.load(Ordering::SeqCst);
        (code, if code == 200 { "ok" } else { "sick" }.to_string())
    } else {
        clients.fetch_add(1, Ordering::SeqCst);
        (200, name.to_string())
    };
    let reason = if code == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    let _ = write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A server that runs `script` on every connection it accepts, each on its own thread.
struct Scripted {
    addr: SocketAddr,
    /// What `script` chose to record (the huge server: the most bytes one connection took).
    written: Arc<AtomicUsize>,
}

impl Scripted {
    fn start(script: fn(TcpStream, &AtomicUsize)) -> Scripted {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { break };
                let w = w.clone();
                std::thread::spawn(move || script(s, &w));
            }
        });
        Scripted { addr, written }
    }
}

/// Reads whatever request comes first (so that a close does not turn into a reset for
/// unread bytes before the answer is out), then writes `answer`.
fn answer_with(mut s: TcpStream, answer: &[u8]) {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
    let _ = s.write_all(answer);
    let _ = s.shutdown(std::net::Shutdown::Write);
    // Let the peer read it all before the socket goes.
    let _ = s.read(&mut buf);
}

fn garbage(s: TcpStream, _: &AtomicUsize) {
    answer_with(s, b"\x00\x01\x02 SSH-2.0-not-http \xff\xfe\r\n\r\n");
}

/// Tries to write 10 MiB without a newline; records the most one connection got out.
fn huge(mut s: TcpStream, written: &AtomicUsize) {
    let chunk = vec![b'A'; 64 * 1024];
    let mut total = 0;
    for _ in 0..160 {
        match s.write(&chunk) {
            Ok(n) => total += n,
            Err(_) => break,
        }
    }
    written.fetch_max(total, Ordering::SeqCst);
}

fn dribble(mut s: TcpStream, _: &AtomicUsize) {
    for b in b"HTTP/1.1 200 OK\r\n\r\n" {
        if s.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn cut(s: TcpStream, _: &AtomicUsize) {
    answer_with(s, b"HTTP/1.1 20");
}

/// Accepts and never says a word; holds the connection until the peer goes.
fn silent(mut s: TcpStream, _: &AtomicUsize) {
    let mut buf = [0u8; 4096];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

fn redis_loading(s: TcpStream, _: &AtomicUsize) {
    answer_with(s, b"-LOADING Redis is loading the dataset in memory\r\n");
}

fn pg_starting_up(s: TcpStream, _: &AtomicUsize) {
    let mut fields = Vec::new();
    for (k, v) in [
        (b'S', "FATAL"),
        (b'C', "57P03"),
        (b'M', "the database system is starting up"),
    ] {
        fields.push(k);
        fields.extend_from_slice(v.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut m = vec![b'E'];
    m.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(&fields);
    answer_with(s, &m);
}

fn tls_alert(s: TcpStream, _: &AtomicUsize) {
    answer_with(s, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40]);
}

/// Speaks first, as SMTP servers do, then waits for the peer to go.
fn smtp_banner(mut s: TcpStream, _: &AtomicUsize) {
    if s.write_all(b"220 mail.test ESMTP ready\r\n").is_ok() {
        silent(s, &AtomicUsize::new(0));
    }
}

// ----- Helpers -----

fn status(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get(admin, "/status")).unwrap()
}

/// The `last_check.result` and `state` of one backend on /status.
fn backend_status(admin: SocketAddr, frontend: &str, backend: &str) -> (String, String) {
    let s = status(admin);
    let fe = s["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend} in {s}"))
        .clone();
    let b = fe["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap_or_else(|| panic!("no backend {backend} in {fe}"))
        .clone();
    (
        b["last_check"]["result"].as_str().unwrap_or("").to_string(),
        b["state"].as_str().unwrap().to_string(),
    )
}

fn wait_log(lb: &Ringlb, mark: usize, needle: &str, timeout: Duration) -> String {
    lb.wait_for_log_after(mark, needle, timeout)
        .unwrap_or_else(|| panic!("no {needle:?} in:\n{}", lb.logs()[mark..].join("\n")))
}

/// The `check duration: Nms` of a transition line.
fn check_ms(line: &str) -> u64 {
    line.split("check duration: ")
        .nth(1)
        .and_then(|r| r.split("ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no check duration in {line}"))
}

/// One request through ringlb; the body (the app's name).
fn ask(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

// ----- HTTP -----

#[test]
fn an_http_backend_whose_health_answers_503_is_taken_out_and_brought_back_when_it_answers_200() {
    let a = HttpApp::start("app-a");
    let b = HttpApp::start("app-b");
    let interval = Duration::from_millis(200);
    let fall = 3;
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"\n[frontend.health]\nkind = \"http\"\npath = \"/health\"\n\
             interval = \"200ms\"\nrise = 2\nfall = 3\n",
            &[("a", a.addr, ""), ("b", b.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    let web = lb.addr("web");
    assert!(wait_until(SOON, || backend_status(admin, "web", "a").0
        == "Layer7 check passed"));

    let mark = lb.log_len();
    let switched = Instant::now();
    a.health.store(503, Ordering::SeqCst);
    let line = wait_log(&lb, mark, "Server web/a is DOWN", SOON);
    let took = switched.elapsed();
    assert!(
        line.contains(
            "reason: Layer7 wrong status, code: 503, info: \"Service Unavailable\", check duration: "
        ),
        "{line}"
    );
    assert!(
        line.contains("1 active and 0 backup servers left"),
        "{line}"
    );
    // fall checks (the spread adds up to 10% each), plus one interval for the phase of the
    // first, plus slack for a busy machine.
    let bound = interval * fall * 11 / 10 + interval + Duration::from_secs(2);
    eprintln!("marked down {took:?} after /health turned 503 (fall x interval = 600ms)");
    assert!(took <= bound, "took {took:?}, more than {bound:?}");
    assert_eq!(
        backend_status(admin, "web", "a"),
        (
            "Layer7 wrong status, code: 503, info: \"Service Unavailable\"".into(),
            "down".into()
        )
    );
    // Its port still accepts, but no new client reaches it.
    let before = a.clients.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(ask(web), "app-b");
    }
    assert_eq!(a.clients.load(Ordering::SeqCst), before);

    let mark = lb.log_len();
    a.health.store(200, Ordering::SeqCst);
    let line = wait_log(&lb, mark, "Server web/a is UP", SOON);
    assert!(
        line.contains("reason: Layer7 check passed, check duration: "),
        "{line}"
    );
    let answers: Vec<String> = (0..10).map(|_| ask(web)).collect();
    assert!(answers.iter().any(|n| n == "app-a"), "{answers:?}");
    assert!(a.clients.load(Ordering::SeqCst) > before);
}

#[test]
fn a_server_that_accepts_and_never_answers_fails_with_layer7_timeout_within_the_timeout() {
    let quiet = Scripted::start(silent);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\nkind = \"http\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\nfall = 1\n",
            &[("quiet", quiet.addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let line = wait_log(&lb, 0, "Server web/quiet is DOWN", SOON);
    assert!(
        line.contains("reason: Layer7 timeout, check duration: "),
        "{line}"
    );
    let ms = check_ms(&line);
    assert!((300..2000).contains(&ms), "{line}");
}

#[test]
fn a_backend_can_override_the_frontends_check_kind_and_send_expect_reads_a_banner() {
    let smtp = Scripted::start(smtp_banner);
    let sick = HttpApp::start("sick");
    sick.health.store(503, Ordering::SeqCst);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\nkind = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\n\
             rise = 1\nfall = 1\ninitial_state = \"down\"\n",
            &[
                (
                    "mail",
                    smtp.addr,
                    "[frontend.backend.health]\nkind = \"send-expect\"\nexpect_regex = '^220 \\S+ ESMTP'\n",
                ),
                // Layer4 only: its /health answers 503, and a connect check cannot tell.
                ("plain", sick.addr, "[frontend.backend.health]\nkind = \"tcp\"\n"),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let line = wait_log(&lb, 0, "Server web/mail is UP", SOON);
    assert!(line.contains("reason: Layer7 check passed"), "{line}");
    let line = wait_log(&lb, 0, "Server web/plain is UP", SOON);
    assert!(line.contains("reason: Layer4 check passed"), "{line}");
}

// ----- Bad answers -----

/// Every kind of bad answer, each its own backend, fails with its own reason within the
/// check timeout, reading at most 16 KiB; and once the checks are gone, so are their fds.
#[test]
fn garbage_huge_dribbled_and_cut_answers_fail_with_clear_reasons_and_leak_no_fds() {
    let servers = [
        ("garbage", Scripted::start(garbage)),
        ("huge", Scripted::start(huge)),
        ("dribble", Scripted::start(dribble)),
        ("cut", Scripted::start(cut)),
        ("silent", Scripted::start(silent)),
        // HTTPS to a server that never answers: the check ends mid-handshake.
        ("tls-silent", Scripted::start(silent)),
    ];
    let idle = refused_addr();
    let base = |extra: &str| {
        let mut list: Vec<(&str, SocketAddr, &str)> = vec![("idle", idle, "check = false\n")];
        if !extra.is_empty() {
            list.extend(servers.iter().map(|(n, s)| {
                let own = if *n == "tls-silent" {
                    "[frontend.backend.health]\ntls = true\n"
                } else {
                    ""
                };
                (*n, s.addr, own)
            }));
        }
        global_toml("") + &frontend_toml("web", extra, &list)
    };
    // Without the bad backends first: the fd count to come back to.
    let lb = Ringlb::start(&base(""));
    let admin = lb.admin.unwrap();
    let baseline = lb.fd_count();

    let mark = lb.reload(&base(
        "[frontend.health]\nkind = \"http\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nfall = 1\n",
    ));
    let expect = [
        (
            "garbage",
            "Layer7 invalid response, info: \"not an HTTP status line: '... SSH-2.0-not-http ..'\"",
        ),
        (
            "huge",
            "Layer7 invalid response, info: \"no complete answer in the first 16384 bytes\"",
        ),
        ("dribble", "Layer7 timeout"),
        (
            "cut",
            "Layer7 invalid response, info: \"connection closed after 11 bytes, before a complete \
             answer: 'HTTP/1.1 20'\"",
        ),
        ("silent", "Layer7 timeout"),
        ("tls-silent", "Layer6 timeout"),
    ];
    for (name, reason) in expect {
        let line = wait_log(&lb, mark, &format!("Server web/{name} is DOWN"), SOON);
        assert!(
            line.contains(&format!("reason: {reason}, check duration: ")),
            "{name}: {line}"
        );
        // Within the timeout (1s), with slack for a busy machine.
        assert!(check_ms(&line) < 2500, "{line}");
    }
    // Many more checks of each.
    let failures = || metrics(admin).sum("ringlb_backend_check_failures_total", &[]);
    let first = failures();
    assert!(
        wait_until(Duration::from_secs(60), || failures() >= first + 40.0),
        "checks did not go on"
    );
    let during = lb.fd_count();
    // One check socket per backend at most, plus the admin connection of the poll.
    assert!(
        during <= baseline + servers.len() + 2,
        "{during} fds during checks, {baseline} before"
    );
    // A check reads 16 KiB and resets: no connection took the whole 10 MiB (what it did
    // take beyond 16 KiB sat in the kernel's socket buffers, never read).
    let most = servers[1].1.written.load(Ordering::SeqCst);
    eprintln!("the 10 MiB writer got at most {most} bytes out on one check connection");
    assert!(most < 10 << 20, "{most}");

    // Checks gone with their backends: every socket they had is closed.
    let mark = lb.reload(&base(""));
    wait_log(&lb, mark, "reload: applied", SOON);
    assert!(
        wait_until(SOON, || lb.fd_count() == baseline),
        "{} fds after the checks stopped, {baseline} before",
        lb.fd_count()
    );
}

#[test]
fn redis_loading_postgres_starting_up_and_a_tls_alert_fail_their_profiles() {
    let loading = Scripted::start(redis_loading);
    let starting = Scripted::start(pg_starting_up);
    let alert = Scripted::start(tls_alert);
    let fast = "interval = \"200ms\"\nfall = 1\n";
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            &format!("[frontend.health]\n{fast}"),
            &[
                (
                    "redis",
                    loading.addr,
                    "[frontend.backend.health]\nkind = \"redis\"\n",
                ),
                (
                    "pg",
                    starting.addr,
                    "[frontend.backend.health]\nkind = \"postgres\"\n",
                ),
                (
                    "tls",
                    alert.addr,
                    "[frontend.backend.health]\nkind = \"tls\"\n",
                ),
            ],
        );
    let lb = Ringlb::start(&cfg);
    for (name, reason) in [
        (
            "redis",
            "Layer7 wrong status, info: \"LOADING Redis is loading the dataset in memory\"",
        ),
        (
            "pg",
            "Layer7 wrong status, code: 57P03, info: \"the database system is starting up\"",
        ),
        (
            "tls",
            "Layer6 invalid response, info: \"TLS alert handshake_failure (40)\"",
        ),
    ] {
        let line = wait_log(&lb, 0, &format!("Server web/{name} is DOWN"), SOON);
        assert!(
            line.contains(&format!("reason: {reason}, check duration: ")),
            "{line}"
        );
    }
}

// ----- Real services -----

/// A redis-server with no persistence on a free port, with `extra` arguments; killed on drop.
fn start_redis(server: &Path, dir: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    for _ in 0..5 {
        let port = free_port();
        let mut cmd = Command::new(server);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut p = Proc(cmd.spawn().unwrap());
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = wait_until(SOON, || {
            redis_command(addr, "*1\r\n$4\r\nPING\r\n").starts_with("+PONG")
                || p.0.try_wait().unwrap().is_some()
        });
        if up && p.0.try_wait().unwrap().is_none() {
            return (p, addr);
        }
    }
    panic!("redis-server did not start");
}

/// One command on a fresh connection; the first line of the answer ("" when none within 2 s).
fn redis_command(addr: SocketAddr, resp: &str) -> String {
    redis_command_within(addr, resp, Duration::from_secs(2))
}

fn redis_command_within(addr: SocketAddr, resp: &str, timeout: Duration) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(timeout)).unwrap();
    if s.write_all(resp.as_bytes()).is_err() {
        return String::new();
    }
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn a_paused_redis_server_is_marked_down_by_the_redis_check_while_a_tcp_check_keeps_it_up() {
    let server = on_path("redis-server");
    if !tool_available(
        server.is_some(),
        "redis-server",
        "apt-get install redis-server",
    ) {
        return;
    }
    let dir = TempDir::new();
    let (_redis, addr) = start_redis(&server.unwrap(), &dir.path, &[]);
    let fast = "[frontend.health]\ninterval = \"200ms\"\ntimeout = \"300ms\"\nrise = 2\nfall = 2\n";
    let cfg = global_toml("")
        + &frontend_toml(
            "l7",
            &format!("{fast}kind = \"redis\"\n"),
            &[("r", addr, "")],
        )
        + "\n"
        + &frontend_toml("l4", fast, &[("r", addr, "")]);
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    assert!(wait_until(SOON, || backend_status(admin, "l7", "r").0
        == "Layer7 check passed"));
    assert!(wait_until(SOON, || backend_status(admin, "l4", "r").0
        == "Layer4 check passed"));

    // Every command, PING included, waits 4s; the kernel still completes connects.
    let mark = lb.log_len();
    let paused = Instant::now();
    let ok = redis_command(
        addr,
        "*4\r\n$6\r\nCLIENT\r\n$5\r\nPAUSE\r\n$4\r\n4000\r\n$3\r\nALL\r\n",
    );
    assert!(ok.starts_with("+OK"), "CLIENT PAUSE: {ok}");
    let line = wait_log(&lb, mark, "Server l7/r is DOWN", SOON);
    assert!(
        line.contains("reason: Layer7 timeout, check duration: "),
        "{line}"
    );
    assert!(
        paused.elapsed() < Duration::from_secs(4),
        "the pause ended before the mark-down"
    );
    assert_eq!(backend_status(admin, "l4", "r").1, "up");
    let line = wait_log(&lb, mark, "Server l7/r is UP", SOON);
    assert!(line.contains("reason: Layer7 check passed"), "{line}");
    assert!(
        !lb.logs()[mark..]
            .iter()
            .any(|l| l.contains("Server l4/r is DOWN")),
        "the tcp check marked it down:\n{}",
        lb.logs()[mark..].join("\n")
    );
}

/// A redis-server reloading its dataset (`DEBUG RELOAD`: save, then load it again) answers
/// every command with `-LOADING` until it is done, while its port accepts as ever: the redis
/// check takes it out with Redis's own words, and a tcp check does not notice.
#[test]
fn a_redis_server_loading_its_dataset_is_marked_down_with_its_loading_error() {
    let server = on_path("redis-server");
    if !tool_available(
        server.is_some(),
        "redis-server",
        "apt-get install redis-server",
    ) {
        return;
    }
    let dir = TempDir::new();
    let (_redis, addr) = start_redis(
        &server.unwrap(),
        &dir.path,
        &["--enable-debug-command", "yes"],
    );
    // Enough keys that loading them takes a while.
    let ok = redis_command_within(
        addr,
        "*3\r\n$5\r\nDEBUG\r\n$8\r\nPOPULATE\r\n$7\r\n1000000\r\n",
        Duration::from_secs(120),
    );
    assert!(ok.starts_with("+OK"), "DEBUG POPULATE: {ok}");
    // A timeout long enough that a PING sent while the server saves and flushes (it answers
    // nothing then, for seconds on a busy machine) is answered once loading starts, with
    // -LOADING, whatever the save took.
    let fast = "[frontend.health]\ninterval = \"100ms\"\ntimeout = \"30s\"\nrise = 1\nfall = 1\n";
    let cfg = global_toml("")
        + &frontend_toml(
            "l7",
            &format!("{fast}kind = \"redis\"\n"),
            &[("r", addr, "")],
        )
        + "\n"
        + &frontend_toml("l4", fast, &[("r", addr, "")]);
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    assert!(wait_until(SOON, || backend_status(admin, "l7", "r").0
        == "Layer7 check passed"));
    let mark = lb.log_len();
    let reload = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"*2\r\n$5\r\nDEBUG\r\n$6\r\nRELOAD\r\n")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let line = wait_log(&lb, mark, "Server l7/r is DOWN", Duration::from_secs(60));
    assert!(
        line.contains(
            "reason: Layer7 wrong status, info: \"LOADING Redis is loading the dataset in memory\""
        ),
        "{line}"
    );
    assert!(reload.join().unwrap().starts_with("+OK"));
    let line = wait_log(&lb, mark, "Server l7/r is UP", SOON);
    assert!(line.contains("reason: Layer7 check passed"), "{line}");
    assert!(
        !lb.logs()[mark..]
            .iter()
            .any(|l| l.contains("Server l4/r is DOWN")),
        "the tcp check marked it down:\n{}",
        lb.logs()[mark..].join("\n")
    );
}

/// The PostgreSQL server tools' directory and, when the test runs as root, the postgres
/// system user's uid and gid (postgres refuses to run as root).
fn pg_tools() -> Option<(PathBuf, Option<(u32, u32)>)> {
    const INSTALL: &str = "apt-get install postgresql";
    let complete = |d: &Path| {
        ["initdb", "postgres"]
            .iter()
            .all(|t| is_executable(&d.join(t)))
    };
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            complete(&bin).then_some((v, bin))
        })
        .collect();
    dirs.sort();
    let bin = dirs.pop().map(|(_, b)| b).or_else(|| {
        let d = on_path("initdb")?
            .canonicalize()
            .ok()?
            .parent()?
            .to_path_buf();
        complete(&d).then_some(d)
    });
    if !tool_available(bin.is_some(), "the PostgreSQL server tools", INSTALL) {
        return None;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some((bin?, None));
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    let user = id("-u").zip(id("-g"));
    if !tool_available(user.is_some(), "the postgres system user", INSTALL) {
        return None;
    }
    Some((bin?, user))
}

fn as_pg_user(cmd: &mut Command, user: Option<(u32, u32)>, cwd: &Path) {
    cmd.current_dir(cwd);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", cwd);
    }
}

#[test]
fn a_real_postgres_passes_the_postgres_check_without_credentials() {
    let Some((bin, user)) = pg_tools() else {
        return;
    };
    let dir = TempDir::new();
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700)).unwrap();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir.path, Some(uid), Some(gid)).unwrap();
    }
    let data = dir.path.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    as_pg_user(&mut initdb, user, &dir.path);
    assert!(initdb.status().unwrap().success(), "initdb failed");
    let port = free_port();
    let log = dir.path.join("postgres.log");
    let out = std::fs::File::create(&log).unwrap();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).unwrap();
    }
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.path.display()))
        .args(["-c", "fsync=off"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    as_pg_user(&mut cmd, user, &dir.path);
    let _pg = Proc(cmd.spawn().unwrap());
    assert!(
        wait_until(SOON, || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready to accept connections")),
        "postgres did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = global_toml("")
        + &frontend_toml(
            "pg",
            "[frontend.health]\nkind = \"postgres\"\ninterval = \"200ms\"\ninitial_state = \"down\"\n",
            &[("db", addr, "")],
        );
    let lb = Ringlb::start(&cfg);
    let line = wait_log(&lb, 0, "Server pg/db is UP", SOON);
    assert!(line.contains("reason: Layer7 check passed"), "{line}");
    // The server saw the check's stranger and refused it: no session was opened.
    let pglog = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        pglog.contains("role \"ringlb-health-check\" does not exist"),
        "{pglog}"
    );
}

#[test]
fn openssl_s_server_passes_the_tls_and_https_checks_and_an_http_server_on_the_tls_port_fails_them()
{
    let openssl = on_path("openssl");
    if !tool_available(openssl.is_some(), "openssl", "apt-get install openssl") {
        return;
    }
    let openssl = openssl.unwrap();
    let dir = TempDir::new();
    let (cert, key) = (dir.path.join("cert.pem"), dir.path.join("key.pem"));
    let made = Command::new(&openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=tls.test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "openssl req failed");
    let port = free_port();
    let _server = Proc::quiet(
        Command::new(&openssl)
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-www"])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(SOON, || TcpStream::connect(addr).is_ok()));
    let web = HttpApp::start("web");
    let cfg = global_toml("")
        + &frontend_toml(
            "tls",
            "[frontend.health]\nkind = \"tls\"\nsni = \"tls.test\"\ninterval = \"200ms\"\nfall = 1\n",
            &[
                ("s_server", addr, "[frontend.backend.health]\ninitial_state = \"down\"\n"),
                ("http", web.addr, ""),
            ],
        )
        // HTTPS: an HTTP check over TLS (`tls = true`), against the same s_server (its -www
        // page lists its ciphers) and against the plain HTTP server, which cannot speak TLS.
        + "\n"
        + &frontend_toml(
            "https",
            "[frontend.health]\nkind = \"http\"\ntls = true\nhost = \"tls.test\"\n\
             expect_body = \"Ciphers supported\"\ninterval = \"200ms\"\nfall = 1\n",
            &[
                ("s_server", addr, "[frontend.backend.health]\ninitial_state = \"down\"\n"),
                ("http", web.addr, ""),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let line = wait_log(&lb, 0, "Server tls/s_server is UP", SOON);
    assert!(line.contains("reason: Layer6 check passed"), "{line}");
    let line = wait_log(&lb, 0, "Server tls/http is DOWN", SOON);
    assert!(
        line.contains(
            "reason: Layer6 invalid response, info: \"not a TLS record: 'HTTP/1.1 400 Bad Request"
        ),
        "{line}"
    );
    let line = wait_log(&lb, 0, "Server https/s_server is UP", SOON);
    assert!(line.contains("reason: Layer7 check passed"), "{line}");
    let line = wait_log(&lb, 0, "Server https/http is DOWN", SOON);
    assert!(
        line.contains("reason: Layer6 invalid response, info: \"TLS handshake: "),
        "{line}"
    );
}

// ----- Bad config -----

fn ringlb_check(text: &str) -> (bool, String) {
    let dir = TempDir::new();
    let path = dir.path.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (
        out.status.success(),
        text.replace(&path.display().to_string(), "FILE"),
    )
}

const BAD_CHECKS: &str = r#"[[frontend]]
name = "web"
listen = ["127.0.0.1:0"]
[frontend.health]
kind = "http"
expect_status = "500-200"
send = "PING\r\n"

[[frontend.backend]]
name = "a"
address = "127.0.0.1:9001"
[frontend.backend.health]
kind = "htp"

[[frontend.backend]]
name = "b"
address = "127.0.0.1:9002"
[frontend.backend.health]
kind = "send-expect"
expect_regex = "(unclosed"

[[frontend.backend]]
name = "c"
address = "127.0.0.1:9003"
[frontend.backend.health]
kind = "redis"
path = "/health"
"#;

#[test]
fn a_bad_check_config_names_each_key_and_line_and_a_reload_with_it_changes_nothing() {
    let (ok, text) = ringlb_check(BAD_CHECKS);
    assert!(!ok, "{text}");
    for want in [
        "FILE:6:17: frontend \"web\": health: expect_status: \"500-200\" is an empty range: the \
         lower code comes first, like \"200-500\"",
        "FILE:7:8: frontend \"web\": health: send: belongs to kind = \"send-expect\", and this \
         check is kind = \"http\": set kind = \"send-expect\" or remove the key",
        "FILE:13:8: frontend \"web\": backend \"a\": health: kind: unknown kind \"htp\"",
        "FILE:20:16: frontend \"web\": backend \"b\": health: expect_regex: \"(unclosed\" does \
         not compile: unclosed group",
        "FILE:27:8: frontend \"web\": backend \"c\": health: path: belongs to kind = \"http\", \
         and this check is kind = \"redis\"",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(text.contains("5 problems"), "{text}");

    // A running ringlb with a good HTTP check keeps it when the reload is bad.
    let app = HttpApp::start("app");
    let good = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\nkind = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\nfall = 1\n",
            &[("a", app.addr, "")],
        );
    let lb = Ringlb::start(&good);
    let admin = lb.admin.unwrap();
    assert!(wait_until(SOON, || backend_status(admin, "web", "a").0
        == "Layer7 check passed"));
    let bad = good.replace(
        "path = \"/health\"",
        "path = \"/health\"\nexpect_status = \"500-200\"",
    );
    let mark = lb.reload(&bad);
    wait_log(&lb, mark, "reload failed", SOON);
    wait_log(&lb, mark, "still serving the previous configuration", SOON);
    // The problems follow the "reload failed" line, one line each.
    wait_log(
        &lb,
        mark,
        ": frontend \"web\": health: expect_status: \"500-200\" is an empty range",
        SOON,
    );
    // Still checked as before: a 503 on /health takes it out.
    app.health.store(503, Ordering::SeqCst);
    let line = wait_log(&lb, mark, "Server web/a is DOWN", SOON);
    assert!(line.contains("Layer7 wrong status, code: 503"), "{line}");
}

// ----- The demo -----

/// Three consecutive ports that are free now, for the demo's backends (below the ephemeral
/// range, each test process starting its search elsewhere in 30000..31999).
fn three_free_ports() -> u16 {
    const SLOTS: u32 = 666;
    let offset = std::process::id() % SLOTS;
    (0..SLOTS)
        .map(|i| 30000 + ((offset + i) % SLOTS * 3) as u16)
        .find(|&p| {
            let held: Vec<_> = (p..p + 3)
                .map_while(|q| TcpListener::bind(("127.0.0.1", q)).ok())
                .collect();
            held.len() == 3
        })
        .expect("three consecutive free ports")
}

#[test]
fn the_demo_checks_its_backends_over_http_and_takes_a_sick_one_out() {
    let backends = three_free_ports();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["demo", "--port", "0", "--admin-port", "0", "--backend-port"])
        .arg(backends.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let l2 = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            l2.lock().unwrap().push(line);
        }
    });
    let _demo = Proc(child);
    let find = |needle: &str| -> Option<String> {
        let mut found = None;
        wait_until(SOON, || {
            found = lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            found.is_some()
        });
        found
    };
    let all = || lines.lock().unwrap().join("\n");
    assert!(find(" ready").is_some(), "{}", all());
    stdin.write_all(b"sick 2\n").unwrap();
    let line = find("Server demo/api2 is DOWN").unwrap_or_else(|| panic!("{}", all()));
    assert!(
        line.contains("reason: Layer7 wrong status, code: 503, info: \"Service Unavailable\""),
        "{line}"
    );
    stdin.write_all(b"well 2\n").unwrap();
    let line = find("Server demo/api2 is UP").unwrap_or_else(|| panic!("{}", all()));
    assert!(line.contains("reason: Layer7 check passed"), "{line}");
}

#[test]
fn a_reload_that_turns_a_tcp_check_into_an_http_check_applies_it_to_the_running_checker() {
    let app = HttpApp::start("app");
    app.health.store(503, Ordering::SeqCst);
    let cfg = |kind: &str| {
        global_toml("")
            + &frontend_toml(
                "web",
                &format!("[frontend.health]\n{kind}interval = \"200ms\"\nfall = 1\n"),
                &[("a", app.addr, "")],
            )
    };
    let lb = Ringlb::start(&cfg(""));
    let admin = lb.admin.unwrap();
    // A connect check cannot see the 503.
    assert!(wait_until(SOON, || backend_status(admin, "web", "a").0
        == "Layer4 check passed"));
    let mark = lb.reload(&cfg("kind = \"http\"\npath = \"/health\"\n"));
    wait_log(&lb, mark, "reload: applied", SOON);
    let line = wait_log(&lb, mark, "Server web/a is DOWN", SOON);
    assert!(
        line.contains("reason: Layer7 wrong status, code: 503"),
        "{line}"
    );
}

// ----- PROXY protocol -----

#[test]
fn checks_of_a_send_proxy_backend_start_with_a_proxy_header_that_nginx_accepts() {
    let nginx = on_path("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| is_executable(p)));
    if !tool_available(nginx.is_some(), "nginx", "apt-get install -y nginx") {
        return;
    }
    let nginx = nginx.unwrap();
    let dir = TempDir::new();
    let d = dir.path.display();
    let ports = [free_port(), free_port(), free_port()];
    // A real PROXY-protocol receiver: nginx's HTTP server with `proxy_protocol` on its
    // listener refuses a request that does not start with a header.
    let conf = dir.path.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "master_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  \
             proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  \
             scgi_temp_path {d};\n  server {{\n{listen}    \
             location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
            listen = ports
                .iter()
                .map(|p| format!("    listen 127.0.0.1:{p} proxy_protocol;\n"))
                .collect::<String>()
        ),
    )
    .unwrap();
    let _nginx = Proc::quiet(
        Command::new(&nginx)
            .args(["-e", &format!("{d}/error.log"), "-c"])
            .arg(&conf),
    );
    let addr = |i: usize| -> SocketAddr { format!("127.0.0.1:{}", ports[i]).parse().unwrap() };
    assert!(
        wait_until(SOON, || TcpStream::connect(addr(2)).is_ok()),
        "nginx did not start: {:?}",
        std::fs::read_to_string(dir.path.join("error.log"))
    );
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "[frontend.health]\nkind = \"http\"\npath = \"/\"\ninterval = \"100ms\"\n",
            &[
                ("v1", addr(0), "send_proxy = \"v1\""),
                ("v2", addr(1), "send_proxy = \"v2\""),
                ("plain", addr(2), ""),
            ],
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    let passed = || ("Layer7 check passed".to_string(), "up".to_string());
    assert!(
        wait_until(SOON, || backend_status(admin, "web", "v1") == passed()),
        "v1: {:?}",
        backend_status(admin, "web", "v1")
    );
    assert!(
        wait_until(SOON, || backend_status(admin, "web", "v2") == passed()),
        "v2: {:?}",
        backend_status(admin, "web", "v2")
    );
    // The same server, checked without the header, fails: the test tells the two apart.
    assert!(
        wait_until(SOON, || backend_status(admin, "web", "plain").1 == "down"),
        "plain: {:?}",
        backend_status(admin, "web", "plain")
    );
    let log = std::fs::read_to_string(dir.path.join("error.log")).unwrap_or_default();
    assert!(log.contains("broken header"), "{log}");
}
