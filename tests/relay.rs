//! The relay moves bytes faithfully both ways, and half-closes travel end to end.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::*;

/// `mode` is "io_uring", "epoll" or "splice" (io_uring with the splice relay).
fn echo_lb(mode: &str) -> (Ringlb, Backend) {
    let b = Backend::start("echo", Behaviour::Echo);
    let (io, relay) = match mode {
        "splice" => ("io_uring", "splice"),
        "splice-auto" => ("io_uring", "splice-auto"),
        io => (io, "copy"),
    };
    let cfg = global_toml(&format!("io = \"{io}\"\nrelay = \"{relay}\""))
        + &frontend_toml("web", "", &[("echo", b.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let started = format!("workers on {io} ({relay} relay)");
    assert!(lb.wait_for_log(&started, SOON).is_some(), "{:?}", lb.logs());
    (lb, b)
}

#[test]
fn sixteen_mebibytes_each_way_arrive_intact_on_several_connections_at_once() {
    integrity("io_uring");
}

#[test]
fn the_epoll_fallback_moves_sixteen_mebibytes_each_way_intact_too() {
    integrity("epoll");
}

#[test]
fn the_splice_relay_moves_sixteen_mebibytes_each_way_intact_too() {
    integrity("splice");
}

#[test]
fn the_splice_auto_relay_moves_sixteen_mebibytes_each_way_intact_too() {
    integrity("splice-auto");
}

fn integrity(io: &str) {
    let (lb, _b) = echo_lb(io);
    let addr = lb.addr("web");
    let handles: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || bulk_echo(addr, 16 << 20)))
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Many small writes in a row (each often a read of its own for ringlb, queued behind the
/// others on the direction's read op) arrive in order both ways, also while the client reads
/// slowly: the relay gathers queued reads into one send, and for a slow reader it stops
/// reading and copies aside what it had read, without losing or reordering a byte.
#[test]
fn small_writes_in_a_burst_arrive_in_order_through_a_slow_reader() {
    for mode in ["io_uring", "splice-auto", "epoll"] {
        let (lb, _b) = echo_lb(mode);
        let s = TcpStream::connect(lb.addr("web")).unwrap();
        s.set_nodelay(true).unwrap();
        let total = 4 << 20;
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut at = 0usize;
            while at < total {
                // 37 to 336 bytes, each its own segment (TCP_NODELAY).
                let n = (37 + at % 300).min(total - at);
                let chunk: Vec<u8> = (at..at + n).map(|k| (k % 251) as u8).collect();
                w.write_all(&chunk).unwrap();
                at += n;
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut r = s;
        r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (mut got, mut buf) = (0usize, vec![0u8; 1000]);
        loop {
            let n = r
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("{mode}: {e} at {got}"));
            if n == 0 {
                break;
            }
            if let Some(j) = (0..n).find(|&j| buf[j] != ((got + j) % 251) as u8) {
                panic!("{mode}: byte {} is wrong", got + j);
            }
            got += n;
            // A slow reader for the first MiB: the echo backs up into ringlb's sends.
            if got < 1 << 20 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        assert_eq!(got, total, "{mode}: everything came back, then EOF");
        writer.join().unwrap();
    }
}

#[test]
fn a_client_that_shuts_its_write_side_still_receives_the_full_reply() {
    half_close("io_uring");
}

#[test]
fn half_close_travels_through_the_epoll_fallback_too() {
    half_close("epoll");
}

#[test]
fn half_close_travels_through_the_splice_relay_too() {
    half_close("splice");
}

fn half_close(io: &str) {
    let (lb, _b) = echo_lb(io);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg = vec![b'x'; 300_000];
    s.write_all(&msg).unwrap();
    // Half-close: the echo backend sees EOF only through ringlb's shutdown(Write).
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), msg.len());
}

#[test]
fn a_backend_that_half_closes_first_still_receives_what_the_client_sends_after() {
    // The Named backend writes its name; we then close our side after sending more; the
    // backend's echo of the later bytes must still arrive after its own writes.
    let b = Backend::start("named", Behaviour::Named);
    let cfg = global_toml("") + &frontend_toml("web", "", &[("named", b.addr, "")]);
    let lb = Ringlb::start(&cfg);
    let mut s = TcpStream::connect(lb.addr("web")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"after\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "named\nafter\n");
}

/// Kernel threads of the ringlb process named like io_uring's io-wq workers.
fn io_wq_threads(lb: &Ringlb) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", lb.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("iou-wrk"))
        .count()
}

#[test]
fn fifty_idle_splice_connections_hold_no_kernel_worker_threads() {
    // A splice op waiting on a socket would park an io-wq thread per direction (100 here);
    // the splice relay waits with POLL_ADD instead and splices only when data is there.
    let (lb, _b) = echo_lb("splice");
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(lb.addr("web")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        held.push(s);
    }
    let threads = io_wq_threads(&lb);
    assert!(
        threads <= 4,
        "{threads} io-wq threads for 50 idle connections"
    );
}

#[test]
fn ipv6_clients_reach_ipv4_backends_and_ipv6_backends() {
    let v4 = Backend::start("v4", Behaviour::Named);
    let v6 = std::net::TcpListener::bind("[::1]:0").expect("IPv6 loopback");
    let v6_addr = v6.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in v6.incoming() {
            let Ok(mut s) = s else { break };
            let _ = s.write_all(b"v6\n");
        }
    });
    let cfg = global_toml("")
        + "[[frontend]]\nname = \"web\"\nlisten = [\"[::1]:0\"]\nbalance = \"round-robin\"\n"
        + &format!(
            "[[frontend.backend]]\nname = \"v4\"\naddress = \"{}\"\n",
            v4.addr
        )
        + &format!("[[frontend.backend]]\nname = \"v6\"\naddress = \"{v6_addr}\"\n");
    let lb = Ringlb::start(&cfg);
    let addr = lb.addr("web");
    assert!(addr.is_ipv6());
    let mut names: Vec<String> = (0..4).map(|_| ask_name(addr).unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["v4", "v4", "v6", "v6"]);
}

/// A backend that reads one request line, writes `reply` bytes and closes at once, so its
/// data and its FIN reach ringlb together (often in one readiness wake-up), and the relay's
/// last direction to end passes the close on by closing, not by a shutdown.
fn reply_and_close_backend(reply: usize) -> std::net::SocketAddr {
    thread_per_connection(move |mut s| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let body: Vec<u8> = (0..reply).map(|i| (i % 251) as u8).collect();
        let _ = s.write_all(&body);
        // Dropped here: close right after the write, FIN behind the data.
    })
}

/// A backend on a port of its own that serves each connection with `serve` on a thread.
fn thread_per_connection(
    serve: impl Fn(TcpStream) + Send + Copy + 'static,
) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(s) = conn else { break };
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

/// ringlb on `io` with `relay`, one frontend "web" to the one backend at `backend`.
fn lb_to(io: &str, relay: &str, backend: std::net::SocketAddr) -> Ringlb {
    let cfg = global_toml(&format!("io = \"{io}\"\nrelay = \"{relay}\""))
        + &frontend_toml("web", "", &[("b", backend, "")]);
    Ringlb::start(&cfg)
}

fn reply_then_close(io: &str, relay: &str) {
    // Around the relay's 16 KiB buffer: a short read, exactly one buffer (a full read is not
    // the last one even when the FIN is in), one byte more, and many buffers.
    for reply in [1, 333, 16 * 1024, 16 * 1024 + 1, 300_000] {
        let lb = lb_to(io, relay, reply_and_close_backend(reply));
        for round in 0..20 {
            let mut s = TcpStream::connect(lb.addr("web")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET\n").unwrap();
            let mut got = Vec::new();
            // read_to_end: the whole reply, then EOF (a timeout or a reset fails it).
            s.read_to_end(&mut got)
                .unwrap_or_else(|e| panic!("{io}/{relay}, reply {reply}, round {round}: {e}"));
            assert_eq!(got.len(), reply, "{io}/{relay}, round {round}");
            assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        }
    }
}

#[test]
fn a_reply_and_the_backends_close_in_one_go_arrive_whole_then_eof() {
    reply_then_close("io_uring", "copy");
}

#[test]
fn a_reply_and_close_in_one_go_through_the_epoll_fallback_and_splice_auto() {
    reply_then_close("epoll", "copy");
    reply_then_close("io_uring", "splice-auto");
}

/// A backend that speaks first: on each connection it sends `greeting` and its FIN in one
/// segment (MSG_MORE, then the shutdown), and waits for the client's close.
fn greeting_and_fin_backend(greeting: &'static [u8]) -> std::net::SocketAddr {
    use std::os::fd::AsRawFd;
    thread_per_connection(move |mut s| {
        // SAFETY: a valid socket and buffer; MSG_MORE holds the bytes for the FIN.
        let sent = unsafe {
            libc::send(
                s.as_raw_fd(),
                greeting.as_ptr().cast(),
                greeting.len(),
                libc::MSG_MORE,
            )
        };
        assert_eq!(sent, greeting.len() as isize);
        s.shutdown(Shutdown::Write).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    })
}

/// Segments the socket has received so far (TCP_INFO's tcpi_segs_in).
fn segments_in(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above; `info` and `len` outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_segs_in
}

#[test]
fn a_backends_last_bytes_and_its_fin_reach_the_client_in_one_segment() {
    // The relay reads the bytes with the FIN already queued behind them (the kernel says so
    // with the read's completion), sends them corked and then the shutdown: one segment, as
    // HAProxy does, where a send and then a shutdown would be two (and two ACKs).
    let backend = greeting_and_fin_backend(b"220 hello, then goodbye\r\n");
    for relay in ["copy", "splice-auto"] {
        let lb = lb_to("io_uring", relay, backend);
        for round in 0..10 {
            let mut s = TcpStream::connect(lb.addr("web")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert_eq!(
                got, b"220 hello, then goodbye\r\n",
                "{relay}, round {round}"
            );
            // The SYN-ACK, then the greeting with the FIN.
            assert_eq!(
                segments_in(&s),
                2,
                "{relay}, round {round}: the greeting and the FIN came in separate segments"
            );
        }
    }
}

/// CPUs in a `Cpus_allowed_list` value ("0-1,4"), ascending.
fn cpu_list(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        out.extend(lo.parse::<usize>().unwrap()..=hi.parse::<usize>().unwrap());
    }
    out
}

/// Each worker thread's allowed CPUs, by worker index (threads named `ringlb-wN`).
fn worker_cpus(pid: i32) -> Vec<Vec<usize>> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        let Some(index) = comm.trim().strip_prefix("ringlb-w") else {
            continue;
        };
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap();
        found.push((index.parse::<usize>().unwrap(), cpu_list(list)));
    }
    found.sort();
    found.into_iter().map(|(_, cpus)| cpus).collect()
}

#[test]
fn workers_are_unpinned_by_default_and_pinned_as_cpu_affinity_says() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = cpu_list(
        own.lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap(),
    );
    let b = Backend::start("echo", Behaviour::Echo);
    let lb_with = |extra: &str| {
        Ringlb::start(&(global_toml(extra) + &frontend_toml("web", "", &[("echo", b.addr, "")])))
    };

    // Default: the scheduler places the workers (what HAProxy and nginx do unless told).
    let lb = lb_with("");
    assert!(
        lb.wait_for_log("(copy relay), unpinned", SOON).is_some(),
        "{:?}",
        lb.logs()
    );
    assert_eq!(worker_cpus(lb.pid()), vec![allowed.clone(); 2]);
    bulk_echo(lb.addr("web"), 4096);
    drop(lb);

    // "auto": worker i on the i-th allowed CPU, wrapping around.
    let lb = lb_with("cpu_affinity = \"auto\"");
    let expect: Vec<Vec<usize>> = (0..2).map(|i| vec![allowed[i % allowed.len()]]).collect();
    assert_eq!(worker_cpus(lb.pid()), expect);
    let named = expect
        .iter()
        .map(|c| c[0].to_string())
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        lb.wait_for_log(&format!("pinned to CPUs {named}"), SOON)
            .is_some(),
        "{:?}",
        lb.logs()
    );
    bulk_echo(lb.addr("web"), 4096);
    drop(lb);

    // A list: both workers on the one CPU named.
    let last = *allowed.last().unwrap();
    let lb = lb_with(&format!("cpu_affinity = \"{last}\""));
    assert_eq!(worker_cpus(lb.pid()), vec![vec![last]; 2]);
    bulk_echo(lb.addr("web"), 4096);
}
