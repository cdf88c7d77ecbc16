//! `[frontend.log]`: the connection log's settings, as validated runtime values.
//!
//! The log itself (formatting, the sinks, the writer threads) is `crate::connlog`; this file
//! only turns the table into [`ConnLog`] and reports what is wrong with it, path and line
//! included, like every other table. A target is checked as far as can be done without
//! writing anything: a file's directory must exist and be writable, a syslog URL must parse.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::file::FileLog;
use super::validate::Problems;

/// One frontend's connection log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLog {
    pub format: LogFormat,
    pub sink: SinkSpec,
    /// Only connections that ended abnormally or needed a retry (HAProxy `dontlog-normal`).
    pub only_errors: bool,
    /// Not connections on which the client sent no byte (HAProxy `dontlognull`).
    pub skip_null: bool,
    /// One connection in `sample` is logged (1: all).
    pub sample: u32,
    /// Also a line when the backend connection is established (like HAProxy `logasap`).
    pub log_connect: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// HAProxy's `option tcplog` line.
    Haproxy,
    /// One JSON object a line.
    Json,
}

/// Where lines go and how they are framed there; frontends with equal specs share one sink.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SinkSpec {
    pub target: LogTarget,
    /// Framing for syslog targets (ignored by the others).
    pub syslog: SyslogFormat,
    /// Syslog facility number (local0 = 16).
    pub facility: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LogTarget {
    Stderr,
    File(PathBuf),
    SyslogUdp(SocketAddr),
    SyslogUnix(PathBuf),
}

impl std::fmt::Display for LogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogTarget::Stderr => write!(f, "stderr"),
            LogTarget::File(p) => write!(f, "file:{}", p.display()),
            LogTarget::SyslogUdp(a) => write!(f, "syslog+udp://{a}"),
            LogTarget::SyslogUnix(p) => write!(f, "syslog+unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyslogFormat {
    Rfc5424,
    Rfc3164,
}

const FACILITIES: [(&str, u8); 12] = [
    ("kern", 0),
    ("user", 1),
    ("daemon", 3),
    ("syslog", 5),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// The default syslog port (RFC 5426).
const SYSLOG_PORT: u16 = 514;

pub(super) fn validate_log(l: &FileLog, p: &mut Problems<'_>) -> ConnLog {
    let format = match l.format.as_deref() {
        None | Some("haproxy") => LogFormat::Haproxy,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.push(
                "format",
                format!("unknown format \"{other}\": use \"haproxy\" or \"json\""),
            );
            LogFormat::Haproxy
        }
    };
    let target = match l.target.as_deref() {
        None => LogTarget::Stderr,
        Some(text) => parse_target(text).unwrap_or_else(|e| {
            p.push("target", e);
            LogTarget::Stderr
        }),
    };
    let syslog = match l.syslog_format.as_deref() {
        None | Some("rfc5424") => SyslogFormat::Rfc5424,
        Some("rfc3164") => SyslogFormat::Rfc3164,
        Some(other) => {
            p.push(
                "syslog_format",
                format!("unknown format \"{other}\": use \"rfc5424\" or \"rfc3164\""),
            );
            SyslogFormat::Rfc5424
        }
    };
    let facility = match l.facility.as_deref() {
        None => 16,
        Some(name) => match FACILITIES.iter().find(|(n, _)| *n == name) {
            Some((_, f)) => *f,
            None => {
                p.push(
                    "facility",
                    format!("unknown facility \"{name}\": use local0 to local7, user or daemon"),
                );
                16
            }
        },
    };
    let sample = p.int_in("sample", l.sample, 1, 1, 1_000_000) as u32;
    ConnLog {
        format,
        sink: SinkSpec {
            target,
            syslog,
            facility,
        },
        only_errors: l.only_errors.unwrap_or(false),
        skip_null: l.skip_null.unwrap_or(false),
        sample,
        log_connect: l.log_connect.unwrap_or(false),
    }
}

fn parse_target(text: &str) -> Result<LogTarget, String> {
    if text == "stderr" {
        return Ok(LogTarget::Stderr);
    }
    if let Some(path) = text.strip_prefix("file:") {
        let path = absolute(text, path)?;
        writable_file(&path)?;
        return Ok(LogTarget::File(path));
    }
    if let Some(addr) = text.strip_prefix("syslog+udp://") {
        return udp_address(addr).map(LogTarget::SyslogUdp).ok_or_else(|| {
            format!(
                "\"{text}\": \"{addr}\" is not an IP address with an optional port, like \
                 \"syslog+udp://127.0.0.1:514\""
            )
        });
    }
    if let Some(path) = text.strip_prefix("syslog+unix:") {
        return absolute(text, path).map(LogTarget::SyslogUnix);
    }
    Err(format!(
        "unknown target \"{text}\": use \"stderr\", \"file:/path\", \
         \"syslog+udp://127.0.0.1:514\" or \"syslog+unix:/dev/log\""
    ))
}

fn absolute(text: &str, path: &str) -> Result<PathBuf, String> {
    if path.starts_with('/') && path.len() > 1 {
        Ok(PathBuf::from(path))
    } else {
        Err(format!("\"{text}\": give an absolute path, like \"{}\"", {
            if text.starts_with("file:") {
                "file:/var/log/ringlb/conn.log"
            } else {
                "syslog+unix:/dev/log"
            }
        }))
    }
}

fn udp_address(text: &str) -> Option<SocketAddr> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return (a.port() != 0).then_some(a);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, SYSLOG_PORT))
}

/// Whether ringlb could create or append to `path`, without creating it: an existing file
/// must be a writable regular file, a new one needs a writable directory.
fn writable_file(path: &Path) -> Result<(), String> {
    use nix::unistd::{access, AccessFlags};
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(format!("\"{shown}\" is a directory")),
        Ok(_) => {
            return access(path, AccessFlags::W_OK)
                .map_err(|e| format!("\"{shown}\" is not writable: {}", e.desc()));
        }
        Err(_) => {}
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
            .map_err(|e| format!("cannot create \"{shown}\": {}: {}", dir.display(), e.desc())),
        Ok(_) => Err(format!("\"{}\" is not a directory", dir.display())),
        Err(e) => Err(format!(
            "cannot create \"{shown}\": directory \"{}\": {e}",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_into_their_kinds() {
        assert_eq!(parse_target("stderr"), Ok(LogTarget::Stderr));
        assert_eq!(
            parse_target("syslog+udp://127.0.0.1:5514"),
            Ok(LogTarget::SyslogUdp("127.0.0.1:5514".parse().unwrap()))
        );
        assert_eq!(
            parse_target("syslog+udp://[::1]"),
            Ok(LogTarget::SyslogUdp("[::1]:514".parse().unwrap()))
        );
        assert_eq!(
            parse_target("syslog+unix:/dev/log"),
            Ok(LogTarget::SyslogUnix("/dev/log".into()))
        );
        assert!(parse_target("syslog+udp://loghost").is_err());
        assert!(parse_target("syslog+unix:dev/log").is_err());
        assert!(parse_target("udp://127.0.0.1").is_err());
        assert!(parse_target("file:/nonexistent-dir-ringlb/x.log")
            .unwrap_err()
            .contains("No such file"));
    }
}
