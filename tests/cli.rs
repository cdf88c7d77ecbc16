//! The command line: each subcommand's help shows its own flags, and the demo's port hints
//! name the flag for the port that could not be had.

// Tests: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
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

/// Three consecutive ports that are free now, for the demo's backends.
fn three_free_ports() -> u16 {
    // Below the ephemeral range (32768 and up by default), where connects take ports; each
    // test process starts its search somewhere else in 20000..29999.
    const SLOTS: u32 = 3333;
    let offset = std::process::id() % SLOTS;
    (0..SLOTS)
        .map(|i| 20000 + ((offset + i) % SLOTS * 3) as u16)
        .find(|&p| {
            let held: Vec<_> = (p..p + 3)
                .map_while(|q| TcpListener::bind(("127.0.0.1", q)).ok())
                .collect();
            held.len() == 3
        })
        .expect("three consecutive free ports")
}

#[test]
fn a_taken_demo_admin_port_is_hinted_with_admin_port() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().port().to_string();
    let backends = three_free_ports().to_string();
    let out = ringlb(&[
        "demo",
        "--port",
        "0",
        "--backend-port",
        &backends,
        "--admin-port",
        &admin,
    ]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("admin: cannot listen on"), "{err}");
    assert!(err.contains("pick another port with --admin-port"), "{err}");
    assert!(!err.contains("with --port)"), "{err}");
    drop(taken);
}
