//! DNS service discovery against a real DNS server on loopback: a small A-record responder
//! started by the test on a UDP socket, whose records (and failures) change mid-test. The
//! backends are real listeners on 127.0.0.2, .3, ... sharing one port, as the replicas of a
//! service behind one name do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// What the responder answers.
#[derive(Clone, Debug)]
enum Mode {
    /// NOERROR with these A records (and no AAAA), each with this TTL.
    Records(Vec<Ipv4Addr>, u32),
    /// A random datagram, then a response whose A record is 5 bytes long.
    Garbage,
    /// NXDOMAIN: the name vanished.
    NxDomain,
    /// No answer at all (a hung server).
    Silent,
    /// SRV records (priority, port, target), with an A record in the additional section for
    /// the targets listed in `glue`.
    Srv(Vec<(u16, u16, String)>, Vec<(String, Ipv4Addr)>),
}

/// An in-process DNS server: answers A/AAAA questions per name from `modes`.
struct Dns {
    addr: SocketAddr,
    modes: Arc<Mutex<Vec<(String, Mode)>>>,
    /// Questions received, per name.
    asked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
}

impl Dns {
    fn start(modes: Vec<(&str, Mode)>) -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let modes = Arc::new(Mutex::new(
            modes
                .into_iter()
                .map(|(n, m)| (n.to_string(), m))
                .collect::<Vec<_>>(),
        ));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, a, s) = (modes.clone(), asked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            // The socket closes when this thread ends: queries are then refused (ICMP).
            while !s.load(Ordering::SeqCst) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Some((name, qtype, qend)) = question(&buf[..n]) else {
                    continue;
                };
                a.lock().unwrap().push((name.clone(), Instant::now()));
                let mode = m
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, m)| m.clone())
                    .unwrap_or(Mode::NxDomain);
                for reply in answer(&buf[..qend], qtype, &mode) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Dns {
            addr,
            modes,
            asked,
            stop,
        }
    }

    fn set(&self, name: &str, mode: Mode) {
        let mut modes = self.modes.lock().unwrap();
        modes.retain(|(n, _)| n != name);
        modes.push((name.to_string(), mode));
    }

    fn asked_since(&self, name: &str, since: Instant) -> usize {
        let asked = self.asked.lock().unwrap();
        asked
            .iter()
            .filter(|(n, t)| n == name && *t >= since)
            .count()
    }

    fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (name, qtype, end of the question) of a query.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

/// The datagrams to send back for the query whose header and question are `query`.
fn answer(query: &[u8], qtype: u16, mode: &Mode) -> Vec<Vec<u8>> {
    let head = |rcode: u8, answers: u16| {
        let mut r = query.to_vec();
        r[2] = 0x81;
        r[3] = 0x80 | rcode;
        r[6..8].copy_from_slice(&answers.to_be_bytes());
        r[8..12].copy_from_slice(&[0, 0, 0, 0]);
        r
    };
    let record = |r: &mut Vec<u8>, data: &[u8], ttl: u32| {
        r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(data);
    };
    match mode {
        Mode::Silent => Vec::new(),
        Mode::NxDomain => vec![head(3, 0)],
        Mode::Garbage => {
            let noise: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(97) ^ 0x5a).collect();
            let mut bad = head(0, 1);
            record(&mut bad, &[10, 0, 0, 1, 7], 30);
            vec![noise, bad]
        }
        Mode::Records(ips, ttl) if qtype == 1 => {
            let mut r = head(0, ips.len() as u16);
            for ip in ips {
                record(&mut r, &ip.octets(), *ttl);
            }
            vec![r]
        }
        Mode::Records(..) => vec![head(0, 0)],
        Mode::Srv(records, glue) if qtype == 33 => {
            let mut r = head(0, records.len() as u16);
            r[10..12].copy_from_slice(&(glue.len() as u16).to_be_bytes());
            for (priority, port, target) in records {
                let mut data = Vec::new();
                data.extend_from_slice(&priority.to_be_bytes());
                data.extend_from_slice(&1u16.to_be_bytes());
                data.extend_from_slice(&port.to_be_bytes());
                data.extend_from_slice(&wire_name(target));
                r.extend_from_slice(&[0xC0, 12, 0, 33, 0, 1, 0, 0, 0, 30]);
                r.extend_from_slice(&(data.len() as u16).to_be_bytes());
                r.extend_from_slice(&data);
            }
            for (name, ip) in glue {
                r.extend_from_slice(&wire_name(name));
                r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
                r.extend_from_slice(&ip.octets());
            }
            vec![r]
        }
        Mode::Srv(..) => vec![head(0, 0)],
    }
}

/// `name` as DNS labels, uncompressed.
fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// Three listeners on 127.0.0.2-4 on one port, each answering with its name.
fn replicas() -> Vec<Backend> {
    loop {
        let first = Backend::start_on("127.0.0.2:0".parse().unwrap(), "r2", Behaviour::Named);
        let port = first.addr.port();
        let rest: Vec<Backend> = (3..=4)
            .filter_map(|i| {
                let addr: SocketAddr = format!("127.0.0.{i}:{port}").parse().unwrap();
                std::net::TcpListener::bind(addr).ok().map(drop)?;
                Some(Backend::start_on(addr, &format!("r{i}"), Behaviour::Named))
            })
            .collect();
        if rest.len() == 2 {
            let mut all = vec![first];
            all.extend(rest);
            return all;
        }
    }
}

fn config(dns: SocketAddr, port: u16, static_addr: SocketAddr) -> String {
    let global = global_toml(&format!("resolvers = [\"{dns}\"]"));
    let frontends = format!(
        r#"[[frontend]]
name = "web"
listen = ["127.0.0.1:0"]
balance = "round-robin"

[frontend.health]
interval = "100ms"
timeout = "500ms"
rise = 2
fall = 2

[[frontend.backend]]
name = "static"
address = "{static_addr}"

[[frontend.backend]]
name = "api"
discover = "tasks.web:{port}"
resolve_interval = "300ms"

[[frontend]]
name = "ttl"
listen = ["127.0.0.1:0"]

[[frontend.backend]]
name = "zero"
discover = "zero.test:{port}"
"#
    );
    global + &frontends
}

/// Names of the backends `n` new connections reached.
fn names(lb: &Ringlb, n: usize) -> Vec<String> {
    (0..n).map(|_| ask_name(lb.addr("web")).unwrap()).collect()
}

fn count_logs(lb: &Ringlb, needle: &str) -> usize {
    lb.logs().iter().filter(|l| l.contains(needle)).count()
}

#[test]
fn discovered_addresses_come_and_go_with_dns_and_failures_keep_the_last_good_set() {
    let reps = replicas();
    let port = reps[0].addr.port();
    let stat = Backend::start("static", Behaviour::Named);
    let ip = |i: u8| Ipv4Addr::new(127, 0, 0, i);
    let dns = Dns::start(vec![
        ("tasks.web", Mode::Records(vec![ip(2)], 30)),
        ("zero.test", Mode::Records(vec![ip(2)], 0)),
    ]);
    let lb = Ringlb::start(&config(dns.addr, port, stat.addr));
    let name = |i: u8| format!("api-127.0.0.{i}:{port}");

    // 1. The first address is found, checked (it starts down) and then takes traffic.
    assert!(lb
        .wait_for_log(
            &format!("discover web/api: tasks.web:{port} has 1 addresses"),
            SOON
        )
        .is_some());
    assert!(lb
        .wait_for_log(&format!("Server web/{} is UP", name(2)), SOON)
        .is_some());
    assert!(wait_until(SOON, || names(&lb, 4).contains(&"r2".to_string())));

    // 2. A second address appears in DNS: it takes traffic within resolve_interval + rise x
    //    interval (0.5 s here; the wait is generous, the time is printed).
    let t = Instant::now();
    dns.set("tasks.web", Mode::Records(vec![ip(2), ip(3)], 30));
    assert!(wait_until(SOON, || names(&lb, 6).contains(&"r3".to_string())));
    eprintln!("new address took traffic after {:?}", t.elapsed());

    // 3. An address leaves DNS while a connection through it is open: no new connections
    //    reach it, and the open one carries on until the client ends it.
    let mut held = loop {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = [0u8; 3];
        s.read_exact(&mut line).unwrap();
        if &line == b"r2\n" {
            break s;
        }
    };
    dns.set("tasks.web", Mode::Records(vec![ip(3)], 30));
    assert!(lb
        .wait_for_log(&format!("gone (draining): 127.0.0.2:{port}"), SOON)
        .is_some());
    let after = names(&lb, 30);
    assert!(!after.contains(&"r2".to_string()), "{after:?}");
    // /status lists it as draining while its connection is open, as for a reload.
    let status: serde_json::Value =
        serde_json::from_str(&get(lb.admin.unwrap(), "/status")).unwrap();
    let web = status["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "web")
        .unwrap();
    let gone = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name(2).as_str())
        .unwrap_or_else(|| panic!("{} not on /status: {web}", name(2)));
    assert_eq!(gone["state"], "draining");
    assert!(after.contains(&"r3".to_string()) && after.contains(&"static".to_string()));
    held.write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still here");
    drop(held);
    assert!(wait_until(SOON, || reps[0].open() == 0));

    // 4. Bad answers keep the last good set, and each kind of failure is logged once.
    for (mode, words) in [
        (Mode::Garbage, "malformed answer"),
        (Mode::NxDomain, "no such name (NXDOMAIN)"),
        (Mode::Records(Vec::new(), 30), "the answer holds no address"),
    ] {
        let since = Instant::now();
        dns.set("tasks.web", mode);
        assert!(lb.wait_for_log(words, SOON).is_some(), "{words}");
        // Several more lookups with the same failure (resolve_interval is 300 ms).
        assert!(wait_until(SOON, || dns.asked_since("tasks.web", since) >= 8));
        assert_eq!(count_logs(&lb, words), 1, "{words}: {:#?}", lb.logs());
        let now = names(&lb, 10);
        assert!(now.contains(&"r3".to_string()), "{now:?}");
    }

    // 5. A zero TTL is clamped: lookups of zero.test (no resolve_interval) stay about one a
    //    second (A and AAAA each), not a storm.
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let zero = dns.asked_since("zero.test", since);
    assert!((2..=10).contains(&zero), "{zero} questions in 3 s");

    // 6. DNS down (hung, then gone): the set is kept, the failure logged once, and the health
    //    checks of the other backends keep their 100 ms interval.
    dns.set("tasks.web", Mode::Silent);
    assert!(lb.wait_for_log("did not answer within", SOON).is_some());
    dns.kill();
    let probes_before = stat.accepted();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let probes = stat.accepted() - probes_before;
    let elapsed = t.elapsed();
    eprintln!("{probes} probes of the static backend in {elapsed:?} with DNS down");
    assert!(probes >= 10, "{probes} probes in {elapsed:?}");
    let now = names(&lb, 10);
    assert!(now.contains(&"r3".to_string()), "{now:?}");
    assert_eq!(count_logs(&lb, "did not answer within"), 1);

    // Metrics name the discovered backends and count the lookups.
    let metrics = get(lb.admin.unwrap(), "/metrics");
    assert!(
        metrics.contains(&format!("backend=\"{}\"", name(3))),
        "{metrics}"
    );
    assert!(metrics.contains(
        "ringlb_discovery_lookups_total{frontend=\"web\",discover=\"api\",result=\"failed\"}"
    ));
    let status = get(lb.admin.unwrap(), "/status");
    assert!(status.contains(&name(3)), "{status}");
}

#[test]
fn a_discover_entry_is_checked_like_any_other_key() {
    let text = |entry: &str| {
        format!(
            "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\n\n[[frontend.backend]]\nname = \"api\"\n{entry}\n"
        )
    };
    for (entry, words) in [
        ("discover = \"tasks.web\"", "has no port"),
        ("discover = \"bad name:80\"", "a DNS label holds only"),
        (
            "discover = \"tasks.web:80\"\naddress = \"127.0.0.1:1\"",
            "both given",
        ),
        (
            "address = \"127.0.0.1:1\"\nresolve_interval = \"1s\"",
            "only for entries with discover",
        ),
        (
            "discover = \"tasks.web:80\"\nresolve_interval = \"10ms\"",
            "100ms to 1h",
        ),
        (
            "discover_srv = \"_api._tcp..consul\"",
            "each dot-separated label",
        ),
    ] {
        let (ok, out) = check_config(&text(entry));
        assert!(!ok && out.contains(words), "{entry}: {out}");
    }
    let (ok, out) = check_config(&format!(
        "[global]\nresolvers = [\"127.0.0.1:5353\", \"nope\"]\n{}",
        text("discover = \"tasks.web:80\"")
    ));
    assert!(
        !ok && out.contains("resolvers: \"nope\" is not an IP address"),
        "{out}"
    );
    let (ok, out) = check_config(&text("discover_srv = \"_api._tcp.service.consul\""));
    assert!(ok, "{out}");
}

#[test]
fn an_open_fd_count_returns_to_its_baseline_after_dns_timeouts_and_refusals() {
    let stat = Backend::start("static", Behaviour::Named);
    let dns = Dns::start(vec![("tasks.web", Mode::Silent)]);
    let lb = Ringlb::start(&config(dns.addr, 1, stat.addr));
    let base = lb.fd_count();
    // Timeouts: every lookup waits 2 s for a silent server.
    assert!(lb.wait_for_log("did not answer within", SOON).is_some());
    let since = Instant::now();
    assert!(wait_until(SOON, || dns.asked_since("tasks.web", since) >= 6));
    // Refusals: the server is gone.
    dns.kill();
    assert!(lb.wait_for_log("Connection refused", SOON).is_some());
    assert!(
        wait_until(SOON, || lb.fd_count() <= base),
        "{} fds, {base} at the start",
        lb.fd_count()
    );
}

#[test]
fn a_reload_keeps_what_an_unchanged_entry_found_and_drops_what_a_changed_one_did() {
    let reps = replicas();
    let port = reps[0].addr.port();
    let stat = Backend::start("static", Behaviour::Named);
    let dns = Dns::start(vec![
        (
            "tasks.web",
            Mode::Records(vec![Ipv4Addr::new(127, 0, 0, 2)], 30),
        ),
        (
            "tasks.api",
            Mode::Records(vec![Ipv4Addr::new(127, 0, 0, 3)], 30),
        ),
    ]);
    let cfg = config(dns.addr, port, stat.addr);
    let lb = Ringlb::start(&cfg);
    let up = format!("Server web/api-127.0.0.2:{port} is UP");
    assert!(lb.wait_for_log(&up, SOON).is_some());

    // A reload that changes something else: the discovered backend stays, and stays up.
    let from = lb.reload(&cfg.replace("round-robin", "least-connections"));
    assert!(lb
        .wait_for_log_after(from, "reload: applied", SOON)
        .is_some());
    assert!(wait_until(SOON, || names(&lb, 6).contains(&"r2".to_string())));
    let status = get(lb.admin.unwrap(), "/status");
    assert!(
        status.contains(&format!("api-127.0.0.2:{port}")),
        "{status}"
    );
    assert_eq!(count_logs(&lb, &up), 1, "checked again from scratch");

    // A reload that points the entry at another name: the old address drains, the new one
    // is found and checked.
    let from = lb.reload(&cfg.replace("tasks.web:", "tasks.api:"));
    assert!(lb
        .wait_for_log_after(
            from,
            &format!("Server web/api-127.0.0.3:{port} is UP"),
            SOON
        )
        .is_some());
    assert!(wait_until(SOON, || {
        let n = names(&lb, 10);
        !n.contains(&"r2".to_string()) && n.contains(&"r3".to_string())
    }));
}

#[test]
fn srv_records_give_targets_and_ports_and_only_the_best_priority_is_used() {
    let reps = replicas();
    let port = reps[0].addr.port();
    let stat = Backend::start("static", Behaviour::Named);
    let start = Instant::now();
    let dns = Dns::start(vec![
        (
            "_api._tcp.test",
            Mode::Srv(
                vec![
                    (10, port, "r2.test".into()),
                    (10, port, "r3.test".into()),
                    (20, port, "r4.test".into()),
                ],
                vec![("r3.test".into(), Ipv4Addr::new(127, 0, 0, 3))],
            ),
        ),
        (
            "r2.test",
            Mode::Records(vec![Ipv4Addr::new(127, 0, 0, 2)], 30),
        ),
        (
            "r4.test",
            Mode::Records(vec![Ipv4Addr::new(127, 0, 0, 4)], 30),
        ),
    ]);
    let cfg = config(dns.addr, port, stat.addr).replace(
        &format!("discover = \"tasks.web:{port}\""),
        "discover_srv = \"_api._tcp.test\"",
    );
    let lb = Ringlb::start(&cfg);
    assert!(lb
        .wait_for_log("discover web/api: SRV _api._tcp.test has 2 addresses", SOON)
        .is_some());
    assert!(wait_until(SOON, || {
        let n = names(&lb, 9);
        n.contains(&"r2".to_string()) && n.contains(&"r3".to_string())
    }));
    assert!(!names(&lb, 12).contains(&"r4".to_string()));
    // r3.test came as glue: it was never asked for.
    assert_eq!(dns.asked_since("r3.test", start), 0);
}

#[test]
fn a_host_name_in_address_is_resolved_by_the_same_resolver_and_followed_at_its_ttl() {
    let reps = replicas();
    let port = reps[0].addr.port();
    let local = Backend::start("local", Behaviour::Named);
    let ip = |i: u8| Ipv4Addr::new(127, 0, 0, i);
    let dns = Dns::start(vec![("api.test", Mode::Records(vec![ip(2)], 1))]);
    let cfg = global_toml(&format!("resolvers = [\"{}\"]", dns.addr))
        + &frontend_toml(
            "web",
            "",
            &[(
                "api",
                // Not a socket address: the text goes into the file as written.
                "127.0.0.1:1".parse().unwrap(),
                "",
            )],
        )
        .replace("127.0.0.1:1", &format!("api.test:{port}"))
        + &frontend_toml("local", "", &[("l", "127.0.0.1:1".parse().unwrap(), "")])
            .replace("127.0.0.1:1", &format!("localhost:{}", local.addr.port()));
    let lb = Ringlb::start(&cfg);
    let web =
        |n: usize| -> Vec<String> { (0..n).map(|_| ask_name(lb.addr("web")).unwrap()).collect() };

    // localhost comes from /etc/hosts (or is 127.0.0.1) at load: served at once, no DNS.
    assert_eq!(ask_name(lb.addr("local")).unwrap(), "local");
    assert_eq!(dns.asked_since("localhost", Instant::now() - SOON), 0);

    // api.test is asked of the test's DNS server and serves once it answered.
    assert!(lb
        .wait_for_log(
            &format!("Server web/api: api.test:{port} resolves to 127.0.0.2:{port}"),
            SOON
        )
        .is_some());
    assert!(wait_until(SOON, || web(3).iter().all(|n| n == "r2")));

    // It is asked again at its TTL (1 s): a new address takes the traffic, the old drains.
    let t = Instant::now();
    dns.set("api.test", Mode::Records(vec![ip(3)], 1));
    assert!(lb
        .wait_for_log(
            &format!("resolves to 127.0.0.3:{port} (was 127.0.0.2:{port}, draining)"),
            SOON
        )
        .is_some());
    assert!(wait_until(SOON, || web(3).iter().all(|n| n == "r3")));
    eprintln!("re-resolved and moved after {:?}", t.elapsed());

    // DNS gone: the last good address keeps serving, and the failure is logged once.
    dns.kill();
    assert!(lb
        .wait_for_log("discover web/api: looking up api.test", SOON)
        .is_some());
    assert!(web(5).iter().all(|n| n == "r3"));
    assert_eq!(count_logs(&lb, "discover web/api: looking up api.test"), 1);
}

#[test]
fn discovered_backends_beyond_a_maglev_table_are_warned_about_once_and_counted() {
    let stat = Backend::start("static", Behaviour::Named);
    let ip = |i: u8| Ipv4Addr::new(127, 0, 0, i);
    let dns = Dns::start(vec![(
        "many.test",
        Mode::Records(vec![ip(2), ip(3), ip(4), ip(5)], 30),
    )]);
    let cfg = global_toml(&format!("resolvers = [\"{}\"]", dns.addr))
        + &format!(
            r#"[[frontend]]
name = "mg"
listen = ["127.0.0.1:0"]
balance = "maglev"
maglev_table_size = 3

[[frontend.backend]]
name = "static"
address = "{}"

[[frontend.backend]]
name = "many"
discover = "many.test:8080"
resolve_interval = "200ms"
check = false
"#,
            stat.addr
        );
    let lb = Ringlb::start(&cfg);
    let admin = lb.admin.unwrap();
    let left_out = || -> Option<f64> {
        get(admin, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("ringlb_maglev_backends_left_out{frontend=\"mg\"} "))
            .and_then(|v| v.trim().parse().ok())
    };
    let warn = "frontend mg: 2 usable backends do not fit maglev_table_size 3";
    assert!(lb.wait_for_log(warn, SOON).is_some());
    assert!(wait_until(SOON, || left_out() == Some(2.0)));
    // The same set, looked up again every 200 ms: still one WARN.
    let since = Instant::now();
    assert!(wait_until(SOON, || dns.asked_since("many.test", since) >= 6));
    assert_eq!(count_logs(&lb, "do not fit maglev_table_size"), 1);
    dns.set("many.test", Mode::Records(vec![ip(2)], 30));
    assert!(lb
        .wait_for_log(
            "frontend mg: every usable backend fits maglev_table_size 3 again",
            SOON
        )
        .is_some());
    assert!(wait_until(SOON, || left_out() == Some(0.0)));
}

#[test]
fn ringlb_check_warns_about_a_host_name_that_does_not_resolve_and_still_passes() {
    let dns = Dns::start(vec![(
        "api.test",
        Mode::Records(vec![Ipv4Addr::LOCALHOST], 30),
    )]);
    let cfg = global_toml(&format!("resolvers = [\"{}\"]", dns.addr))
        + &frontend_toml(
            "web",
            "",
            &[
                ("api", "127.0.0.1:1".parse().unwrap(), ""),
                ("typo", "127.0.0.1:2".parse().unwrap(), ""),
            ],
        )
        .replace("127.0.0.1:1", "api.test:8080")
        .replace("127.0.0.1:2", "apy.test:8080");
    let (ok, stderr) = check_config(&cfg);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(
            "warning: frontend \"web\": backend \"typo\": apy.test:8080 does not resolve now \
             (no such name (NXDOMAIN)); ringlb would start without it and keep asking"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("api.test"), "{stderr}");
    // Each name was asked once, by the check.
    assert!(dns.asked_since("apy.test", Instant::now() - SOON) >= 1);
}
