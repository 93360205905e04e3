use anyhow::Result;
use clap::Parser;
use svc_lb::cli::Cli;

fn main() -> Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
