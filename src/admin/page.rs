//! The status page (`GET /`): one table per frontend, a row per backend coloured by state, in
//! the spirit of HAProxy's stats page: sessions, rates (sessions, bytes in and out, errors per
//! second), the last check, time since the last change, and charts of the last five minutes
//! (inline SVG drawn here from `admin::history`). Self-contained HTML (inline CSS and SVG, no
//! external assets) that reloads itself every few seconds, so it works from an SSH tunnel to
//! a box without internet access.
//!
//! When the client may write without a token (loopback, no `token_file`), each backend has
//! drain / ready / maint buttons: a few lines of inline script that POST to the runtime API
//! and reload the page. Without script the page is the same, minus working buttons.

use std::fmt::Write;

use super::history::{Rates, KEEP, SAMPLE_EVERY};
use super::status::{BackendStatus, FrontendStatus, Queue, Rejected, Status};

/// Seconds between automatic refreshes of the page.
pub const REFRESH_SECONDS: u32 = 5;

const STYLE: &str = "
body{font:13px/1.35 system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 4px}
h2{font-size:15px;margin:18px 0 4px}
.meta{color:#555;margin-bottom:8px}
.meta span{margin-right:16px}
.err{background:#fdd;border:1px solid #c66;padding:4px 8px;margin:6px 0}
table{border-collapse:collapse;margin-bottom:6px;background:#fff}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#5a6b7b;color:#fff;font-weight:600}
td.l,th.l{text-align:left}
td.chk{white-space:normal;min-width:190px;max-width:330px;text-align:left}
tr.up td{background:#c8f0c8}
tr.backup td{background:#c8dcf8}
tr.down td{background:#f6b8b8}
tr.draining td{background:#f8e0a0}
tr.drain td{background:#f8e0a0}
tr.maint td{background:#c9b8e8}
tr.total td{background:#e8e8e8;font-weight:600}
td.c{padding:1px 4px}
svg.spark{display:inline-block;vertical-align:middle;margin-right:8px}
svg.spark polyline{fill:none;stroke-width:1.2}
button{font:inherit;font-size:11px;padding:0 5px;margin:0 1px;cursor:pointer}
.rates span{margin-right:14px}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #bbb}
";

/// Clicks on the drain / ready / maint buttons: POST the state, then reload.
const SCRIPT: &str = "
document.querySelectorAll('button[data-state]').forEach(function(b){
 b.addEventListener('click',function(){
  b.disabled=true;
  fetch('/api/backends/'+b.dataset.backend,{method:'POST',
   headers:{'Content-Type':'application/json'},body:JSON.stringify({state:b.dataset.state})})
  .then(function(r){return r.json().then(function(j){
   if(!r.ok){alert(j.error||r.status)} location.reload()})})
  .catch(function(e){alert(e);b.disabled=false});
 });
});
";

/// Renders the page; `writes` shows the action buttons.
pub fn render(s: &Status, writes: bool) -> String {
    let mut h = String::with_capacity(8192);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(
        h,
        "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>ringlb status</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        h,
        "<h1>ringlb {} status</h1><div class=\"meta\">\
         <span>uptime {}</span><span>connections {} / {}</span>\
         <span>config generation {}</span><span>reloads {} ok, {} failed</span>{}</div>",
        esc(s.version),
        duration(s.uptime_seconds),
        s.connections.active,
        s.connections.max,
        s.config_generation,
        s.reloads.ok,
        s.reloads.failed,
        if s.stopping {
            "<span><b>stopping</b></span>"
        } else {
            ""
        },
    );
    if let Some(e) = &s.reloads.last_error {
        let _ = write!(
            h,
            "<div class=\"err\">Last reload failed; still serving the previous configuration: {}</div>",
            esc(e)
        );
    }
    h.push_str(
        "<div class=\"legend\"><span style=\"background:#c8f0c8\">up</span>\
         <span style=\"background:#c8dcf8\">backup</span>\
         <span style=\"background:#f6b8b8\">down</span>\
         <span style=\"background:#f8e0a0\">drain / draining</span>\
         <span style=\"background:#c9b8e8\">maint</span></div>",
    );
    for f in &s.frontends {
        frontend(&mut h, f, writes);
    }
    let minutes = SAMPLE_EVERY.as_secs() * KEEP as u64 / 60;
    let _ = writeln!(
        h,
        "<p class=\"meta\">Refreshes every {REFRESH_SECONDS}s. Rates over the last {}s; charts: \
         sessions/s (blue) and bytes/s (green) over the last {minutes} minutes. {} \
         JSON at <a href=\"/status\">/status</a> and <a href=\"/api/state\">/api/state</a>, \
         Prometheus metrics at <a href=\"/metrics\">/metrics</a>.</p>",
        SAMPLE_EVERY.as_secs(),
        if writes {
            ""
        } else {
            "Actions: with <code>ringlb ctl</code> (this client may not write without the token)."
        }
    );
    if writes {
        let _ = write!(h, "<script>{SCRIPT}</script>");
    }
    h.push_str("</body></html>\n");
    h
}

/// The traffic controls' refusals, those that happened (a frontend without the controls
/// shows none).
fn gate_rejections(r: &Rejected) -> String {
    let mut out = String::new();
    for (what, n) in [
        ("PROXY header", r.proxy),
        ("PROXY timeout", r.proxy_timeout),
        ("ACL", r.acl),
        ("per-source connections", r.source_connections),
        ("per-source rate", r.source_rate),
        ("queue timeout", r.queue_timeout),
        ("TLS ClientHello", r.sni),
        ("ClientHello timeout", r.sni_timeout),
    ] {
        if n > 0 {
            let _ = write!(out, ", {what} {n}");
        }
    }
    out
}

/// HAProxy's queue columns (qcur, qmax, qtime), once anything has queued.
fn queue(q: &Queue) -> String {
    if q.max == 0 {
        return String::new();
    }
    format!(
        "<span>queue: current {}, max {}, time {:.0} ms</span>",
        q.current,
        q.max,
        q.time_seconds * 1000.0
    )
}

/// "12.5/s", "1.2 KiB/s".
fn rate(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn byte_rate(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else {
        format!("{}/s", bytes(v as u64))
    }
}

/// A small line chart of `values` (oldest first), scaled to its own maximum.
fn spark(values: &[f64], colour: &str, title: &str) -> String {
    const W: f64 = 100.0;
    const H: f64 = 20.0;
    let max = values.iter().copied().fold(0.0, f64::max);
    let n = values.len();
    let mut points = String::new();
    for (i, v) in values.iter().enumerate() {
        // The whole history kept (up to five minutes) fills the width; newest on the right.
        let x = if n > 1 {
            i as f64 * W / (n - 1) as f64
        } else {
            W
        };
        let y = if max > 0.0 {
            H - 1.0 - v / max * (H - 2.0)
        } else {
            H - 1.0
        };
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    format!(
        "<svg class=\"spark\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">\
         <title>{} (max {})</title><rect width=\"{W}\" height=\"{H}\" fill=\"#f4f4f4\"/>\
         <polyline stroke=\"{colour}\" points=\"{}\"/></svg>",
        esc(title),
        rate(max),
        points.trim_end()
    )
}

fn charts(r: &Rates) -> String {
    format!(
        "<td class=\"c\">{}</td><td class=\"c\">{}</td>",
        spark(&r.sessions_chart, "#2a6fdb", "sessions/s"),
        spark(&r.bytes_chart, "#2a9d4a", "bytes/s")
    )
}

fn frontend(h: &mut String, f: &FrontendStatus, writes: bool) {
    let listen = if f.listen.is_empty() {
        "not listening".to_string()
    } else {
        f.listen.join(", ")
    };
    let r = &f.rates;
    let _ = write!(
        h,
        "<h2 id=\"fe-{name}\">Frontend {name}{removed}{disabled}</h2><div class=\"meta\">\
         <span>listen {}</span><span>balance {}</span><span>sessions {}</span>\
         <span>accepted {}</span><span>rejected: limit {}, no backend {}{}</span>{}</div>\
         <div class=\"meta rates\"><span>{} sessions/s</span><span>in {}</span><span>out {}</span>\
         <span>{} errors/s</span>{}{}</div>",
        esc(&listen),
        esc(f.balance),
        f.active,
        f.accepted_total,
        f.rejected_total.limit,
        f.rejected_total.no_backend,
        gate_rejections(&f.rejected_total),
        queue(&f.queue),
        rate(r.sessions_per_second),
        byte_rate(r.bytes_in_per_second),
        byte_rate(r.bytes_out_per_second),
        rate(r.errors_per_second),
        spark(&r.sessions_chart, "#2a6fdb", "sessions/s"),
        spark(&r.bytes_chart, "#2a9d4a", "bytes/s"),
        name = esc(&f.name),
        removed = if f.removed {
            " (removed, draining)"
        } else {
            ""
        },
        disabled = if f.enabled || f.removed {
            ""
        } else {
            " (disabled)"
        },
    );
    let _ = write!(
        h,
        "<table><tr><th class=\"l\">Backend</th><th class=\"l\">Address</th>\
         <th class=\"l\">State</th><th>Weight</th><th>Sessions</th>\
         <th>Sess/s</th><th>In/s</th><th>Out/s</th><th>Err/s</th>\
         <th>Total</th><th>Errors</th><th>Check fails</th><th class=\"l\">Last check</th><th>Since change</th>\
         <th>Sess/s, 5 min</th><th>Bytes/s</th>{}</tr>",
        if writes { "<th>Action</th>" } else { "" }
    );
    for b in &f.backends {
        backend_row(h, &f.name, b, writes && !f.removed);
    }
    let sum = |g: fn(&BackendStatus) -> u64| f.backends.iter().map(g).sum::<u64>();
    let _ = write!(
        h,
        "<tr class=\"total\"><td class=\"l\">Total</td><td class=\"l\"></td><td class=\"l\"></td>\
         <td></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td>{}</td><td>{}</td><td class=\"l\"></td><td></td>\
         <td></td><td></td>{}</tr></table>",
        sum(|b| b.active),
        rate(r.sessions_per_second),
        byte_rate(r.bytes_in_per_second),
        byte_rate(r.bytes_out_per_second),
        rate(r.errors_per_second),
        sum(|b| b.connections_total),
        sum(|b| b.connect_failures_total),
        sum(|b| b.check_failures_total),
        if writes { "<td></td>" } else { "" }
    );
}

fn backend_row(h: &mut String, frontend: &str, b: &BackendStatus, writes: bool) {
    let check = match &b.last_check {
        None => "-".to_string(),
        Some(c) => {
            let mut t = c.result.clone().unwrap_or_else(|| "-".to_string());
            if let Some(ms) = c.duration_ms {
                let _ = write!(t, " in {ms}ms");
            }
            t
        }
    };
    let shown = if b.state == b.health || b.state == "backup" {
        b.state.to_string()
    } else {
        // Drained or in maintenance: say what the checks think too.
        format!("{} ({})", b.state, b.health)
    };
    let mut weight = if b.weight == b.configured_weight {
        b.weight.to_string()
    } else {
        format!("{} (cfg {})", b.weight, b.configured_weight)
    };
    if b.effective_weight < f64::from(b.weight) {
        // In slow start.
        let _ = write!(weight, ", now {}", trim_float(b.effective_weight));
    }
    let r = &b.rates;
    let _ = write!(
        h,
        "<tr class=\"{state}\"><td class=\"l\">{}</td><td class=\"l\">{}</td>\
         <td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td class=\"chk\">{}</td><td>{}</td>{}",
        esc(&b.name),
        esc(&b.address),
        esc(&shown),
        esc(&weight),
        b.active,
        rate(r.sessions_per_second),
        byte_rate(r.bytes_in_per_second),
        byte_rate(r.bytes_out_per_second),
        rate(r.errors_per_second),
        b.connections_total,
        b.connect_failures_total,
        b.check_failures_total,
        esc(&check),
        duration(b.seconds_since_change),
        charts(r),
        state = b.state,
    );
    if writes {
        let target = format!("{}/{}", esc(frontend), esc(&b.name));
        h.push_str("<td>");
        for action in ["drain", "ready", "maint"] {
            if b.admin_state != action {
                let _ = write!(
                    h,
                    "<button data-state=\"{action}\" data-backend=\"{target}\">{action}</button>"
                );
            }
        }
        h.push_str("</td>");
    }
    h.push_str("</tr>");
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// 1536 -> "1.5 KiB": people read the page, machines read /status.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// 3725.2 -> "1h2m": coarse on purpose, like HAProxy's "LastChk".
fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_config_is_escaped() {
        assert_eq!(
            esc("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }

    #[test]
    fn sizes_and_durations_read_like_a_person_would_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(duration(59.9), "59s");
        assert_eq!(duration(3725.0), "1h2m");
        assert_eq!(trim_float(2.5), "2.5");
        assert_eq!(trim_float(3.0), "3");
    }
}
