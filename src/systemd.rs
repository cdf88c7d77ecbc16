//! systemd integration: `sd_notify` readiness, reload and stop messages, and watchdog pings,
//! through the `sd-notify` crate (message vocabulary, the monotonic clock, the watchdog
//! environment, and the send to the socket in `$NOTIFY_SOCKET`).
//!
//! Two things the crate does not do are here:
//!
//! - It sends with a blocking socket. Messages therefore go out on a thread of their own, in
//!   the order they were made, so a stuck service manager can never block the control thread;
//!   only the stop waits (at most [`STOP_FLUSH`]) for its STOPPING=1 to leave.
//! - It reaches a socket named by a path (what systemd sets), not one in Linux's abstract
//!   namespace (`@name`, which other service managers and test harnesses use): that is one
//!   `send_to_addr` below.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, or `Type=simple`) every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use sd_notify::NotifyState;

/// How long the stop waits for STOPPING=1 to be sent before the process goes on exiting.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug)]
enum Target {
    /// An absolute path: the crate sends there.
    Path,
    /// `@name`: the abstract namespace.
    Abstract(SocketAddr),
}

/// One part of a message; `Status` owns its text so that it can cross to the sending thread.
enum Part {
    State(NotifyState<'static>),
    Status(String),
}

enum Job {
    Send(Vec<Part>),
    /// Answered once everything queued before it was sent.
    Flush(mpsc::SyncSender<()>),
}

pub struct Notifier {
    jobs: Option<mpsc::Sender<Job>>,
    /// Set once `MAINPID=` named the process an upgrade handed over to: from then on the
    /// service manager hears from that one, and this one says nothing more (with the
    /// default `NotifyAccess=main` it would not be listened to; with `all`, its STOPPING=1
    /// would stop the service).
    handed_over: std::sync::atomic::AtomicBool,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. A socket that cannot be used is logged and ignored: ringlb
    /// still serves, and systemd reports the missing readiness itself.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier {
                jobs: None,
                handed_over: Default::default(),
            };
        };
        let started = target(&name.to_string_lossy()).and_then(|target| {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("ringlb-notify".into())
                .spawn(move || send_loop(&target, rx))?;
            Ok(tx)
        });
        match started {
            Ok(tx) => Notifier {
                jobs: Some(tx),
                handed_over: Default::default(),
            },
            Err(e) => {
                crate::warn!(
                    "systemd: cannot use NOTIFY_SOCKET {}: {e}",
                    name.to_string_lossy()
                );
                Notifier {
                    jobs: None,
                    handed_over: Default::default(),
                }
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.jobs.is_some()
    }

    /// Queues one message. Best effort: a failed send is logged, never fatal.
    fn send(&self, parts: Vec<Part>) {
        if self.handed_over.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(jobs) = &self.jobs {
            // The thread only ends with the process.
            let _ = jobs.send(Job::Send(parts));
        }
    }

    /// Every listener is bound: systemd may start units ordered after us.
    pub fn ready(&self, status: &str) {
        self.send(vec![
            Part::State(NotifyState::Ready),
            Part::Status(status.to_string()),
        ]);
    }

    /// A reload is starting; `ready` ends it. MONOTONIC_USEC lets systemd tell this reload
    /// from an older one.
    pub fn reloading(&self) {
        let mut parts = vec![Part::State(NotifyState::Reloading)];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            parts.push(Part::State(now));
        }
        self.send(parts);
    }

    /// An upgrade's new process `pid` serves: it is the service's main process from now on.
    /// Waits (briefly) until it is sent; nothing more is sent after it.
    pub fn main_pid(&self, pid: u32) {
        self.send(vec![
            Part::State(NotifyState::MainPid(pid)),
            Part::Status(format!("upgraded: process {pid} serves")),
        ]);
        self.flush();
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The graceful stop begins. Waits (briefly) until it is sent: the process may exit
    /// right after.
    pub fn stopping(&self) {
        self.send(vec![
            Part::State(NotifyState::Stopping),
            Part::Status("draining connections".into()),
        ]);
        self.flush();
    }

    /// Waits (at most [`STOP_FLUSH`]) until everything queued was sent.
    fn flush(&self) {
        if let Some(jobs) = &self.jobs {
            let (ack_tx, ack_rx) = mpsc::sync_channel(1);
            if jobs.send(Job::Flush(ack_tx)).is_ok() {
                let _ = ack_rx.recv_timeout(STOP_FLUSH);
            }
        }
    }

    pub fn watchdog(&self) {
        self.send(vec![Part::State(NotifyState::Watchdog)]);
    }
}

fn target(name: &str) -> std::io::Result<Target> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        Ok(Target::Abstract(SocketAddr::from_abstract_name(
            abstract_name.as_bytes(),
        )?))
    } else if name.starts_with('/') {
        Ok(Target::Path)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an absolute path or an @abstract name",
        ))
    }
}

fn send_loop(target: &Target, jobs: mpsc::Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Send(parts) => {
                if let Err(e) = deliver(target, &parts) {
                    crate::warn!("systemd: notify failed: {e}");
                }
            }
            Job::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
}

fn deliver(target: &Target, parts: &[Part]) -> std::io::Result<()> {
    let states: Vec<NotifyState<'_>> = parts
        .iter()
        .map(|p| match p {
            Part::State(s) => s.clone(),
            Part::Status(text) => NotifyState::Status(text),
        })
        .collect();
    match target {
        Target::Path => sd_notify::notify(&states),
        Target::Abstract(addr) => {
            let socket = UnixDatagram::unbound()?;
            socket.send_to_addr(message(&states).as_bytes(), addr)?;
            Ok(())
        }
    }
}

/// The datagram for `states`, one `KEY=value` per line, as the crate writes it.
fn message(states: &[NotifyState<'_>]) -> String {
    states.iter().map(|s| format!("{s}\n")).collect()
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// advises. `None` when no watchdog is asked for, or it is meant for another process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Pings the watchdog from the control thread until the process ends: if the control loop
/// stalls, the pings stop and systemd restarts ringlb.
pub async fn watchdog(notifier: Arc<Notifier>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        notifier.watchdog();
    }
}

/// Everything the control loop needs: the notifier and, when asked for, the watchdog task.
pub fn start() -> Arc<Notifier> {
    let notifier = Arc::new(Notifier::from_env());
    if notifier.is_enabled() {
        if let Some(every) = watchdog_interval() {
            crate::info!(
                "systemd watchdog enabled: pinging every {}",
                crate::config::format_duration(every)
            );
            tokio::spawn(watchdog(notifier.clone(), every));
        }
    }
    notifier
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_an_abstract_socket_in_order() {
        let name = format!("ringlb-sd-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let (tx, jobs) = mpsc::channel();
        let t = target(&format!("@{name}")).unwrap();
        let sender = std::thread::spawn(move || send_loop(&t, jobs));
        let n = Notifier {
            jobs: Some(tx),
            handed_over: Default::default(),
        };
        n.ready("ok");
        n.reloading();
        n.stopping();
        n.main_pid(4242);
        n.watchdog();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok\n");
        let len = rx.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=draining connections\n");
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..len],
            b"MAINPID=4242\nSTATUS=upgraded: process 4242 serves\n"
        );
        drop(n);
        sender.join().unwrap();
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        assert!(target("notify").is_err());
        assert!(matches!(target("/run/systemd/notify"), Ok(Target::Path)));
    }
}
