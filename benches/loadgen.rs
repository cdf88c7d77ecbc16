//! ringlb's own load generator: bulk throughput, new connections per second and
//! request/response latency, each measured directly against the backend and through every
//! balancer under test, in the same run, so the ratios are comparable.
//!
//! Run: `cargo bench --bench loadgen` (add `-- --quick` for a short run, `-- conn` to run
//! one scenario: `bulk`, `conn` or `rr`). HAProxy and nginx
//! (stream module) are included when their binaries are installed (`apt-get install haproxy
//! nginx libnginx-mod-stream`); every balancer gets one worker thread so the comparison is like for like.
//!
//! Everything runs on loopback; every process started here is stopped by its pid.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Opts {
    bulk_bytes: u64,
    bulk_conns: usize,
    cps_secs: u64,
    cps_clients: usize,
    rr_iters: usize,
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The backend: "S" + reads to EOF then replies with the byte count (bulk); anything else is
/// echoed (latency, connection rate).
fn start_backend() -> SocketAddr {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    std_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let l = TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let mut buf = vec![0u8; 256 * 1024];
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if buf[0] == b'S' {
                        let mut total = n as u64 - 1;
                        while let Ok(m) = s.read(&mut buf).await {
                            if m == 0 {
                                break;
                            }
                            total += m as u64;
                        }
                        let _ = s.write_all(&total.to_le_bytes()).await;
                        return;
                    }
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    while let Ok(m) = s.read(&mut buf).await {
                        if m == 0 || s.write_all(&buf[..m]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
    });
    addr
}

fn bulk(target: SocketAddr, o: &Opts) -> f64 {
    rt().block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..o.bulk_conns)
            .map(|_| {
                let bytes = o.bulk_bytes;
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(target).await.unwrap();
                    let chunk = vec![b'S'; 256 * 1024];
                    let mut sent = 0u64;
                    while sent < bytes {
                        let n = chunk.len().min((bytes - sent) as usize);
                        s.write_all(&chunk[..n]).await.unwrap();
                        sent += n as u64;
                    }
                    s.shutdown().await.unwrap();
                    let mut count = [0u8; 8];
                    s.read_exact(&mut count).await.unwrap();
                    assert_eq!(u64::from_le_bytes(count), bytes - 1);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        (o.bulk_bytes * o.bulk_conns as u64 * 8) as f64 / secs / 1e9
    })
}

fn conns_per_sec(target: SocketAddr, o: &Opts) -> (f64, u64) {
    rt().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(o.cps_secs);
        let start = Instant::now();
        let tasks: Vec<_> = (0..o.cps_clients)
            .map(|_| {
                tokio::spawn(async move {
                    let (mut ok, mut err) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let r = async {
                            let mut s = TcpStream::connect(target).await?;
                            s.set_nodelay(true)?;
                            s.write_all(b"x").await?;
                            let mut b = [0u8; 1];
                            s.read_exact(&mut b).await?;
                            Ok::<_, std::io::Error>(())
                        }
                        .await;
                        if r.is_ok() {
                            ok += 1
                        } else {
                            err += 1
                        }
                    }
                    (ok, err)
                })
            })
            .collect();
        let (mut ok, mut err) = (0, 0);
        for t in tasks {
            let (a, b) = t.await.unwrap();
            ok += a;
            err += b;
        }
        (ok as f64 / start.elapsed().as_secs_f64(), err)
    })
}

fn latency(target: SocketAddr, o: &Opts) -> (f64, f64) {
    rt().block_on(async {
        let mut s = TcpStream::connect(target).await.unwrap();
        s.set_nodelay(true).unwrap();
        let msg = [b'p'; 64];
        let mut back = [0u8; 64];
        let mut samples = Vec::with_capacity(o.rr_iters);
        for _ in 0..o.rr_iters {
            let t = Instant::now();
            s.write_all(&msg).await.unwrap();
            s.read_exact(&mut back).await.unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100],
        )
    })
}

/// A balancer process under test, stopped by pid on drop.
struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
    _dir: std::path::PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: SocketAddr) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn spawn_proxy(name: &'static str, backend: SocketAddr) -> Option<Proxy> {
    let dir = std::env::temp_dir().join(format!("ringlb-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = match name {
        "ringlb" | "ringlb-splice" | "ringlb-epoll" => {
            let relay = if name == "ringlb-splice" {
                "splice"
            } else {
                "copy"
            };
            let io = if name == "ringlb-epoll" {
                "epoll"
            } else {
                "auto"
            };
            let cfg = dir.join("ringlb.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[global]\nworkers = 1\nrelay = \"{relay}\"\nio = \"{io}\"\n[admin]\nlisten = \"\"\n[[frontend]]\nname = \"bench\"\nlisten = [\"{addr}\"]\n\
                     balance = \"round-robin\"\n[[frontend.backend]]\nname = \"b\"\naddress = \"{backend}\"\ncheck = false\n"
                ),
            )
            .unwrap();
            let mut c = Command::new(env!("CARGO_BIN_EXE_ringlb"));
            c.arg("run").arg("--config").arg(cfg);
            c
        }
        "haproxy" => {
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\
                     frontend f\n  bind {addr}\n  default_backend b\nbackend b\n  server s1 {backend}\n"
                ),
            )
            .unwrap();
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(cfg);
            c
        }
        "nginx" => {
            let cfg = dir.join("nginx.conf");
            std::fs::write(
                &cfg,
                format!(
                    "{load}daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\n\
                     events {{ worker_connections 4096; }}\nstream {{ upstream b {{ server {backend}; }}\n\
                     server {{ listen {addr}; proxy_pass b; tcp_nodelay on; proxy_half_close on; }} }}\n",
                    load = nginx_stream_module_load(),
                    pid = dir.join("nginx.pid").display(),
                    err = dir.join("error.log").display()
                ),
            )
            .unwrap();
            let mut c = Command::new("nginx");
            c.arg("-c").arg(cfg).arg("-p").arg(&dir);
            c
        }
        _ => unreachable!(),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Proxy {
        name,
        addr,
        child: Some(child),
        _dir: dir,
    };
    if !wait_listening(addr) {
        eprintln!("{name}: did not start listening; skipped");
        return None;
    }
    Some(p)
}

/// Debian ships the stream module separately (libnginx-mod-stream) as a dynamic module.
fn nginx_stream_module_load() -> String {
    let so = "/usr/lib/nginx/modules/ngx_stream_module.so";
    if std::path::Path::new(so).exists() {
        format!("load_module {so};\n")
    } else {
        String::new()
    }
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let o = if quick {
        Opts {
            bulk_bytes: 64 << 20,
            bulk_conns: 2,
            cps_secs: 2,
            cps_clients: 16,
            rr_iters: 5_000,
        }
    } else {
        Opts {
            bulk_bytes: 512 << 20,
            bulk_conns: 4,
            cps_secs: 5,
            cps_clients: 32,
            rr_iters: 20_000,
        }
    };
    let backend = start_backend();
    let mut proxies = vec![
        spawn_proxy("ringlb", backend).expect("ringlb starts"),
        spawn_proxy("ringlb-splice", backend).expect("ringlb starts"),
        spawn_proxy("ringlb-epoll", backend).expect("ringlb starts"),
    ];
    for other in ["haproxy", "nginx"] {
        if have(other) {
            if let Some(p) = spawn_proxy(other, backend) {
                proxies.push(p);
            }
        } else {
            println!("# {other}: not installed, skipped (apt-get install {other})");
        }
    }
    println!(
        "# loopback, {} CPUs, each balancer with 1 worker; ratios are against a direct connection in this run",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut targets: Vec<(&str, SocketAddr)> = vec![("direct", backend)];
    targets.extend(proxies.iter().map(|p| (p.name, p.addr)));

    // `-- bulk`, `-- conn` or `-- rr` runs only those scenarios (default: all three).
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| ["bulk", "conn", "rr"].contains(&a.as_str()))
        .collect();
    let run = |s: &str| picked.is_empty() || picked.iter().any(|p| p == s);
    let mut base = 0.0;
    if run("bulk") {
        println!("\n{:<14} {:>12} {:>8}", "bulk", "Gbit/s", "ratio");
    }
    for (name, addr) in targets.iter().filter(|_| run("bulk")) {
        let g = bulk(*addr, &o);
        if *name == "direct" {
            base = g;
        }
        println!("{name:<14} {g:>12.2} {:>8.2}", g / base);
        let _ = std::io::stdout().flush();
    }

    if run("conn") {
        println!(
            "\n{:<14} {:>12} {:>8} {:>8}",
            "conn/s", "conn/s", "ratio", "errors"
        );
    }
    for (name, addr) in targets.iter().filter(|_| run("conn")) {
        let (c, e) = conns_per_sec(*addr, &o);
        if *name == "direct" {
            base = c;
        }
        println!("{name:<14} {c:>12.0} {:>8.2} {e:>8}", c / base);
        let _ = std::io::stdout().flush();
    }

    if run("rr") {
        println!(
            "\n{:<14} {:>12} {:>12} {:>8}",
            "64B rr", "p50 us", "p99 us", "p50 x"
        );
    }
    for (name, addr) in targets.iter().filter(|_| run("rr")) {
        let (p50, p99) = latency(*addr, &o);
        if *name == "direct" {
            base = p50;
        }
        println!("{name:<14} {p50:>12.1} {p99:>12.1} {:>8.2}", p50 / base);
    }
}
