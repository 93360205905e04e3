//! `cargo xtask test`: what CI runs. Every step runs even after a failure (except the tests
//! after a failed build), and the exit status is non-zero if any step failed.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::{
    run::{self, Steps},
    setup,
};

/// Packages checked by clippy and tested. Never `--workspace`: the eBPF crate only builds for
/// the BPF target (svc-lb's build.rs builds it).
const PACKAGES: &[&str] = &["svc-lb", "svc-lb-common", "svc-lb-tests", "xtask"];

pub fn test() -> Result<()> {
    let started = Instant::now();
    let mut steps = Steps::new(7);
    if let Err(e) = setup::run_setup(&mut steps) {
        steps.summary(started);
        return Err(e.context("setup failed"));
    }
    let _ = steps.step("cargo fmt --check", || {
        run::run_ok(
            "cargo fmt",
            run::cargo().args(["fmt", "--all", "--", "--check"]),
        )
    });
    let _ = steps.step("cargo clippy -D warnings", || {
        let mut cmd = run::cargo();
        cmd.arg("clippy");
        for p in PACKAGES {
            cmd.args(["-p", p]);
        }
        cmd.args(["--all-targets", "--", "-D", "warnings"]);
        run::run_ok("cargo clippy", &mut cmd)
    });
    let built = steps.step("cargo build --bins (svc-lb, svc-lb-echo)", || {
        run::run_ok(
            "cargo build",
            run::cargo().args(["build", "-p", "svc-lb", "-p", "svc-lb-tests", "--bins"]),
        )
    });
    if built.is_ok() {
        let _ = steps.step("cargo test (unit, program, e2e)", || {
            let mut cmd = run::cargo();
            cmd.arg("test");
            for p in ["svc-lb-common", "svc-lb", "svc-lb-tests", "xtask"] {
                cmd.args(["-p", p]);
            }
            // CI mode: privileged tests must fail, never skip, when they cannot run.
            cmd.env("SVC_LB_CI", "1");
            run::run_ok("cargo test", &mut cmd)
        });
    } else {
        steps.skip("cargo test (unit, program, e2e)", "build failed");
    }
    steps.summary(started);
    if steps.failed() {
        bail!("some steps failed");
    }
    println!("all steps passed");
    Ok(())
}
