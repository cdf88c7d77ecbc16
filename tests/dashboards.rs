#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! contrib/: the Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), and every metric name that the rules and the Grafana dashboard
//! use is one a running ringlb exports.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

/// `ringlb_...` identifiers in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ringlb_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every PromQL string in the dashboard: panel targets and template queries.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// Names a running ringlb exports, with traffic through it.
fn exported() -> BTreeSet<String> {
    let b = Backend::start("api1", Behaviour::Echo);
    let lb = Ringlb::start(&(global_toml("") + &frontend_toml("web", "", &[("api1", b.addr, "")])));
    bulk_echo(lb.addr("web"), 1024);
    let text = get(lb.admin.unwrap(), "/metrics");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_the_alert_rules_and_the_dashboard_use_is_exported() {
    let have = exported();
    let rules = std::fs::read_to_string(contrib("prometheus/ringlb-alerts.yml")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(contrib("grafana/ringlb-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    assert!(queries.len() > 20, "{queries:?}");
    let mut used = metric_names(&rules);
    assert!(used.len() >= 10, "{used:?}");
    for q in &queries {
        used.extend(metric_names(q));
    }
    let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used by contrib/ but not exported: {missing:?}\nexported: {have:?}"
    );
    // Every panel queries something and has a unique id.
    let panels = dash["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len());
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !tool_available(found, "promtool", "apt-get install prometheus") {
        return;
    }
    for args in [
        ["check", "rules", "ringlb-alerts.yml"],
        ["test", "rules", "ringlb-alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(contrib("prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
