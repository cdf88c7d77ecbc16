//! `ringlb demo`: ringlb in front of three local HTTP backends, nothing else needed.
//!
//! Each demo backend answers any request with "Hello from API #N", and `/health` with 200 (the
//! demo's HTTP health check asks it). Typing `stop 2` in the terminal closes backend 2's port
//! (new connections are refused, as when a process dies); `start 2` opens it again. `sick 2`
//! makes its `/health` answer 503 while the port keeps accepting (an app that is up but not
//! well); `well 2` heals it. The balancer retries refused connects on another backend and its
//! health checks take the dead or sick one out, so `curl` keeps answering throughout.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;

use crate::config::Config;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Port the load balancer listens on (127.0.0.1).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// First backend port; the three backends use this and the next two.
    #[arg(long, default_value_t = 9001)]
    pub backend_port: u16,
    /// Port of the admin listener (/metrics, /status).
    #[arg(long, default_value_t = 9090)]
    pub admin_port: u16,
}

/// A demo backend that can be stopped and started from the terminal.
struct DemoBackend {
    number: usize,
    addr: SocketAddr,
    /// The listener's fd while running; `stop` shuts it down to end the accept thread.
    running: Mutex<Option<i32>>,
    /// `/health` answers 503 while set.
    sick: AtomicBool,
}

impl DemoBackend {
    fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr)?;
        *running = Some(listener.as_raw_fd());
        let me = self.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let me = me.clone();
                        std::thread::spawn(move || answer(stream, &me));
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(())
    }

    fn stop(&self) {
        if let Some(fd) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            // Ends the accept loop (accept returns EINVAL), which drops and closes the socket.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
    }
}

/// Reads a request (HTTP or anything) briefly, then answers like a tiny web service.
fn answer(mut stream: TcpStream, me: &DemoBackend) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && !seen.contains(&b'\n') {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let (number, addr) = (me.number, me.addr);
    let (status, body) = if !seen.starts_with(b"GET /health ") {
        ("200 OK", format!("Hello from API #{number} ({addr})\n"))
    } else if me.sick.load(Ordering::Relaxed) {
        ("503 Service Unavailable", "sick\n".to_string())
    } else {
        ("200 OK", "ok\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
}

fn demo_config(args: &DemoArgs) -> String {
    let mut s = format!(
        r#"[global]
shutdown_timeout = "2s"
# A demo needs few connections; the default (100000) would warn under a small open-file limit.
max_connections = 1000

[admin]
listen = "127.0.0.1:{admin}"

[[frontend]]
name = "demo"
listen = ["127.0.0.1:{port}"]
balance = "round-robin"
connect_timeout = "1s"
retries = 2
# One line per connection on stderr, in HAProxy's tcplog format (docs/logging.md).
log = {{ format = "haproxy", target = "stderr" }}

# An HTTP check (HAProxy's `option httpchk`): a backend whose /health stops answering 2xx or
# 3xx is taken out even while its port accepts.
[frontend.health]
kind = "http"
path = "/health"
interval = "1s"
rise = 2
fall = 2
"#,
        admin = args.admin_port,
        port = args.port
    );
    for i in 0..3u16 {
        s.push_str(&format!(
            "\n[[frontend.backend]]\nname = \"api{}\"\naddress = \"127.0.0.1:{}\"\n",
            i + 1,
            args.backend_port + i
        ));
    }
    s
}

pub fn run(args: DemoArgs) -> ExitCode {
    let config = match Config::parse(&demo_config(&args), "demo config") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let backends: Vec<Arc<DemoBackend>> = (0..3)
        .map(|i| {
            Arc::new(DemoBackend {
                number: i + 1,
                addr: SocketAddr::from(([127, 0, 0, 1], args.backend_port + i as u16)),
                running: Mutex::new(None),
                sick: AtomicBool::new(false),
            })
        })
        .collect();
    for b in &backends {
        if let Err(e) = b.start() {
            eprintln!(
                "demo: cannot start backend API #{} on {}: {e} (pick other ports with --backend-port)",
                b.number, b.addr
            );
            return ExitCode::FAILURE;
        }
    }
    let port = args.port;
    let admin = args.admin_port;
    let console_backends = backends.clone();
    let result = crate::control::run(config, None, move |_server| {
        println!();
        println!("ringlb demo is running: 127.0.0.1:{port} -> API #1, #2, #3 (round robin)");
        println!();
        println!("  Try it:        curl http://127.0.0.1:{port}/    (run it a few times: #1, #2, #3, #1, ...)");
        println!("  Kill one:      type `stop 2` here and press Enter; curl keeps answering from #1 and #3");
        println!("  Bring it back: type `start 2`");
        println!("  Make it sick:  type `sick 2`: its /health answers 503 (port still open), the HTTP check takes it out; `well 2` heals it");
        println!("  Status:        http://127.0.0.1:{admin}/  (metrics at /metrics)");
        println!("  Each connection is logged below when it ends (HAProxy tcplog format)");
        println!("  Quit:          Ctrl-C");
        println!();
        std::thread::spawn(move || console(console_backends));
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Name the flag for the port that could not be had.
            let hint = match e {
                crate::server::StartError::Bind { .. } => " (pick another port with --port)",
                crate::server::StartError::Admin { .. } => " (pick another port with --admin-port)",
                _ => "",
            };
            eprintln!("demo: {e}{hint}");
            ExitCode::FAILURE
        }
    }
}

/// Reads `stop N` / `start N` from the terminal.
fn console(backends: Vec<Arc<DemoBackend>>) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let target = words
            .get(1)
            .and_then(|n| n.trim_start_matches('#').parse::<usize>().ok())
            .and_then(|n| backends.iter().find(|b| b.number == n));
        match (words.first().copied(), target) {
            (Some("stop"), Some(b)) => {
                b.stop();
                println!(
                    "demo: API #{} stopped ({} now refuses connections)",
                    b.number, b.addr
                );
            }
            (Some("start"), Some(b)) => match b.start() {
                Ok(()) => println!("demo: API #{} started again on {}", b.number, b.addr),
                Err(e) => println!("demo: cannot start API #{}: {e}", b.number),
            },
            (Some("sick"), Some(b)) => {
                b.sick.store(true, Ordering::Relaxed);
                println!("demo: API #{} now answers /health with 503", b.number);
            }
            (Some("well"), Some(b)) => {
                b.sick.store(false, Ordering::Relaxed);
                println!("demo: API #{} answers /health with 200 again", b.number);
            }
            (None, _) => {}
            _ => println!(
                "demo: commands are `stop N`, `start N`, `sick N` and `well N` (N = 1, 2 or 3)"
            ),
        }
    }
}
