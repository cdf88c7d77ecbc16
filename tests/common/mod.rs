//! Shared test harness: a real `ringlb` process on loopback and real backends.
//!
//! Every test starts the built binary with a config whose listeners use port 0; the harness
//! reads the bound addresses from ringlb's own start-up log lines. Backends are plain std
//! threads on 127.0.0.1:0. Nothing here mocks the network.

#![allow(dead_code)]

pub mod backends;
pub mod churn;
pub mod metrics;
pub mod tools;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

// Not every test file uses the backends.
#[allow(unused_imports)]
pub use backends::*;
#[allow(unused_imports)]
pub use churn::*;
#[allow(unused_imports)]
pub use metrics::*;
#[allow(unused_imports)]
pub use tools::*;

/// How long a test waits for something that should happen "soon". Generous on purpose:
/// tests assert behaviour, not speed, and CI machines are small.
pub const SOON: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Default)]
struct LogLines {
    lines: Vec<String>,
    closed: bool,
}

/// A running ringlb process; killed on drop.
pub struct Ringlb {
    child: Child,
    pub config_path: PathBuf,
    _dir: TempDir,
    log: Arc<(Mutex<LogLines>, Condvar)>,
    /// Bound listen addresses by frontend name, from the "listening on" log lines.
    pub listeners: HashMap<String, Vec<SocketAddr>>,
    pub admin: Option<SocketAddr>,
}

impl Ringlb {
    /// Starts ringlb with `config` (TOML) and waits until it logs "ready".
    pub fn start(config: &str) -> Ringlb {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Ringlb {
        Self::start_with_nofile(config, env, None)
    }

    /// Starts ringlb with its open-file limit (soft and hard) set to `nofile`, if given.
    pub fn start_with_nofile(config: &str, env: &[(&str, &str)], nofile: Option<u64>) -> Ringlb {
        Self::start_with(config, |cmd| {
            for (k, v) in env {
                cmd.env(k, v);
            }
            if let Some(limit) = nofile {
                use std::os::unix::process::CommandExt;
                // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        nix::sys::resource::setrlimit(
                            nix::sys::resource::Resource::RLIMIT_NOFILE,
                            limit,
                            limit,
                        )
                        .map_err(std::io::Error::from)
                    });
                }
            }
        })
    }

    /// Like `start`, letting `customise` change the command before it is spawned (its
    /// environment, or a `pre_exec` hook that restricts the child).
    pub fn start_with(config: &str, customise: impl FnOnce(&mut Command)) -> Ringlb {
        Self::spawn(
            config,
            |config_path| {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringlb"));
                cmd.arg("run").arg("--config").arg(config_path);
                cmd
            },
            customise,
        )
    }

    /// Like `start_with`, but ringlb is exec'ed by `sh -c` after the shell assignments in
    /// `shell_env` (e.g. `LISTEN_PID=$$`, which names ringlb's own pid: exec keeps it).
    pub fn start_with_shell_env(
        config: &str,
        shell_env: &str,
        customise: impl FnOnce(&mut Command),
    ) -> Ringlb {
        Self::spawn(
            config,
            |config_path| {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(format!("{shell_env} exec \"$0\" run --config \"$1\""))
                    .arg(env!("CARGO_BIN_EXE_ringlb"))
                    .arg(config_path);
                cmd
            },
            customise,
        )
    }

    fn spawn(
        config: &str,
        command: impl FnOnce(&std::path::Path) -> Command,
        customise: impl FnOnce(&mut Command),
    ) -> Ringlb {
        let dir = TempDir::new();
        let config_path = dir.path.join("ringlb.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = command(&config_path);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET");
        customise(&mut cmd);
        let mut child = cmd.spawn().expect("start ringlb");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(LogLines::default()), Condvar::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("RINGLB_TEST_ECHO").is_some() {
                    eprintln!("[ringlb] {line}");
                }
                let (m, cv) = &*log2;
                m.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            let (m, cv) = &*log2;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
        let mut r = Ringlb {
            child,
            config_path,
            _dir: dir,
            log,
            listeners: HashMap::new(),
            admin: None,
        };
        r.wait_for_log(" ready", SOON)
            .unwrap_or_else(|| panic!("ringlb did not start:\n{}", r.logs().join("\n")));
        for line in r.logs() {
            if let Some(rest) = line.split("frontend ").nth(1) {
                if let Some((name, addr)) = rest.split_once(" listening on ") {
                    let addr: SocketAddr = addr.trim().parse().unwrap();
                    r.listeners.entry(name.to_string()).or_default().push(addr);
                }
            }
            if let Some(addr) = line.split("admin listening on ").nth(1) {
                r.admin = addr.split_whitespace().next().and_then(|a| a.parse().ok());
            }
        }
        r
    }

    /// The first bound address of `frontend`.
    pub fn addr(&self, frontend: &str) -> SocketAddr {
        self.listeners
            .get(frontend)
            .and_then(|v| v.first().copied())
            .unwrap_or_else(|| panic!("no listener for frontend {frontend}: {:?}", self.logs()))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn logs(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_log_after(0, needle, timeout)
    }

    /// Like `wait_for_log`, looking only at lines after the first `skip`.
    pub fn wait_for_log_after(
        &self,
        skip: usize,
        needle: &str,
        timeout: Duration,
    ) -> Option<String> {
        let (m, cv) = &*self.log;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(l) = g.lines.iter().skip(skip).find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                return None;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    pub fn log_len(&self) -> usize {
        self.log.0.lock().unwrap().lines.len()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Writes a new config and sends SIGHUP; returns the log position before the reload.
    pub fn reload(&self, config: &str) -> usize {
        let mark = self.log_len();
        std::fs::write(&self.config_path, config).unwrap();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        mark
    }

    /// Number of open fds of the ringlb process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Open fds of the ringlb process that are pipes, and the rest.
    pub fn fd_count_by_kind(&self) -> (usize, usize) {
        let mut pipes = 0;
        let mut others = 0;
        for e in std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap() {
            let Ok(e) = e else { continue };
            match std::fs::read_link(e.path()) {
                Ok(t) if t.to_string_lossy().starts_with("pipe:") => pipes += 1,
                _ => others += 1,
            }
        }
        (pipes, others)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ringlb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection (the admin listener closes after each answer);
/// returns (status code, head, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ringlb-test\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    (code, head.to_string(), body.to_string())
}

/// GET that must answer 200; returns the body.
pub fn get(addr: SocketAddr, path: &str) -> String {
    let (code, head, body) = http(addr, "GET", path);
    assert_eq!(code, 200, "GET {path}: {head}\n{body}");
    body
}

/// Whether an external tool that one test needs (a browser, systemd-analyze) is here.
/// Missing in CI (`CI` set, as `.ci/run` runs) it is a failure: `.ci/run` installs it.
/// Missing on a developer's machine the test says loudly that it was skipped and how to
/// install the tool, so that `cargo test` works on a fresh machine as the README promises.
pub fn tool_available(found: bool, what: &str, install: &str) -> bool {
    if found {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is needed by this test and was not found; install it: {install}");
    }
    // Straight to the process's stderr: the test harness captures eprintln! of a passing
    // test, and a skip must show in a plain `cargo test`.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {what} not found; install it to run this test: {install}"
    );
    false
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringlb-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A frontend config block with the given backends (`(name, addr, extra toml lines)`).
pub fn frontend_toml(name: &str, settings: &str, backends: &[(&str, SocketAddr, &str)]) -> String {
    let mut s =
        format!("[[frontend]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:0\"]\n{settings}\n");
    for (bname, addr, extra) in backends {
        s.push_str(&format!(
            "\n[[frontend.backend]]\nname = \"{bname}\"\naddress = \"{addr}\"\n{extra}\n"
        ));
    }
    s
}

/// The `[global]` and `[admin]` blocks tests use: 2 workers, admin on a free port.
pub fn global_toml(extra: &str) -> String {
    format!("[global]\nworkers = 2\nshutdown_timeout = \"5s\"\n{extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n")
}

/// Sends `len` random bytes through the echo backend while reading them back; compares the
/// sha256 and length of what came back with what was sent.
pub fn bulk_echo(addr: SocketAddr, len: usize) {
    let mut data = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    let sent = <sha2::Sha256 as sha2::Digest>::digest(&data);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let recv = std::thread::spawn(move || {
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            sha2::Digest::update(&mut h, &buf[..n]);
            total += n;
        }
        (total, sha2::Digest::finalize(h))
    });
    std::io::Write::write_all(&mut s, &data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (total, got) = recv.join().unwrap();
    assert_eq!(total, len);
    assert_eq!(got, sent, "the bytes that came back differ");
}

/// Runs `ringlb check` on `config` (TOML text); returns whether it passed and its stderr.
pub fn check_config(config: &str) -> (bool, String) {
    let dir = TempDir::new();
    let path = dir.path.join("ringlb.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
