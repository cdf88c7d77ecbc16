//! Constant connection load while a test stops, restarts or upgrades what serves it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{bulk_echo, SOON};

/// One exchange on a new connection to an echo backend: writes "ping", reads it back.
/// Returns the connection, still open.
pub fn ping(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(SOON))?;
    s.write_all(b"ping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    if &back != b"ping" {
        return Err(std::io::Error::other(format!("echoed {back:?}")));
    }
    Ok(s)
}

/// Eight clients making [`ping`]s back to back, each on a new connection, and two making
/// 2 MiB transfers each way (sha256 checked: `bulk_echo` panics on a mismatch or a cut).
pub struct Churn {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<Vec<String>>>,
    bulk: Vec<JoinHandle<usize>>,
}

/// What a [`Churn`] saw, once stopped.
pub struct Churned {
    pub exchanges: usize,
    pub transfers: usize,
    pub failures: Vec<String>,
}

impl Churn {
    pub fn start(addr: SocketAddr) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let clients = (0..8)
            .map(|_| {
                let (stop, served) = (stop.clone(), served.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match ping(addr) {
                            Ok(_) => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.push(format!("{e:?}")),
                        }
                    }
                    failures
                })
            })
            .collect();
        let bulk = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        bulk_echo(addr, 2 << 20);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        Churn {
            stop,
            served,
            clients,
            bulk,
        }
    }

    /// Exchanges completed so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until more than `n` exchanges complete after this call: traffic is flowing.
    pub fn flowing(&self, n: usize) -> bool {
        let before = self.served();
        super::wait_until(SOON, || self.served() > before + n)
    }

    pub fn stop(self) -> Churned {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        let transfers = self.bulk.into_iter().map(|b| b.join().unwrap()).sum();
        Churned {
            exchanges: self.served.load(Ordering::Relaxed),
            transfers,
            failures,
        }
    }
}
