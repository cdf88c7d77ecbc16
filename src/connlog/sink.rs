//! Sinks: where finished lines go, each drained by a writer thread of its own.
//!
//! Workers never write to a sink. They hand whole batches of lines to the sink's bounded
//! channel with `try_send`; a full channel (the sink is slow or blocked) drops the batch and
//! counts its lines, and the worker goes on. The writer thread does the blocking part:
//! `write` to stderr or a file, one datagram a line to syslog over UDP or a Unix socket, with
//! the syslog header (RFC 5424 or 3164) added here, off the data path. A failed write drops
//! and counts its lines; the next one tries again, so logging resumes when the sink is back
//! (a file reopened after an error, a syslog daemon restarted).
//!
//! A sink lives as long as a snapshot or a worker's unflushed batch holds it. When the last
//! [`Sink`] goes (a reload removed or changed the target), its channel closes and the writer
//! writes what is queued and ends.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::UdpSocket;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{LogTarget, SinkSpec, SyslogFormat};
use crate::log::Utc;

/// Batches a sink may have queued before workers start dropping: each at most
/// [`super::batch::FLUSH_AT`] bytes plus one line, so at most about 1 MiB, a few seconds of
/// lines at a moderate rate and a fraction of a second at a very high one.
const QUEUE: usize = 64;
/// How often an idle writer looks at its reopen flag, and retries a file it could not open.
const WRITER_TICK: Duration = Duration::from_millis(200);
/// A syslog send that blocks longer than this (a Unix socket whose reader stalled) fails.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Lines for one sink: whole lines, each ending in `\n`.
pub struct Batch {
    pub bytes: Vec<u8>,
    pub lines: u64,
}

/// Counters of one sink, shared by the workers, its writer and the metrics exporter.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Lines the sink accepted.
    pub written: AtomicU64,
    /// Lines lost: the queue was full, or the write failed.
    pub dropped: AtomicU64,
    /// Lines handed to the writer and not yet written or dropped.
    pub queued: AtomicU64,
    /// Set by SIGUSR1: the writer reopens a file target before its next write.
    reopen: AtomicBool,
}

/// The workers' handle on a sink.
pub struct Sink {
    pub spec: SinkSpec,
    pub stats: Arc<SinkStats>,
    tx: SyncSender<Batch>,
}

impl Sink {
    fn start(spec: SinkSpec) -> io::Result<Arc<Sink>> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let stats = Arc::new(SinkStats::default());
        let writer = Writer::new(spec.clone(), stats.clone());
        std::thread::Builder::new()
            .name("ringlb-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(Arc::new(Sink { spec, stats, tx }))
    }

    /// Hands a batch to the writer without waiting; a full queue drops it (counted).
    pub fn offer(&self, batch: Batch) {
        let lines = batch.lines;
        self.stats.queued.fetch_add(lines, Ordering::Relaxed);
        match self.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(lines, Ordering::Relaxed);
                self.stats.dropped.fetch_add(lines, Ordering::Relaxed);
            }
        }
    }
}

/// The sinks in use, by spec, so that frontends (and successive snapshots) naming the same
/// target share one writer. Owned by the control thread, inside the backend registry.
#[derive(Default)]
pub struct Sinks {
    by_spec: HashMap<SinkSpec, Weak<Sink>>,
}

impl Sinks {
    /// The sink for `spec`, started if it is not running. `None` only if no thread could be
    /// started (logged); the frontend then logs nothing.
    pub fn get(&mut self, spec: &SinkSpec) -> Option<Arc<Sink>> {
        self.by_spec.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = self.by_spec.get(spec).and_then(Weak::upgrade) {
            return Some(s);
        }
        match Sink::start(spec.clone()) {
            Ok(s) => {
                self.by_spec.insert(spec.clone(), Arc::downgrade(&s));
                Some(s)
            }
            Err(e) => {
                crate::error!(
                    "connection log to {}: cannot start its writer thread: {e}",
                    spec.target
                );
                None
            }
        }
    }

    /// SIGUSR1: every file sink reopens its file (after logrotate moved it).
    pub fn reopen_files(&self) {
        for s in self.by_spec.values().filter_map(Weak::upgrade) {
            if matches!(s.spec.target, LogTarget::File(_)) {
                s.stats.reopen.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Lines queued in any sink and not yet written.
    pub fn queued(&self) -> u64 {
        self.by_spec
            .values()
            .filter_map(Weak::upgrade)
            .map(|s| s.stats.queued.load(Ordering::Relaxed))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_spec.values().all(|w| w.strong_count() == 0)
    }
}

/// The open destination of a writer.
enum Out {
    Stderr {
        journald: bool,
    },
    /// `None` while the file cannot be opened; retried every [`WRITER_TICK`].
    File(Option<File>),
    Udp(Option<UdpSocket>),
    Unix(Option<UnixDatagram>),
}

struct Writer {
    spec: SinkSpec,
    stats: Arc<SinkStats>,
    out: Out,
    hostname: String,
    pid: u32,
    /// One framed datagram, reused.
    frame: Vec<u8>,
    /// When the last open failure was logged (one line per failure streak).
    failing_since: Option<Instant>,
}

impl Writer {
    fn new(spec: SinkSpec, stats: Arc<SinkStats>) -> Writer {
        let out = match &spec.target {
            LogTarget::Stderr => Out::Stderr {
                journald: std::env::var_os("JOURNAL_STREAM").is_some(),
            },
            LogTarget::File(_) => Out::File(None),
            LogTarget::SyslogUdp(_) => Out::Udp(None),
            LogTarget::SyslogUnix(_) => Out::Unix(None),
        };
        #[allow(clippy::disallowed_methods)] // once, on the writer thread
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains(' '))
            .unwrap_or_else(|| "-".to_string());
        Writer {
            spec,
            stats,
            out,
            hostname,
            pid: std::process::id(),
            frame: Vec::with_capacity(1024),
            failing_since: None,
        }
    }

    fn run(mut self, rx: Receiver<Batch>) {
        self.open();
        loop {
            let batch = match rx.recv_timeout(WRITER_TICK) {
                Ok(b) => Some(b),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if self.stats.reopen.swap(false, Ordering::Relaxed) {
                self.close();
            }
            if self.is_closed() {
                self.open();
            }
            if let Some(b) = batch {
                let lines = b.lines;
                let written = self.write(&b);
                self.stats.written.fetch_add(written, Ordering::Relaxed);
                self.stats
                    .dropped
                    .fetch_add(lines - written, Ordering::Relaxed);
                self.stats.queued.fetch_sub(lines, Ordering::Relaxed);
            }
        }
    }

    fn is_closed(&self) -> bool {
        matches!(self.out, Out::File(None) | Out::Udp(None) | Out::Unix(None))
    }

    fn close(&mut self) {
        match &mut self.out {
            Out::File(f) => *f = None,
            Out::Udp(s) => *s = None,
            Out::Unix(s) => *s = None,
            Out::Stderr { .. } => {}
        }
    }

    fn open(&mut self) {
        let result = match (&mut self.out, &self.spec.target) {
            (Out::File(f), LogTarget::File(path)) => OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map(|file| *f = Some(file)),
            (Out::Udp(s), LogTarget::SyslogUdp(addr)) => {
                let local = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                // Connected, so that an ICMP "port unreachable" comes back as an error on a
                // later send and the line is counted as dropped rather than lost unseen.
                UdpSocket::bind(local)
                    .and_then(|u| u.connect(addr).map(|()| u))
                    .map(|u| *s = Some(u))
            }
            (Out::Unix(s), LogTarget::SyslogUnix(_)) => UnixDatagram::unbound()
                .and_then(|u| u.set_write_timeout(Some(SEND_TIMEOUT)).map(|()| u))
                .map(|u| *s = Some(u)),
            _ => Ok(()),
        };
        match result {
            Ok(()) => {
                if self.failing_since.take().is_some() {
                    crate::info!("connection log to {}: writing again", self.spec.target);
                }
            }
            Err(e) => {
                if self.failing_since.is_none() {
                    self.failing_since = Some(Instant::now());
                    crate::error!(
                        "connection log to {}: cannot open it: {e}; lines are dropped \
                         (ringlb_log_dropped_total) until it can be",
                        self.spec.target
                    );
                }
            }
        }
    }

    /// Writes a batch; returns how many of its lines the sink took.
    fn write(&mut self, b: &Batch) -> u64 {
        let result = match &mut self.out {
            Out::Stderr { journald: false } => {
                return whole(io::stderr().lock().write_all(&b.bytes), b.lines)
            }
            Out::Stderr { journald: true } => {
                // journald reads a priority per line: info.
                self.frame.clear();
                for line in b.bytes.split_inclusive(|&c| c == b'\n') {
                    self.frame.extend_from_slice(b"<6>");
                    self.frame.extend_from_slice(line);
                }
                return whole(io::stderr().lock().write_all(&self.frame), b.lines);
            }
            Out::File(Some(f)) => f.write_all(&b.bytes),
            Out::File(None) | Out::Udp(None) | Out::Unix(None) => return 0,
            Out::Udp(Some(_)) | Out::Unix(Some(_)) => return self.send_lines(b),
        };
        if let Err(e) = &result {
            self.note_write_error(e);
        } else if self.failing_since.take().is_some() {
            crate::info!("connection log to {}: writing again", self.spec.target);
        }
        whole(result, b.lines)
    }

    /// One datagram per line, each with its syslog header.
    fn send_lines(&mut self, b: &Batch) -> u64 {
        let mut sent = 0;
        let now = SystemTime::now();
        for line in b.bytes.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            self.frame.clear();
            // Over a local socket a 3164 header carries no host name (the daemon adds it);
            // a 5424 header always does.
            let host = match (&self.out, self.spec.syslog) {
                (Out::Unix(_), SyslogFormat::Rfc3164) => "",
                _ => &self.hostname,
            };
            syslog_header(
                &mut self.frame,
                self.spec.syslog,
                self.spec.facility,
                now,
                host,
                self.pid,
            );
            self.frame.extend_from_slice(line);
            let r = match (&self.out, &self.spec.target) {
                (Out::Udp(Some(u)), _) => u.send(&self.frame).map(drop),
                (Out::Unix(Some(u)), LogTarget::SyslogUnix(path)) => {
                    u.send_to(&self.frame, path).map(drop)
                }
                _ => Err(io::ErrorKind::NotConnected.into()),
            };
            match r {
                Ok(()) => {
                    sent += 1;
                    if self.failing_since.take().is_some() {
                        crate::info!("connection log to {}: writing again", self.spec.target);
                    }
                }
                Err(e) => self.note_write_error(&e),
            }
        }
        sent
    }

    fn note_write_error(&mut self, e: &io::Error) {
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            crate::error!(
                "connection log to {}: write failed: {e}; lines are dropped \
                 (ringlb_log_dropped_total) until it works again",
                self.spec.target
            );
        }
    }
}

fn whole(r: io::Result<()>, lines: u64) -> u64 {
    if r.is_ok() {
        lines
    } else {
        0
    }
}

/// `<PRI>1 TIMESTAMP HOST ringlb PID - - ` (RFC 5424) or `<PRI>Mmm dd hh:mm:ss HOST
/// ringlb[PID]: ` (RFC 3164). Severity is info; times are UTC.
fn syslog_header(
    out: &mut Vec<u8>,
    format: SyslogFormat,
    facility: u8,
    now: SystemTime,
    host: &str,
    pid: u32,
) {
    let pri = u32::from(facility) * 8 + 6;
    let t = Utc::from(now);
    let _ = match format {
        SyslogFormat::Rfc5424 => write!(
            out,
            "<{pri}>1 {:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z {host} ringlb {pid} - - ",
            t.year, t.month, t.day, t.hour, t.minute, t.second, t.milli
        ),
        // The local socket's daemon adds the host itself, as it does for syslog(3).
        SyslogFormat::Rfc3164 if host.is_empty() => write!(
            out,
            "<{pri}>{} {:>2} {:02}:{:02}:{:02} ringlb[{pid}]: ",
            super::line::month_name(t.month),
            t.day,
            t.hour,
            t.minute,
            t.second
        ),
        SyslogFormat::Rfc3164 => write!(
            out,
            "<{pri}>{} {:>2} {:02}:{:02}:{:02} {host} ringlb[{pid}]: ",
            super::line::month_name(t.month),
            t.day,
            t.hour,
            t.minute,
            t.second
        ),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn syslog_headers_follow_their_rfcs() {
        let t = UNIX_EPOCH + Duration::from_millis(1_233_922_371_443);
        let mut out = Vec::new();
        syslog_header(&mut out, SyslogFormat::Rfc5424, 16, t, "lb1", 42);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "<134>1 2009-02-06T12:12:51.443Z lb1 ringlb 42 - - "
        );
        out.clear();
        syslog_header(&mut out, SyslogFormat::Rfc3164, 16, t, "lb1", 42);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "<134>Feb  6 12:12:51 lb1 ringlb[42]: "
        );
        out.clear();
        syslog_header(&mut out, SyslogFormat::Rfc3164, 3, t, "", 42);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "<30>Feb  6 12:12:51 ringlb[42]: "
        );
    }
}
