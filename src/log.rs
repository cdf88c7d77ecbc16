//! Operator logs on stderr, one line each, in a form journald keeps well.
//!
//! Under systemd (`JOURNAL_STREAM` set) lines carry the `<N>` syslog priority prefix that
//! journald turns into a level, and no timestamp of their own (journald adds one). Elsewhere
//! a line is `2026-11-23T19:23:37.123Z INFO message`. No colour: logs are read by machines
//! as often as by people.

use std::fmt;
use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }

    fn syslog_priority(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug => 7,
        }
    }
}

struct Settings {
    journald: bool,
    max: Level,
}

fn settings() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| Settings {
        journald: std::env::var_os("JOURNAL_STREAM").is_some(),
        max: match std::env::var("RINGLB_LOG").as_deref() {
            Ok("debug") => Level::Debug,
            Ok("warn") => Level::Warn,
            Ok("error") => Level::Error,
            _ => Level::Info,
        },
    })
}

pub fn enabled(level: Level) -> bool {
    level <= settings().max
}

pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let s = settings();
    if level > s.max {
        return;
    }
    let line = if s.journald {
        // journald reads the priority per line: a multi-line message (a reload's list of
        // config problems) carries it on every line, so none falls to the default level.
        let text = args.to_string();
        let mut out = String::with_capacity(text.len() + 8);
        for l in text.lines() {
            out.push_str(&format!("<{}>{l}\n", level.syslog_priority()));
        }
        out
    } else {
        format!("{} {} {}\n", utc_now(), level.word(), args)
    };
    // One write per line so lines from several threads do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// RFC 3339 UTC time with milliseconds, without a date crate.
fn utc_now() -> String {
    let t = Utc::from(SystemTime::now());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.milli
    )
}

/// A moment as a UTC calendar date and time (also used by the connection log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    /// 1-12.
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub milli: u32,
}

impl From<SystemTime> for Utc {
    fn from(t: SystemTime) -> Utc {
        let now = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = now.as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Civil-from-days (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        Utc {
            year: yoe + era * 400 + i64::from(m <= 2),
            month: m as u32,
            day: d as u32,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            milli: now.subsec_millis(),
        }
    }
}

#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::log::enabled($crate::log::Level::Debug) {
            $crate::log::write($crate::log::Level::Debug, format_args!($($t)*))
        }
    };
}
