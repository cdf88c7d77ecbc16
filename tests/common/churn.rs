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

impl Churned {
    /// Prints what the load did during `what` (e.g. "20 restarts") and fails the test on any
    /// refused, reset or corrupted connection, or if fewer than two transfers completed.
    pub fn assert_clean(&self, what: &str) {
        eprintln!(
            "{what}: {} exchanges and {} 2 MiB transfers, {} failures",
            self.exchanges,
            self.transfers,
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "{} failed, e.g. {:?}",
            self.failures.len(),
            &self.failures[..self.failures.len().min(5)]
        );
        assert!(self.transfers >= 2);
    }
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

/// Sends 512 KiB (a pattern varied by `seed`) through the echo connection `held` and checks
/// that the same bytes come back (sha256): a connection established before a stop or an
/// upgrade still moves data after it. Panics naming `what` if it is cut or the bytes differ.
pub fn echo_checked(held: &mut TcpStream, seed: u32, what: &str) {
    let data: Vec<u8> = (0..512 * 1024u32).map(|i| (i * 7 + seed) as u8).collect();
    let mut reader = held.try_clone().unwrap();
    let len = data.len();
    let echoed = std::thread::spawn(move || {
        let mut back = vec![0u8; len];
        reader.read_exact(&mut back).map(|()| back)
    });
    held.write_all(&data).unwrap();
    let back = echoed
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: cut ({e})"));
    let digest = |b: &[u8]| <sha2::Sha256 as sha2::Digest>::digest(b);
    assert_eq!(digest(&back), digest(&data), "{what}: bytes differ");
}
