use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use clap::Parser;
use svc_lb::cli::{Cli, Command};
use tracing_subscriber::{EnvFilter, util::SubscriberInitExt as _};

/// Logs go to stderr (stdout is for `debug` output). RUST_LOG overrides the default `info`;
/// with the tracing-log feature, `init` also bridges `log` records (aya, aya-log) into tracing.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .try_init();
}

fn print(out: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    // `svc-lb debug ... | head` closes the pipe early; that is not an error.
    match stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing output"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => svc_lb::run::run(&args).context("svc-lb run")?,
        Command::Debug(cmd) => print(&svc_lb::inspect::debug::run(&cmd)?)?,
        Command::Service(args) => print(&svc_lb::inspect::list::service(&args)?)?,
        Command::Uninstall(pin) => svc_lb::dataplane::uninstall(&pin.pin_dir)
            .with_context(|| format!("uninstalling from {}", pin.pin_dir.display()))?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain; no backtrace even if RUST_BACKTRACE is set
            // (these are operator errors, not bugs).
            eprintln!("error: {}", svc_lb::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
