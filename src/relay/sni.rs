//! Reading the server name from a TLS ClientHello without terminating TLS (SNI routing of
//! TLS passthrough, docs/traffic-controls.md). Written here from RFC 8446 (records, the
//! ClientHello) and RFC 6066 (the server_name extension).
//!
//! [`parse`] is pure and incremental: given every byte read from the client so far, it says
//! the ClientHello is complete (with its server name, if it has one), needs more bytes, is
//! not TLS at all, or is bad. The ClientHello may be fragmented anywhere: across reads (the
//! caller just calls again with more bytes) and across TLS records (the parser reads the
//! handshake stream through the record headers, byte by byte, so a length or a name split
//! between two records is read like any other). It only reads: the bytes are replayed to the
//! backend unchanged, which terminates TLS itself.
//!
//! It looks only at the ClientHello's own bytes, so the answer is the same whatever follows
//! it; a refusal stays a refusal whatever follows. It never allocates and never panics; every
//! input of [`HELLO_MAX`] bytes or more is decided.

use std::fmt;

/// The most bytes read while looking for a whole ClientHello, record headers included: the
/// size of one relay buffer, which the bytes are read into and handed to the relay from.
/// Browsers' ClientHellos, post-quantum key shares included, are under 2 KiB.
pub const HELLO_MAX: usize = super::pool::BUF_SIZE;
/// The largest TLS plaintext record fragment (RFC 8446, 5.1).
const RECORD_MAX: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// Longest server name kept (a DNS name is at most 253 characters, 255 octets on the wire).
pub const NAME_MAX: usize = 255;

/// Where parsing stands.
// The name is held inline (257 bytes) on purpose: a value on the stack, never an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The ClientHello is not complete yet.
    Partial,
    /// A whole ClientHello, ending at byte `len`; its server name (lowercased, without a
    /// trailing dot), if it sent one.
    Hello {
        name: Option<ServerName>,
        len: usize,
    },
    /// The first bytes are not a TLS handshake record: some other protocol.
    NotTls,
}

/// A host name from the server_name extension: printable ASCII, lowercased.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerName {
    bytes: [u8; NAME_MAX],
    len: u8,
}

impl ServerName {
    pub fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored, so this never fails.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Why a ClientHello was refused; `as_str` names it in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// A record after the first that is not a TLS 1.x handshake record (an alert, say).
    RecordType,
    /// A record of length zero or over 2^14 bytes.
    RecordLength,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// The ClientHello would not fit in [`HELLO_MAX`] bytes.
    TooLong,
    /// A length inside the ClientHello that runs past its end, or a field out of bounds.
    Malformed,
    /// A server_name extension that is empty, repeated, malformed, or names a host that is
    /// not printable ASCII of 1 to 255 characters.
    ServerName,
}

impl Bad {
    pub fn as_str(self) -> &'static str {
        match self {
            Bad::RecordType => "a TLS record that is not a handshake record",
            Bad::RecordLength => "a TLS record of length zero or over 16384 bytes",
            Bad::NotClientHello => "a TLS handshake that does not start with a ClientHello",
            Bad::TooLong => "a TLS ClientHello longer than 16384 bytes",
            Bad::Malformed => "a malformed TLS ClientHello",
            Bad::ServerName => "a malformed server_name extension in the TLS ClientHello",
        }
    }
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why reading stopped before the end.
enum Stop {
    Partial,
    Bad(Bad),
}

impl From<Bad> for Stop {
    fn from(b: Bad) -> Stop {
        Stop::Bad(b)
    }
}

/// The handshake byte stream, read through the record headers.
struct Stream<'a> {
    buf: &'a [u8],
    /// The next byte of `buf` to look at.
    pos: usize,
    /// Payload bytes left in the current record.
    in_record: usize,
}

impl Stream<'_> {
    fn byte(&mut self) -> Result<u8, Stop> {
        if self.in_record == 0 {
            self.record()?;
        }
        let b = *self.buf.get(self.pos).ok_or(Stop::Partial)?;
        self.pos += 1;
        self.in_record -= 1;
        Ok(b)
    }

    /// Reads the header of the next record at `pos`: a handshake record of TLS 1.x (major
    /// version 3) with a length of 1 to 2^14.
    fn record(&mut self) -> Result<(), Stop> {
        let h = self.buf.get(self.pos..).unwrap_or_default();
        if h.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) || h.get(1).is_some_and(|&v| v != 3) {
            return Err(Bad::RecordType.into());
        }
        if h.len() < 5 {
            return Err(Stop::Partial);
        }
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if len == 0 || len > RECORD_MAX {
            return Err(Bad::RecordLength.into());
        }
        self.pos += 5;
        self.in_record = len;
        Ok(())
    }
}

/// The ClientHello's body: reads bounded by the handshake message's declared length.
struct Body<'a, 'b> {
    s: &'b mut Stream<'a>,
    /// Bytes of the body not read yet.
    left: usize,
}

impl Body<'_, '_> {
    /// Claims `n` bytes of the body; a length that runs past its end is malformed.
    fn claim(&mut self, n: usize) -> Result<(), Stop> {
        if n > self.left {
            return Err(Bad::Malformed.into());
        }
        self.left -= n;
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        self.claim(1)?;
        self.s.byte()
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        self.claim(2)?;
        Ok(u16::from_be_bytes([self.s.byte()?, self.s.byte()?]))
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        self.claim(n)?;
        for _ in 0..n {
            self.s.byte()?;
        }
        Ok(())
    }
}

/// Parses the ClientHello at the start of `buf` (every byte read from the client so far).
pub fn parse(buf: &[u8]) -> Result<Parsed, Bad> {
    // Nothing past the cap is looked at, so the answer for an input over it is the answer
    // for its first HELLO_MAX bytes, whatever follows.
    let buf = &buf[..buf.len().min(HELLO_MAX)];
    // Not TLS: the first record is not a handshake record of TLS 1.x (SSL 3 to TLS 1.3 all
    // write major version 3 there). Anything else is some other protocol.
    match buf {
        [] | [CONTENT_HANDSHAKE] => return Ok(Parsed::Partial),
        [t, ..] if *t != CONTENT_HANDSHAKE => return Ok(Parsed::NotTls),
        [_, v, ..] if *v != 3 => return Ok(Parsed::NotTls),
        _ => {}
    }
    let mut s = Stream {
        buf,
        pos: 0,
        in_record: 0,
    };
    match hello(&mut s) {
        Ok(name) => Ok(Parsed::Hello { name, len: s.pos }),
        Err(Stop::Bad(b)) => Err(b),
        // Every byte up to the cap was read and the ClientHello is still not whole (small
        // records can carry one that would fit the cap past it: refused alike).
        Err(Stop::Partial) if buf.len() >= HELLO_MAX => Err(Bad::TooLong),
        Err(Stop::Partial) => Ok(Parsed::Partial),
    }
}

fn hello(s: &mut Stream<'_>) -> Result<Option<ServerName>, Stop> {
    if s.byte()? != HANDSHAKE_CLIENT_HELLO {
        return Err(Bad::NotClientHello.into());
    }
    let len =
        (usize::from(s.byte()?) << 16) | (usize::from(s.byte()?) << 8) | usize::from(s.byte()?);
    // Four bytes of handshake header and five of the first record's header come first.
    if len + 9 > HELLO_MAX {
        return Err(Bad::TooLong.into());
    }
    let mut b = Body { s, left: len };
    // legacy_version and random.
    b.skip(2 + 32)?;
    let session_id = usize::from(b.u8()?);
    if session_id > 32 {
        return Err(Bad::Malformed.into());
    }
    b.skip(session_id)?;
    let suites = usize::from(b.u16()?);
    if suites < 2 || suites % 2 != 0 {
        return Err(Bad::Malformed.into());
    }
    b.skip(suites)?;
    let compression = usize::from(b.u8()?);
    if compression < 1 {
        return Err(Bad::Malformed.into());
    }
    b.skip(compression)?;
    if b.left == 0 {
        // No extensions (a ClientHello from before TLS 1.2 may have none).
        return Ok(None);
    }
    let exts = usize::from(b.u16()?);
    if exts != b.left {
        return Err(Bad::Malformed.into());
    }
    let mut name = None;
    let mut seen = false;
    while b.left > 0 {
        let kind = b.u16()?;
        let ext_len = usize::from(b.u16()?);
        if kind != EXT_SERVER_NAME {
            b.skip(ext_len)?;
            continue;
        }
        if seen {
            return Err(Bad::ServerName.into());
        }
        seen = true;
        if ext_len > b.left {
            return Err(Bad::Malformed.into());
        }
        name = server_name(&mut b, ext_len)?;
    }
    Ok(name)
}

/// The server_name extension's body (`ext_len` bytes): a list of (type, name) with at most
/// one host name.
fn server_name(b: &mut Body<'_, '_>, ext_len: usize) -> Result<Option<ServerName>, Stop> {
    if ext_len < 2 {
        return Err(Bad::ServerName.into());
    }
    let list = usize::from(b.u16()?);
    if list + 2 != ext_len || list == 0 {
        return Err(Bad::ServerName.into());
    }
    let mut left = list;
    let mut host = None;
    while left > 0 {
        if left < 3 {
            return Err(Bad::ServerName.into());
        }
        let kind = b.u8()?;
        let n = usize::from(b.u16()?);
        left -= 3;
        if n > left || n == 0 {
            return Err(Bad::ServerName.into());
        }
        left -= n;
        if kind != NAME_TYPE_HOST {
            b.skip(n)?;
            continue;
        }
        if host.is_some() || n > NAME_MAX {
            return Err(Bad::ServerName.into());
        }
        let mut name = ServerName {
            bytes: [0; NAME_MAX],
            len: 0,
        };
        for i in 0..n {
            let c = b.u8()?;
            if !c.is_ascii_graphic() {
                return Err(Bad::ServerName.into());
            }
            name.bytes[i] = c.to_ascii_lowercase();
        }
        // "example.com." names the same host as "example.com".
        let len = if name.bytes[n - 1] == b'.' { n - 1 } else { n };
        // "." or "a..": not a host name.
        if len == 0 || name.bytes[len - 1] == b'.' {
            return Err(Bad::ServerName.into());
        }
        name.len = len as u8;
        host = Some(name);
    }
    Ok(host)
}

/// A ClientHello with `name` (or none) and filler extensions, in one record: for tests,
/// benches and the fuzzer's seeds. Not a valid handshake (the random is zeros, the key share
/// absent), only a well-formed ClientHello.
pub fn sample_hello(name: Option<&str>, padding: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(n) = name {
        let n = n.as_bytes();
        let list = n.len() + 3;
        exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        exts.extend_from_slice(&((list + 2) as u16).to_be_bytes());
        exts.extend_from_slice(&(list as u16).to_be_bytes());
        exts.push(NAME_TYPE_HOST);
        exts.extend_from_slice(&(n.len() as u16).to_be_bytes());
        exts.extend_from_slice(n);
    }
    if padding > 0 {
        // The padding extension (RFC 7685), type 21.
        exts.extend_from_slice(&21u16.to_be_bytes());
        exts.extend_from_slice(&(padding as u16).to_be_bytes());
        exts.resize(exts.len() + padding, 0);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    records(&hs, RECORD_MAX)
}

/// `handshake` cut into handshake records of at most `size` bytes each.
pub fn records(handshake: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in handshake.chunks(size.max(1)) {
        out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(bytes: &[u8]) -> Option<String> {
        match parse(bytes) {
            Ok(Parsed::Hello { name, .. }) => name.map(|n| n.as_str().to_string()),
            other => panic!("not a whole hello: {other:?}"),
        }
    }

    #[test]
    fn a_client_hello_gives_its_server_name_lowercased_without_the_trailing_dot() {
        assert_eq!(
            name_of(&sample_hello(Some("A.Example."), 0)).as_deref(),
            Some("a.example")
        );
        assert_eq!(name_of(&sample_hello(None, 10)), None);
    }

    #[test]
    fn every_prefix_of_a_hello_is_partial_and_the_answer_ignores_what_follows() {
        let h = sample_hello(Some("b.example"), 100);
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Ok(Parsed::Partial), "prefix of {i}");
        }
        let mut more = h.clone();
        more.extend_from_slice(b"\x17\x03\x03 application data");
        assert_eq!(name_of(&more).as_deref(), Some("b.example"));
    }

    #[test]
    fn a_hello_split_across_one_byte_records_reads_the_same() {
        let h = sample_hello(Some("c.example"), 0);
        let hs = &h[5..];
        for size in [1, 2, 3, 7, 40] {
            assert_eq!(
                name_of(&records(hs, size)).as_deref(),
                Some("c.example"),
                "records of {size}"
            );
        }
    }

    #[test]
    fn other_protocols_are_not_tls_and_broken_hellos_are_refused() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Ok(Parsed::NotTls));
        assert_eq!(parse(b"\x16\x01"), Ok(Parsed::NotTls));
        // An alert record after a first handshake record.
        let h = sample_hello(Some("a.example"), 0);
        let mut split = records(&h[5..], 10);
        split[15] = 0x15;
        assert_eq!(parse(&split), Err(Bad::RecordType));
        // A ServerHello where a ClientHello belongs.
        let mut sh = h.clone();
        sh[5] = 2;
        assert_eq!(parse(&sh), Err(Bad::NotClientHello));
        // A zero-length record.
        assert_eq!(parse(b"\x16\x03\x01\x00\x00"), Err(Bad::RecordLength));
        // A name with a space in it.
        assert_eq!(
            parse(&sample_hello(Some("a example"), 0)),
            Err(Bad::ServerName)
        );
    }

    #[test]
    fn a_hello_over_the_cap_is_refused_before_the_cap_is_read() {
        let h = sample_hello(Some("a.example"), 16_500);
        assert_eq!(parse(&h[..20]), Err(Bad::TooLong));
        // Small records: the headers push it past the cap, decided once the cap is read.
        let h = sample_hello(Some("a.example"), 15_000);
        let small = records(&h[5..], 16);
        assert_eq!(parse(&small[..HELLO_MAX - 1]), Ok(Parsed::Partial));
        assert_eq!(parse(&small[..HELLO_MAX]), Err(Bad::TooLong));
        // Nothing past the cap counts: not valid records, nor an alert right after it.
        let mut past = small[..HELLO_MAX + 3].to_vec();
        past.extend_from_slice(&[0x15; 40]);
        assert_eq!(parse(&past), Err(Bad::TooLong));
    }
}
