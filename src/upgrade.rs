//! Hitless binary upgrade, in nginx's `USR2` model: the running process starts the binary at
//! the path it was started from, with the same arguments, and passes it every listening
//! socket it holds; the new process adopts them, starts, and says it is ready; only then does
//! the old process stop accepting (the sockets stay open in the new one, so their queues are
//! handed over whole, nothing is reset) and drain its established connections for up to
//! `shutdown_timeout` while the new one serves new clients.
//!
//! The hand-off, from the old process to its child:
//!
//! - `RINGLB_INHERIT`: the passed sockets, `;`-separated entries of
//!   `FD KIND FRONTEND CONFIGURED BOUND` (`KIND` is `listen` for ringlb's own SO_REUSEPORT
//!   sockets, `socket-unit` for one the service manager passed, `admin` for the admin
//!   listener, whose `FRONTEND` is `-`). Each fd keeps its number in the child.
//! - `RINGLB_UPGRADE_READY`: the write end of a pipe. The child writes one line there once it
//!   serves; its exit (or a crash) before that closes the pipe, which the parent reads as a
//!   failed start.
//! - `RINGLB_UPGRADE_PARENT`: the old process's pid, so that variables that leaked to some
//!   other process are refused instead of taken.
//!
//! The fds are close-on-exec in the old process and made inheritable only in the child
//! (`relay::ops::keep_across_exec`), so nothing else ringlb runs inherits them, and a failed
//! start closes them in the child only. The parent side lives here ([`spawn`], [`wait_ready`]);
//! what the control loop does with the outcome is in `control.rs`; the child's adoption of the
//! sockets is in `worker::listener::activation` (frontends) and `admin` (the admin listener).

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use socket2::Socket;

use crate::relay::ops;

pub const INHERIT_VAR: &str = "RINGLB_INHERIT";
pub const READY_VAR: &str = "RINGLB_UPGRADE_READY";
pub const PARENT_VAR: &str = "RINGLB_UPGRADE_PARENT";

/// How long the new process has to start serving before the old one gives up on it, kills it,
/// and goes on serving.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a passed socket is to the process that passed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of a frontend's SO_REUSEPORT sockets that ringlb bound.
    Listen,
    /// A frontend's socket the service manager passed (`LISTEN_FDS`): it also holds it, so
    /// ringlb never shuts it down.
    SocketUnit,
    /// The admin listener.
    Admin,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Listen => "listen",
            Kind::SocketUnit => "socket-unit",
            Kind::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s {
            "listen" => Some(Kind::Listen),
            "socket-unit" => Some(Kind::SocketUnit),
            "admin" => Some(Kind::Admin),
            _ => None,
        }
    }
}

/// One passed socket, as `RINGLB_INHERIT` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub fd: RawFd,
    pub kind: Kind,
    /// The frontend it listens for; empty for the admin listener.
    pub frontend: String,
    /// The address as the old process's config wrote it (port 0 included).
    pub configured: SocketAddr,
    /// The address it is bound to.
    pub bound: SocketAddr,
}

impl Entry {
    /// How errors name it: `RINGLB_INHERIT: fd 7 (frontend web, 127.0.0.1:8080)`.
    pub fn what(&self) -> String {
        match self.kind {
            Kind::Admin => format!("{INHERIT_VAR}: fd {} (admin, {})", self.fd, self.bound),
            _ => format!(
                "{INHERIT_VAR}: fd {} (frontend {}, {})",
                self.fd, self.frontend, self.bound
            ),
        }
    }
}

/// The value of `RINGLB_INHERIT` for `entries`.
pub fn encode(entries: &[Entry]) -> String {
    entries
        .iter()
        .map(|e| {
            let frontend = if e.frontend.is_empty() {
                "-"
            } else {
                &e.frontend
            };
            format!(
                "{} {} {frontend} {} {}",
                e.fd,
                e.kind.as_str(),
                e.configured,
                e.bound
            )
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Parses `RINGLB_INHERIT`; an entry that does not read is an error quoting it.
pub fn parse(value: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for raw in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: &str| format!("{INHERIT_VAR}: entry \"{raw}\": {why}");
        let fields: Vec<&str> = raw.split_whitespace().collect();
        let [fd, kind, frontend, configured, bound] = fields.as_slice() else {
            return Err(bad("not FD KIND FRONTEND CONFIGURED BOUND"));
        };
        let fd: RawFd = fd.parse().map_err(|_| bad("the fd is not a number"))?;
        let kind =
            Kind::parse(kind).ok_or_else(|| bad("kind is not listen, socket-unit or admin"))?;
        let configured = configured
            .parse()
            .map_err(|_| bad("the configured address is not IP:PORT"))?;
        let bound = bound
            .parse()
            .map_err(|_| bad("the bound address is not IP:PORT"))?;
        let frontend = match (kind, *frontend) {
            (Kind::Admin, _) | (_, "-") => String::new(),
            (_, f) => f.to_string(),
        };
        if kind != Kind::Admin && frontend.is_empty() {
            return Err(bad("a frontend socket without its frontend's name"));
        }
        out.push(Entry {
            fd,
            kind,
            frontend,
            configured,
            bound,
        });
    }
    Ok(out)
}

/// What the old process passed to this one; empty when this process was not started by an
/// upgrade.
#[derive(Default)]
pub struct Passed {
    /// The frontends' sockets, checked to be TCP listeners on the address their entry names.
    pub frontends: Vec<(Entry, Socket)>,
    /// The admin listener, taken by `admin::start` if the config still names its address.
    pub admin: Option<(Entry, Socket)>,
    /// Where to say "ready".
    ready: Option<std::fs::File>,
}

impl Passed {
    pub fn is_upgrade(&self) -> bool {
        self.ready.is_some()
    }

    /// Tells the old process this one serves: it then stops accepting and drains.
    /// An error means the old process is no longer waiting (it gave up on this one, or it
    /// is gone): this process must then stop, or two would serve with nobody the main one.
    pub fn announce_ready(&mut self) -> Result<(), String> {
        if let Some(mut pipe) = self.ready.take() {
            let line = format!("ready {}\n", std::process::id());
            pipe.write_all(line.as_bytes()).map_err(|e| {
                format!(
                    "upgrade: cannot tell the old process that this one is ready ({e}); \
                     stopping this one, the old one goes on serving"
                )
            })?;
        }
        Ok(())
    }
}

/// Takes what the old process passed (see the module docs). The variables are removed, so
/// nothing this process starts sees them. An fd that is not open, not a TCP listener, or not
/// on the address its entry names is an error naming it; so is a hand-off from a process that
/// is not this one's parent.
pub fn take_passed() -> Result<Passed, String> {
    let inherit = std::env::var(INHERIT_VAR).ok();
    let ready = std::env::var(READY_VAR).ok();
    let parent = std::env::var(PARENT_VAR).ok();
    for var in [INHERIT_VAR, READY_VAR, PARENT_VAR] {
        std::env::remove_var(var);
    }
    let Some(ready) = ready else {
        if inherit.is_some() {
            return Err(format!(
                "{INHERIT_VAR} is set without {READY_VAR}: sockets are passed only by a running \
                 ringlb's upgrade (SIGUSR2, ringlb ctl upgrade)"
            ));
        }
        return Ok(Passed::default());
    };
    let ppid = std::os::unix::process::parent_id();
    if parent.as_deref().map(str::trim) != Some(ppid.to_string().as_str()) {
        return Err(format!(
            "{PARENT_VAR} is {}, not this process's parent ({ppid}): the hand-off is not from \
             the ringlb that started this one; not taking its fds",
            parent.as_deref().unwrap_or("unset")
        ));
    }
    let ready_fd: RawFd = ready
        .trim()
        .parse()
        .map_err(|_| format!("{READY_VAR} is {ready:?}, not an fd number"))?;
    let ready = ops::take_passed_fd(ready_fd, READY_VAR).map_err(|e| e.to_string())?;
    let mut passed = Passed {
        ready: Some(std::fs::File::from(ready)),
        ..Passed::default()
    };
    for entry in parse(inherit.as_deref().unwrap_or(""))? {
        let what = entry.what();
        let fd = ops::take_passed_fd(entry.fd, &what).map_err(|e| e.to_string())?;
        let socket = Socket::from(fd);
        let addr = crate::worker::listener::activation::check(&socket)
            .map_err(|e| format!("{what}: {e}"))?;
        if addr != entry.bound {
            return Err(format!(
                "{what}: listens on {addr}, not on {} as {INHERIT_VAR} says",
                entry.bound
            ));
        }
        if entry.kind == Kind::Admin {
            passed.admin = Some((entry, socket));
        } else {
            passed.frontends.push((entry, socket));
        }
    }
    Ok(passed)
}

/// The program and arguments to start for an upgrade, as recorded at start.
struct Program {
    exe: PathBuf,
    args: Vec<OsString>,
}

static PROGRAM: OnceLock<Program> = OnceLock::new();

/// Records the path this process was started from and its arguments; call first thing in
/// `main`. The path is the one `/proc/self/exe` names at start, so it is the file a package
/// upgrade replaces (`/usr/bin/ringlb`): after the upgrade, `/proc/self/exe` points at the
/// deleted old file, while this path holds the new binary.
pub fn record_program() {
    let exe = std::env::current_exe()
        .or_else(|_| std::env::args_os().next().map(PathBuf::from).ok_or(()))
        .unwrap_or_default();
    let args = std::env::args_os().skip(1).collect();
    let _ = PROGRAM.set(Program { exe, args });
}

/// The new process, started and not yet ready.
pub struct Started {
    child: tokio::process::Child,
    pub pid: u32,
    ready: tokio::net::unix::pipe::Receiver,
}

/// Starts the recorded program with `sockets` passed (each `Entry` names its fd in this
/// process). The write end of the ready pipe and the sockets' inheritable copies exist only in
/// the child.
pub fn spawn(sockets: &[Entry]) -> io::Result<Started> {
    let program = PROGRAM
        .get()
        .ok_or_else(|| io::Error::other("the program path was not recorded at start"))?;
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let mut cmd = std::process::Command::new(&program.exe);
    cmd.args(&program.args)
        .env(INHERIT_VAR, encode(sockets))
        .env(READY_VAR, write.as_raw_fd().to_string())
        .env(PARENT_VAR, std::process::id().to_string())
        // The watchdog names our pid; the new process pings for itself once it is the main
        // process (sd_watchdog_enabled(3) accepts an unset WATCHDOG_PID).
        .env_remove("WATCHDOG_PID");
    let mut fds: Vec<RawFd> = sockets.iter().map(|e| e.fd).collect();
    fds.push(write.as_raw_fd());
    ops::keep_across_exec(&mut cmd, fds);
    let mut cmd = tokio::process::Command::from(cmd);
    // Until it is ready, the child is ours: given up on (or abandoned by a stop), it is killed.
    cmd.kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", program.exe.display()),
        )
    })?;
    // Our copy of the write end goes now: the pipe then reads EOF once the child's is closed.
    drop(write);
    let pid = child.id().unwrap_or(0);
    let ready = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    Ok(Started { child, pid, ready })
}

pub fn program_path() -> Option<PathBuf> {
    PROGRAM.get().map(|p| p.exe.clone())
}

/// Waits until the new process says it is ready (Ok with its pid; it is left to run), exits,
/// closes the pipe without a word, or takes longer than [`READY_TIMEOUT`] (Err with why; the
/// child is killed and reaped). Dropping the future unfinished kills the child.
pub async fn wait_ready(started: Started) -> Result<u32, String> {
    use tokio::io::AsyncReadExt;
    let Started {
        mut child,
        pid,
        mut ready,
    } = started;
    let mut buf = [0u8; 64];
    let why = tokio::select! {
        read = ready.read(&mut buf) => match read {
            Ok(n) if n > 0 => {
                // It runs on as the service's main process: the handle is forgotten, not
                // dropped (that would kill it). When this process exits, the init process
                // adopts and reaps it.
                std::mem::forget(child);
                return Ok(pid);
            }
            Ok(_) => None,
            Err(e) => Some(format!("reading its ready pipe failed ({e})")),
        },
        _ = tokio::time::sleep(READY_TIMEOUT) => Some(format!(
            "it was not ready within {}",
            crate::config::format_duration(READY_TIMEOUT)
        )),
    };
    // The pipe closes when the process exits: its own error is in the log above.
    let exited = match why {
        None => tokio::time::timeout(Duration::from_secs(1), child.wait())
            .await
            .ok()
            .and_then(Result::ok),
        Some(_) => None,
    };
    if let Some(status) = exited {
        return Err(format!(
            "new process {pid} exited before it was ready ({status}); its own error is logged \
             above"
        ));
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let why = why.unwrap_or_else(|| "it closed its ready pipe without saying ready".into());
    Err(format!("new process {pid}: {why}; it was killed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_as_written() {
        let entries = vec![
            Entry {
                fd: 7,
                kind: Kind::Listen,
                frontend: "web".into(),
                configured: "127.0.0.1:0".parse().unwrap(),
                bound: "127.0.0.1:41234".parse().unwrap(),
            },
            Entry {
                fd: 9,
                kind: Kind::SocketUnit,
                frontend: "db-1.x".into(),
                configured: "[::1]:5432".parse().unwrap(),
                bound: "[::1]:5432".parse().unwrap(),
            },
            Entry {
                fd: 12,
                kind: Kind::Admin,
                frontend: String::new(),
                configured: "127.0.0.1:9090".parse().unwrap(),
                bound: "127.0.0.1:9090".parse().unwrap(),
            },
        ];
        let text = encode(&entries);
        assert_eq!(
            text,
            "7 listen web 127.0.0.1:0 127.0.0.1:41234;9 socket-unit db-1.x [::1]:5432 \
             [::1]:5432;12 admin - 127.0.0.1:9090 127.0.0.1:9090"
        );
        assert_eq!(parse(&text).unwrap(), entries);
    }

    #[test]
    fn a_bad_entry_is_quoted_in_the_error() {
        let e = parse("7 listen web 127.0.0.1:0").unwrap_err();
        assert!(e.contains("entry \"7 listen web 127.0.0.1:0\""), "{e}");
        let e = parse("x listen web 127.0.0.1:0 127.0.0.1:1").unwrap_err();
        assert!(e.contains("the fd is not a number"), "{e}");
        let e = parse("7 tcp web 127.0.0.1:0 127.0.0.1:1").unwrap_err();
        assert!(e.contains("kind is not"), "{e}");
        let e = parse("7 listen - 127.0.0.1:0 127.0.0.1:1").unwrap_err();
        assert!(e.contains("without its frontend"), "{e}");
        assert!(parse("").unwrap().is_empty());
    }
}
