//! The command line: each subcommand's help shows its own flags.

// Tests: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

fn ringlb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap()
}

#[test]
fn demo_help_shows_the_demos_flags_and_not_runs_config() {
    let out = ringlb(&["demo", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--admin-port"), "{help}");
    assert!(!help.contains("--config"), "{help}");
    // run and check still take it, after the subcommand or before it.
    for args in [
        ["check", "--config", "config/ringlb.toml"],
        ["--config", "config/ringlb.toml", "check"],
    ] {
        let out = ringlb(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
}
