//! Property test of the PROXY protocol header parser (`ringlb::relay::proxy_in`) over
//! arbitrary bytes: random bytes, bytes that look like v1 lines or v2 headers, and headers
//! ringlb itself sends with random edits. For every input it checks that the parser does not
//! panic; never looks past the header's end (a complete header parses the same whatever
//! follows it, and a refusal stays a refusal whatever follows); decides every input within
//! the size cap; and that the accept-time reader, fed the input in random read sizes, consumes
//! exactly the header and gets the same answer as the whole input.
//!
//! A small run by default; `RINGLB_FUZZ_CASES=1000000` for the long mode (docs/testing.md,
//! "PROXY header fuzzing"). The number of cases run is printed either way.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::SocketAddr;

mod fuzzing;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use ringlb::config::ProxyVersion;
use ringlb::relay::proxy::header;
use ringlb::relay::proxy_in::{parse, Bad, Parsed, HEADER_MAX};

const DEFAULT_CASES: u32 = 5000;

fn cases() -> u32 {
    fuzzing::cases(DEFAULT_CASES)
}

const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Bytes that start like a v1 line often enough to reach every branch of its grammar.
fn near_v1() -> impl Strategy<Value = Vec<u8>> {
    let alphabet = b"PROXY TCP46UNKOW 0123456789.:abcdef\r\n\0\xff".to_vec();
    (
        any::<bool>(),
        prop::collection::vec(prop::sample::select(alphabet), 0..140),
    )
        .prop_map(|(prefixed, mut tail)| {
            if prefixed {
                let mut v = b"PROXY ".to_vec();
                v.append(&mut tail);
                v
            } else {
                tail
            }
        })
}

/// The v2 signature, a version/command and family byte from a small set, a length that is
/// sometimes right, and random bytes.
fn near_v2() -> impl Strategy<Value = Vec<u8>> {
    let ver_cmd = prop::sample::select(vec![0x20u8, 0x21, 0x22, 0x11, 0x2f]);
    let family = prop::sample::select(vec![0x00u8, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x41, 0x10]);
    (
        ver_cmd,
        family,
        prop::collection::vec(any::<u8>(), 0..600),
        any::<bool>(),
        0usize..16,
    )
        .prop_map(|(vc, fam, body, honest, cut)| {
            let mut h = SIG.to_vec();
            h.push(vc);
            h.push(fam);
            let len = if honest {
                body.len() as u16
            } else {
                (body.len() as u16).wrapping_add(7)
            };
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&body);
            let keep = h.len().saturating_sub(cut);
            h.truncate(keep);
            h
        })
}

/// A header ringlb sends, with random edits, and some payload after it.
fn mutated_header() -> impl Strategy<Value = Vec<u8>> {
    let addr = prop_oneof![
        any::<([u8; 4], u16)>()
            .prop_map(|(ip, port)| SocketAddr::from((std::net::Ipv4Addr::from(ip), port))),
        any::<([u8; 16], u16)>()
            .prop_map(|(ip, port)| SocketAddr::from((std::net::Ipv6Addr::from(ip), port))),
    ];
    let edit = fuzzing::edit();
    (
        any::<bool>(),
        addr.clone(),
        addr,
        prop::collection::vec(edit, 0..4),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(v1, src, dst, edits, payload)| {
            let v = if v1 {
                ProxyVersion::V1
            } else {
                ProxyVersion::V2
            };
            let mut h = header(v, src, dst);
            fuzzing::apply(&mut h, edits);
            h.extend_from_slice(&payload);
            h
        })
}

fn input() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, Vec<usize>)> {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..700),
        near_v1(),
        near_v2(),
        mutated_header(),
    ];
    (
        bytes,
        prop::collection::vec(any::<u8>(), 0..32),
        prop::collection::vec(1usize..64, 1..40),
    )
}

/// The accept-time reader's loop (`worker::gate::read_proxy`), over an in-memory socket that
/// delivers `input` in reads of the given sizes: peek what has arrived, parse, consume only
/// the header's part of it. Returns the answer and how many bytes it consumed.
fn reader(input: &[u8], reads: &[usize]) -> (Result<Parsed, Bad>, usize) {
    let mut arrived = 0; // bytes the "socket" has received so far
    let mut sizes = reads.iter().cycle();
    let mut buf = Vec::new();
    loop {
        if arrived == buf.len() {
            if arrived == input.len() {
                // EOF inside the header: the gate closes it as truncated.
                return (parse(&buf), buf.len());
            }
            arrived = (arrived + sizes.next().copied().unwrap_or(1)).min(input.len());
        }
        let room = HEADER_MAX - buf.len();
        let peeked = &input[buf.len()..arrived.min(buf.len() + room)];
        let mut view = buf.clone();
        view.extend_from_slice(peeked);
        let parsed = parse(&view);
        let take = match parsed {
            Err(_) => return (parsed, buf.len()),
            Ok(Parsed::Done { len, .. }) => len - buf.len(),
            Ok(Parsed::Partial { .. }) => peeked.len(),
        };
        buf.extend_from_slice(&peeked[..take]);
        if let Ok(Parsed::Done { len, .. }) = parsed {
            if buf.len() == len {
                return (parsed, len);
            }
        }
        assert!(
            buf.len() < HEADER_MAX,
            "the reader filled its buffer undecided"
        );
    }
}

fn check((bytes, suffix, reads): (Vec<u8>, Vec<u8>, Vec<usize>)) -> Result<(), TestCaseError> {
    let whole = parse(&bytes);
    let mut longer = bytes.clone();
    longer.extend_from_slice(&suffix);
    match whole {
        Ok(Parsed::Done { len, declared }) => {
            prop_assert!(len <= bytes.len() && len <= HEADER_MAX);
            // The answer depends on the header's bytes alone.
            prop_assert_eq!(parse(&bytes[..len]), whole);
            prop_assert_eq!(parse(&longer), whole);
            // Every shorter prefix waits for more: the end is where it says.
            for i in 0..len {
                let partial = matches!(parse(&bytes[..i]), Ok(Parsed::Partial { .. }));
                prop_assert!(
                    partial,
                    "prefix {} of a {}-byte header: {:?}",
                    i,
                    len,
                    parse(&bytes[..i])
                );
            }
            let _ = declared;
        }
        Ok(Parsed::Partial { len }) => {
            // Undecided only below the cap, and a known length is past what is there.
            prop_assert!(bytes.len() < HEADER_MAX);
            if let Some(l) = len {
                prop_assert!(l > bytes.len() && l <= HEADER_MAX);
            }
        }
        Err(_) => {
            // A refusal is final: no more bytes make it a header.
            prop_assert!(parse(&longer).is_err());
        }
    }
    // Read in pieces, the reader consumes exactly the header and agrees with the whole.
    let (answer, consumed) = reader(&bytes, &reads);
    match whole {
        Ok(Parsed::Done { len, .. }) => {
            prop_assert_eq!(answer, whole);
            prop_assert_eq!(consumed, len);
        }
        Ok(Parsed::Partial { .. }) => {
            let partial = matches!(answer, Ok(Parsed::Partial { .. }));
            prop_assert!(partial, "the reader decided {:?}", answer);
            prop_assert_eq!(consumed, bytes.len());
        }
        Err(_) => prop_assert!(answer.is_err()),
    }
    Ok(())
}

#[test]
fn the_proxy_header_parser_survives_arbitrary_bytes_and_never_reads_past_the_header() {
    fuzzing::run(
        "PROXY header fuzzing",
        cases(),
        &input(),
        ("complete headers", |case| {
            matches!(parse(&case.0), Ok(Parsed::Done { .. }))
        }),
        check,
    );
}

#[test]
fn every_header_ringlb_sends_parses_back_to_its_addresses() {
    let addr = prop_oneof![
        any::<([u8; 4], u16)>()
            .prop_map(|(ip, port)| SocketAddr::from((std::net::Ipv4Addr::from(ip), port))),
        any::<([u8; 16], u16)>()
            .prop_map(|(ip, port)| SocketAddr::from((std::net::Ipv6Addr::from(ip), port))),
    ];
    let mut runner = TestRunner::new(Config {
        cases: cases().min(20_000),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(addr.clone(), addr, any::<bool>()), |(src, dst, v1)| {
            // Same family both sides, and no IPv4-mapped IPv6 (sent as IPv4, by design).
            let mapped = |a: &SocketAddr| match a.ip() {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
                _ => false,
            };
            if src.is_ipv4() != dst.is_ipv4() || mapped(&src) || mapped(&dst) {
                return Ok(());
            }
            let v = if v1 {
                ProxyVersion::V1
            } else {
                ProxyVersion::V2
            };
            let h = header(v, src, dst);
            prop_assert_eq!(
                parse(&h),
                Ok(Parsed::Done {
                    len: h.len(),
                    declared: ringlb::relay::proxy_in::Declared::Proxy { src, dst },
                })
            );
            Ok(())
        })
        .unwrap();
}
