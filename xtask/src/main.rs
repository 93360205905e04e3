//! Developer tasks for svc-lb: `cargo xtask setup | test | demo`.
//!
//! Plain std process spawning on purpose: the tasks mostly run other tools (apt-get, rustup,
//! cargo, ip, curl) and print what they do.

mod demo;
mod run;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "svc-lb developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing: apt packages, the eBPF nightly toolchain, bpf-linker.
    Setup,
    /// Setup, then fmt check, clippy, build and every test (unit, program and end to end).
    Test,
    /// Setup, build, then run svc-lb between network namespaces and send it traffic.
    Demo,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    run::install_sigint_handler();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Test => test::test(),
        Task::Demo => demo::demo(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tasks() {
        assert!(matches!(
            Cli::try_parse_from(["xtask", "demo"]).unwrap().task,
            Task::Demo
        ));
        assert!(Cli::try_parse_from(["xtask", "nope"]).is_err());
    }
}
