//! Config files: every fixture under valid/ passes `ringlb check`, every one under invalid/
//! fails with the message its first line expects (`# expect: ...`), and so does the example.

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

#[test]
fn every_invalid_fixture_fails_check_with_its_expected_message() {
    for f in fixtures("invalid") {
        let body = std::fs::read_to_string(&f).unwrap();
        let expect = body
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", f.display()));
        let (ok, text) = check(&f);
        assert!(!ok, "{} passed check", f.display());
        assert!(
            text.contains(expect),
            "{}:\nexpected {expect:?}\ngot {text}",
            f.display()
        );
        // The file is named, so an operator knows which one is wrong.
        assert!(text.contains(&f.display().to_string()), "{text}");
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
