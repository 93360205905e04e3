//! `cargo xtask bench [--quick]`: installs what the baselines need, builds in release and runs
//! `svc-lb-bench` (which creates and removes its own namespaces and pins). A benchmark, not a
//! test: it reports numbers and fails only when a measurement could not be made.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    run::{self, Steps},
    setup,
};

/// The kube-proxy baselines: iptables (provides iptables-legacy-restore and
/// iptables-nft-restore) and nftables (nft); bpftool reads map memory; iperf3 for B3 bulk.
const BENCH_APT: &[&str] = &["iptables", "nftables", "bpftool", "iperf3"];

/// The full run takes about 15 minutes on 2 CPUs; this only catches a hang.
const BENCH_LIMIT: Duration = Duration::from_secs(30 * 60);

pub fn bench(quick: bool) -> Result<()> {
    let started = Instant::now();
    let mut steps = Steps::new(6);
    if let Err(e) = setup::run_setup(&mut steps) {
        steps.summary(started);
        return Err(e.context("setup failed"));
    }
    let res = steps
        .step("apt: iptables nftables bpftool iperf3", || {
            setup::apt_install(BENCH_APT)
        })
        .and_then(|()| {
            steps.step(
                "cargo build --release (svc-lb, svc-lb-echo, svc-lb-bench)",
                || {
                    run::run_ok(
                        "cargo build",
                        run::cargo().args([
                            "build",
                            "--release",
                            "-p",
                            "svc-lb",
                            "-p",
                            "svc-lb-tests",
                            "-p",
                            "svc-lb-bench",
                            "--bins",
                        ]),
                    )
                },
            )
        })
        .and_then(|()| {
            steps.step(
                if quick {
                    "svc-lb-bench --quick"
                } else {
                    "svc-lb-bench"
                },
                || {
                    let mut cmd = Command::new("target/release/svc-lb-bench");
                    cmd.args([
                        "--out",
                        "target/bench/results.json",
                        "--svc-lb",
                        "target/release/svc-lb",
                    ]);
                    if quick {
                        cmd.arg("--quick");
                    }
                    match run::run_with_limit("svc-lb-bench", &mut cmd, Some(BENCH_LIMIT))? {
                        st if st.success() => Ok(()),
                        st => bail!("svc-lb-bench failed ({st})"),
                    }
                },
            )
        });
    steps.summary(started);
    res
}
