//! What each application check sends and how it judges the answer.
//!
//! Pure functions over bytes, so every protocol's corner is unit-tested here without a
//! server; [`super::app`] owns the socket, the deadline and the read cap. A judge sees all the
//! bytes read so far and whether more may come; it answers "wait" (`None`) or a verdict. Text
//! taken from an answer goes into log lines only through [`printable`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::probe::{CheckResult, Layer};
use crate::config::{HttpProbe, Probe, SendExpect};

/// The most a check reads from one answer. Every verdict is made within it.
pub const READ_CAP: usize = 16 * 1024;

/// What is known about the rest of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// More bytes may come.
    More,
    /// The backend closed its side.
    Closed,
    /// [`READ_CAP`] bytes are read; nothing more will be.
    Full,
}

/// One check's conversation: the bytes to send and the judge of the answer.
pub struct Exchange<'a> {
    pub layer: Layer,
    pub request: Vec<u8>,
    judge: Judge<'a>,
}

enum Judge<'a> {
    Http(&'a HttpProbe),
    SendExpect(&'a SendExpect),
    Redis,
    Postgres,
    Mysql,
    Tls,
}

impl<'a> Exchange<'a> {
    /// The exchange for `probe`; `None` for `Tcp`, which says nothing.
    pub fn new(probe: &'a Probe, addr: SocketAddr) -> Option<Exchange<'a>> {
        let (layer, request, judge) = match probe {
            Probe::Tcp => return None,
            Probe::Http(h) => (Layer::L7, http_request(h, addr), Judge::Http(h)),
            Probe::SendExpect(s) => (Layer::L7, s.send.clone(), Judge::SendExpect(s)),
            Probe::Redis => (Layer::L7, REDIS_PING.to_vec(), Judge::Redis),
            Probe::Postgres => (Layer::L7, pg_startup(), Judge::Postgres),
            // The server speaks first.
            Probe::Mysql => (Layer::L7, Vec::new(), Judge::Mysql),
            Probe::Tls { sni } => (
                Layer::L6,
                client_hello(sni.as_deref(), &mut Random::new()),
                Judge::Tls,
            ),
        };
        Some(Exchange {
            layer,
            request,
            judge,
        })
    }

    /// A verdict on the answer so far, or `None` to read more (only while `end` is `More`;
    /// the caller words the verdict for an answer that ended undecided).
    pub fn judge(&self, got: &[u8], end: End) -> Option<CheckResult> {
        match self.judge {
            Judge::Http(h) => judge_http(h, got, end),
            Judge::SendExpect(s) => judge_send_expect(s, got, end),
            Judge::Redis => judge_redis(got),
            Judge::Postgres => judge_postgres(got),
            Judge::Mysql => judge_mysql(got),
            Judge::Tls => judge_tls(got),
        }
    }

    /// The verdict on an answer that ended (closed, or the cap reached) before its judge
    /// decided: cut short, or too long.
    pub fn undecided(&self, got: &[u8], end: End) -> CheckResult {
        let info = match end {
            End::Full => format!("no complete answer in the first {READ_CAP} bytes"),
            _ if got.is_empty() => "connection closed before any answer".to_string(),
            _ => format!(
                "connection closed after {} bytes, before a complete answer: '{}'",
                got.len(),
                printable(got)
            ),
        };
        CheckResult::InvalidResponse(self.layer, info)
    }
}

/// Server text for a log line: printable ASCII, quotes and backslashes replaced, at most 64
/// characters (then "...").
pub fn printable(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let mut s: String = bytes
        .iter()
        .take(MAX)
        .map(|&b| match b {
            b'"' => '\'',
            b'\\' => '/',
            0x20..=0x7e => char::from(b),
            _ => '.',
        })
        .collect();
    if bytes.len() > MAX {
        s.push_str("...");
    }
    s
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn invalid(info: String) -> Option<CheckResult> {
    Some(CheckResult::InvalidResponse(Layer::L7, info))
}

// ----- http -----

fn http_request(h: &HttpProbe, addr: SocketAddr) -> Vec<u8> {
    let host = h.host.clone().unwrap_or_else(|| addr.to_string());
    format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringlb-health-check\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        h.method, h.path
    )
    .into_bytes()
}

/// `HTTP/1.1 503 Service Unavailable` -> (503, "Service Unavailable").
fn status_line(line: &[u8]) -> Option<(u16, &[u8])> {
    let rest = line.strip_prefix(b"HTTP/")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let rest = &rest[sp + 1..];
    let digits = rest.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    Some((code, rest.get(4..).unwrap_or_default()))
}

fn content_length(head: &[u8]) -> Option<usize> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        if !name.eq_ignore_ascii_case(b"content-length") {
            return None;
        }
        std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok()
    })
}

fn judge_http(h: &HttpProbe, got: &[u8], end: End) -> Option<CheckResult> {
    let eol = find(got, b"\n")?;
    let line = got[..eol].strip_suffix(b"\r").unwrap_or(&got[..eol]);
    let Some((code, reason)) = status_line(line) else {
        return invalid(format!("not an HTTP status line: '{}'", printable(line)));
    };
    if !h.expect_status.contains(code) {
        let info = if reason.is_empty() {
            format!("status outside {}", h.expect_status)
        } else {
            printable(reason)
        };
        return Some(CheckResult::WrongStatus {
            code: Some(code.to_string()),
            info,
        });
    }
    let Some(want) = &h.expect_body else {
        return Some(CheckResult::AppPassed(Layer::L7));
    };
    let head_end = find(got, b"\r\n\r\n")? + 4;
    let body = &got[head_end..];
    if find(body, want).is_some() {
        return Some(CheckResult::AppPassed(Layer::L7));
    }
    let complete = content_length(&got[..head_end]).is_some_and(|n| body.len() >= n);
    (complete || end != End::More).then(|| CheckResult::WrongStatus {
        code: Some(code.to_string()),
        info: "HTTP content check did not match".into(),
    })
}

// ----- send-expect -----

fn judge_send_expect(s: &SendExpect, got: &[u8], end: End) -> Option<CheckResult> {
    let matched = s.expect.as_ref().is_some_and(|e| find(got, e).is_some())
        || s.expect_regex.as_ref().is_some_and(|r| r.0.is_match(got));
    if matched {
        return Some(CheckResult::AppPassed(Layer::L7));
    }
    if end == End::More || got.is_empty() {
        return None;
    }
    let what = match &s.expect {
        Some(e) => format!("'{}'", printable(e)),
        None => "expect_regex".into(),
    };
    Some(CheckResult::WrongStatus {
        code: None,
        info: format!(
            "answer did not match {what} ({} bytes{}): '{}'",
            got.len(),
            if end == End::Full {
                ", the most read"
            } else {
                ""
            },
            printable(got)
        ),
    })
}

// ----- redis -----

/// `PING` as a RESP array, as every client sends it.
const REDIS_PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

fn judge_redis(got: &[u8]) -> Option<CheckResult> {
    let line = &got[..find(got, b"\r\n")?];
    match line.first() {
        Some(b'+') if &line[1..] == b"PONG" => Some(CheckResult::AppPassed(Layer::L7)),
        // "-LOADING Redis is loading the dataset in memory", "-BUSY ...", "-NOAUTH ...".
        Some(b'-') => Some(CheckResult::WrongStatus {
            code: None,
            info: printable(&line[1..]),
        }),
        _ => invalid(format!("not a PONG: '{}'", printable(line))),
    }
}

// ----- postgres -----

/// The role and database a check names: there is none such, so the server answers without
/// asking for credentials that the check does not have (or asks for them, which is as good).
pub const PG_USER: &str = "ringlb-health-check";

/// A protocol 3.0 startup message.
fn pg_startup() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0x0003_0000u32.to_be_bytes());
    for (k, v) in [
        ("user", PG_USER),
        ("database", PG_USER),
        ("application_name", PG_USER),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// SQLSTATEs that a server taking sessions gives a stranger: class 28 (invalid authorization:
/// no such role, wrong password) and 3D000 (no such database). Everything else, notably 57P03
/// (starting up, shutting down, in recovery) and 53300 (too many connections), means no.
fn pg_up_code(code: &str) -> bool {
    code.starts_with("28") || code == "3D000"
}

fn judge_postgres(got: &[u8]) -> Option<CheckResult> {
    let tag = *got.first()?;
    if !matches!(tag, b'R' | b'E') {
        return invalid(format!(
            "not a PostgreSQL answer (first byte 0x{tag:02x}: '{}')",
            printable(got)
        ));
    }
    let len = u32::from_be_bytes(got.get(1..5)?.try_into().ok()?) as usize;
    if !(4..=8192).contains(&len) {
        return invalid(format!("a PostgreSQL message of {len} bytes"));
    }
    if tag == b'R' {
        // An authentication request (or AuthenticationOk): the server takes sessions.
        return Some(CheckResult::AppPassed(Layer::L7));
    }
    let fields = got.get(5..1 + len)?;
    let (mut code, mut message) = (None, None);
    let mut rest = fields;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        match kind {
            b'C' => code = Some(&tail[..end]),
            b'M' => message = Some(&tail[..end]),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    let code = printable(code.unwrap_or(b"?"));
    if pg_up_code(&code) {
        return Some(CheckResult::AppPassed(Layer::L7));
    }
    Some(CheckResult::WrongStatus {
        code: Some(code),
        info: printable(message.unwrap_or_default()),
    })
}

// ----- mysql -----

fn judge_mysql(got: &[u8]) -> Option<CheckResult> {
    let head = got.get(..4)?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    if len == 0 || len + 4 > READ_CAP {
        return invalid(format!("not a MySQL greeting (a packet of {len} bytes)"));
    }
    let payload = got.get(4..4 + len)?;
    match payload[0] {
        0x0a if payload[1..].contains(&0) => Some(CheckResult::AppPassed(Layer::L7)),
        0x0a => invalid("a MySQL greeting without a server version".into()),
        0xff => {
            let code = payload
                .get(1..3)
                .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
            let mut text = payload.get(3..).unwrap_or_default();
            // A '#' and a five-character SQLSTATE come first in protocol 4.1 errors.
            if text.first() == Some(&b'#') {
                text = text.get(6..).unwrap_or_default();
            }
            Some(CheckResult::WrongStatus {
                code: Some(code.to_string()),
                info: printable(text),
            })
        }
        v => invalid(format!("not a MySQL greeting (protocol {v}, not 10)")),
    }
}

// ----- tls -----

/// A source of the ClientHello's random fields. They need to be unpredictable to no one (the
/// check never finishes a handshake), only different each time, as TLS servers expect.
struct Random(u64);

impl Random {
    fn new() -> Random {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = now ^ COUNT.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        Random(seed | 1)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
        }
    }
}

fn u16be(v: usize) -> [u8; 2] {
    (v as u16).to_be_bytes()
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u16be(data.len()));
    out.extend_from_slice(data);
}

/// A ClientHello that any TLS 1.2 or 1.3 server answers with a ServerHello: the common
/// suites of both versions, x25519 and the NIST curves, and an x25519 key share (random
/// bytes are a valid x25519 public key) so a 1.3 server needs no retry.
fn client_hello(sni: Option<&str>, rng: &mut Random) -> Vec<u8> {
    const SUITES: &[u16] = &[
        0x1301, 0x1302, 0x1303, // TLS 1.3: AES-128-GCM, AES-256-GCM, ChaCha20
        0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, // ECDHE with AEAD
        0xc013, 0xc014, 0x009c, 0x009d, 0x002f, 0x0035, // older, for older servers
    ];
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let mut data = u16be(name.len() + 3).to_vec();
        data.push(0); // host_name
        data.extend_from_slice(&u16be(name.len()));
        data.extend_from_slice(name.as_bytes());
        extension(&mut exts, 0x0000, &data);
    }
    extension(
        &mut exts,
        0x000a,
        &[0, 6, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18],
    );
    extension(&mut exts, 0x000b, &[1, 0]);
    let sigs: &[u16] = &[
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601, 0x0201,
    ];
    let mut data = u16be(sigs.len() * 2).to_vec();
    sigs.iter()
        .for_each(|s| data.extend_from_slice(&s.to_be_bytes()));
    extension(&mut exts, 0x000d, &data);
    extension(&mut exts, 0x0017, &[]); // extended_master_secret
    extension(&mut exts, 0xff01, &[0]); // renegotiation_info
    extension(&mut exts, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]); // TLS 1.3, 1.2
    let mut key = [0u8; 32];
    rng.fill(&mut key);
    let mut data = u16be(36).to_vec();
    data.extend_from_slice(&[0x00, 0x1d, 0x00, 0x20]);
    data.extend_from_slice(&key);
    extension(&mut exts, 0x0033, &data);

    let mut body = vec![0x03, 0x03];
    let mut random = [0u8; 64];
    rng.fill(&mut random);
    body.extend_from_slice(&random[..32]);
    body.push(32); // a session id, as TLS 1.3 clients send for middleboxes
    body.extend_from_slice(&random[32..]);
    body.extend_from_slice(&u16be(SUITES.len() * 2));
    SUITES
        .iter()
        .for_each(|s| body.extend_from_slice(&s.to_be_bytes()));
    body.extend_from_slice(&[1, 0]); // compression: none
    body.extend_from_slice(&u16be(exts.len()));
    body.extend_from_slice(&exts);

    let mut hello = vec![0x01];
    hello.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hello.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16be(hello.len()));
    record.extend_from_slice(&hello);
    record
}

fn alert_name(code: u8) -> &'static str {
    match code {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        40 => "handshake_failure",
        42 => "bad_certificate",
        47 => "illegal_parameter",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        120 => "no_application_protocol",
        _ => "alert",
    }
}

fn judge_tls(got: &[u8]) -> Option<CheckResult> {
    let bad = |info: String| Some(CheckResult::InvalidResponse(Layer::L6, info));
    let tag = *got.first()?;
    if !matches!(tag, 0x15 | 0x16) || got.get(1).is_some_and(|&v| v != 3) {
        return bad(format!("not a TLS record: '{}'", printable(got)));
    }
    if tag == 0x15 {
        let desc = *got.get(6)?;
        return bad(format!("TLS alert {} ({desc})", alert_name(desc)));
    }
    match *got.get(5)? {
        2 => Some(CheckResult::AppPassed(Layer::L6)),
        t => bad(format!(
            "TLS handshake message {t} instead of a ServerHello"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Pattern, StatusRange};

    fn http(body: Option<&str>) -> HttpProbe {
        HttpProbe {
            method: "GET".into(),
            path: "/health".into(),
            host: None,
            expect_status: StatusRange::DEFAULT,
            expect_body: body.map(|b| b.as_bytes().to_vec()),
            tls: false,
        }
    }

    fn words(r: Option<CheckResult>) -> String {
        r.map_or("wait".into(), |r| r.to_string())
    }

    #[test]
    fn http_status_decides_and_the_reason_phrase_is_the_info() {
        let h = http(None);
        let j = |t: &str, e| words(judge_http(&h, t.as_bytes(), e));
        assert_eq!(j("HTTP/1.1 200 OK\r\n", End::More), "Layer7 check passed");
        assert_eq!(
            j("HTTP/1.1 503 Service Unavailable\r\n", End::More),
            "Layer7 wrong status, code: 503, info: \"Service Unavailable\""
        );
        assert_eq!(j("HTTP/1.1 20", End::More), "wait");
        assert_eq!(
            j("SSH-2.0-OpenSSH\r\n", End::More),
            "Layer7 invalid response, info: \"not an HTTP status line: 'SSH-2.0-OpenSSH'\""
        );
        assert_eq!(
            j("HTTP/1.0 404\n", End::More),
            "Layer7 wrong status, code: 404, info: \"status outside 200-399\""
        );
        assert!(j("HTTP/1.1 2000 OK\r\n", End::More).contains("invalid response"));
    }

    #[test]
    fn http_body_check_waits_for_the_body_and_fails_when_it_is_complete_without_a_match() {
        let h = http(Some("ok"));
        let j = |t: &str, e| words(judge_http(&h, t.as_bytes(), e));
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(j(&format!("{head}st"), End::More), "wait");
        assert_eq!(j(&format!("{head}stat"), End::More), "wait");
        assert!(j(&format!("{head}status"), End::More).contains("did not match"));
        assert_eq!(
            j(&format!("{head}statu"), End::Closed),
            "Layer7 wrong status, code: 200, info: \"HTTP content check did not match\""
        );
        assert_eq!(
            j("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbad", End::More),
            "Layer7 wrong status, code: 200, info: \"HTTP content check did not match\""
        );
        assert_eq!(
            j("HTTP/1.1 200 OK\r\n\r\nall ok", End::More),
            "Layer7 check passed"
        );
    }

    #[test]
    fn send_expect_matches_a_substring_or_a_regex_and_says_what_came_instead() {
        let s = SendExpect {
            send: b"HELO\r\n".to_vec(),
            expect: Some(b"250".to_vec()),
            expect_regex: None,
        };
        assert_eq!(judge_send_expect(&s, b"220 hi\r\n", End::More), None);
        assert!(judge_send_expect(&s, b"220 hi\r\n250 ok", End::More).is_some_and(|r| r.passed()));
        assert_eq!(
            words(judge_send_expect(&s, b"554 no\r\n", End::Closed)),
            "Layer7 wrong status, info: \"answer did not match '250' (8 bytes): '554 no..'\""
        );
        let r = SendExpect {
            send: Vec::new(),
            expect: None,
            expect_regex: Some(Pattern(regex::bytes::Regex::new(r"^220 \S+").unwrap())),
        };
        assert!(
            judge_send_expect(&r, b"220 mail.example ESMTP", End::More).is_some_and(|r| r.passed())
        );
        assert_eq!(judge_send_expect(&r, b"421 busy", End::More), None);
    }

    #[test]
    fn redis_passes_on_pong_only_and_names_the_error() {
        assert_eq!(words(judge_redis(b"+PONG\r\n")), "Layer7 check passed");
        assert_eq!(words(judge_redis(b"+PON")), "wait");
        assert_eq!(
            words(judge_redis(
                b"-LOADING Redis is loading the dataset in memory\r\n"
            )),
            "Layer7 wrong status, info: \"LOADING Redis is loading the dataset in memory\""
        );
        assert_eq!(
            words(judge_redis(b"HTTP/1.1 400 Bad Request\r\n")),
            "Layer7 invalid response, info: \"not a PONG: 'HTTP/1.1 400 Bad Request'\""
        );
    }

    fn pg_error(code: &str, msg: &str) -> Vec<u8> {
        let mut fields = Vec::new();
        for (k, v) in [(b'S', "FATAL"), (b'C', code), (b'M', msg)] {
            fields.push(k);
            fields.extend_from_slice(v.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut m = vec![b'E'];
        m.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(&fields);
        m
    }

    #[test]
    fn postgres_up_is_an_auth_request_or_an_auth_error_and_starting_up_is_down() {
        assert!(judge_postgres(&[b'R', 0, 0, 0, 8, 0, 0, 0, 5]).is_some_and(|r| r.passed()));
        let no_role = pg_error("28000", "role \"ringlb-health-check\" does not exist");
        assert!(judge_postgres(&no_role).is_some_and(|r| r.passed()));
        assert_eq!(judge_postgres(&no_role[..10]), None);
        assert!(judge_postgres(&pg_error("3D000", "no db")).is_some_and(|r| r.passed()));
        assert!(judge_postgres(&pg_error("28P01", "password")).is_some_and(|r| r.passed()));
        assert_eq!(
            words(judge_postgres(&pg_error(
                "57P03",
                "the database system is starting up"
            ))),
            "Layer7 wrong status, code: 57P03, info: \"the database system is starting up\""
        );
        assert!(words(judge_postgres(&pg_error(
            "53300",
            "sorry, too many clients already"
        )))
        .contains("code: 53300"));
        assert!(words(judge_postgres(b"HTTP/1.1 400")).contains("not a PostgreSQL answer"));
        assert!(words(judge_postgres(&[b'E', 0xff, 0, 0, 0])).contains("invalid response"));
        let s = pg_startup();
        assert_eq!(
            s.len(),
            u32::from_be_bytes(s[..4].try_into().unwrap()) as usize
        );
        assert_eq!(&s[4..8], &[0, 3, 0, 0]);
    }

    /// Greetings written here byte by byte after the protocol documentation (no MySQL
    /// server is started by the tests).
    #[test]
    fn mysql_greeting_is_protocol_10_and_an_error_packet_is_named() {
        let mut greeting = vec![0x0a];
        greeting.extend_from_slice(b"8.0.36\0");
        greeting.extend_from_slice(&[1, 0, 0, 0]); // thread id
        greeting.extend_from_slice(b"abcdefgh\0"); // auth plugin data part 1 and filler
        let mut packet = vec![greeting.len() as u8, 0, 0, 0];
        packet.extend_from_slice(&greeting);
        assert!(judge_mysql(&packet).is_some_and(|r| r.passed()));
        assert_eq!(judge_mysql(&packet[..6]), None);
        let mut err = vec![0xff, 0x10, 0x04]; // 1040
        err.extend_from_slice(b"Too many connections");
        let mut packet = vec![err.len() as u8, 0, 0, 0];
        packet.extend_from_slice(&err);
        assert_eq!(
            words(judge_mysql(&packet)),
            "Layer7 wrong status, code: 1040, info: \"Too many connections\""
        );
        let mut v9 = vec![5, 0, 0, 0, 9];
        v9.extend_from_slice(b"5.0\0");
        assert!(words(judge_mysql(&v9)).contains("protocol 9, not 10"));
        assert!(words(judge_mysql(b"HTTP/1.1 400 Bad")).contains("invalid response"));
    }

    #[test]
    fn tls_passes_on_a_server_hello_and_names_an_alert() {
        assert_eq!(
            words(judge_tls(&[0x16, 3, 3, 0, 90, 2, 0, 0, 86])),
            "Layer6 check passed"
        );
        assert_eq!(words(judge_tls(&[0x16, 3, 3, 0])), "wait");
        assert_eq!(
            words(judge_tls(&[0x15, 3, 3, 0, 2, 2, 40])),
            "Layer6 invalid response, info: \"TLS alert handshake_failure (40)\""
        );
        assert_eq!(
            words(judge_tls(b"HTTP/1.1 400 Bad Request")),
            "Layer6 invalid response, info: \"not a TLS record: 'HTTP/1.1 400 Bad Request'\""
        );
    }

    #[test]
    fn the_client_hello_is_well_framed_and_carries_the_sni() {
        let hello = client_hello(Some("db.example"), &mut Random::new());
        assert_eq!(hello[0], 0x16);
        let record = u16::from_be_bytes([hello[3], hello[4]]) as usize;
        assert_eq!(record, hello.len() - 5);
        let handshake = u32::from_be_bytes([0, hello[6], hello[7], hello[8]]) as usize;
        assert_eq!(handshake, record - 4);
        assert!(find(&hello, b"db.example").is_some());
        assert_ne!(
            client_hello(None, &mut Random::new()),
            client_hello(None, &mut Random::new())
        );
    }

    #[test]
    fn printable_keeps_log_lines_on_one_line_and_short() {
        assert_eq!(printable(b"a\"b\\c\r\n\x1b"), "a'b/c...");
        assert_eq!(printable(&[b'x'; 100]).len(), 67);
    }
}
