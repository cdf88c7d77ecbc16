//! The status page (`GET /`): one table per frontend, a row per backend coloured by state, in
//! the spirit of HAProxy's stats page. Self-contained HTML (inline CSS, no scripts, no external
//! assets) that reloads itself every few seconds, so it works from an SSH tunnel to a box
//! without internet access.

use std::fmt::Write;

use super::status::{BackendStatus, FrontendStatus, Status};

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
td.chk{white-space:normal;max-width:330px;text-align:left}
tr.up td{background:#c8f0c8}
tr.backup td{background:#c8dcf8}
tr.down td{background:#f6b8b8}
tr.draining td{background:#f8e0a0}
tr.drain td{background:#f8e0a0}
tr.maint td{background:#c9b8e8}
tr.total td{background:#e8e8e8;font-weight:600}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #bbb}
";

/// Renders the page.
pub fn render(s: &Status) -> String {
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
        frontend(&mut h, f);
    }
    let _ = writeln!(
        h,
        "<p class=\"meta\">Refreshes every {REFRESH_SECONDS}s. JSON at <a href=\"/status\">/status</a>, \
         Prometheus metrics at <a href=\"/metrics\">/metrics</a>.</p></body></html>"
    );
    h
}

fn frontend(h: &mut String, f: &FrontendStatus) {
    let listen = if f.listen.is_empty() {
        "not listening".to_string()
    } else {
        f.listen.join(", ")
    };
    let _ = write!(
        h,
        "<h2 id=\"fe-{name}\">Frontend {name}{removed}</h2><div class=\"meta\">\
         <span>listen {}</span><span>balance {}</span><span>active {}</span>\
         <span>accepted {}</span><span>rejected: limit {}, no backend {}</span></div>",
        esc(&listen),
        esc(f.balance),
        f.active,
        f.accepted_total,
        f.rejected_total.limit,
        f.rejected_total.no_backend,
        name = esc(&f.name),
        removed = if f.removed {
            " (removed, draining)"
        } else {
            ""
        },
    );
    h.push_str(
        "<table><tr><th class=\"l\">Backend</th><th class=\"l\">Address</th>\
         <th class=\"l\">State</th><th>Weight</th><th>Eff. weight</th><th>Active</th>\
         <th>Conns</th><th>Conn errors</th><th>Retries</th><th>Bytes in</th>\
         <th>Bytes out</th><th>Check fails</th><th>Changes</th>\
         <th class=\"l\">Last check</th><th>Since change</th></tr>",
    );
    for b in &f.backends {
        backend_row(h, b);
    }
    let sum = |g: fn(&BackendStatus) -> u64| f.backends.iter().map(g).sum::<u64>();
    let _ = write!(
        h,
        "<tr class=\"total\"><td class=\"l\">Total</td><td class=\"l\"></td><td class=\"l\"></td>\
         <td></td><td></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td>{}</td><td>{}</td><td class=\"l\"></td><td></td></tr></table>",
        sum(|b| b.active),
        sum(|b| b.connections_total),
        sum(|b| b.connect_failures_total),
        sum(|b| b.retries_total),
        bytes(sum(|b| b.bytes_in_total)),
        bytes(sum(|b| b.bytes_out_total)),
        sum(|b| b.check_failures_total),
        sum(|b| b.state_changes_total),
    );
}

fn backend_row(h: &mut String, b: &BackendStatus) {
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
    let _ = write!(
        h,
        "<tr class=\"{state}\"><td class=\"l\">{}</td><td class=\"l\">{}</td>\
         <td class=\"l\">{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"chk\">{}</td>\
         <td>{}</td></tr>",
        esc(&b.name),
        esc(&b.address),
        b.weight,
        trim_float(b.effective_weight),
        b.active,
        b.connections_total,
        b.connect_failures_total,
        b.retries_total,
        bytes(b.bytes_in_total),
        bytes(b.bytes_out_total),
        b.check_failures_total,
        b.state_changes_total,
        esc(&check),
        duration(b.seconds_since_change),
        state = b.state,
    );
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
