//! The two-node ECMP + BGP lab (tests/scale-out.sh) as part of `cargo test`: two ringlb nodes
//! announce one VIP through BIRD to a router in network namespaces; flows keep their backend
//! whichever node gets them, a hung node is withdrawn within the BGP hold time, a SIGTERM'd node
//! withdraws before it stops accepting, and a node without backends withdraws. Needs root and
//! BIRD 2; see docs/scale-out.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::process::Command;

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn two_nodes_behind_ecmp_agree_and_withdraw_cleanly() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        if std::env::var_os("CI").is_some() {
            panic!("the scale-out lab needs root (network namespaces); CI runs as root");
        }
        eprintln!("SKIPPED: the scale-out lab needs root (network namespaces)");
        return;
    }
    if !common::tool_available(
        on_path("bird") && on_path("birdc"),
        "BIRD 2 (bird, birdc)",
        "apt-get install bird2",
    ) {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scale-out.sh");
    let child = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_ringlb"))
        .env("RINGLB_SCALE_OUT_FLOWS", "10000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The script names its namespaces after its pid (another run may have its own).
    let prefix = format!("rlbso{}-", child.id());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scale-out lab failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("PASS: every check held"), "{stderr}");
    // The lab removes every namespace it made, also on failure.
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&prefix), "namespaces left behind: {left}");
}
