//! ringlb: a Layer-4 TCP load balancer for Linux on io_uring.
//!
//! Module map (data flows top to bottom):
//!
//! - [`cli`]: the `ringlb` command line (`run`, `check`, `demo`).
//! - [`config`]: TOML file -> validated [`config::Config`]; the pure reload [`config::diff`].
//! - [`control`]: the control thread's loop: signals, reloads, events, graceful stop.
//! - [`server`]: owns config, registry, workers and listeners; publishes snapshots; reloads.
//! - [`backend`]: live backend state (kept across reloads) and the published snapshot.
//! - [`balance`]: selection behind one trait: round robin, least-connections, Maglev; the
//!   pools SNI routes pick from (`balance::pools`).
//! - [`discovery`]: backend groups from DNS (`discover`): async lookups, re-resolution, the
//!   expansion of the config with what they found.
//! - [`health`]: active checks on a thread of their own, passive health, slow start, the logs.
//! - [`worker`]: per-core threads (on io_uring the worker's own executor, `worker::exec`,
//!   parked in its own ring, `worker::ring`, with its timers in `worker::deadline`; or the
//!   epoll fallback on tokio); SO_REUSEPORT listeners,
//!   kept to ringlb's own sockets (`worker::listener`); accept -> pick -> connect -> relay;
//!   each worker's connection table (idle timeout, kill switch, byte counts); the fd budget;
//!   local errors (this host out of fds) kept apart; the accept-time gate (`worker::gate`:
//!   PROXY header in, source ACLs, per-source limits), backend `max_connections` with the
//!   frontend's FIFO queue (`worker::queue`), and SNI routing's read of the ClientHello
//!   (`worker::route`).
//! - [`relay`]: one relay for every runtime and mode (copy, splice, splice-auto): on io_uring
//!   a read op into the worker's provided buffer ring, elsewhere readiness then plain
//!   non-blocking syscalls, with buffers and pipes lent per chunk by per-worker pools; the
//!   PROXY protocol header out (`relay::proxy`) and its strict parser for headers coming in
//!   (`relay::proxy_in`); the TLS ClientHello parser (`relay::sni`). The io_uring ops are in
//!   `worker::ring` (`unsafe` lives there, in `relay::ops` for accept4 and passed fds, and in
//!   one setsockopt in `worker::listener::reuseport`).
//! - [`admin`]: the admin listener: `/metrics`, `/status`, the status page, `/healthz`.
//! - [`metrics`]: the Prometheus recorder, fed from the data path's atomics by a periodic task.
//! - [`systemd`]: `sd_notify` readiness, reload and stop messages; watchdog pings.
//! - [`upgrade`]: the hitless binary upgrade (SIGUSR2, `ringlb ctl upgrade`): the new process
//!   is started with every listening socket, and the old one drains once it serves.
//! - [`demo`]: the self-contained demo behind `ringlb demo`.
//! - [`log`]: one-line operator logs on stderr, journald-aware.
//! - [`connlog`]: connection logs (HAProxy tcplog or JSON) to stderr, a file or syslog,
//!   written by sink threads off the data path.

// Unsafe code is confined to `relay::ops` and `worker::listener::reuseport`, which opt back
// in; everything else is checked.
#![deny(unsafe_code)]

pub mod log;

pub mod admin;
pub mod announce;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod config;
pub mod connlog;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod relay;
pub mod server;
pub mod systemd;
pub mod upgrade;
pub mod worker;
