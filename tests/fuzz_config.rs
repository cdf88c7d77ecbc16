//! Property tests of the config loader (the path `ringlb check`, `run` and every reload take):
//! arbitrary bytes, TOML-like text, and the shipped configs mutated. For every input the loader
//! must return, without a panic, within a bound of time, with either a config or problems that
//! each fit on one line and point inside the file.
//!
//! Each test runs `RINGLB_FUZZ_CASES` cases (default: a few thousand, a few seconds for the
//! CI) and prints the count, the time taken and the slowest case to the log. The long mode and
//! its numbers are in docs/testing.md ("Fuzzing").

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::cell::Cell;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{
    Config as RunnerConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use ringlb::config::{Config, HostLookup};

/// Cases per test when RINGLB_FUZZ_CASES is not set: enough to cover every mutation kind on
/// every fixture, small enough for CI.
const DEFAULT_CASES: u32 = 2_000;

/// No input may take longer than this. A parse of these inputs takes well under a millisecond;
/// the bound is loose so a busy machine does not fail it, and tight enough to catch
/// a quadratic blow-up or a loop that would hang a reload.
const SLOWEST_ALLOWED: Duration = Duration::from_secs(2);

const NAME: &str = "fuzz.toml";

fn cases() -> u32 {
    match std::env::var("RINGLB_FUZZ_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("RINGLB_FUZZ_CASES={v:?} is not a count")),
        Err(_) => DEFAULT_CASES,
    }
}

/// Loads `bytes` the way `Config::load` does (host names are refused, not resolved: a lookup
/// per case would be slow and need the network) and checks what came back.
/// Returns whether the input loaded.
fn check_one(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let start = Instant::now();
    let result = Config::parse_bytes(bytes, NAME, HostLookup::Refuse);
    let took = start.elapsed();
    prop_assert!(took < SLOWEST_ALLOWED, "took {took:?}");
    let loaded = result.is_ok();
    match result {
        Ok(config) => {
            // A config that loads has something to serve, and equals itself (the reload diff).
            prop_assert!(!config.frontends.is_empty());
            prop_assert!(config.frontends.iter().all(|f| !f.backends.is_empty()));
            prop_assert!(ringlb::config::diff(&config, &config).is_empty());
        }
        Err(e) => {
            prop_assert!(!e.problems.is_empty());
            let lines = bytes.split(|&b| b == b'\n').count();
            for p in &e.problems {
                // One problem per line, whatever strings the file held.
                prop_assert!(!p.is_empty() && !p.contains(['\n', '\r']), "{p:?}");
                if let Some(rest) = p.strip_prefix(&format!("{NAME}:")) {
                    let mut pos = rest.splitn(3, ':');
                    let line: usize = pos.next().unwrap_or("").parse().unwrap_or(0);
                    let col: usize = pos.next().unwrap_or("").parse().unwrap_or(0);
                    prop_assert!(line >= 1 && line <= lines, "{p:?} ({lines} lines)");
                    prop_assert!(col >= 1, "{p:?}");
                }
            }
            prop_assert_eq!(e.to_string().lines().count(), 1 + e.problems.len());
        }
    }
    Ok(loaded)
}

/// The process's peak resident memory (VmHWM), to show in the log that it stays small.
fn peak_rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map_or("unknown".into(), |v| v.trim().to_string())
}

/// Runs `strategy` for the configured number of cases, prints what was run, and returns how
/// many inputs loaded and how many did not.
fn run<S: Strategy<Value = Vec<u8>>>(what: &str, strategy: S) -> (u64, u64) {
    let cases = cases();
    // A new seed each run finds new inputs; it is printed, and RINGLB_FUZZ_SEED replays it.
    let seed: u64 = match std::env::var("RINGLB_FUZZ_SEED") {
        Ok(v) => v.parse().expect("RINGLB_FUZZ_SEED is a number"),
        Err(_) => rand::random(),
    };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = RunnerConfig {
        cases,
        // A failure prints its shrunk input; nothing is written into the source tree.
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    // The runner takes a `Fn`; Cells let it count.
    let slowest = Cell::new(Duration::ZERO);
    let ran = Cell::new(0u64);
    let loaded = Cell::new(0u64);
    let start = Instant::now();
    let result = runner.run(&strategy, |bytes| {
        let t = Instant::now();
        let r = check_one(&bytes);
        slowest.set(slowest.get().max(t.elapsed()));
        ran.set(ran.get() + 1);
        loaded.set(loaded.get() + u64::from(matches!(r, Ok(true))));
        r.map(|_| ())
    });
    let took = start.elapsed();
    let (ran, loaded, slowest) = (ran.get(), loaded.get(), slowest.get());
    // Written to stderr directly, not through eprintln!, so the test harness does not capture
    // it: the count is meant to be in the CI log.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz_config: {what}: seed {seed}: {cases} cases in {:.1} s ({loaded} loaded, {} refused), \
         slowest {:.2} ms, test process peak RSS {}",
        took.as_secs_f64(),
        ran - loaded,
        slowest.as_secs_f64() * 1000.0,
        peak_rss()
    );
    match result {
        Ok(()) => (loaded, ran - loaded),
        Err(TestError::Fail(why, input)) => panic!(
            "{what}: RINGLB_FUZZ_SEED={seed}: {why}\ninput ({} bytes): {:?}",
            input.len(),
            String::from_utf8_lossy(&input)
        ),
        Err(e) => panic!("{what}: RINGLB_FUZZ_SEED={seed}: {e}"),
    }
}

#[test]
fn arbitrary_bytes_never_panic_or_hang() {
    let _ = run(
        "arbitrary bytes",
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048),
            any::<String>().prop_map(String::into_bytes),
            // Text made of TOML's own punctuation and a few letters, so inputs get past the
            // lexer into tables, arrays, strings and numbers.
            "[\\[\\]{}=\"',.#a-z_0-9 \\n\\t+:-]{0,1024}".prop_map(String::into_bytes),
        ],
    );
}

/// Every config the repository ships, valid and invalid: mutations of real files reach the
/// walk and validation far more often than random text does. The valid ones are listed four
/// times, so that many mutants still load and the paths past validation run too.
fn seeds() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = |kind: &str| {
        let mut files: Vec<_> = std::fs::read_dir(root.join("tests/fixtures/config").join(kind))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    };
    let mut valid = dir("valid");
    valid.push(root.join("config/ringlb.toml"));
    let invalid = dir("invalid");
    let files = valid.iter().cycle().take(4 * valid.len()).chain(&invalid);
    files.map(|f| std::fs::read(f).unwrap()).collect()
}

/// Pieces a mutation may insert: every key and table header, and values at and past every
/// bound the validator checks.
const TOKENS: &[&str] = &[
    "[global]\n",
    "[admin]\n",
    "[[frontend]]\n",
    "[[frontend.backend]]\n",
    "[frontend.health]\n",
    "[frontend.backend.health]\n",
    "[frontend]\n",
    "[[global]]\n",
    "workers",
    "max_connections",
    "shutdown_timeout",
    "io",
    "relay",
    "cpu_affinity",
    "ring_buffers",
    "listen",
    "allow_public",
    "name",
    "balance",
    "connect_timeout",
    "idle_timeout",
    "retries",
    "hash_key",
    "maglev_table_size",
    "on_marked_down",
    "slow_start",
    "health",
    "backend",
    "interval",
    "timeout",
    "rise",
    "fall",
    "fast_interval",
    "down_interval",
    "error_limit",
    "initial_state",
    "spread",
    "address",
    "weight",
    "backup",
    "check",
    " = ",
    "=",
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "\\u0000",
    "0",
    "1",
    "-1",
    "3",
    "65537",
    "16777259",
    "16777260",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "1.5",
    "nan",
    "inf",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "\"0s\"",
    "\"2s\"",
    "\"720h\"",
    "\"721h\"",
    "\"9999999999h\"",
    "\"1h30m\"",
    "\"\"",
    "\"auto\"",
    "\"maglev\"",
    "\"round-robin\"",
    "\"ip-port\"",
    "\"splice\"",
    "\"down\"",
    "\"127.0.0.1:0\"",
    "\"127.0.0.1:9090\"",
    "\"0.0.0.0:80\"",
    "\"[::1]:9002\"",
    "\"localhost:80\"",
    "\"no-port\"",
    "[\"127.0.0.1:8080\"]",
    "[]",
    "{}",
];

/// Whole lines a mutation may insert between two lines: each is well-formed, so a mutant often
/// still parses and validation decides (some are in range, some just past a bound).
const LINES: &[&str] = &[
    "# a comment",
    "retries = 5",
    "retries = 101",
    "weight = 3",
    "weight = 0",
    "weight = 257",
    "backup = true",
    "check = false",
    "slow_start = \"10s\"",
    "balance = \"maglev\"",
    "balance = \"random\"",
    "maglev_table_size = 7",
    "maglev_table_size = 8",
    "hash_key = \"ip-port\"",
    "interval = \"1s\"",
    "timeout = \"0s\"",
    "rise = 0",
    "fall = 1",
    "spread = 51",
    "error_limit = 0",
    "initial_state = \"down\"",
    "on_marked_down = \"shutdown-sessions\"",
    "idle_timeout = \"1h\"",
    "connect_timeout = \"0s\"",
    "listen = [\"127.0.0.1:8081\"]",
    "listen = [\"127.0.0.1:9090\"]",
    "address = \"127.0.0.1:9001\"",
    "address = \"[::1]:0\"",
    "name = \"x\"",
    "name = \"bad name\"",
    "workers = \"auto\"",
    "workers = 0",
    "max_connections = 1",
    "io = \"epoll\"",
    "relay = \"splice\"",
    "shutdown_timeout = \"1s\"",
    "allow_public = true",
    "listen = \"\"",
    "wieght = 2",
    "[frontend.health]",
    "[[frontend.backend]]",
];

#[derive(Debug, Clone)]
enum Mutation {
    Line(Index, Index),
    Insert(Index, u8),
    Replace(Index, u8),
    Delete(Index, u8),
    Token(Index, Index),
    DuplicateLine(Index),
    DeleteLine(Index),
    SwapLines(Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        1 => (any::<Index>(), 1..64u8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::Token(i, t)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, l)| Mutation::Line(i, l)),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => any::<Index>().prop_map(Mutation::DeleteLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
    ]
}

fn apply(mut text: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let at = |i: &Index, len: usize| i.index(len + 1);
        match m {
            Mutation::Insert(i, b) => {
                let p = at(i, text.len());
                text.insert(p, *b);
            }
            Mutation::Replace(i, b) if !text.is_empty() => {
                let p = i.index(text.len());
                text[p] = *b;
            }
            Mutation::Delete(i, n) if !text.is_empty() => {
                let p = i.index(text.len());
                let end = (p + usize::from(*n)).min(text.len());
                text.drain(p..end);
            }
            Mutation::Token(i, t) => {
                let p = at(i, text.len());
                let tok = t.get(TOKENS).as_bytes();
                text.splice(p..p, tok.iter().copied());
            }
            Mutation::Line(i, _)
            | Mutation::DuplicateLine(i)
            | Mutation::DeleteLine(i)
            | Mutation::SwapLines(i, _) => {
                let mut lines: Vec<Vec<u8>> =
                    text.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
                let a = i.index(lines.len());
                match m {
                    Mutation::Line(_, l) => lines.insert(a, l.get(LINES).as_bytes().to_vec()),
                    Mutation::DuplicateLine(_) => {
                        let l = lines[a].clone();
                        lines.insert(a, l);
                    }
                    Mutation::DeleteLine(_) => {
                        lines.remove(a);
                    }
                    Mutation::SwapLines(_, j) => {
                        let b = j.index(lines.len());
                        lines.swap(a, b);
                    }
                    _ => unreachable!(),
                }
                text = lines.join(&b'\n');
            }
            _ => {}
        }
    }
    text
}

#[test]
fn mutated_shipped_configs_never_panic_or_hang() {
    let seeds = seeds();
    assert!(seeds.len() > 10);
    let strategy = (any::<Index>(), proptest::collection::vec(mutation(), 1..6))
        .prop_map(move |(seed, ms)| apply(seed.get(&seeds).clone(), &ms));
    let (loaded, refused) = run("mutated shipped configs", strategy);
    // A guard on the generator: were every mutant refused (or loaded), only one side of the
    // loader would be exercised.
    if cases() >= 500 {
        assert!(
            loaded > 0 && refused > 0,
            "{loaded} loaded, {refused} refused"
        );
    }
}
