//! `ringlb ctl`: the runtime API from the command line (`status`, `drain`, `ready`, `maint`,
//! `weight`, `enable`, `disable`, `upgrade`).
//!
//! It finds the admin listener in the config file (only its `[admin]` table is read, so a
//! config being edited elsewhere does not stop an operator from draining a backend) or takes
//! `--admin ADDR`, and the token from `--token-file` or the config's `token_file`. A plain
//! blocking HTTP/1.1 client: one request, `Connection: close`, deadlines on connect and read.
//!
//! Exit codes, for scripts: 0 done; 1 refused by ringlb (no such backend, bad value);
//! 2 usage or config error; 3 admin listener unreachable; 4 not allowed (no or wrong token,
//! writes refused from here); 5 ringlb could not do it now (port taken, stopping).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::config::DEFAULT_ADMIN_LISTEN;

/// Where the config is looked for when neither `--config` nor `--admin` is given.
pub const DEFAULT_CONFIG: &str = "/etc/ringlb/ringlb.toml";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Config file to read the admin address and token_file from [default: /etc/ringlb/ringlb.toml].
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Admin listener address (instead of reading it from the config), e.g. 127.0.0.1:9090.
    #[arg(long)]
    pub admin: Option<String>,
    /// File holding the bearer token (instead of the config's admin.token_file).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Show every frontend and backend with its state.
    Status,
    /// No new connections to FRONTEND/BACKEND; established ones finish.
    Drain { target: String },
    /// Back to taking connections (from drain or maint).
    Ready { target: String },
    /// Maintenance: no new connections and no health checks.
    Maint { target: String },
    /// Set FRONTEND/BACKEND's weight (1 to 256) until the next restart or config change.
    Weight { target: String, weight: u32 },
    /// Open the frontend's listeners again.
    Enable { frontend: String },
    /// Close the frontend's listeners; established connections go on.
    Disable { frontend: String },
    /// Binary upgrade: start the ringlb binary at the path the running one was started from,
    /// hand it every listening socket, and once it serves, let the running one drain.
    Upgrade,
}

/// What went wrong, with its exit code.
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

pub fn main(args: CtlArgs, top_config: Option<PathBuf>) -> ExitCode {
    match run(&args, top_config) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("ringlb ctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn run(args: &CtlArgs, top_config: Option<PathBuf>) -> Result<String, Failure> {
    let config = args.config.clone().or(top_config);
    let (admin, config_token) = locate(args.admin.as_deref(), config.as_deref())?;
    let token_file = args.token_file.clone().or(config_token);
    let token = match &token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    let (method, path, body) = request_for(&args.command)?;
    // An upgrade is answered once the new process serves, which may take a while.
    let wait = match args.command {
        CtlCommand::Upgrade => crate::upgrade::READY_TIMEOUT + READ_TIMEOUT,
        _ => READ_TIMEOUT,
    };
    let (code, json) = call(
        admin,
        method,
        &path,
        body.as_deref(),
        token.as_deref(),
        wait,
    )?;
    match code {
        200 => {}
        401 | 403 => return Err(fail(4, format!("{code}: {}", error_text(&json)))),
        409 | 503 => return Err(fail(5, format!("{code}: {}", error_text(&json)))),
        _ => return Err(fail(1, format!("{code}: {}", error_text(&json)))),
    }
    if args.json {
        let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
        text.push('\n');
        return Ok(text);
    }
    Ok(match &args.command {
        CtlCommand::Status => status_text(&json),
        CtlCommand::Enable { .. } | CtlCommand::Disable { .. } => frontend_line(&json),
        CtlCommand::Upgrade => format!(
            "upgraded: process {} serves; process {} drains its connections and exits\n",
            json["pid"], json["old_pid"]
        ),
        _ => backend_line(&json, false),
    })
}

fn error_text(v: &Value) -> String {
    v["error"]
        .as_str()
        .map_or_else(|| v.to_string(), str::to_string)
}

/// The admin address and the config's token file.
fn locate(
    admin: Option<&str>,
    config: Option<&Path>,
) -> Result<(SocketAddr, Option<PathBuf>), Failure> {
    let from_config = match (admin, config) {
        (Some(_), None) => None,
        (_, Some(path)) => Some(read_admin_table(path)?),
        (None, None) => Some(read_admin_table(Path::new(DEFAULT_CONFIG))?),
    };
    let (listen, token_file) = from_config.unwrap_or((None, None));
    let text = admin
        .map(str::to_string)
        .or(listen)
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
    if text.is_empty() {
        return Err(fail(
            2,
            "the admin listener is disabled in the config (admin.listen = \"\")",
        ));
    }
    let addr: SocketAddr = text.parse().map_err(|_| {
        fail(
            2,
            format!("\"{text}\" is not an IP address with a port, like \"127.0.0.1:9090\""),
        )
    })?;
    Ok((reachable(addr), token_file))
}

/// A wildcard listen address is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

type AdminTable = (Option<String>, Option<PathBuf>);

/// `[admin] listen` and `token_file` from a config file, without validating the rest.
#[allow(clippy::disallowed_methods)] // a command-line tool: no async thread here
fn read_admin_table(path: &Path) -> Result<AdminTable, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(
            2,
            format!(
                "cannot read {}: {e} (give the config with --config FILE or the address with --admin ADDR)",
                path.display()
            ),
        )
    })?;
    let doc: toml::Table = toml::from_str(&text)
        .map_err(|e| fail(2, format!("{}: not valid TOML: {e}", path.display())))?;
    let admin = doc.get("admin").and_then(|a| a.as_table());
    let get = |key: &str| {
        admin
            .and_then(|a| a.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    Ok((get("listen"), get("token_file").map(PathBuf::from)))
}

#[allow(clippy::disallowed_methods)] // a command-line tool: no async thread here
fn read_token(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(2, format!("cannot read token file {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(fail(2, format!("token file {} is empty", path.display())));
    }
    Ok(token.to_string())
}

/// Splits `FRONTEND/BACKEND`.
fn split_target(target: &str) -> Result<(&str, &str), Failure> {
    match target.split_once('/') {
        Some((f, b)) if valid(f) && valid(b) => Ok((f, b)),
        _ => Err(fail(
            2,
            format!("\"{target}\" is not FRONTEND/BACKEND, like web/api3"),
        )),
    }
}

/// Names as the config allows them; nothing that would need escaping in a URL.
fn valid(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

type Call = (&'static str, String, Option<String>);

fn request_for(cmd: &CtlCommand) -> Result<Call, Failure> {
    let backend = |target: &str, body: String| -> Result<Call, Failure> {
        let (f, b) = split_target(target)?;
        Ok(("POST", format!("/api/backends/{f}/{b}"), Some(body)))
    };
    let frontend = |name: &str, enabled: bool| -> Result<Call, Failure> {
        if !valid(name) {
            return Err(fail(2, format!("\"{name}\" is not a frontend name")));
        }
        Ok((
            "POST",
            format!("/api/frontends/{name}"),
            Some(format!("{{\"enabled\":{enabled}}}")),
        ))
    };
    match cmd {
        CtlCommand::Status => Ok(("GET", "/api/state".to_string(), None)),
        CtlCommand::Drain { target } => backend(target, r#"{"state":"drain"}"#.into()),
        CtlCommand::Ready { target } => backend(target, r#"{"state":"ready"}"#.into()),
        CtlCommand::Maint { target } => backend(target, r#"{"state":"maint"}"#.into()),
        CtlCommand::Weight { target, weight } => {
            backend(target, format!("{{\"weight\":{weight}}}"))
        }
        CtlCommand::Enable { frontend: f } => frontend(f, true),
        CtlCommand::Disable { frontend: f } => frontend(f, false),
        CtlCommand::Upgrade => Ok(("POST", "/api/upgrade".to_string(), Some("{}".into()))),
    }
}

/// One request; returns the status code and the JSON body.
fn call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
    wait: Duration,
) -> Result<(u16, Value), Failure> {
    let unreachable = |e: std::io::Error| {
        fail(
            3,
            format!("cannot reach the admin listener at {admin}: {e} (is ringlb running? is [admin] listen right?)"),
        )
    };
    let mut s = TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT).map_err(unreachable)?;
    s.set_read_timeout(Some(wait)).map_err(unreachable)?;
    s.set_write_timeout(Some(READ_TIMEOUT))
        .map_err(unreachable)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nUser-Agent: ringlb-ctl\r\nConnection: close\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).map_err(unreachable)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(fail(3, format!("{admin} did not answer HTTP")));
    };
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| fail(3, format!("{admin} did not answer HTTP")))?;
    let json = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.trim().into()));
    Ok((code, json))
}

fn frontend_line(f: &Value) -> String {
    let listen: Vec<&str> = f["listen"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "frontend {}: {}{}\n",
        f["name"].as_str().unwrap_or("?"),
        if f["enabled"].as_bool() == Some(false) {
            "disabled"
        } else {
            "enabled"
        },
        if listen.is_empty() {
            String::new()
        } else {
            format!(", listening on {}", listen.join(" "))
        }
    )
}

/// One backend: in `status` as a row under its frontend (`in_table`), else on its own.
fn backend_line(b: &Value, in_table: bool) -> String {
    let weight = match (b["weight"].as_u64(), b["configured_weight"].as_u64()) {
        (Some(w), Some(c)) if w != c => format!("weight {w} (configured {c})"),
        (Some(w), _) => format!("weight {w}"),
        _ => String::new(),
    };
    let name = b["name"].as_str().unwrap_or("?");
    let state = b["state"].as_str().unwrap_or("?");
    let health = b["health"].as_str().unwrap_or("?");
    let active = b["active"].as_u64().unwrap_or(0);
    let address = b["address"].as_str().unwrap_or("");
    if in_table {
        format!("  {name:<16} {address:<22} {state:<5} health {health:<4} {weight:<24} {active} active\n")
    } else {
        format!(
            "{name} ({address}): {state}, health {health}, {weight}, {active} active connections\n"
        )
    }
}

fn status_text(v: &Value) -> String {
    let mut out = String::new();
    for f in v["frontends"].as_array().into_iter().flatten() {
        out.push_str(&frontend_line(f));
        for b in f["backends"].as_array().into_iter().flatten() {
            out.push_str(&backend_line(b, true));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_frontend_slash_backend() {
        assert_eq!(split_target("web/api3").ok(), Some(("web", "api3")));
        for bad in ["web", "web/", "/api3", "web/api 3", "web/a/b"] {
            assert!(split_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_wildcard_admin_is_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9090".parse().unwrap()),
            "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            reachable("[::]:9090".parse().unwrap()),
            "[::1]:9090".parse::<SocketAddr>().unwrap()
        );
    }
}
