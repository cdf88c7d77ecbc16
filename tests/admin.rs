//! The admin listener: /metrics is valid Prometheus text whose numbers follow the traffic,
//! /status tells the truth about every backend, the status page renders in a real browser,
//! and no admin client can stall it.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Parses Prometheus text exposition format 0.0.4 strictly: every sample line well formed,
/// names and label names legal, label values properly escaped, `# TYPE` at most once per
/// family and before its samples, no series twice. Sample lines are read by the tests'
/// common `parse_sample`; this adds the checks on names, types and repeats.
fn parse_prometheus(text: &str) {
    fn legal_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut sampled: std::collections::HashSet<String> = Default::default();
    let mut out = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let words: Vec<&str> = rest.trim_start().splitn(3, ' ').collect();
            match words.first().copied() {
                Some("TYPE") => {
                    assert!(words.len() == 3, "{}", at());
                    assert!(legal_name(words[1], true), "{}", at());
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]),
                        "{}",
                        at()
                    );
                    assert!(!sampled.contains(words[1]), "TYPE after samples: {}", at());
                    assert!(
                        types
                            .insert(words[1].to_string(), words[2].to_string())
                            .is_none(),
                        "second TYPE: {}",
                        at()
                    );
                }
                Some("HELP") => assert!(words.len() >= 2 && legal_name(words[1], true), "{}", at()),
                _ => {}
            }
            continue;
        }
        // name, optional {labels}, value, optional timestamp.
        let sample = parse_sample(line).unwrap_or_else(|e| panic!("{e}: {}", at()));
        let (name, value) = (sample.name.as_str(), sample.value);
        assert!(legal_name(name, true), "metric name: {}", at());
        for (lname, _) in &sample.labels {
            assert!(legal_name(lname, false), "label name: {}", at());
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        if types.get(family).map(String::as_str) == Some("counter") {
            assert!(value >= 0.0, "negative counter: {}", at());
        }
        sampled.insert(family.to_string());
        let labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        let series = format!("{name}{{{}}}", labels.join(","));
        assert!(out.insert(series), "series twice: {}", at());
    }
}

/// One scrape, checked to be valid Prometheus text; series are looked up with
/// `Metrics::exact` (exactly the labels given: the tests assert each metric's label set).
fn scrape(admin: SocketAddr) -> Metrics {
    let text = get(admin, "/metrics");
    parse_prometheus(&text);
    Metrics::parse(&text)
}

/// Every name docs/metrics.md documents, and the labels each carries.
const BACKEND_METRICS: &[&str] = &[
    "ringlb_backend_up",
    "ringlb_backend_draining",
    "ringlb_backend_active_connections",
    "ringlb_backend_weight",
    "ringlb_backend_effective_weight",
    "ringlb_backend_connections_total",
    "ringlb_backend_connect_failures_total",
    "ringlb_backend_retries_total",
    "ringlb_backend_connect_hedges_total",
    "ringlb_backend_connect_hedges_won_total",
    "ringlb_backend_bytes_in_total",
    "ringlb_backend_bytes_out_total",
    "ringlb_backend_check_failures_total",
    "ringlb_backend_state_changes_total",
    "ringlb_backend_connections_shut_down_total",
    "ringlb_backend_check_duration_seconds",
    "ringlb_backend_last_state_change_seconds",
];

fn status(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get(admin, "/status")).expect("/status is JSON")
}

fn backend<'a>(s: &'a serde_json::Value, fe: &str, be: &str) -> Option<&'a serde_json::Value> {
    s["frontends"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == fe)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == be)
}

/// Opens a connection through ringlb and checks it works (one echo round trip).
fn open_echo(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s
}

#[test]
fn metrics_are_valid_prometheus_text_and_move_as_traffic_flows() {
    let b = Backend::start("a1", Behaviour::Echo);
    let cfg = global_toml("") + &frontend_toml("web", "", &[("a1", b.addr, "weight = 3")]);
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.expect("admin listening line");

    let m = scrape(admin);
    let web_a1 = [("frontend", "web"), ("backend", "a1")];
    for name in BACKEND_METRICS {
        assert!(m.exact(name, &web_a1).is_some(), "{name} missing");
    }
    for (name, labels) in [
        (
            "ringlb_frontend_active_connections",
            vec![("frontend", "web")],
        ),
        (
            "ringlb_frontend_connections_total",
            vec![("frontend", "web")],
        ),
        (
            "ringlb_frontend_rejected_total",
            vec![("frontend", "web"), ("reason", "limit")],
        ),
        (
            "ringlb_frontend_rejected_total",
            vec![("frontend", "web"), ("reason", "no_backend")],
        ),
        ("ringlb_config_reloads_total", vec![("result", "success")]),
        ("ringlb_config_reloads_total", vec![("result", "failure")]),
        ("ringlb_config_generation", vec![]),
        (
            "ringlb_config_last_reload_success_timestamp_seconds",
            vec![],
        ),
        (
            "ringlb_build_info",
            vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("io", "io_uring"),
                ("relay", "copy"),
            ],
        ),
        ("ringlb_active_connections", vec![]),
        ("ringlb_start_time_seconds", vec![]),
    ] {
        assert!(
            m.exact(name, &labels).is_some(),
            "{name} {labels:?} missing"
        );
    }
    assert_eq!(m.exact("ringlb_backend_up", &web_a1), Some(1.0));
    assert_eq!(m.exact("ringlb_backend_weight", &web_a1), Some(3.0));
    assert_eq!(m.exact("ringlb_config_generation", &[]), Some(1.0));
    let conns_before = m
        .exact("ringlb_backend_connections_total", &web_a1)
        .unwrap();

    // One connection held open: the gauges show it.
    let mut held = open_echo(lb.addr("web"));
    let m = scrape(admin);
    assert_eq!(
        m.exact("ringlb_backend_active_connections", &web_a1),
        Some(1.0)
    );
    assert_eq!(
        m.exact("ringlb_frontend_active_connections", &[("frontend", "web")]),
        Some(1.0)
    );
    // 100 KB each way, then close: the totals move by at least that much.
    let data = vec![7u8; 100_000];
    held.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    held.read_exact(&mut back).unwrap();
    drop(held);
    let mut last = Metrics::parse("");
    let settled = wait_until(SOON, || {
        last = scrape(admin);
        last.exact("ringlb_backend_active_connections", &web_a1) == Some(0.0)
    });
    assert!(settled, "active connections never went back to 0");
    let m = last;
    assert!(
        m.exact("ringlb_backend_connections_total", &web_a1)
            .unwrap()
            >= conns_before + 1.0
    );
    assert!(m.exact("ringlb_backend_bytes_in_total", &web_a1).unwrap() >= 100_004.0);
    assert!(m.exact("ringlb_backend_bytes_out_total", &web_a1).unwrap() >= 100_004.0);
    assert!(
        m.exact("ringlb_frontend_connections_total", &[("frontend", "web")])
            .unwrap()
            >= 1.0
    );
}

#[test]
fn status_lists_every_frontend_with_its_listeners_algorithm_and_backends() {
    let a = Backend::start("a1", Behaviour::Echo);
    let b = Backend::start("b1", Behaviour::Echo);
    let spare = Backend::start("spare", Behaviour::Echo);
    let cfg = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"",
            &[
                ("a1", a.addr, "weight = 2"),
                ("spare", spare.addr, "backup = true"),
            ],
        )
        + &frontend_toml("api", "", &[("b1", b.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    drop(open_echo(lb.addr("web")));

    let s = status(admin);
    let fronts = s["frontends"].as_array().unwrap();
    assert_eq!(fronts.len(), 2);
    let web = fronts.iter().find(|f| f["name"] == "web").unwrap();
    assert_eq!(web["balance"], "round-robin");
    assert_eq!(web["listen"][0], lb.addr("web").to_string());
    let api = fronts.iter().find(|f| f["name"] == "api").unwrap();
    assert_eq!(api["balance"], "least-connections");
    assert_eq!(api["listen"][0], lb.addr("api").to_string());

    let a1 = backend(&s, "web", "a1").unwrap();
    assert_eq!(a1["state"], "up");
    assert_eq!(a1["address"], a.addr.to_string());
    assert_eq!(a1["weight"], 2);
    assert_eq!(a1["effective_weight"], 2.0);
    for key in [
        "active",
        "connections_total",
        "connect_failures_total",
        "retries_total",
        "bytes_in_total",
        "bytes_out_total",
        "check_failures_total",
        "state_changes_total",
        "seconds_since_change",
    ] {
        assert!(a1[key].is_number(), "{key} missing: {a1}");
    }
    assert!(a1.get("last_check").is_some());
    assert_eq!(backend(&s, "web", "spare").unwrap()["state"], "backup");
    assert_eq!(backend(&s, "api", "b1").unwrap()["state"], "up");
    // The connection made above is counted.
    let done = wait_until(SOON, || {
        let s = status(admin);
        backend(&s, "web", "a1").unwrap()["connections_total"] == 1
            && backend(&s, "web", "a1").unwrap()["bytes_in_total"] == 4
    });
    assert!(done, "{}", status(admin));
}

#[test]
fn a_backend_removed_by_reload_shows_draining_until_its_last_connection_closes() {
    let a = Backend::start("a1", Behaviour::Echo);
    let b = Backend::start("b1", Behaviour::Echo);
    let both = global_toml("")
        + &frontend_toml(
            "web",
            "balance = \"round-robin\"",
            &[("a1", a.addr, ""), ("b1", b.addr, "")],
        );
    let lb = Ringlb::start(&both);
    let admin = lb.admin.unwrap();
    // Round robin over two: two connections, one on each.
    let conns = [open_echo(lb.addr("web")), open_echo(lb.addr("web"))];
    let s = status(admin);
    for name in ["a1", "b1"] {
        assert_eq!(backend(&s, "web", name).unwrap()["active"], 1, "{s}");
    }

    let only_a = global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, "")]);
    let mark = lb.reload(&only_a);
    lb.wait_for_log_after(mark, "reload: applied", SOON)
        .expect("reload applied");
    let s = status(admin);
    let b1 = backend(&s, "web", "b1").expect("the removed backend is still listed");
    assert_eq!(b1["state"], "draining");
    assert_eq!(b1["active"], 1);
    assert_eq!(backend(&s, "web", "a1").unwrap()["state"], "up");
    let m = scrape(admin);
    let web_b1 = [("frontend", "web"), ("backend", "b1")];
    assert_eq!(m.exact("ringlb_backend_draining", &web_b1), Some(1.0));
    assert_eq!(m.exact("ringlb_backend_up", &web_b1), Some(0.0));
    assert_eq!(m.exact("ringlb_config_generation", &[]), Some(2.0));

    // The draining connection still works; once it closes the backend is gone.
    for mut c in &conns {
        c.write_all(b"more").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"more");
    }
    drop(conns);
    let gone = wait_until(SOON, || backend(&status(admin), "web", "b1").is_none());
    assert!(gone, "{}", status(admin));
}

#[test]
fn healthz_answers_ok_unknown_paths_404_and_other_methods_405() {
    let b = Backend::start("a1", Behaviour::Echo);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", b.addr, "")])));
    let admin = lb.admin.unwrap();
    let (code, head, body) = http(admin, "GET", "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert!(head.contains("Connection: close"), "{head}");
    let (code, head, body) = http(admin, "HEAD", "/metrics");
    assert_eq!(code, 200);
    assert!(body.is_empty() && head.contains("Content-Length: "));
    assert_eq!(http(admin, "GET", "/nope").0, 404);
    assert_eq!(http(admin, "GET", "/metrics/x").0, 404);
    let (code, head, _) = http(admin, "POST", "/metrics");
    assert_eq!(code, 405);
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    assert_eq!(http(admin, "DELETE", "/status").0, 405);
    let (code, head, _) = http(admin, "GET", "/");
    assert_eq!(code, 200);
    assert!(head.contains("text/html"), "{head}");
}

#[test]
fn silent_slow_and_malformed_admin_clients_do_not_stall_it() {
    let b = Backend::start("a1", Behaviour::Echo);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", b.addr, "")])));
    let admin = lb.admin.unwrap();
    // Clients that connect and say nothing, or stop half-way through a request line.
    let mut silent: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(admin).unwrap()).collect();
    let mut half = TcpStream::connect(admin).unwrap();
    half.write_all(b"GET /met").unwrap();
    // Others are still served at once, and the traffic path is unaffected.
    let start = Instant::now();
    assert_eq!(get(admin, "/healthz"), "ok\n");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    drop(open_echo(lb.addr("web")));
    // Garbage gets 400; a head past the size cap gets 431; neither takes the listener down.
    let mut g = TcpStream::connect(admin).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    g.write_all(b"\x16\x03\x01 hello\r\n\r\n").unwrap();
    let mut resp = String::new();
    g.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let mut big = TcpStream::connect(admin).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = b"GET /status HTTP/1.1\r\n".to_vec();
    for i in 0..400 {
        req.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(40)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let _ = big.write_all(&req);
    let mut resp = String::new();
    let _ = big.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.80}");
    // The silent ones are answered 408 and closed after the head deadline.
    let s = &mut silent[0];
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert_eq!(get(admin, "/healthz"), "ok\n");
}

#[test]
fn ringlb_check_refuses_a_public_admin_address_unless_allowed() {
    let dir = TempDir::new();
    let path = dir.path.join("public.toml");
    let frontend = frontend_toml("web", "", &[("a1", refused_addr(), "")]);
    std::fs::write(
        &path,
        format!("[admin]\nlisten = \"0.0.0.0:9090\"\n\n{frontend}"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("admin: listen: 0.0.0.0:9090 is not a loopback address")
            && stderr.contains("allow_public = true"),
        "{stderr}"
    );
    // `run` refuses the same file before binding anything.
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));

    std::fs::write(
        &path,
        format!("[admin]\nlisten = \"0.0.0.0:9090\"\nallow_public = true\n\n{frontend}"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Finds the browser: $CHROMIUM, or `chromium` / `chromium-browser` on PATH.
fn chromium() -> Option<String> {
    let candidates = std::env::var("CHROMIUM")
        .map(|c| vec![c])
        .unwrap_or_else(|_| vec!["chromium".into(), "chromium-browser".into()]);
    for c in &candidates {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(c.clone());
        }
    }
    let what = format!("headless Chromium (tried {candidates:?})");
    tool_available(
        false,
        &what,
        "apt-get install chromium, or set CHROMIUM=/path/to/chromium",
    );
    None
}

/// Runs headless Chromium on `url` with `extra` flags; returns stdout.
fn run_chromium(browser: &str, url: &str, extra: &[String]) -> String {
    let profile = TempDir::new();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_renders_in_headless_chromium_with_a_row_per_backend_coloured_by_state() {
    let Some(browser) = chromium() else { return };
    let a1 = Backend::start("api1", Behaviour::Echo);
    let a2 = Backend::start("api2", Behaviour::Echo);
    let a3 = Backend::start("api3", Behaviour::Echo);
    let spare = Backend::start("spare", Behaviour::Echo);
    let db = Backend::start("db1", Behaviour::Echo);
    let dead = refused_addr();
    let web = |with_api3: bool| {
        let mut backends = vec![
            ("api1", a1.addr, "weight = 3"),
            ("api2", a2.addr, "weight = 2"),
            ("spare", spare.addr, "backup = true"),
        ];
        if with_api3 {
            backends.push(("api3", a3.addr, ""));
        }
        backends.push((
            "api4",
            dead,
            "health = { initial_state = \"down\", interval = \"200ms\" }",
        ));
        global_toml("")
            + &frontend_toml("web", "balance = \"round-robin\"", &backends)
            + &frontend_toml("db", "", &[("db1", db.addr, "")])
    };
    let lb = Ringlb::start(&web(true));
    let admin = lb.admin.unwrap();
    // Some traffic on every primary, then one connection held on api3 while a reload
    // removes it, so the page has up, backup and draining rows.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(open_echo(lb.addr("web")));
    }
    drop(open_echo(lb.addr("db")));
    assert_eq!(backend(&status(admin), "web", "api3").unwrap()["active"], 1);
    let mark = lb.reload(&web(false));
    lb.wait_for_log_after(mark, "reload: applied", SOON)
        .unwrap();

    let url = format!("http://{admin}/");
    let dom = run_chromium(&browser, &url, &["--dump-dom".to_string()]);
    assert!(dom.contains("<title>ringlb status</title>"), "{dom}");
    assert!(
        dom.contains("Frontend web") && dom.contains("Frontend db"),
        "{dom}"
    );
    for (name, state) in [
        ("api1", "up"),
        ("api2", "up"),
        ("spare", "backup"),
        ("api3", "draining"),
        ("api4", "down"),
        ("db1", "up"),
    ] {
        let row = format!("<tr class=\"{state}\"><td class=\"l\">{name}</td>");
        assert!(dom.contains(&row), "no {state} row for {name}:\n{dom}");
    }
    assert!(
        dom.contains("http-equiv=\"refresh\""),
        "the page does not refresh itself"
    );
    assert!(
        !dom.contains("src=\"http") && !dom.contains("href=\"http"),
        "external asset"
    );

    let shots = TempDir::new();
    let png = shots.path.join("status-page.png");
    run_chromium(
        &browser,
        &url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1440,640".to_string(),
        ],
    );
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
    // docs/status-page.png is taken under load by tests/runtime_api.rs
    // (`RINGLB_UPDATE_SCREENSHOT=1 cargo test --test runtime_api the_status_page`).
    drop(held);
}

#[test]
fn every_metric_in_docs_metrics_md_is_exported_and_every_exported_one_is_documented() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"),
    )
    .unwrap();
    // Names in the tables: the first backticked cell of each row.
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `ringlb_"))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            format!("ringlb_{name}")
        })
        .collect();
    let b = Backend::start("a1", Behaviour::Echo);
    // With a connection log (its series exist once a frontend logs, one per target) and a
    // discover entry (so that the discovery series exist; its lookups are refused).
    let log = "log = { target = \"stderr\" }";
    let discover = "\n[[frontend.backend]]\nname = \"d\"\ndiscover = \"tasks.web:80\"\n";
    let lb = Ringlb::start(
        &(global_toml("resolvers = [\"127.0.0.1:9\"]")
            + &frontend_toml("web", log, &[("a1", b.addr, "")])
            + discover),
    );
    let exported: std::collections::BTreeSet<String> = scrape(lb.admin.unwrap())
        .samples
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(documented, exported);
}

#[test]
fn status_and_metrics_follow_a_backend_going_down_and_coming_back() {
    let a = Backend::start("a1", Behaviour::Echo);
    let b = Backend::start("b1", Behaviour::Echo);
    let fast = "health = { interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1 }";
    let cfg =
        global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, fast), ("b1", b.addr, fast)]);
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    let web_b1 = [("frontend", "web"), ("backend", "b1")];
    let b1 = |s: &serde_json::Value| backend(s, "web", "b1").unwrap().clone();

    let addr = b.addr;
    b.stop();
    let mut s = serde_json::Value::Null;
    assert!(
        wait_until(SOON, || {
            s = status(admin);
            b1(&s)["state"] == "down"
        }),
        "b1 never went down: {s}"
    );
    let down = b1(&s);
    assert_eq!(down["state_changes_total"], 1);
    assert!(
        down["check_failures_total"].as_u64().unwrap() >= 1,
        "{down}"
    );
    let result = down["last_check"]["result"].as_str().unwrap_or_default();
    assert!(result.contains("Layer4"), "{down}");
    assert!(down["last_check"]["duration_ms"].is_u64(), "{down}");
    let m = scrape(admin);
    assert_eq!(m.exact("ringlb_backend_up", &web_b1), Some(0.0));
    assert_eq!(
        m.exact("ringlb_backend_state_changes_total", &web_b1),
        Some(1.0)
    );
    assert!(
        m.exact("ringlb_backend_check_failures_total", &web_b1)
            .unwrap()
            >= 1.0
    );
    // Traffic still flows, to a1.
    drop(open_echo(lb.addr("web")));

    let _back = Backend::start_on(addr, "b1", Behaviour::Echo);
    assert!(
        wait_until(SOON, || {
            s = status(admin);
            b1(&s)["state"] == "up"
        }),
        "b1 never came back: {s}"
    );
    let up = b1(&s);
    assert_eq!(up["state_changes_total"], 2);
    assert!(up["seconds_since_change"].as_f64().unwrap() < 10.0, "{up}");
    assert!(
        up["last_check"]["result"]
            .as_str()
            .unwrap()
            .contains("passed"),
        "{up}"
    );
    let m = scrape(admin);
    assert_eq!(m.exact("ringlb_backend_up", &web_b1), Some(1.0));
    assert_eq!(
        m.exact("ringlb_backend_state_changes_total", &web_b1),
        Some(2.0)
    );
}

#[test]
fn status_shows_the_slow_start_ramp_as_effective_weight() {
    let a = Backend::start("a1", Behaviour::Echo);
    let ramp = "weight = 4\nslow_start = \"60s\"\nhealth = { initial_state = \"down\", interval = \"100ms\", rise = 1 }";
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("a1", a.addr, ramp)])));
    let admin = lb.admin.unwrap();
    let mut s = serde_json::Value::Null;
    assert!(
        wait_until(SOON, || {
            s = status(admin);
            backend(&s, "web", "a1").unwrap()["state"] == "up"
        }),
        "{s}"
    );
    let a1 = backend(&s, "web", "a1").unwrap();
    assert_eq!(a1["weight"], 4);
    let eff = a1["effective_weight"].as_f64().unwrap();
    assert!(
        eff > 0.0 && eff < 4.0,
        "coming up from down ramps its weight: {a1}"
    );
    let m = scrape(admin);
    let got = m
        .exact(
            "ringlb_backend_effective_weight",
            &[("frontend", "web"), ("backend", "a1")],
        )
        .unwrap();
    assert!(got > 0.0 && got < 4.0, "{got}");
}

#[test]
fn the_tests_metrics_reader_parses_labels_escapes_and_special_values() {
    let m = Metrics::parse(
        "# HELP x_total A counter.\n# TYPE x_total counter\n\
         x_total{frontend=\"web\",backend=\"b1\"} 3\n\
         x_total{frontend=\"web\",backend=\"b2\"} 4 1700000000000\n\
         x_total{frontend=\"a,b\",backend=\"q\\\"u\\\\o\"} 5\n\
         up 1\nh_bucket{le=\"+Inf\"} +Inf\nn NaN\n\n",
    );
    assert_eq!(m.get("x_total", &[("backend", "b2")]), Some(4.0));
    assert_eq!(
        m.get("x_total", &[("backend", "b1"), ("frontend", "web")]),
        Some(3.0)
    );
    assert_eq!(m.get("x_total", &[("backend", "q\"u\\o")]), Some(5.0));
    assert_eq!(m.get("x_total", &[("frontend", "a")]), None);
    assert_eq!(m.get("x_total", &[("backend", "b")]), None);
    assert_eq!(m.get("x", &[]), None);
    assert_eq!(m.sum("x_total", &[]), 12.0);
    assert_eq!(m.sum("x_total", &[("frontend", "web")]), 7.0);
    assert_eq!(m.sum("nothing", &[]), 0.0);
    assert_eq!(m.exact("x_total", &[("backend", "b1")]), None);
    assert_eq!(m.exact("up", &[]), Some(1.0));
    assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), Some(f64::INFINITY));
    assert!(m.get("n", &[]).unwrap().is_nan());
    for bad in [
        "x{a=\"1} 2",
        "x{a=1} 2",
        "x{a=\"\\q\"} 2",
        "x 1 2 3",
        "x",
        "x two",
    ] {
        assert!(parse_sample(bad).is_err(), "{bad}");
    }
}
