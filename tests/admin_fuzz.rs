//! Property test of the admin listener's request-head parser (`ringlb::admin::head`) over
//! arbitrary bytes: it never panics, holds at most `MAX_HELD` bytes whatever it is fed,
//! decides every input of more than `MAX_HEAD` bytes (so a connection never waits for more
//! past the cap), gives the same answer however the bytes are split into reads, and parses
//! every well-formed head to the right method and path.
//!
//! A small run by default; `RINGLB_FUZZ_CASES=1000000` for the long mode (docs/testing.md,
//! "Admin parser fuzzing"). The number of cases run is printed either way.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use ringlb::admin::head::{HeadParser, Progress, Request, MAX_HEAD, MAX_HELD, MAX_LINE};

const DEFAULT_CASES: u32 = 3000;

fn cases() -> u32 {
    match std::env::var("RINGLB_FUZZ_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("RINGLB_FUZZ_CASES={v:?} is not a number")),
        Err(_) => DEFAULT_CASES,
    }
}

/// A well-formed head and the request it must parse to.
fn valid_head() -> impl Strategy<Value = (Vec<u8>, Request)> {
    let method = prop::sample::select(vec!["GET", "HEAD", "POST", "DELETE", "OPTIONS"]);
    let header = ("[A-Za-z0-9-]{1,16}", "[ -~]{0,40}");
    (
        method,
        "/[a-z0-9/._-]{0,24}",
        "(\\?[a-z0-9=&]{0,12})?",
        0u8..=1,
        prop::collection::vec(header, 0..10),
        any::<bool>(),
    )
        .prop_map(|(method, path, query, minor, headers, crlf)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut head = format!("{method} {path}{query} HTTP/1.{minor}{eol}");
            for (name, value) in headers {
                // `X-` keeps them clear of the headers the parser keeps (and checks).
                head.push_str(&format!("X-{name}:{value}{eol}"));
            }
            head.push_str(eol);
            let request = Request::new(method, &path);
            (head.into_bytes(), request)
        })
}

/// Bytes that look like HTTP often enough to reach every state of the parser.
fn near_http() -> impl Strategy<Value = Vec<u8>> {
    let alphabet = b"GETPOS /HTP1.0\r\n\r\n:\t ?#\0\xffaZ-".to_vec();
    prop::collection::vec(prop::sample::select(alphabet), 0..600)
}

/// A valid head with random bytes overwritten, inserted or cut.
fn mutated_head() -> impl Strategy<Value = Vec<u8>> {
    let edit = (any::<prop::sample::Index>(), any::<u8>(), 0u8..3);
    (valid_head(), prop::collection::vec(edit, 1..6)).prop_map(|((mut head, _), edits)| {
        for (at, byte, op) in edits {
            if head.is_empty() {
                break;
            }
            let i = at.index(head.len());
            match op {
                0 => head[i] = byte,
                1 => head.insert(i, byte),
                _ => head.truncate(i),
            }
        }
        head
    })
}

/// Inputs around and past the caps: long request lines, long header sections.
fn oversized() -> impl Strategy<Value = Vec<u8>> {
    let filler = prop::sample::select(b"ab:\r\n \0".to_vec());
    (
        prop::sample::select(vec![&b""[..], b"GET /", b"GET / HTTP/1.1\r\n"]),
        prop::collection::vec(filler, MAX_LINE - 8..MAX_HEAD + 64),
        any::<bool>(),
    )
        .prop_map(|(prefix, body, all_header_bytes)| {
            let mut v = prefix.to_vec();
            if all_header_bytes {
                // Header lines that never end: only the head cap can stop them.
                v.extend(body.iter().map(|b| if *b == b'\n' { b'x' } else { *b }));
            } else {
                v.extend(body);
            }
            v
        })
}

/// Feeds `input` in reads of the sizes in `reads` (cycled) and checks every property that
/// holds for any input. Returns the parser's answer.
fn check(input: &[u8], reads: &[usize]) -> Result<Progress, TestCaseError> {
    let mut whole = HeadParser::new();
    let expected = whole.feed(input);
    prop_assert!(whole.held_bytes() <= MAX_HELD, "{}", whole.held_bytes());
    let mut p = HeadParser::new();
    let mut at = 0;
    let mut got = Progress::NeedMore;
    for n in reads.iter().cycle() {
        if at >= input.len() {
            break;
        }
        let end = input.len().min(at + n);
        let r = p.feed(&input[at..end]);
        prop_assert!(p.held_bytes() <= MAX_HELD, "{}", p.held_bytes());
        match r {
            Progress::NeedMore => at = end,
            Progress::Done { request, consumed } => {
                got = Progress::Done {
                    request,
                    consumed: at + consumed,
                };
                break;
            }
            failed => {
                got = failed;
                break;
            }
        }
    }
    prop_assert_eq!(&got, &expected, "split into reads of {:?}", reads);
    if input.len() > MAX_HEAD {
        prop_assert_ne!(&expected, &Progress::NeedMore, "undecided past MAX_HEAD");
    }
    if let Progress::Done { request, consumed } = &expected {
        let head = &input[..*consumed];
        prop_assert!(*consumed <= MAX_HEAD);
        prop_assert!(head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"));
        prop_assert!(!request.method.is_empty());
        prop_assert!(request.method.bytes().all(|b| b.is_ascii_uppercase()));
        prop_assert!(request.path.starts_with('/'));
        prop_assert!(!request.path.contains(['?', '#']));
    }
    Ok(expected)
}

#[derive(Debug, Clone)]
enum Input {
    Valid(Vec<u8>, Request),
    Other(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        3 => valid_head().prop_map(|(h, r)| Input::Valid(h, r)),
        3 => mutated_head().prop_map(Input::Other),
        3 => near_http().prop_map(Input::Other),
        2 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Input::Other),
        1 => oversized().prop_map(Input::Other),
    ]
}

#[test]
fn the_admin_head_parser_survives_arbitrary_bytes() {
    let cases = cases();
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let run = AtomicU64::new(0);
    let reads = prop::collection::vec(1usize..=97, 1..8);
    let result = TestRunner::new(config).run(&(input(), reads), |(input, reads)| {
        run.fetch_add(1, Ordering::Relaxed);
        match input {
            Input::Valid(head, request) => {
                let got = check(&head, &reads)?;
                let want = Progress::Done {
                    request,
                    consumed: head.len(),
                };
                prop_assert_eq!(got, want);
            }
            Input::Other(bytes) => {
                check(&bytes, &reads)?;
            }
        }
        Ok(())
    });
    // Straight to stderr, past the test harness's capture, so that CI logs show the count.
    let _ = writeln!(
        std::io::stderr(),
        "admin parser fuzzing: {} cases run ({cases} asked; RINGLB_FUZZ_CASES sets it)",
        run.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
