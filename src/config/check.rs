//! What an active health check says on its connection: the validated `kind` of
//! `[frontend.health]` / `[frontend.backend.health]` and the keys that belong to it.
//!
//! Plain values compared with `==` by the reload diff; a changed check is retuned in place by
//! the backend's checker (`health::checker`), which keeps its counter.

use std::fmt;

/// The check a backend gets. `Tcp` is HAProxy's Layer4 check; the others speak on the
/// connection and report in Layer7 (Layer6 for `Tls`) words.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Probe {
    /// Connect, then close.
    #[default]
    Tcp,
    /// One HTTP/1.1 request; the status (and optionally the body) decides.
    Http(HttpProbe),
    /// Send bytes (or nothing), expect a substring or a regex match in the answer.
    SendExpect(SendExpect),
    /// `PING` answered by `+PONG`.
    Redis,
    /// A startup message for a user that needs no credentials to be refused.
    Postgres,
    /// The server's greeting (protocol 10), not an error packet.
    Mysql,
    /// A ClientHello answered by a ServerHello (HAProxy's ssl-hello-chk).
    Tls { sni: Option<String> },
}

impl Probe {
    /// The word written in the config file.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Tcp => "tcp",
            Probe::Http(_) => "http",
            Probe::SendExpect(_) => "send-expect",
            Probe::Redis => "redis",
            Probe::Postgres => "postgres",
            Probe::Mysql => "mysql",
            Probe::Tls { .. } => "tls",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpProbe {
    pub method: String,
    pub path: String,
    /// The Host header; `None` sends the backend's address.
    pub host: Option<String>,
    pub expect_status: StatusRange,
    /// A substring the body must contain.
    pub expect_body: Option<Vec<u8>>,
    /// HTTPS: the request goes over TLS (the certificate is not verified).
    pub tls: bool,
}

/// An inclusive range of HTTP status codes, like `200-399`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub lo: u16,
    pub hi: u16,
}

impl StatusRange {
    pub const DEFAULT: StatusRange = StatusRange { lo: 200, hi: 399 };

    pub fn contains(self, code: u16) -> bool {
        (self.lo..=self.hi).contains(&code)
    }

    /// `"200"` or `"200-399"`, codes 100 to 599, the lower first.
    pub fn parse(text: &str) -> Result<StatusRange, String> {
        let code = |t: &str| -> Result<u16, String> {
            match t.trim().parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => Ok(c),
                _ => Err(format!(
                    "\"{text}\" is not a status code or range: write \"200\" or \"200-399\" \
                     (codes 100 to 599)"
                )),
            }
        };
        let (lo, hi) = match text.split_once('-') {
            Some((a, b)) => (code(a)?, code(b)?),
            None => {
                let c = code(text)?;
                (c, c)
            }
        };
        if lo > hi {
            return Err(format!(
                "\"{text}\" is an empty range: the lower code comes first, like \"{hi}-{lo}\""
            ));
        }
        Ok(StatusRange { lo, hi })
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SendExpect {
    /// Written as soon as the connection is up; empty for protocols that speak first (SMTP).
    pub send: Vec<u8>,
    pub expect: Option<Vec<u8>>,
    pub expect_regex: Option<Pattern>,
}

/// A compiled `expect_regex`, compared by its source text (a compiled regex has no `==`).
#[derive(Debug, Clone)]
pub struct Pattern(pub regex::bytes::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// `send` and `expect` as bytes: TOML's own escapes (`"\r\n"`) arrive already turned into
/// characters; a literal string (`'PING\r\n'`) or `\xHH` for a byte that TOML cannot write is
/// unescaped here. Knows `\r \n \t \0 \\ \xHH`.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let value = std::str::from_utf8(&hex)
                    .ok()
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match value {
                    Some(v) => out.push(v),
                    None => return Err("\\x needs two hex digits, like \\x00".into()),
                }
            }
            Some(other) => {
                return Err(format!(
                    "unknown escape \\{}: use \\r, \\n, \\t, \\0, \\\\ or \\xHH",
                    char::from(other).escape_default()
                ))
            }
            None => return Err("ends with a lone backslash".into()),
        }
    }
    Ok(out)
}

/// The check kinds as written in `kind = "..."`, and the keys each one takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KindName {
    Tcp,
    Http,
    SendExpect,
    Redis,
    Postgres,
    Mysql,
    Tls,
}

const KINDS: &[(&str, KindName, &[&str])] = &[
    ("tcp", KindName::Tcp, &[]),
    (
        "http",
        KindName::Http,
        &[
            "path",
            "method",
            "host",
            "expect_status",
            "expect_body",
            "tls",
        ],
    ),
    (
        "send-expect",
        KindName::SendExpect,
        &["send", "expect", "expect_regex"],
    ),
    ("redis", KindName::Redis, &[]),
    ("postgres", KindName::Postgres, &[]),
    ("mysql", KindName::Mysql, &[]),
    ("tls", KindName::Tls, &["sni"]),
];

impl KindName {
    fn word(self) -> &'static str {
        KINDS.iter().find(|k| k.1 == self).map_or("tcp", |k| k.0)
    }

    fn takes(self, key: &str) -> bool {
        KINDS
            .iter()
            .find(|k| k.1 == self)
            .is_some_and(|k| k.2.contains(&key))
    }
}

/// Longest `send`/`expect`: an expected string must fit in what a check reads.
const MAX_CHECK_TEXT: usize = 4096;

/// One level's check settings, each checked: `None` where the level does not set the key (or
/// set it wrongly, which is reported).
#[derive(Debug, Default, Clone)]
pub(super) struct ProbeLayer {
    kind: Option<KindName>,
    path: Option<String>,
    method: Option<String>,
    host: Option<String>,
    expect_status: Option<StatusRange>,
    expect_body: Option<Vec<u8>>,
    send: Option<Vec<u8>>,
    expect: Option<Vec<u8>>,
    expect_regex: Option<Pattern>,
    sni: Option<String>,
    tls: Option<bool>,
}

/// A problem with one key of a health table: the key and what is wrong.
pub(super) type KeyProblem = (&'static str, String);

impl ProbeLayer {
    /// Checks the keys one health table sets. `inherited` is the kind the table gets from the
    /// frontend when it sets none itself (a backend's table); keys that the resulting kind
    /// does not take are reported, each at its own line.
    pub(super) fn check(
        f: &super::file::FileHealth,
        inherited: Option<KindName>,
        out: &mut Vec<KeyProblem>,
    ) -> ProbeLayer {
        let mut layer = ProbeLayer::default();
        if let Some(word) = &f.kind {
            match KINDS.iter().find(|k| k.0 == word) {
                Some(k) => layer.kind = Some(k.1),
                None => out.push((
                    "kind",
                    format!(
                        "unknown kind \"{word}\": use \"tcp\", \"http\", \"send-expect\", \"redis\", \
                         \"postgres\", \"mysql\" or \"tls\""
                    ),
                )),
            }
        }
        // An unknown kind is reported once; its keys are not judged against a guess.
        let judged = f.kind.is_none() || layer.kind.is_some();
        let kind = layer.kind.or(inherited).unwrap_or(KindName::Tcp);
        let written: [(&'static str, &Option<String>); 9] = [
            ("path", &f.path),
            ("method", &f.method),
            ("host", &f.host),
            ("expect_status", &f.expect_status),
            ("expect_body", &f.expect_body),
            ("send", &f.send),
            ("expect", &f.expect),
            ("expect_regex", &f.expect_regex),
            ("sni", &f.sni),
        ];
        // `tls` is the one boolean: judged as the strings are, with no value to check.
        let tls = f.tls.map(|t| t.to_string());
        for (key, value) in written.into_iter().chain([("tls", &tls)]) {
            let Some(text) = value else { continue };
            if judged && !kind.takes(key) {
                let owner = KINDS
                    .iter()
                    .find(|k| k.2.contains(&key))
                    .map_or("?", |k| k.0);
                let from = if layer.kind.is_none() && inherited.is_some() {
                    " (from the frontend's [frontend.health])"
                } else if layer.kind.is_none() {
                    " (the default)"
                } else {
                    ""
                };
                out.push((
                    key,
                    format!(
                        "belongs to kind = \"{owner}\", and this check is kind = \"{}\"{from}: \
                         set kind = \"{owner}\" or remove the key",
                        kind.word()
                    ),
                ));
                continue;
            }
            if let Err(e) = layer.set(key, text) {
                out.push((key, e));
            }
        }
        if layer.kind == Some(KindName::SendExpect)
            && f.expect.is_none()
            && f.expect_regex.is_none()
        {
            out.push((
                "kind",
                "\"send-expect\" needs expect (a substring) or expect_regex".into(),
            ));
        }
        if f.expect.is_some() && f.expect_regex.is_some() {
            out.push((
                "expect_regex",
                "set expect or expect_regex, not both".into(),
            ));
        }
        layer
    }

    fn set(&mut self, key: &str, text: &str) -> Result<(), String> {
        let plain = |what: &str, max: usize| -> Result<String, String> {
            if text.is_empty() || text.len() > max {
                return Err(format!("must be 1 to {max} characters"));
            }
            if text
                .bytes()
                .any(|b| b.is_ascii_control() || b == b' ' || b >= 0x7f)
            {
                return Err(format!(
                    "\"{text}\" is not {what}: no spaces, control or non-ASCII characters"
                ));
            }
            Ok(text.to_string())
        };
        let bytes = |max: usize| -> Result<Vec<u8>, String> {
            let b = unescape(text)?;
            if b.is_empty() || b.len() > max {
                return Err(format!("must be 1 to {max} bytes"));
            }
            Ok(b)
        };
        match key {
            "path" => {
                let p = plain("a request path", 1024)?;
                if !p.starts_with('/') {
                    return Err(format!("\"{text}\" must start with '/', like \"/health\""));
                }
                self.path = Some(p);
            }
            "method" => {
                if text.is_empty()
                    || text.len() > 16
                    || !text.bytes().all(|b| b.is_ascii_uppercase())
                {
                    return Err(format!(
                        "\"{text}\" is not an HTTP method: upper-case letters, like \"GET\" or \"HEAD\""
                    ));
                }
                self.method = Some(text.to_string());
            }
            "host" => self.host = Some(plain("a host name", 255)?),
            "tls" => self.tls = Some(text == "true"),
            "expect_status" => self.expect_status = Some(StatusRange::parse(text)?),
            "expect_body" => self.expect_body = Some(bytes(MAX_CHECK_TEXT)?),
            "send" => self.send = Some(bytes(MAX_CHECK_TEXT)?),
            "expect" => self.expect = Some(bytes(MAX_CHECK_TEXT)?),
            "expect_regex" => {
                let re = regex::bytes::RegexBuilder::new(text)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| {
                        // The crate's message spans lines (the pattern, a caret, the error);
                        // its last line says what is wrong.
                        let msg = e.to_string();
                        let last = msg.lines().rev().find(|l| !l.trim().is_empty());
                        format!(
                            "\"{text}\" does not compile: {}",
                            last.unwrap_or("invalid")
                                .trim()
                                .trim_start_matches("error: ")
                        )
                    })?;
                self.expect_regex = Some(Pattern(re));
            }
            "sni" => {
                let name = plain("a host name", 253)?;
                if !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                {
                    return Err(format!(
                        "\"{text}\" is not a DNS name: letters, digits, '.' and '-'"
                    ));
                }
                self.sni = Some(name);
            }
            _ => {}
        }
        Ok(())
    }

    /// A backend's layer over its frontend's: a backend that names its own `kind` takes none
    /// of the frontend's check keys (they may belong to another kind); one that does not
    /// overrides them key by key.
    pub(super) fn over(self, below: &ProbeLayer) -> ProbeLayer {
        if self.kind.is_some() {
            return self;
        }
        ProbeLayer {
            kind: below.kind,
            path: self.path.or_else(|| below.path.clone()),
            method: self.method.or_else(|| below.method.clone()),
            host: self.host.or_else(|| below.host.clone()),
            expect_status: self.expect_status.or(below.expect_status),
            expect_body: self.expect_body.or_else(|| below.expect_body.clone()),
            send: self.send.or_else(|| below.send.clone()),
            expect: self.expect.or_else(|| below.expect.clone()),
            expect_regex: self.expect_regex.or_else(|| below.expect_regex.clone()),
            sni: self.sni.or_else(|| below.sni.clone()),
            tls: self.tls.or(below.tls),
        }
    }

    pub(super) fn kind(&self) -> Option<KindName> {
        self.kind
    }

    /// The probe with the documented defaults for what no level sets.
    pub(super) fn resolve(self) -> Probe {
        match self.kind.unwrap_or(KindName::Tcp) {
            KindName::Tcp => Probe::Tcp,
            KindName::Http => Probe::Http(HttpProbe {
                method: self.method.unwrap_or_else(|| "GET".into()),
                path: self.path.unwrap_or_else(|| "/".into()),
                host: self.host,
                expect_status: self.expect_status.unwrap_or(StatusRange::DEFAULT),
                expect_body: self.expect_body,
                tls: self.tls.unwrap_or(false),
            }),
            KindName::SendExpect => Probe::SendExpect(SendExpect {
                send: self.send.unwrap_or_default(),
                expect: self.expect,
                expect_regex: self.expect_regex,
            }),
            KindName::Redis => Probe::Redis,
            KindName::Postgres => Probe::Postgres,
            KindName::Mysql => Probe::Mysql,
            KindName::Tls => Probe::Tls { sni: self.sni },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn probes(health: &str, backend_health: &str) -> Result<Vec<Probe>, Vec<String>> {
        let text = format!(
            "[[frontend]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\n[frontend.health]\n{health}\n\
             [[frontend.backend]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
             [frontend.backend.health]\n{backend_health}\n\
             [[frontend.backend]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"\n"
        );
        Config::parse(&text, "t")
            .map(|c| {
                c.frontends[0]
                    .backends
                    .iter()
                    .map(|b| b.health.probe.clone())
                    .collect()
            })
            .map_err(|e| e.problems)
    }

    #[test]
    fn the_default_check_is_tcp_and_http_gets_its_documented_defaults() {
        assert_eq!(probes("", "").unwrap(), vec![Probe::Tcp, Probe::Tcp]);
        let p = probes("kind = \"http\"", "").unwrap();
        assert_eq!(
            p[1],
            Probe::Http(HttpProbe {
                method: "GET".into(),
                path: "/".into(),
                host: None,
                expect_status: StatusRange::DEFAULT,
                expect_body: None,
                tls: false,
            })
        );
    }

    #[test]
    fn a_backend_overrides_check_keys_one_by_one_or_takes_its_own_kind_whole() {
        let p = probes(
            "kind = \"http\"\npath = \"/health\"\nexpect_status = \"200\"",
            "path = \"/ready\"",
        )
        .unwrap();
        let Probe::Http(a) = &p[0] else {
            panic!("{p:?}")
        };
        assert_eq!(
            (a.path.as_str(), a.expect_status.to_string()),
            ("/ready", "200".into())
        );
        let Probe::Http(b) = &p[1] else {
            panic!("{p:?}")
        };
        assert_eq!(b.path, "/health");
        // Its own kind: the frontend's http keys are not its keys, and are not an error.
        let p = probes("kind = \"http\"\npath = \"/health\"", "kind = \"redis\"").unwrap();
        assert_eq!(p[0], Probe::Redis);
        let p = probes("kind = \"tls\"", "sni = \"db.internal\"").unwrap();
        assert_eq!(
            p[0],
            Probe::Tls {
                sni: Some("db.internal".into())
            }
        );
    }

    #[test]
    fn a_key_of_another_kind_and_a_send_expect_without_expect_are_refused() {
        let e = probes("path = \"/health\"", "").unwrap_err().join("\n");
        assert!(
            e.contains("health: path: belongs to kind = \"http\", and this check is kind = \"tcp\" (the default)"),
            "{e}"
        );
        let e = probes("kind = \"http\"", "send = \"x\"")
            .unwrap_err()
            .join("\n");
        assert!(
            e.contains("backend \"a\": health: send: belongs to kind = \"send-expect\", and this check is kind = \"http\" (from the frontend's [frontend.health])"),
            "{e}"
        );
        let e = probes("kind = \"send-expect\"\nsend = \"x\"", "")
            .unwrap_err()
            .join("\n");
        assert!(e.contains("kind: \"send-expect\" needs expect"), "{e}");
        let e = probes("kind = \"http\"\nmethod = \"get\"\npath = \"health\"", "")
            .unwrap_err()
            .join("\n");
        assert!(e.contains("method: \"get\" is not an HTTP method"), "{e}");
        assert!(e.contains("path: \"health\" must start with '/'"), "{e}");
    }

    #[test]
    fn status_ranges_parse_single_codes_and_ordered_ranges_only() {
        assert_eq!(StatusRange::parse("200-399"), Ok(StatusRange::DEFAULT));
        assert_eq!(
            StatusRange::parse("204"),
            Ok(StatusRange { lo: 204, hi: 204 })
        );
        let e = StatusRange::parse("500-200").unwrap_err();
        assert!(e.contains("empty range") && e.contains("200-500"), "{e}");
        assert!(StatusRange::parse("2xx").is_err());
        assert!(StatusRange::parse("99").is_err());
        assert!(StatusRange::parse("200-600").is_err());
        assert!(StatusRange::DEFAULT.contains(399) && !StatusRange::DEFAULT.contains(400));
    }

    #[test]
    fn escapes_turn_into_bytes_and_bad_ones_are_named() {
        assert_eq!(unescape(r"PING\r\n").unwrap(), b"PING\r\n");
        assert_eq!(unescape(r"\x00\xff\\").unwrap(), vec![0, 0xff, b'\\']);
        assert_eq!(unescape("HELO\r\n").unwrap(), b"HELO\r\n");
        assert!(unescape(r"\q").unwrap_err().contains("unknown escape \\q"));
        assert!(unescape(r"\x4").is_err());
        assert!(unescape("a\\").is_err());
    }
}
