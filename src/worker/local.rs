//! Local errors: this host running out of fds, memory or socket buffers.
//!
//! EMFILE, ENFILE, ENOBUFS and ENOMEM on an accept, a backend connect or a health probe say
//! nothing about the backend: they are ringlb's own condition. They are never counted against
//! a backend and never mark one down; they are counted here (`ringlb_local_errors_total`) and
//! logged at most once per [`LOG_EVERY`] per operation, saying what they are.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The errnos that mean "this host", with their names for metrics and logs.
pub const LOCAL_ERRNOS: [(i32, &str); 4] = [
    (libc::EMFILE, "EMFILE"),
    (libc::ENFILE, "ENFILE"),
    (libc::ENOBUFS, "ENOBUFS"),
    (libc::ENOMEM, "ENOMEM"),
];

/// Where a local error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Accept = 0,
    Connect = 1,
    Probe = 2,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Accept, Op::Connect, Op::Probe];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Accept => "accept",
            Op::Connect => "connect",
            Op::Probe => "probe",
        }
    }
}

/// How often each operation may log a local error.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

pub fn is_local_error(e: &io::Error) -> bool {
    errno_index(e).is_some()
}

fn errno_index(e: &io::Error) -> Option<usize> {
    let code = e.raw_os_error()?;
    LOCAL_ERRNOS.iter().position(|&(c, _)| c == code)
}

/// Counts of local errors by operation and errno, shared by the workers and the probes.
#[derive(Debug)]
pub struct LocalErrors {
    counts: [[AtomicU64; LOCAL_ERRNOS.len()]; Op::ALL.len()],
    /// Milliseconds since `start` of each operation's last log line (0: never).
    last_logged_ms: [AtomicU64; Op::ALL.len()],
    start: Instant,
}

impl Default for LocalErrors {
    fn default() -> Self {
        LocalErrors {
            counts: Default::default(),
            last_logged_ms: Default::default(),
            start: Instant::now(),
        }
    }
}

impl LocalErrors {
    /// Counts `e` if it is a local error and logs it when this operation has not logged for
    /// [`LOG_EVERY`]; returns whether it was local. `what` names the context for the log
    /// line ("frontend web: connect to api1").
    pub fn record(&self, op: Op, e: &io::Error, what: impl FnOnce() -> String) -> bool {
        let Some(i) = errno_index(e) else {
            return false;
        };
        self.counts[op as usize][i].fetch_add(1, Ordering::Relaxed);
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = &self.last_logged_ms[op as usize];
        let prev = last.load(Ordering::Relaxed);
        if (prev == 0 || now.saturating_sub(prev) >= LOG_EVERY.as_millis() as u64)
            && last
                .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            crate::warn!(
                "{}: {e}: this host is out of {}, not a backend failure; not counted against \
                 any backend (raise LimitNOFILE= or lower max_connections; logged at most once \
                 per {}s)",
                what(),
                if matches!(LOCAL_ERRNOS[i].0, libc::EMFILE | libc::ENFILE) {
                    "file descriptors"
                } else {
                    "memory or socket buffers"
                },
                LOG_EVERY.as_secs()
            );
        }
        true
    }

    /// Every (operation, errno name, count), for /metrics.
    pub fn counts(&self) -> impl Iterator<Item = (Op, &'static str, u64)> + '_ {
        Op::ALL.into_iter().flat_map(move |op| {
            LOCAL_ERRNOS.iter().enumerate().map(move |(i, &(_, name))| {
                (
                    op,
                    name,
                    self.counts[op as usize][i].load(Ordering::Relaxed),
                )
            })
        })
    }
}
