//! `[admin] state_file`: the runtime API's changes saved across restarts (HAProxy's
//! `server-state-file`, written by ringlb itself on every change instead of by a script
//! before the restart).
//!
//! Only what differs from the config is saved: backends not ready or with a runtime weight,
//! frontends disabled. It is written atomically (a temporary file in the same directory,
//! fsynced, then renamed over the old one) so a crash leaves the old or the new file, never
//! half of one. At start it is read before the first snapshot; a file that cannot be read or
//! parsed is a WARN and ignored, never a failed start: losing a drain is better than not
//! serving at all.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{AdminMode, Registry, RuntimeWeight};

const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub version: u32,
    #[serde(default)]
    pub backends: Vec<SavedBackend>,
    #[serde(default)]
    pub frontends: Vec<SavedFrontend>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedBackend {
    pub frontend: String,
    pub backend: String,
    /// A backend whose address changed is another server: its state is not carried over.
    pub address: SocketAddr,
    /// "ready", "drain" or "maint".
    pub state: String,
    /// The runtime weight and the configured weight it was set over, if one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured_weight: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedFrontend {
    pub name: String,
    pub enabled: bool,
}

/// What the registry holds now that differs from the config, sorted so that the file only
/// changes when the state does.
pub fn collect(registry: &Registry) -> SavedState {
    let mut backends: Vec<SavedBackend> = registry
        .backends()
        .filter_map(|b| {
            let mode = b.admin_mode();
            let rw = b.peek_runtime_weight();
            if mode == AdminMode::Ready && rw.is_none() {
                return None;
            }
            Some(SavedBackend {
                frontend: b.frontend.clone(),
                backend: b.name.clone(),
                address: b.address,
                state: mode.as_str().to_string(),
                weight: rw.map(|w| w.weight),
                configured_weight: rw.map(|w| w.configured),
            })
        })
        .collect();
    backends.sort_by(|a, b| (&a.frontend, &a.backend).cmp(&(&b.frontend, &b.backend)));
    let mut frontends: Vec<SavedFrontend> = registry
        .frontends()
        .filter(|(_, f)| f.disabled.load(std::sync::atomic::Ordering::Relaxed))
        .map(|(name, _)| SavedFrontend {
            name: name.clone(),
            enabled: false,
        })
        .collect();
    frontends.sort_by(|a, b| a.name.cmp(&b.name));
    SavedState {
        version: VERSION,
        backends,
        frontends,
    }
}

/// Writes `state` to `path` atomically. Runs on the control thread, once per operator
/// change: a few hundred bytes and two fsyncs, in order, so that a later change's file is
/// never overwritten by an earlier one finishing late.
pub fn save(path: &Path, state: &SavedState) -> std::io::Result<()> {
    let mut text = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    text.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Parses a state file's text.
pub fn parse(text: &str) -> Result<SavedState, String> {
    let state: SavedState = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if state.version != VERSION {
        return Err(format!(
            "version {} is not one this ringlb reads ({VERSION})",
            state.version
        ));
    }
    for b in &state.backends {
        if AdminMode::parse(&b.state).is_none() {
            return Err(format!(
                "backend {}/{}: state \"{}\" is not ready, drain or maint",
                b.frontend, b.backend, b.state
            ));
        }
    }
    Ok(state)
}

/// Reads `path` and puts what it saved onto the registry's live state. A missing file is
/// the first start (nothing to say); an unreadable or corrupt one is a WARN and ignored.
pub fn restore(path: &Path, registry: &Registry) {
    // Once, at start, before anything is served: nothing waits on this thread yet.
    #[allow(clippy::disallowed_methods)]
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            crate::warn!(
                "admin: cannot read state file {}: {e}; ignored, every backend starts as configured",
                path.display()
            );
            return;
        }
    };
    let state = match parse(&text) {
        Ok(s) => s,
        Err(e) => {
            crate::warn!(
                "admin: state file {} is corrupt ({e}); ignored, every backend starts as configured",
                path.display()
            );
            return;
        }
    };
    for b in &state.backends {
        let live = registry
            .find_backend(&b.frontend, &b.backend)
            .filter(|s| s.address == b.address);
        let Some(live) = live else {
            crate::info!(
                "admin: state file: backend {}/{} ({}) is no longer configured; its saved state is dropped",
                b.frontend,
                b.backend,
                b.address
            );
            continue;
        };
        let mode = AdminMode::parse(&b.state).unwrap_or_default();
        live.set_admin_mode(mode);
        if let (Some(weight), Some(configured)) = (b.weight, b.configured_weight) {
            live.set_runtime_weight(Some(RuntimeWeight { weight, configured }));
        }
        // Never the word "ready" after a space: test harnesses and scripts wait for the
        // start-up line " ready".
        let mut what: Vec<String> = Vec::new();
        if mode != AdminMode::Ready {
            what.push(mode.as_str().to_string());
        }
        if let Some(w) = b.weight {
            what.push(format!("weight {w}"));
        }
        crate::info!(
            "admin: Server {}/{} restored from the state file ({})",
            b.frontend,
            b.backend,
            what.join(", ")
        );
    }
    for f in &state.frontends {
        match registry.find_frontend(&f.name) {
            Some(live) => live
                .disabled
                .store(!f.enabled, std::sync::atomic::Ordering::Relaxed),
            None => crate::info!(
                "admin: state file: frontend {} is no longer configured; its saved state is dropped",
                f.name
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_parses_back_to_itself() {
        let s = SavedState {
            version: VERSION,
            backends: vec![SavedBackend {
                frontend: "web".into(),
                backend: "api3".into(),
                address: "127.0.0.1:80".parse().unwrap(),
                state: "drain".into(),
                weight: Some(50),
                configured_weight: Some(1),
            }],
            frontends: vec![SavedFrontend {
                name: "web".into(),
                enabled: false,
            }],
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(parse(&text).unwrap(), s);
    }

    #[test]
    fn a_corrupt_or_foreign_state_file_is_refused_with_its_reason() {
        assert!(parse("{\"version\":1,").is_err());
        assert!(parse("{\"version\":2}").unwrap_err().contains("version 2"));
        let bad = r#"{"version":1,"backends":[{"frontend":"w","backend":"a","address":"127.0.0.1:1","state":"sleep"}]}"#;
        assert!(parse(bad).unwrap_err().contains("\"sleep\""));
    }
}
