//! What the parser property tests share: the number of cases (`RINGLB_FUZZ_CASES`), random
//! edits of a valid input, and the runner that counts and reports what it ran.

#![allow(dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Cases to run: `RINGLB_FUZZ_CASES` (the long mode, docs/testing.md), else `default`.
pub fn cases(default: u32) -> u32 {
    match std::env::var("RINGLB_FUZZ_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("RINGLB_FUZZ_CASES={v:?} is not a number")),
        Err(_) => default,
    }
}

/// One edit of an input: at a position, a byte, and what to do (overwrite, insert, remove,
/// truncate).
pub type Edit = (prop::sample::Index, u8, u8);

pub fn edit() -> impl Strategy<Value = Edit> {
    (any::<prop::sample::Index>(), any::<u8>(), 0u8..4)
}

/// Applies `edits` to `bytes` in order (an empty input stays empty).
pub fn apply(bytes: &mut Vec<u8>, edits: Vec<Edit>) {
    for (at, byte, op) in edits {
        if bytes.is_empty() {
            break;
        }
        let i = at.index(bytes.len());
        match op {
            0 => bytes[i] = byte,
            1 => bytes.insert(i, byte),
            2 => {
                bytes.remove(i);
            }
            _ => bytes.truncate(i),
        }
    }
}

/// Runs `check` on `n` cases of `strategy` (no failure file: a failure prints its minimal
/// case), then prints how many ran and how many were `notable` (e.g. complete headers), so a
/// run that only ever produced junk shows.
pub fn run<S: Strategy>(
    what: &str,
    n: u32,
    strategy: &S,
    notable: (&str, fn(&S::Value) -> bool),
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let done = AtomicU64::new(0);
    let seen = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(strategy, |case| {
            done.fetch_add(1, Ordering::Relaxed);
            if (notable.1)(&case) {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            check(case)
        })
        .unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "{what}: {} cases run ({n} asked; RINGLB_FUZZ_CASES sets it), {} {}",
        done.load(Ordering::Relaxed),
        seen.load(Ordering::Relaxed),
        notable.0
    );
}
