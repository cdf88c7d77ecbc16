//! Property test of the TLS ClientHello parser (`ringlb::relay::sni`) over arbitrary bytes:
//! random bytes, bytes that start like a TLS handshake record, and well-formed ClientHellos
//! with random edits, cut into records of random sizes. For every input it checks that the
//! parser does not panic; never looks past the ClientHello's end (a complete one parses the
//! same whatever follows it, every shorter prefix waits for more, and a refusal or a "not
//! TLS" stays so whatever follows); decides every input of the size cap; gives only names a
//! route could match (printable, lowercase, no trailing dot); reads the same name however
//! the handshake is cut into records; and that the worker's reader, fed the input in random
//! read sizes, gets the same answer as the whole input.
//!
//! A small run by default; `RINGLB_FUZZ_CASES=1000000` for the long mode (docs/testing.md,
//! "ClientHello fuzzing"). The number of cases run is printed either way.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod fuzzing;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use ringlb::relay::sni::{parse, records, sample_hello, Parsed, HELLO_MAX};

const DEFAULT_CASES: u32 = 3000;

fn cases() -> u32 {
    fuzzing::cases(DEFAULT_CASES)
}

/// Random bytes, half of them behind a TLS handshake record header of a random length.
fn near_record() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        any::<u16>(),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(framed, len, mut body)| {
            if !framed {
                return body;
            }
            let mut v = vec![0x16, 0x03, 0x01];
            v.extend_from_slice(&(len % 700).to_be_bytes());
            // Often a ClientHello's handshake header.
            if len % 3 != 0 {
                v.extend_from_slice(&[0x01, 0x00, (len >> 8) as u8 % 3, len as u8]);
            }
            v.append(&mut body);
            v
        })
}

/// A server name: mostly from host-name characters (dots included, so empty labels and
/// trailing dots come up), sometimes with characters a name may not hold.
fn name() -> impl Strategy<Value = Option<String>> {
    let good: Vec<char> = "abcXYZ09-_.".chars().collect();
    let any_char: Vec<char> = "abcXYZ09-_.* \u{7f}\u{e9}".chars().collect();
    let chars = prop_oneof![
        4 => prop::collection::vec(prop::sample::select(good), 0..40),
        1 => prop::collection::vec(prop::sample::select(any_char), 0..40),
        1 => prop::collection::vec(Just('a'), 250..260),
    ];
    prop::option::of(chars.prop_map(|v| v.into_iter().collect::<String>()))
}

/// A well-formed ClientHello, with random byte edits, cut into records of a random size,
/// with random bytes after it.
fn mutated_hello() -> impl Strategy<Value = Vec<u8>> {
    let edit = fuzzing::edit();
    (
        name(),
        prop_oneof![3 => Just(0usize), 3 => 0usize..300, 1 => 16_300usize..16_500],
        1usize..400,
        prop_oneof![Just(Vec::new()), prop::collection::vec(edit, 1..3)],
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(name, padding, record, edits, after)| {
            let one = sample_hello(name.as_deref(), padding);
            let mut h = records(&one[5..], record);
            fuzzing::apply(&mut h, edits);
            h.extend_from_slice(&after);
            h
        })
}

fn input() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, Vec<usize>)> {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        near_record(),
        mutated_hello(),
        mutated_hello(),
    ];
    (
        bytes,
        prop::collection::vec(any::<u8>(), 1..32),
        prop::collection::vec(1usize..2000, 1..40),
    )
}

/// The worker's reader (`worker::route`): bytes arrive in reads of the given sizes, up to
/// the cap; after each read everything so far is parsed, and the first decision stands.
fn reader(input: &[u8], reads: &[usize]) -> Result<Parsed, ringlb::relay::sni::Bad> {
    let mut have = 0;
    let mut sizes = reads.iter().cycle();
    let input = &input[..input.len().min(HELLO_MAX)];
    loop {
        if have == input.len() {
            // EOF (or the cap): what the whole says.
            return parse(input);
        }
        have = (have + sizes.next().copied().unwrap_or(1)).min(input.len());
        match parse(&input[..have]) {
            Ok(Parsed::Partial) => {}
            decided => return decided,
        }
    }
}

fn check((bytes, suffix, reads): (Vec<u8>, Vec<u8>, Vec<usize>)) -> Result<(), TestCaseError> {
    let whole = parse(&bytes);
    let mut longer = bytes.clone();
    longer.extend_from_slice(&suffix);
    match whole {
        Ok(Parsed::Hello { name, len }) => {
            prop_assert!(len <= bytes.len() && len <= HELLO_MAX);
            prop_assert_eq!(parse(&bytes[..len]), whole);
            prop_assert_eq!(parse(&longer), whole);
            for i in 0..len {
                prop_assert_eq!(parse(&bytes[..i]), Ok(Parsed::Partial), "prefix {}", i);
            }
            if let Some(n) = name {
                let n = n.as_str();
                prop_assert!(!n.is_empty() && n.len() <= 255 && !n.ends_with('.'));
                prop_assert!(n
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
            }
            // The same handshake cut into other records reads the same name.
            let hs = handshake_bytes(&bytes[..len]);
            for size in [1, 3, 100] {
                let again = parse(&records(&hs, size));
                let same = match again {
                    Ok(Parsed::Hello { name: n2, .. }) => n2 == name,
                    // One-byte records can push a large ClientHello past the cap.
                    Err(ringlb::relay::sni::Bad::TooLong) => true,
                    _ => false,
                };
                prop_assert!(same, "records of {}: {:?} against {:?}", size, again, name);
            }
        }
        Ok(Parsed::Partial) => prop_assert!(bytes.len() < HELLO_MAX),
        Ok(Parsed::NotTls) => prop_assert_eq!(parse(&longer), whole),
        Err(_) => prop_assert_eq!(parse(&longer), whole),
    }
    // Read in pieces, the reader agrees with the whole (cut at the cap, as it reads).
    let capped = parse(&bytes[..bytes.len().min(HELLO_MAX)]);
    prop_assert_eq!(reader(&bytes, &reads), capped);
    Ok(())
}

/// The handshake bytes carried by well-formed records (as the parser accepted them).
fn handshake_bytes(mut recs: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while recs.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([recs[3], recs[4]]));
        let end = (5 + len).min(recs.len());
        out.extend_from_slice(&recs[5..end]);
        recs = &recs[end..];
    }
    out
}

#[test]
fn the_client_hello_parser_survives_arbitrary_bytes_and_never_reads_past_the_hello() {
    fuzzing::run(
        "ClientHello fuzzing",
        cases(),
        &input(),
        ("whole hellos with a server name", |case| {
            matches!(parse(&case.0), Ok(Parsed::Hello { name: Some(_), .. }))
        }),
        check,
    );
}
