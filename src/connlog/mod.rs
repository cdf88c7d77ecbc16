//! Connection logs: one line per connection when it ends (and, with `log_connect`, one when
//! its backend connection is up), in HAProxy's `option tcplog` format or as JSON.
//!
//! The data path sees two things. A [`Trace`] that `worker::accept::serve` fills at a few
//! points (a backend tried, connected, failed, relaying, finished): when the frontend has no
//! `[frontend.log]` it is a null pointer and every call is one branch, with no allocation
//! and no syscall. When it logs, the trace is one small boxed record per connection, and the
//! finished line is formatted into the worker's buffer ([`batch`]), which goes to the sink's
//! writer thread ([`sink`]) in batches; a sink that cannot keep up costs dropped lines
//! (`ringlb_log_dropped_total`), never a stalled relay.
//!
//! [`termination`] gives HAProxy's two-letter termination state from how the connection
//! ended: the relay's [`Ended`], the sweeper's [`Cut`], or the last connect failure.

mod batch;
pub mod line;
pub mod sink;

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::backend::FrontendSnap;
use crate::config::{ConnLog, LogFormat};
use crate::relay::{Ended, Meter, Side};
use crate::worker::conns::Cut;
use line::{Entry, Event};
pub use sink::{Sink, Sinks};

/// One frontend's log as the workers use it: its settings and its sink. Rebuilt with every
/// snapshot (cheap: the sink is shared and kept).
pub struct FrontendLog {
    pub config: ConnLog,
    pub sink: Arc<Sink>,
}

impl FrontendLog {
    pub fn build(config: &ConnLog, sinks: &mut Sinks) -> Option<Arc<FrontendLog>> {
        Some(Arc::new(FrontendLog {
            config: config.clone(),
            sink: sinks.get(&config.sink)?,
        }))
    }
}

/// Why a connect attempt failed, as far as the termination state cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailed {
    /// Refused, reset, or closed before a byte: the server's doing (`S`).
    Refused,
    /// `connect_timeout` passed (`s`).
    TimedOut,
    /// This host is out of fds or memory (`R`).
    Local,
}

/// How a connection ended, for [`termination`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It was relayed until `ended`, or until the sweeper cut it.
    Relayed {
        ended: Ended,
        cut: Option<Cut>,
        backend_up: bool,
    },
    /// No backend was ever connected; `last` is the last attempt's failure (`None`: no
    /// backend could be picked at all).
    NotConnected { last: Option<ConnectFailed> },
    /// It waited in the frontend's queue (`max_connections`) until `queue_timeout`.
    QueueTimeout,
}

/// HAProxy's termination state: who or what ended the connection, then at which stage.
pub fn termination(o: Outcome) -> [u8; 2] {
    match o {
        Outcome::Relayed {
            cut: Some(Cut::Idle | Cut::ClientTimeout),
            ..
        } => *b"cD",
        Outcome::Relayed {
            cut: Some(Cut::ServerTimeout),
            ..
        } => *b"sD",
        // A backend marked down with `shutdown-sessions` (D), else an operator's or a
        // reload's kill (K).
        Outcome::Relayed {
            cut: Some(Cut::Killed),
            backend_up,
            ..
        } => {
            if backend_up {
                *b"KD"
            } else {
                *b"DD"
            }
        }
        Outcome::Relayed { ended, .. } => match ended {
            Ended::Closed { .. } => *b"--",
            Ended::Failed(Side::Client) => *b"CD",
            Ended::Failed(Side::Server) => *b"SD",
        },
        Outcome::NotConnected { last } => match last {
            None | Some(ConnectFailed::Refused) => *b"SC",
            Some(ConnectFailed::TimedOut) => *b"sC",
            Some(ConnectFailed::Local) => *b"RC",
        },
        Outcome::QueueTimeout => *b"sQ",
    }
}

thread_local! {
    /// Connections seen by this worker on sampled frontends, for `sample = N`.
    static SAMPLED: Cell<u64> = const { Cell::new(0) };
}

/// What the log needs to know of one connection, gathered while it lives. It holds no
/// reference to the log: `serve` holds the frontend's snapshot (and so its log) for the
/// connection's life and hands it back at the end, so a logged connection adds no shared
/// reference count to bump.
struct Record {
    client: SocketAddr,
    accepted: SystemTime,
    start: Instant,
    /// Time spent waiting in queues (frontend and backend `max_connections`): HAProxy's Tw.
    waited: Duration,
    /// Milliseconds from accept to the backend connection, -1 until then.
    tc_ms: i64,
    backend: Option<usize>,
    /// Backends tried (a local error retried on the same one counts once).
    tries: u32,
    last_failure: Option<ConnectFailed>,
}

/// One connection's log record, or nothing when its frontend does not log it. Every method
/// is a no-op on nothing.
pub struct Trace(Option<Box<Record>>);

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Trace {
    /// Starts the record of a connection accepted from `client`, if `log` says to log it.
    #[inline]
    pub fn begin(log: Option<&Arc<FrontendLog>>, client: SocketAddr) -> Trace {
        match log {
            None => Trace(None),
            Some(log) => Trace::sampled(log, client),
        }
    }

    #[inline(never)]
    fn sampled(log: &FrontendLog, client: SocketAddr) -> Trace {
        let n = u64::from(log.config.sample);
        if n > 1 {
            let seen = SAMPLED.get().wrapping_add(1);
            SAMPLED.set(seen);
            if seen % n != 0 {
                return Trace(None);
            }
        }
        Trace(Some(Box::new(Record {
            client,
            accepted: SystemTime::now(),
            start: Instant::now(),
            waited: Duration::ZERO,
            tc_ms: -1,
            backend: None,
            tries: 0,
            last_failure: None,
        })))
    }

    /// The client's address as a PROXY header declared it.
    #[inline]
    pub fn client(&mut self, addr: SocketAddr) {
        if let Some(r) = &mut self.0 {
            r.client = addr;
        }
    }

    /// The connection waited `d` in a queue.
    #[inline]
    pub fn waited(&mut self, d: Duration) {
        if let Some(r) = &mut self.0 {
            r.waited += d;
        }
    }

    /// A connect to backend `index` begins.
    #[inline]
    pub fn attempt(&mut self, index: usize) {
        if let Some(r) = &mut self.0 {
            let again = r.last_failure == Some(ConnectFailed::Local) && r.backend == Some(index);
            if !again {
                r.tries += 1;
            }
            r.backend = Some(index);
            r.last_failure = None;
        }
    }

    /// The backend that carries the connection, when a hedge won the race for it.
    #[inline]
    pub fn carried_by(&mut self, index: usize) {
        if let Some(r) = &mut self.0 {
            r.backend = Some(index);
        }
    }

    /// The connect succeeded.
    #[inline]
    pub fn connected(&mut self) {
        if let Some(r) = &mut self.0 {
            r.tc_ms = ms(r.start.elapsed());
        }
    }

    #[inline]
    pub fn failed(&mut self, why: ConnectFailed) {
        if let Some(r) = &mut self.0 {
            r.last_failure = Some(why);
        }
    }

    /// The relay starts: writes the `log_connect` line if asked for. `actconn` counts the
    /// process's open connections (read only when a line is written: it is a contended
    /// line, and a connection that is not logged should not touch it).
    #[inline]
    pub fn relaying(&self, fe: &FrontendSnap, actconn: &AtomicUsize) {
        if let (Some(r), Some(log)) = (&self.0, &fe.log) {
            if log.config.log_connect && !log.config.only_errors {
                let actconn = actconn.load(Ordering::Relaxed);
                r.emit(log, fe, actconn, Event::Connect, *b"--", (0, 0));
            }
        }
    }

    /// The connection is over: writes its line unless a filter skips it. Call it while the
    /// connection still counts in the open-connection numbers (they include it, as HAProxy's
    /// do).
    #[inline]
    pub fn finish(self, fe: &FrontendSnap, actconn: &AtomicUsize, end: End<'_>) {
        if let (Some(r), Some(log)) = (self.0, &fe.log) {
            r.finish(log, fe, actconn.load(Ordering::Relaxed), end);
        }
    }
}

/// How `serve` saw a connection end.
pub enum End<'a> {
    /// Relayed until `ended`; `cut` if the sweeper ended it; `meter` holds its byte counts.
    Relayed {
        ended: Ended,
        cut: Option<Cut>,
        meter: &'a Meter,
    },
    /// No backend connection was ever made (the trace knows the last failure).
    NotConnected,
    /// Refused after waiting in the queue for `queue_timeout`.
    QueueTimeout,
}

impl Record {
    fn retries(&self) -> u32 {
        self.tries.saturating_sub(1)
    }

    #[inline(never)]
    fn finish(&self, log: &FrontendLog, fe: &FrontendSnap, actconn: usize, end: End<'_>) {
        let (outcome, bytes) = match end {
            End::Relayed { ended, cut, meter } => {
                let backend_up = self
                    .backend
                    .and_then(|i| fe.backends.get(i))
                    .is_none_or(|b| b.state.is_up());
                (
                    Outcome::Relayed {
                        ended,
                        cut,
                        backend_up,
                    },
                    (meter.bytes_up.get(), meter.bytes_down.get()),
                )
            }
            End::NotConnected => (
                Outcome::NotConnected {
                    last: self.last_failure,
                },
                (0, 0),
            ),
            End::QueueTimeout => (Outcome::QueueTimeout, (0, 0)),
        };
        let state = termination(outcome);
        let c = &log.config;
        if (c.only_errors && &state == b"--" && self.retries() == 0)
            || (c.skip_null && bytes.0 == 0)
        {
            return;
        }
        self.emit(log, fe, actconn, Event::End, state, bytes);
    }

    #[inline(never)]
    fn emit(
        &self,
        log: &FrontendLog,
        fe: &FrontendSnap,
        actconn: usize,
        event: Event,
        termination: [u8; 2],
        (bytes_in, bytes_out): (u64, u64),
    ) {
        let backend = self.backend.and_then(|i| fe.backends.get(i));
        let feconn = fe.state.active();
        let entry = Entry {
            event,
            client: self.client,
            accepted: self.accepted,
            frontend: &fe.config.name,
            backend: backend.map(|b| b.config.name.as_str()),
            tw_ms: ms(self.waited),
            tc_ms: self.tc_ms,
            tt_ms: ms(self.start.elapsed()),
            bytes_in,
            bytes_out,
            termination,
            actconn: actconn as u64,
            feconn,
            // ringlb's frontend is HAProxy's backend too: one pool per frontend.
            beconn: feconn,
            srvconn: backend.map_or(0, |b| b.state.active.load(Ordering::Relaxed)),
            retries: self.retries(),
        };
        let format = log.config.format;
        batch::push(&log.sink, |out| match format {
            LogFormat::Haproxy => line::haproxy(&entry, out),
            LogFormat::Json => line::json(&entry, out),
        });
    }
}

/// Waits, up to `limit`, until the lines the workers logged so far are written: for a
/// graceful stop, after the last connection closed.
pub async fn settle(sinks: &Sinks, limit: Duration) {
    if sinks.is_empty() {
        return;
    }
    let deadline = Instant::now() + limit;
    // Two flush periods: every worker has handed over its buffer.
    tokio::time::sleep(batch::FLUSH_EVERY * 2).await;
    while sinks.queued() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed(ended: Ended, cut: Option<Cut>, backend_up: bool) -> [u8; 2] {
        termination(Outcome::Relayed {
            ended,
            cut,
            backend_up,
        })
    }

    #[test]
    fn termination_states_use_haproxys_letters() {
        let closed = Ended::Closed {
            first: Side::Client,
        };
        assert_eq!(&relayed(closed, None, true), b"--");
        assert_eq!(&relayed(Ended::Failed(Side::Client), None, true), b"CD");
        assert_eq!(&relayed(Ended::Failed(Side::Server), None, true), b"SD");
        assert_eq!(&relayed(closed, Some(Cut::Idle), true), b"cD");
        assert_eq!(&relayed(closed, Some(Cut::Killed), false), b"DD");
        assert_eq!(&relayed(closed, Some(Cut::Killed), true), b"KD");
        let not = |last| termination(Outcome::NotConnected { last });
        assert_eq!(&not(None), b"SC");
        assert_eq!(&not(Some(ConnectFailed::Refused)), b"SC");
        assert_eq!(&not(Some(ConnectFailed::TimedOut)), b"sC");
        assert_eq!(&not(Some(ConnectFailed::Local)), b"RC");
    }
}
