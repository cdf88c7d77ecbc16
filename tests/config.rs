//! Config files: every fixture under valid/ passes `ringlb check`; every one under invalid/
//! fails with each message its leading `# expect: ...` lines give (`FILE` stands for the path
//! the file was checked as, so the line and column are pinned too); the example is valid.

// Tests and benches: a failed unwrap is a failed run, and blocking file I/O is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn check(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

#[test]
fn every_valid_fixture_passes_check() {
    for f in fixtures("valid") {
        let (ok, text) = check(&f);
        assert!(ok, "{}: {text}", f.display());
        assert!(text.contains("configuration is valid"), "{text}");
    }
}

/// The `# expect: ` lines at the top of a fixture, with `FILE` replaced by its path.
fn expectations(path: &Path) -> Vec<String> {
    // Read as bytes: one fixture is deliberately not UTF-8 after its first line.
    let body = std::fs::read(path).unwrap();
    let body = String::from_utf8_lossy(&body);
    let file = path.display().to_string();
    body.lines()
        .map_while(|l| l.strip_prefix("# expect: "))
        .map(|e| e.replace("FILE", &file))
        .collect()
}

#[test]
fn every_invalid_fixture_fails_check_with_its_expected_messages() {
    for f in fixtures("invalid") {
        let expect = expectations(&f);
        assert!(
            !expect.is_empty(),
            "{}: first line must be `# expect: ...`",
            f.display()
        );
        let (ok, text) = check(&f);
        assert!(!ok, "{} passed check", f.display());
        for e in &expect {
            assert!(
                text.contains(e.as_str()),
                "{}:\nexpected {e:?}\ngot {text}",
                f.display()
            );
        }
        // The file is named, so an operator knows which one is wrong.
        assert!(text.contains(&f.display().to_string()), "{text}");
    }
}

#[test]
fn check_lists_three_unknown_keys_and_two_bad_values_in_one_run_with_their_lines() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config/invalid/five-problems.toml");
    let (ok, text) = check(&f);
    assert!(!ok, "{text}");
    let file = f.display().to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("{file}: 5 problems"), "{text}");
    // One line per problem, in file order, each `file:line:column: key path: what`.
    let want = [
        (
            10,
            1,
            "global: unknown key `max_conections`: did you mean `max_connections`?",
        ),
        (
            15,
            1,
            "frontend \"web\": unknown key `conect_timeout`: did you mean `connect_timeout`?",
        ),
        (
            16,
            16,
            "frontend \"web\": idle_timeout: bad duration \"10x\"",
        ),
        (
            20,
            11,
            "frontend \"web\": backend \"api3\": address: \"10.0.0.13\" has no port",
        ),
        (
            21,
            1,
            "frontend \"web\": backend \"api3\": unknown key `wieght`: did you mean `weight`?",
        ),
    ];
    assert_eq!(lines.len(), 1 + want.len(), "{text}");
    for (got, (line, col, what)) in lines[1..].iter().zip(want) {
        let prefix = format!("  {file}:{line}:{col}: {what}");
        assert!(got.starts_with(&prefix), "expected {prefix:?}\ngot {got:?}");
    }
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ringlb.toml");
    let (ok, text) = check(&example);
    assert!(ok, "{text}");
}

#[test]
fn a_missing_file_is_an_error_that_names_it() {
    let (ok, text) = check(Path::new("/nonexistent/ringlb.toml"));
    assert!(!ok);
    assert!(
        text.contains("/nonexistent/ringlb.toml: 1 problem"),
        "{text}"
    );
    assert!(text.contains("cannot read the file"), "{text}");
}
