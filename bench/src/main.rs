//! `svc-lb-bench`: runs the benchmarks of issue 5 (needs root), prints a table and writes JSON.
//! Usually started by `cargo xtask bench [--quick]`, which installs the tools and builds first.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use svc_lb::dataplane::capacity::MapCapacity;
use svc_lb_bench::{
    b1::{self, B1Config},
    b2_b3::{self, B2B3Config},
    b4::{self, B4Config},
    b5_b6::{self, B5B6Config},
    report::{Machine, Report},
};

#[derive(Debug, Parser)]
#[command(
    name = "svc-lb-bench",
    about = "svc-lb next to kube-proxy's iptables/nftables rules"
)]
struct Cli {
    /// Smaller scales and fewer repetitions (about 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Only these benchmarks (comma separated: b1,b2,b3,b4,b5,b6).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The svc-lb binary for B5/B6 (the real agent).
    #[arg(long, default_value = "target/release/svc-lb")]
    svc_lb: PathBuf,
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("svc-lb-bench needs root (BPF, network namespaces, iptables)");
    }
    let want = |b: &str| cli.only.is_empty() || cli.only.iter().any(|o| o.eq_ignore_ascii_case(b));
    let started = Instant::now();
    let mut report = Report {
        machine: Machine::detect(),
        quick: cli.quick,
        started_utc: utc_now(),
        rows: Vec::new(),
        not_run: Vec::new(),
    };
    let mut failures: Vec<String> = Vec::new();
    // Results so far are written after every benchmark, so a run stopped halfway keeps them.
    let checkpoint = |report: &Report, failures: &[String]| -> Result<()> {
        if let Some(dir) = cli.out.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let mut v = serde_json::to_value(report)?;
        v["failures"] = serde_json::json!(failures);
        std::fs::write(&cli.out, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("write {}", cli.out.display()))
    };

    if want("b1") {
        // (Services, endpoints each, pod pool). The full run programs a million distinct
        // backends at 10k and 100k Services into maps sized for them (the agent's
        // --max-services 131072 --max-backends 1048576); the quick run keeps the default sizes.
        let (capacity, scales) = if cli.quick {
            (
                MapCapacity::default(),
                vec![(0, 0, 1), (10_000, 10, 50_000)],
            )
        } else {
            (
                MapCapacity {
                    max_services: 131_072,
                    max_backends: 1_048_576,
                    ..MapCapacity::default()
                },
                vec![
                    (0, 0, 1),
                    (10_000, 100, 1_000_000),
                    (100_000, 10, 1_000_000),
                ],
            )
        };
        let cfg = B1Config {
            repeat: if cli.quick { 100_000 } else { 1_000_000 },
            rounds: if cli.quick { 3 } else { 5 },
            capacity,
        };
        for (n, eps, pods) in scales {
            if let Err(e) = b1::run_scale(n, eps, pods, &cfg, &mut report.rows) {
                failures.push(format!("B1 at {n} Services: {e}"));
            }
        }
    }
    checkpoint(&report, &failures)?;
    if want("b2") || want("b3") {
        let cfg = if cli.quick {
            B2B3Config {
                scales: vec![1, 1_000],
                bulk_secs: 2,
                conns: 300,
                keepalive_reqs: 2_000,
            }
        } else {
            B2B3Config {
                scales: vec![1, 1_000, 10_000, 30_000],
                bulk_secs: 5,
                conns: 2_000,
                keepalive_reqs: 20_000,
            }
        };
        if let Err(e) = b2_b3::run(&cfg, &cli.svc_lb, &mut report.rows) {
            failures.push(format!("B2/B3: {e}"));
        }
    }
    checkpoint(&report, &failures)?;
    if want("b4") {
        let cfg = if cli.quick {
            B4Config {
                services: 1_000,
                eps: 10,
                pods: 5_000,
                changes: 5,
            }
        } else {
            // 100k endpoints over 50k pods: MAX_BACKENDS (65,536 backend ids) caps distinct pods.
            B4Config {
                services: 10_000,
                eps: 10,
                pods: 50_000,
                changes: 9,
            }
        };
        if let Err(e) = b4::run(&cfg, &mut report.rows) {
            failures.push(format!("B4: {e}"));
        }
    }
    checkpoint(&report, &failures)?;
    if want("b5") || want("b6") {
        let cfg = if cli.quick {
            B5B6Config {
                services: 1_000,
                eps: 10,
                pods: 5_000,
                changes: 10,
            }
        } else {
            B5B6Config {
                services: 10_000,
                eps: 10,
                pods: 50_000,
                changes: 30,
            }
        };
        if let Err(e) = b5_b6::run(&cfg, &cli.svc_lb, &mut report.rows) {
            failures.push(format!("B5/B6: {e}"));
        }
    }

    println!(
        "\nsvc-lb benchmarks ({}), {} / {} CPUs / {}",
        if cli.quick { "quick" } else { "full" },
        report.machine.kernel,
        report.machine.cpus,
        report.machine.cpu_model
    );
    print!("{}", report.table());
    for n in &report.not_run {
        println!("not run: {n}");
    }
    report.not_run.extend(failures.iter().cloned());
    if let Some(dir) = cli.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&cli.out, json).with_context(|| format!("write {}", cli.out.display()))?;
    println!(
        "results: {} ({:.0}s)",
        cli.out.display(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!("some benchmarks failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}
