//! Command line: `run` (the default), `check`, `demo`, `ctl` (the runtime API's client, in
//! [`ctl`]).

pub mod ctl;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "ringlb",
    version,
    about = "A Layer-4 TCP load balancer on io_uring"
)]
pub struct Cli {
    /// Config file, for `run` (the default command) and `check`; it may also follow them.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--config` after `run` or `check`. Not a global flag: `demo` has no config file, and a
/// global one would show `run`'s help text under `demo --help`.
#[derive(clap::Args, Debug, Default)]
pub struct ConfigArg {
    /// Config file.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve traffic with the config file (the default).
    Run(ConfigArg),
    /// Validate the config file and exit: 0 if valid, 1 with every problem listed if not.
    Check(ConfigArg),
    /// Start a self-contained demo: ringlb in front of three local HTTP backends.
    Demo(crate::demo::DemoArgs),
    /// Talk to a running ringlb: status, drain, ready, maint, weight, enable, disable, upgrade.
    /// Exit codes: 0 done, 1 refused, 2 usage or config error, 3 unreachable, 4 not allowed,
    /// 5 cannot be done now.
    Ctl(ctl::CtlArgs),
}

pub fn main() -> ExitCode {
    // Before anything else: the path an upgrade starts (see `upgrade::record_program`).
    crate::upgrade::record_program();
    let cli = Cli::parse();
    let top = cli.config;
    match cli.command.unwrap_or(Command::Run(ConfigArg::default())) {
        Command::Check(arg) => {
            let Some(path) = arg.config.or(top) else {
                eprintln!("ringlb check: give the file with --config FILE");
                return ExitCode::from(2);
            };
            match Config::load(&path) {
                Ok(config) => {
                    // Warnings, not errors: the config is valid either way.
                    for line in crate::discovery::unresolved(&config) {
                        eprintln!("{}: warning: {line}", path.display());
                    }
                    println!("{}: configuration is valid", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(arg) => {
            let Some(path) = arg.config.or(top) else {
                eprintln!("ringlb: give a config file with --config FILE (or try `ringlb demo`)");
                return ExitCode::from(2);
            };
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    crate::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match crate::control::run(config, Some(path), |_| {}) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    crate::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ctl(args) => ctl::main(args, top),
        Command::Demo(args) => {
            if top.is_some() {
                eprintln!(
                    "ringlb demo: the demo has its own config; --config is for run and check"
                );
                return ExitCode::from(2);
            }
            crate::demo::run(args)
        }
    }
}
