//! Developer tasks for svc-lb: `cargo xtask setup | test | demo | bench | run | modules | image`.
//!
//! Plain std process spawning on purpose: the tasks mostly run other tools (apt-get, rustup,
//! cargo, ip, curl) and print what they do.

mod bench;
mod demo;
mod image;
mod launch;
mod modgraph;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

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
    /// Build svc-lb and run it as root with the arguments after `--`
    /// (`cargo xtask run -- run --manifests examples --iface eth0`).
    Run {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
        /// Arguments for svc-lb.
        #[arg(last = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Print the import graph between svc-lb's top-level modules; fails on a cycle.
    Modules,
    /// Build the container image (static musl binary, FROM scratch, with buildah) into
    /// target/image/: an OCI archive and a `docker load`-able one.
    Image {
        /// Only build the static binary into target/image/context/ (the Containerfile's build
        /// stage runs this).
        #[arg(long)]
        binary_only: bool,
    },
    /// Benchmarks next to kube-proxy's iptables/nftables rules (docs/benchmarks.md).
    Bench {
        /// Smaller scales, about 2 minutes.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::install_sigint_handler();
    let res = match cli.task {
        Task::Setup => setup::setup(),
        Task::Test => test::test(),
        Task::Demo => demo::demo(),
        Task::Run { release, args } => launch::launch(release, &args),
        Task::Modules => modules(),
        Task::Image { binary_only } => image::image(binary_only),
        Task::Bench { quick } => bench::bench(quick),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Display with causes, not Debug: a backtrace (RUST_BACKTRACE) would bury the reason.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn modules() -> anyhow::Result<()> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../svc-lb/src");
    let graph = modgraph::read_graph(&src)?;
    for (from, to) in &graph {
        let to: Vec<_> = to.iter().map(String::as_str).collect();
        println!("{from:<12} -> {}", to.join(", "));
    }
    modgraph::check_acyclic(&src)?;
    println!("no cycle");
    Ok(())
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
        match Cli::try_parse_from(["xtask", "run", "--release", "--", "run", "--iface", "eth0"])
            .unwrap()
            .task
        {
            Task::Run { release, args } => {
                assert!(release);
                assert_eq!(args, ["run", "--iface", "eth0"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
