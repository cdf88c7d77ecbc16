//! systemd integration: `sd_notify` readiness, reload and stop messages, and watchdog pings.
//!
//! The protocol is one datagram per message to the `AF_UNIX` socket named in `$NOTIFY_SOCKET`
//! (a path, or an abstract name written with a leading `@`), so it is done here in a few
//! lines over std's `UnixDatagram` rather than with a crate: the `sd-notify` crate needs a
//! newer Rust than this project's MSRV, and owning it keeps the socket non-blocking, so a
//! stuck service manager can never block the control thread.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, or `Type=simple`) every call is a no-op.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. A socket that cannot be used is logged and ignored: ringlb
    /// still serves, and systemd reports the missing readiness itself.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        match open(&name) {
            Ok(target) => Notifier {
                target: Some(target),
            },
            Err(e) => {
                crate::warn!(
                    "systemd: cannot use NOTIFY_SOCKET {}: {e}",
                    name.to_string_lossy()
                );
                Notifier { target: None }
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message (lines of `KEY=value`). Best effort: a failure is logged, never fatal.
    pub fn send(&self, msg: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(msg.as_bytes(), addr) {
            crate::warn!("systemd: notify failed: {e}");
        }
    }

    /// Every listener is bound: systemd may start units ordered after us.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload is starting; `ready` ends it. MONOTONIC_USEC lets systemd tell this reload
    /// from an older one.
    pub fn reloading(&self) {
        match monotonic_usec() {
            Some(usec) => self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}")),
            None => self.send("RELOADING=1"),
        }
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining connections");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

fn open(name: &OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let bytes = name.as_bytes();
    let addr = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => SocketAddr::from_pathname(name)?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an absolute path or an @abstract name",
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd uses for MONOTONIC_USEC.
fn monotonic_usec() -> Option<u64> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    Some(ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000)
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// advises. `None` when no watchdog is asked for, or it is meant for another process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
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
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("ringlb-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(open(path.as_os_str()).unwrap()),
        };
        n.ready("ok");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
        let _ = std::fs::remove_dir_all(&dir);

        let name = format!("ringlb-sd-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier {
            target: Some(open(OsStr::new(&format!("@{name}"))).unwrap()),
        };
        n.reloading();
        let len = rx.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        assert!(open(OsStr::new("notify")).is_err());
    }
}
