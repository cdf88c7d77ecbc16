//! Command line: `run` (the default), `check`, `demo`.

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
    /// Config file (for `run`, the default command).
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve traffic with the config file (the default).
    Run,
    /// Validate the config file and exit: 0 if valid, 1 with every problem listed if not.
    Check,
    /// Start a self-contained demo: ringlb in front of three local HTTP backends.
    Demo(crate::demo::DemoArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            let Some(path) = cli.config else {
                eprintln!("ringlb check: give the file with --config FILE");
                return ExitCode::from(2);
            };
            match Config::load(&path) {
                Ok(_) => {
                    println!("{}: configuration is valid", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            let Some(path) = cli.config else {
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
        Command::Demo(args) => crate::demo::run(args),
    }
}
