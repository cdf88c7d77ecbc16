//! The admin listener's request-head parser: incremental, byte by byte, with a fixed memory
//! bound.
//!
//! The request line is kept (at most [`MAX_LINE`] bytes), and so is the current header line
//! while it arrives; of the headers only the few the runtime API needs are stored
//! (`Content-Length`, `Content-Type`, `Authorization`, `Origin`, `Host`, whether
//! `Transfer-Encoding` was sent), each under its own cap, at most [`MAX_KEPT`] bytes in all; other header lines
//! are checked for shape and dropped. The whole head is capped at [`MAX_HEAD`] bytes, so a
//! connection costs at most [`MAX_HELD`] bytes of parser state however much it sends, and
//! every input of `MAX_HEAD + 1` bytes or more is decided. Feeding the same bytes in any
//! chunking gives the same result.
//!
//! Public so that the property test in `tests/admin_fuzz.rs` can drive it.

/// Largest request line accepted (`GET /path?query HTTP/1.1`), line ending included.
pub const MAX_LINE: usize = 2 * 1024;
/// Largest request head accepted: request line, headers and the blank line.
pub const MAX_HEAD: usize = 8 * 1024;
/// Header values kept, at most, in all (see [`KEPT`]).
pub const MAX_KEPT: usize = 2 * 1024;
/// Parser state held at most: the line being read and the kept header values.
pub const MAX_HELD: usize = MAX_LINE + MAX_KEPT;

/// The headers kept, with the longest value accepted for each (longer: 431).
const KEPT: &[(&str, usize)] = &[
    ("authorization", 512),
    ("content-type", 128),
    ("origin", 256),
    ("content-length", 20),
    ("transfer-encoding", 64),
    ("host", 256),
];

/// The parts of a request the admin listener routes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Upper-case token, e.g. `GET`.
    pub method: String,
    /// The target without its query or fragment; always starts with `/`.
    pub path: String,
    /// `Content-Length`, if sent (sent twice: malformed).
    pub content_length: Option<usize>,
    /// `Content-Type`, trimmed.
    pub content_type: Option<String>,
    /// `Authorization`, trimmed.
    pub authorization: Option<String>,
    /// `Origin`, trimmed (browsers send it on a cross-site POST).
    pub origin: Option<String>,
    /// `Host`, trimmed.
    pub host: Option<String>,
    /// Whether `Transfer-Encoding` was sent (the admin listener takes no chunked bodies).
    pub transfer_encoding: bool,
}

impl Request {
    /// A request with no kept headers.
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            content_length: None,
            content_type: None,
            authorization: None,
            origin: None,
            host: None,
            transfer_encoding: false,
        }
    }
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The request line or the whole head is over its cap (answered 431).
    #[error("request head too large")]
    TooLarge,
    /// Not an HTTP/1.x request head (answered 400).
    #[error("malformed request head")]
    Malformed,
}

/// What the parser knows after the bytes fed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The head is not complete yet.
    NeedMore,
    /// The head is complete; `consumed` bytes of the last chunk belonged to it.
    Done { request: Request, consumed: usize },
    /// The head is refused; nothing more needs to be read.
    Failed(HeadError),
}

#[derive(Debug)]
enum State {
    RequestLine,
    Headers { request: Request },
    Finished,
}

/// Incremental parser for one request head.
#[derive(Debug)]
pub struct HeadParser {
    state: State,
    /// The request line so far (only while in `State::RequestLine`).
    line: Vec<u8>,
    /// Bytes of the head seen so far.
    total: usize,
    /// Bytes of the current header line, line ending excluded.
    header_len: usize,
    /// Whether the current header line has a `:`.
    header_colon: bool,
    /// Whether the last byte of the current header line was `\r`.
    header_cr: bool,
}

impl Default for HeadParser {
    fn default() -> Self {
        HeadParser::new()
    }
}

impl HeadParser {
    pub fn new() -> HeadParser {
        HeadParser {
            state: State::RequestLine,
            line: Vec::new(),
            total: 0,
            header_len: 0,
            header_colon: false,
            header_cr: false,
        }
    }

    /// Bytes the parser holds on the heap: never more than [`MAX_HELD`].
    pub fn held_bytes(&self) -> usize {
        let kept = match &self.state {
            State::Headers { request } => [
                &request.content_type,
                &request.authorization,
                &request.origin,
                &request.host,
            ]
            .iter()
            .map(|v| v.as_ref().map_or(0, String::capacity))
            .sum(),
            _ => 0,
        };
        self.line.capacity() + kept
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Feeds the next bytes of the connection. Once it returns `Done` or `Failed`, further
    /// calls return `Failed(Malformed)`: a parser is for one head.
    pub fn feed(&mut self, bytes: &[u8]) -> Progress {
        if matches!(self.state, State::Finished) {
            return Progress::Failed(HeadError::Malformed);
        }
        for (i, &b) in bytes.iter().enumerate() {
            self.total += 1;
            if self.total > MAX_HEAD {
                return self.fail(HeadError::TooLarge);
            }
            let step = match &self.state {
                State::RequestLine => self.request_line_byte(b),
                State::Headers { .. } => self.header_byte(b),
                State::Finished => Err(HeadError::Malformed),
            };
            match step {
                Err(e) => return self.fail(e),
                Ok(true) => {
                    let State::Headers { request } =
                        std::mem::replace(&mut self.state, State::Finished)
                    else {
                        return self.fail(HeadError::Malformed);
                    };
                    return Progress::Done {
                        request,
                        consumed: i + 1,
                    };
                }
                Ok(false) => {}
            }
        }
        Progress::NeedMore
    }

    fn fail(&mut self, e: HeadError) -> Progress {
        self.state = State::Finished;
        self.line = Vec::new();
        Progress::Failed(e)
    }

    /// One byte of the request line; `Ok(true)` never happens here (headers follow).
    fn request_line_byte(&mut self, b: u8) -> Result<bool, HeadError> {
        if b != b'\n' {
            if self.line.len() + 1 >= MAX_LINE {
                return Err(HeadError::TooLarge);
            }
            if self.line.is_empty() {
                // Allocated once, at its cap, so it never grows past it.
                self.line.reserve_exact(MAX_LINE);
            }
            self.line.push(b);
            return Ok(false);
        }
        let line = std::mem::take(&mut self.line);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        let request = parse_request_line(line)?;
        self.state = State::Headers { request };
        Ok(false)
    }

    /// One byte of the header section; `Ok(true)` at the blank line that ends the head.
    fn header_byte(&mut self, b: u8) -> Result<bool, HeadError> {
        match b {
            b'\n' => {
                let content = self.header_len - usize::from(self.header_cr);
                if content == 0 {
                    return Ok(true);
                }
                if !self.header_colon {
                    return Err(HeadError::Malformed);
                }
                let line = std::mem::take(&mut self.line);
                let overflow = self.header_len > line.len();
                self.header_len = 0;
                self.header_colon = false;
                self.header_cr = false;
                self.keep_header(&line, overflow)?;
                // The buffer is reused for the next header line: allocated once.
                self.line = line;
                self.line.clear();
                Ok(false)
            }
            // A bare CR inside a line, a NUL, or a folded (continued) header line.
            _ if self.header_cr || b == 0 => Err(HeadError::Malformed),
            b' ' | b'\t' if self.header_len == 0 => Err(HeadError::Malformed),
            _ => {
                self.header_colon |= b == b':';
                self.header_cr = b == b'\r';
                self.header_len += 1;
                // Only the start of a long line is kept: enough to know its name.
                if self.line.len() < MAX_LINE {
                    if self.line.capacity() == 0 {
                        self.line.reserve_exact(MAX_LINE);
                    }
                    self.line.push(b);
                }
                Ok(false)
            }
        }
    }

    /// Stores a finished header line if it is one of [`KEPT`]; `overflow` says the line was
    /// longer than what was kept of it.
    fn keep_header(&mut self, line: &[u8], overflow: bool) -> Result<(), HeadError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(HeadError::Malformed);
        };
        let name = &line[..colon];
        let Some(&(kept, cap)) = KEPT
            .iter()
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name))
        else {
            return Ok(());
        };
        let value = std::str::from_utf8(&line[colon + 1..])
            .map_err(|_| HeadError::Malformed)?
            .trim_matches([' ', '\t']);
        if overflow || value.len() > cap {
            return Err(HeadError::TooLarge);
        }
        let State::Headers { request } = &mut self.state else {
            return Err(HeadError::Malformed);
        };
        let slot = match kept {
            "content-length" => {
                let n: usize = value.parse().map_err(|_| HeadError::Malformed)?;
                if request.content_length.replace(n).is_some() {
                    return Err(HeadError::Malformed);
                }
                return Ok(());
            }
            "transfer-encoding" => {
                request.transfer_encoding = true;
                return Ok(());
            }
            "content-type" => &mut request.content_type,
            "authorization" => &mut request.authorization,
            "host" => &mut request.host,
            _ => &mut request.origin,
        };
        if slot.replace(value.to_string()).is_some() {
            return Err(HeadError::Malformed);
        }
        Ok(())
    }
}

/// Parses `METHOD SP TARGET SP HTTP/1.x` (the line ending already removed).
fn parse_request_line(line: &[u8]) -> Result<Request, HeadError> {
    let text = std::str::from_utf8(line).map_err(|_| HeadError::Malformed)?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    let version_ok = version
        .strip_prefix("HTTP/1.")
        .is_some_and(|minor| minor.len() == 1 && minor.bytes().all(|b| b.is_ascii_digit()));
    let target_ok = target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic());
    if !token(method) || !target_ok || !version_ok {
        return Err(HeadError::Malformed);
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    Ok(Request::new(method, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Progress {
        HeadParser::new().feed(bytes)
    }

    fn done(method: &str, path: &str, consumed: usize) -> Progress {
        Progress::Done {
            request: Request::new(method, path),
            consumed,
        }
    }

    #[test]
    fn a_plain_get_is_parsed_and_the_query_is_ignored() {
        let head = b"GET /status?x=1 HTTP/1.1\r\nX-A: a\r\n\r\nbody";
        assert_eq!(parse(head), done("GET", "/status", head.len() - 4));
    }

    #[test]
    fn either_line_ending_ends_the_head() {
        assert_eq!(parse(b"GET / HTTP/1.1\n\n"), done("GET", "/", 16));
        assert_eq!(parse(b"GET / HTTP/1.0\r\nA: b\n\r\n"), done("GET", "/", 23));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Progress::NeedMore);
    }

    #[test]
    fn garbage_request_lines_are_malformed() {
        for bad in [
            &b"GET\r\n"[..],
            b"GET /\r\n",
            b"get / HTTP/1.1\r\n",
            b"GET status HTTP/1.1\r\n",
            b"GET / SPDY/3\r\n",
            b"GET / HTTP/1.1 extra\r\n",
            b"GET / HTTP/1.10\r\n",
            b"\xff\xfe / HTTP/1.1\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Progress::Failed(HeadError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn malformed_header_lines_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nno colon\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: \0\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Progress::Failed(HeadError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn long_lines_and_heads_are_too_large_and_memory_stays_at_the_cap() {
        let mut p = HeadParser::new();
        assert_eq!(p.feed(&[b'a'; MAX_LINE - 1]), Progress::NeedMore);
        assert!(p.held_bytes() <= MAX_LINE);
        assert_eq!(p.feed(b"a"), Progress::Failed(HeadError::TooLarge));
        let mut p = HeadParser::new();
        assert_eq!(p.feed(b"GET / HTTP/1.1\r\n"), Progress::NeedMore);
        let header = b"X: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n";
        let mut last = Progress::NeedMore;
        for _ in 0..MAX_HEAD / header.len() + 1 {
            last = p.feed(header);
            if last != Progress::NeedMore {
                break;
            }
        }
        assert_eq!(last, Progress::Failed(HeadError::TooLarge));
        assert_eq!(p.held_bytes(), 0);
    }

    #[test]
    fn the_runtime_api_headers_are_kept_and_others_dropped() {
        let head = b"POST /api/x HTTP/1.1\r\nHost: a\r\ncontent-length: 12\r\n\
            Content-Type: application/json\r\nAuthorization:  Bearer abc \r\n\r\n";
        let Progress::Done { request, .. } = parse(head) else {
            panic!("not parsed");
        };
        assert_eq!(request.content_length, Some(12));
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(request.origin, None);
        assert!(!request.transfer_encoding);
    }

    #[test]
    fn a_repeated_or_bad_content_length_and_an_oversized_token_are_refused() {
        let twice = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(parse(twice), Progress::Failed(HeadError::Malformed));
        let bad = b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(parse(bad), Progress::Failed(HeadError::Malformed));
        let long = format!(
            "POST / HTTP/1.1\r\nAuthorization: {}\r\n\r\n",
            "a".repeat(600)
        );
        assert_eq!(
            parse(long.as_bytes()),
            Progress::Failed(HeadError::TooLarge)
        );
        let mut p = HeadParser::new();
        let huge = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n", "b".repeat(4000));
        assert_eq!(p.feed(huge.as_bytes()), Progress::NeedMore);
        assert!(p.held_bytes() <= MAX_HELD);
    }

    #[test]
    fn a_finished_parser_refuses_more_bytes() {
        let mut p = HeadParser::new();
        assert!(matches!(
            p.feed(b"GET / HTTP/1.1\r\n\r\n"),
            Progress::Done { .. }
        ));
        assert_eq!(p.feed(b"x"), Progress::Failed(HeadError::Malformed));
    }
}
