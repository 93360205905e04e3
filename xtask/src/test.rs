//! `cargo xtask test`: what CI runs. Every step runs even after a failure (except the tests
//! after a failed build), and the exit status is non-zero if any step failed.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    run::{self, Steps},
    setup,
};

/// Packages checked by clippy and tested. Never `--workspace`: the eBPF crate only builds for
/// the BPF target (svc-lb's build.rs builds it).
const PACKAGES: &[&str] = &[
    "svc-lb",
    "svc-lb-common",
    "svc-lb-tests",
    "svc-lb-bench",
    "xtask",
];

/// The whole test run takes well under a minute; this only catches a hang.
const TEST_LIMIT: Duration = Duration::from_secs(600);

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
            for p in [
                "svc-lb-common",
                "svc-lb",
                "svc-lb-tests",
                "svc-lb-bench",
                "xtask",
            ] {
                cmd.args(["-p", p]);
            }
            // CI mode: privileged tests must fail, never skip, when they cannot run.
            cmd.env("SVC_LB_CI", "1");
            reap_stale();
            let res = run::run_with_limit("cargo test", &mut cmd, Some(TEST_LIMIT));
            // A killed or crashed test binary cannot run its guards: remove what it left.
            reap_stale();
            match res? {
                st if st.success() => Ok(()),
                st => bail!("cargo test failed ({st})"),
            }
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

/// The pid in a test resource name `slb<pid>-<n>[-...]` (see tests/src/netns.rs).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("slb")?;
    let (pid, n) = rest.split_once('-')?;
    let n = n.split('-').next()?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes namespaces and pin directories of test processes that no longer exist.
fn reap_stale() {
    let svc_lb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/svc-lb");
    if let Ok(dir) = fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                println!("    removing stale pins {}", e.path().display());
                let ok = Command::new(&svc_lb)
                    .arg("uninstall")
                    .arg("--pin-dir")
                    .arg(e.path())
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !ok {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if stale(name) {
            println!("    removing stale netns {name}");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_of_test_resources() {
        assert_eq!(owner_pid("slb123-0-client"), Some(123));
        assert_eq!(owner_pid("slb123-4"), Some(123));
        assert_eq!(owner_pid("slb123-x"), None);
        assert_eq!(owner_pid("svc-lb-demo-node"), None);
        assert_eq!(owner_pid("slbfoo-1"), None);
        assert!(!stale(&format!("slb{}-0-node", std::process::id())));
    }
}
