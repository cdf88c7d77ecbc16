//! Real backends for tests: each a listener on 127.0.0.1:0 served by std threads.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a backend does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Echo every byte back until EOF, then close.
    Echo,
    /// Write its name and a newline at once, then echo until EOF.
    Named,
    /// Accept and close at once without a byte: a backend dying with connections queued.
    Slam,
}

/// A backend that can be stopped (its port then refuses) and counts what it served.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    listener_fd: Mutex<Option<i32>>,
    stopped: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(name: &str, behaviour: Behaviour) -> Backend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, behaviour)
    }

    /// Starts on a given address (to bring a stopped backend back on its old port).
    pub fn start_on(addr: SocketAddr, name: &str, behaviour: Behaviour) -> Backend {
        let listener = bind_retrying(addr);
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let fd = listener.as_raw_fd();
        {
            let (accepted, open, stopped) = (accepted.clone(), open.clone(), stopped.clone());
            let name = name.to_string();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { break };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let open = open.clone();
                    let name = name.clone();
                    open.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        serve(stream, behaviour, &name);
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
        Backend {
            name: name.to_string(),
            addr,
            accepted,
            open,
            listener_fd: Mutex::new(Some(fd)),
            stopped,
        }
    }

    /// Closes the listening port: new connections are refused, as when the process dies.
    /// Connections already open keep going.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(fd) = self.listener_fd.lock().unwrap().take() {
            // shutdown() wakes the blocked accept(), whose thread then drops the listener.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind_retrying(addr: SocketAddr) -> TcpListener {
    // A port just released by `stop` may take a moment to be free again.
    for _ in 0..200 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        if s.bind(&addr.into()).is_ok() && s.listen(1024).is_ok() {
            return s.into();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot bind backend on {addr}");
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, name: &str) {
    if behaviour == Behaviour::Slam {
        // Linger 0: a reset, as the kernel sends for connections a dying listener had queued.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        return;
    }
    if behaviour == Behaviour::Named && stream.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// A backend that never answers a SYN: a listener with a full accept queue. The kernel drops
/// further SYNs, so a connect to it hangs until the connector's own timeout.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        // Fill the accept queue (backlog 0 holds one) with connections nobody accepts.
        let mut fillers = Vec::new();
        for _ in 0..4 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            fillers.push(s);
        }
        // Wait until a fresh connect really hangs.
        let probe_hangs = || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(300))
                .err()
                .is_some_and(|e| {
                    e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::WouldBlock
                })
        };
        assert!(
            super::wait_until(super::SOON, probe_hangs),
            "blackhole backend still answers"
        );
        Blackhole {
            addr,
            _listener: l,
            _fillers: fillers,
        }
    }
}

/// An address on which nothing listens (connects are refused). Each call in a process gets
/// another loopback address, so two calls never return the same address (a port freed by
/// the first could otherwise be handed out again to the second).
pub fn refused_addr() -> SocketAddr {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 0, 1 + (n / 250 % 250) as u8, (n % 250) as u8 + 1);
    let l = TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap()
}

/// Connects to ringlb, reads the backend's name line, closes. Returns the name.
pub fn ask_name(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed after {:?}", String::from_utf8_lossy(&name)),
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => name.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// A listener that records when each connection (each health probe) arrived, and closes it.
pub fn probe_recorder() -> (SocketAddr, Arc<Mutex<Vec<std::time::Instant>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { break };
            s.lock().unwrap().push(std::time::Instant::now());
            drop(c);
        }
    });
    (addr, seen)
}
