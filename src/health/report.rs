//! Transition log lines, worded as HAProxy words them so operators' habits and alerts carry
//! over (`grep 'is DOWN'`, `has no server available`).
//!
//! Pure formatting, unit-tested against the exact lines in docs/health-checks.md.

use std::time::Duration;

/// Usable servers of a frontend after a transition, as HAProxy counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    /// Usable non-backup servers ("active" in HAProxy's words).
    pub active: usize,
    pub backup: usize,
}

/// Who changed state: `Server web/api3` or, for a backup, `Backup Server web/spare`.
pub struct Subject<'a> {
    pub frontend: &'a str,
    pub backend: &'a str,
    pub backup: bool,
}

impl Subject<'_> {
    fn prefix(&self) -> &'static str {
        if self.backup {
            "Backup Server"
        } else {
            "Server"
        }
    }
}

/// Why a backend went down: the `reason: ...` text and, for an active check, its duration.
pub struct Why<'a> {
    pub reason: &'a str,
    pub check_duration: Option<Duration>,
}

fn duration_part(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!(", check duration: {}ms", d.as_millis()),
        None => String::new(),
    }
}

pub fn down_line(who: &Subject<'_>, why: &Why<'_>, left: Remaining, sessions: u64) -> String {
    format!(
        "{} {}/{} is DOWN, reason: {}{}. {} active and {} backup servers left. \
         {sessions} sessions active, 0 requeued, 0 remaining in queue.",
        who.prefix(),
        who.frontend,
        who.backend,
        why.reason,
        duration_part(why.check_duration),
        left.active,
        left.backup,
    )
}

pub fn up_line(who: &Subject<'_>, why: &Why<'_>, online: Remaining) -> String {
    format!(
        "{} {}/{} is UP, reason: {}{}. {} active and {} backup servers online. \
         0 sessions requeued, 0 total in queue.",
        who.prefix(),
        who.frontend,
        who.backend,
        why.reason,
        duration_part(why.check_duration),
        online.active,
        online.backup,
    )
}

pub fn no_server_line(frontend: &str) -> String {
    format!("frontend {frontend} has no server available!")
}

/// The same for one SNI routing pool (HAProxy's line names the backend a route uses).
pub fn no_pool_server_line(frontend: &str, pool: &str) -> String {
    format!("frontend {frontend} pool {pool} has no server available!")
}

/// The reason for a passive-health mark-down, after HAProxy's `observe layer4` wording.
pub fn passive_reason(consecutive: u32, last_error: &str) -> String {
    format!(
        "Health analyze, info: \"Detected {consecutive} consecutive errors (error_limit), last one was: {}\"",
        strip_os_error(last_error)
    )
}

/// "Connection refused (os error 111)" -> "Connection refused".
fn strip_os_error(text: &str) -> &str {
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::probe::CheckResult;

    fn api3() -> Subject<'static> {
        Subject {
            frontend: "web",
            backend: "api3",
            backup: false,
        }
    }

    #[test]
    fn a_timeout_reads_like_haproxy() {
        let reason = CheckResult::Timeout.to_string();
        let line = down_line(
            &api3(),
            &Why {
                reason: &reason,
                check_duration: Some(Duration::from_millis(2001)),
            },
            Remaining {
                active: 4,
                backup: 0,
            },
            1,
        );
        assert_eq!(
            line,
            "Server web/api3 is DOWN, reason: Layer4 timeout, check duration: 2001ms. \
             4 active and 0 backup servers left. 1 sessions active, 0 requeued, 0 remaining in queue."
        );
    }

    #[test]
    fn a_refused_connect_reads_like_haproxy() {
        let reason = CheckResult::ConnectionProblem("Connection refused".into()).to_string();
        let line = down_line(
            &api3(),
            &Why {
                reason: &reason,
                check_duration: Some(Duration::from_micros(300)),
            },
            Remaining {
                active: 4,
                backup: 0,
            },
            0,
        );
        assert_eq!(
            line,
            "Server web/api3 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", \
             check duration: 0ms. 4 active and 0 backup servers left. 0 sessions active, 0 requeued, \
             0 remaining in queue."
        );
    }

    #[test]
    fn an_up_line_reads_like_haproxy() {
        let reason = CheckResult::Passed.to_string();
        let line = up_line(
            &Subject {
                frontend: "web",
                backend: "api8",
                backup: false,
            },
            &Why {
                reason: &reason,
                check_duration: Some(Duration::ZERO),
            },
            Remaining {
                active: 5,
                backup: 0,
            },
        );
        assert_eq!(
            line,
            "Server web/api8 is UP, reason: Layer4 check passed, check duration: 0ms. \
             5 active and 0 backup servers online. 0 sessions requeued, 0 total in queue."
        );
    }

    #[test]
    fn an_application_check_reads_like_haproxys_layer7_lines() {
        let reason = CheckResult::WrongStatus {
            code: Some("503".into()),
            info: "Service Unavailable".into(),
        }
        .to_string();
        let line = down_line(
            &Subject {
                frontend: "demo",
                backend: "api2",
                backup: false,
            },
            &Why {
                reason: &reason,
                check_duration: Some(Duration::from_micros(400)),
            },
            Remaining {
                active: 2,
                backup: 0,
            },
            0,
        );
        assert_eq!(
            line,
            "Server demo/api2 is DOWN, reason: Layer7 wrong status, code: 503, info: \"Service \
             Unavailable\", check duration: 0ms. 2 active and 0 backup servers left. 0 sessions \
             active, 0 requeued, 0 remaining in queue."
        );
        use crate::health::probe::Layer;
        assert_eq!(
            CheckResult::AppPassed(Layer::L7).to_string(),
            "Layer7 check passed"
        );
        assert_eq!(
            CheckResult::AppTimeout(Layer::L7).to_string(),
            "Layer7 timeout"
        );
        assert_eq!(
            CheckResult::InvalidResponse(Layer::L6, "TLS alert handshake_failure (40)".into())
                .to_string(),
            "Layer6 invalid response, info: \"TLS alert handshake_failure (40)\""
        );
    }

    #[test]
    fn a_backup_server_is_named_as_one() {
        let line = up_line(
            &Subject {
                frontend: "web",
                backend: "spare",
                backup: true,
            },
            &Why {
                reason: "Layer4 check passed",
                check_duration: Some(Duration::from_millis(1)),
            },
            Remaining {
                active: 0,
                backup: 1,
            },
        );
        assert!(line.starts_with("Backup Server web/spare is UP"), "{line}");
        assert!(
            line.contains("0 active and 1 backup servers online"),
            "{line}"
        );
    }

    #[test]
    fn a_passive_mark_down_says_real_traffic_failed_and_has_no_check_duration() {
        let reason = passive_reason(10, "Connection refused (os error 111)");
        let line = down_line(
            &api3(),
            &Why {
                reason: &reason,
                check_duration: None,
            },
            Remaining {
                active: 2,
                backup: 1,
            },
            0,
        );
        assert_eq!(
            line,
            "Server web/api3 is DOWN, reason: Health analyze, info: \"Detected 10 consecutive errors \
             (error_limit), last one was: Connection refused\". 2 active and 1 backup servers left. \
             0 sessions active, 0 requeued, 0 remaining in queue."
        );
    }

    #[test]
    fn the_last_server_going_names_the_frontend() {
        assert_eq!(
            no_server_line("web"),
            "frontend web has no server available!"
        );
    }
}
