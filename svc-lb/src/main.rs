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

/// Tells on stderr (stdout may be JSON) whether an agent is running on `pin_dir`: without one,
/// the maps show what the last agent programmed and nothing keeps them up to date.
fn agent_note(pin_dir: &std::path::Path) {
    match svc_lb::dataplane::running_agent(pin_dir) {
        Ok(Some(holder)) => eprintln!("agent: running on {}, {holder}", pin_dir.display()),
        Ok(None) => eprintln!(
            "agent: none running on {} (the maps show what the last agent programmed; nothing \
             updates them)",
            pin_dir.display()
        ),
        Err(e) => eprintln!("agent: unknown ({})", svc_lb::error::chain(&e)),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => svc_lb::run::run(&args).context("svc-lb run")?,
        Command::Debug(cmd) => {
            if let Some(pin_dir) = cmd.pin_dir() {
                agent_note(pin_dir);
            }
            print(&svc_lb::inspect::debug::run(&cmd)?)?
        }
        Command::Service(args) => print(&svc_lb::inspect::list::service(&args)?)?,
        Command::Uninstall(args) => {
            let opts = svc_lb::dataplane::UninstallOptions { force: args.force };
            svc_lb::dataplane::uninstall_with(&args.pin.pin_dir, opts).with_context(|| {
                format!("svc-lb uninstall --pin-dir {}", args.pin.pin_dir.display())
            })?;
        }
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
