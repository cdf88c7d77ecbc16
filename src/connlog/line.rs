//! One connection's log line, in HAProxy's `option tcplog` order or as a JSON object.
//!
//! Lines are written straight into the worker's batch buffer (`write!` into a `Vec<u8>`):
//! no intermediate `String`. Names in a line are frontend and backend names, which validation
//! keeps to `[A-Za-z0-9._-]`, so neither format needs escaping; a line never holds a newline.

use std::io::Write;
use std::net::SocketAddr;
use std::time::SystemTime;

use crate::log::Utc;

/// Which moment of a connection a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The backend connection is up (`log_connect`); timers and bytes so far.
    Connect,
    /// The connection is over.
    End,
}

/// Everything a line says. Times are milliseconds, -1 where the step never happened.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub event: Event,
    pub client: SocketAddr,
    pub accepted: SystemTime,
    pub frontend: &'a str,
    /// `None`: no backend was ever picked (HAProxy's `<NOSRV>`).
    pub backend: Option<&'a str>,
    pub tw_ms: i64,
    pub tc_ms: i64,
    pub tt_ms: i64,
    /// Client to backend.
    pub bytes_in: u64,
    /// Backend to client.
    pub bytes_out: u64,
    pub termination: [u8; 2],
    pub actconn: u64,
    pub feconn: u64,
    pub beconn: u64,
    pub srvconn: u64,
    pub retries: u32,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

pub fn month_name(month: u32) -> &'static str {
    MONTHS[(month.clamp(1, 12) - 1) as usize]
}

fn termination<'e>(e: &'e Entry<'_>) -> &'e str {
    std::str::from_utf8(&e.termination).unwrap_or("??")
}

/// HAProxy's tcplog line:
/// `client:port [accept_date] frontend backend/server Tw/Tc/Tt bytes_read termination
/// actconn/feconn/beconn/srv_conn/retries srv_queue/backend_queue`. ringlb's frontend is both
/// HAProxy's frontend and its backend (the pool), and ringlb's backend is HAProxy's server.
/// A `log_connect` line marks Tt and the bytes with `+`, as HAProxy's `logasap` does.
pub fn haproxy(e: &Entry<'_>, out: &mut Vec<u8>) {
    let t = Utc::from(e.accepted);
    let plus = if e.event == Event::Connect { "+" } else { "" };
    // Writes to a Vec cannot fail.
    let _ = writeln!(
        out,
        "{} [{:02}/{}/{:04}:{:02}:{:02}:{:02}.{:03}] {} {}/{} {}/{}/{plus}{} {plus}{} {} {}/{}/{}/{}/{} 0/0",
        e.client,
        t.day,
        month_name(t.month),
        t.year,
        t.hour,
        t.minute,
        t.second,
        t.milli,
        e.frontend,
        e.frontend,
        e.backend.unwrap_or("<NOSRV>"),
        e.tw_ms,
        e.tc_ms,
        e.tt_ms,
        e.bytes_out,
        termination(e),
        e.actconn,
        e.feconn,
        e.beconn,
        e.srvconn,
        e.retries,
    );
}

/// One JSON object: the tcplog fields by name, plus `bytes_in`.
pub fn json(e: &Entry<'_>, out: &mut Vec<u8>) {
    let t = Utc::from(e.accepted);
    let event = match e.event {
        Event::Connect => "connect",
        Event::End => "end",
    };
    let _ = write!(
        out,
        "{{\"event\":\"{event}\",\"client\":\"{}\",\
         \"accept_time\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"frontend\":\"{}\",",
        e.client, t.year, t.month, t.day, t.hour, t.minute, t.second, t.milli, e.frontend,
    );
    let _ = match e.backend {
        Some(b) => write!(out, "\"backend\":\"{b}\","),
        None => write!(out, "\"backend\":null,"),
    };
    let _ = writeln!(
        out,
        "\"tw_ms\":{},\"tc_ms\":{},\"tt_ms\":{},\"bytes_in\":{},\"bytes_out\":{},\
         \"retries\":{},\"termination\":\"{}\",\"actconn\":{},\"feconn\":{},\"beconn\":{},\
         \"srvconn\":{},\"srv_queue\":0,\"backend_queue\":0}}",
        e.tw_ms,
        e.tc_ms,
        e.tt_ms,
        e.bytes_in,
        e.bytes_out,
        e.retries,
        termination(e),
        e.actconn,
        e.feconn,
        e.beconn,
        e.srvconn,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn entry() -> Entry<'static> {
        Entry {
            event: Event::End,
            client: "10.0.1.2:33313".parse().unwrap(),
            // 2009-02-06T12:12:51.443Z, HAProxy's manual example.
            accepted: UNIX_EPOCH + Duration::from_millis(1_233_922_371_443),
            frontend: "fnt",
            backend: Some("srv1"),
            tw_ms: 0,
            tc_ms: 0,
            tt_ms: 5007,
            bytes_in: 17,
            bytes_out: 212,
            termination: *b"--",
            actconn: 0,
            feconn: 0,
            beconn: 0,
            srvconn: 0,
            retries: 3,
        }
    }

    #[test]
    fn the_haproxy_line_has_tcplog_field_order() {
        let mut out = Vec::new();
        haproxy(&entry(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "10.0.1.2:33313 [06/Feb/2009:12:12:51.443] fnt fnt/srv1 0/0/5007 212 -- 0/0/0/0/3 0/0\n"
        );
    }

    #[test]
    fn a_connect_line_marks_tt_and_bytes_as_partial() {
        let mut e = entry();
        e.event = Event::Connect;
        e.backend = None;
        let mut out = Vec::new();
        haproxy(&e, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains(" fnt/<NOSRV> 0/0/+5007 +212 -- "), "{line}");
    }

    #[test]
    fn the_json_line_is_one_parseable_object() {
        let mut out = Vec::new();
        json(&entry(), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["client"], "10.0.1.2:33313");
        assert_eq!(v["accept_time"], "2009-02-06T12:12:51.443Z");
        assert_eq!(v["backend"], "srv1");
        assert_eq!(v["bytes_in"], 17);
        assert_eq!(v["bytes_out"], 212);
        assert_eq!(v["termination"], "--");
        assert_eq!(v["retries"], 3);
    }
}
