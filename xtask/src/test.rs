//! `cargo xtask test`: what CI runs. Every step runs even after a failure (except the tests
//! after a failed build), and the exit status is non-zero if any step failed.

use std::{
    ffi::CStr,
    fs, io,
    os::unix::process::CommandExt,
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

/// Unit tests: no root, no BPF, no bpffs needed (those belong in `svc-lb-tests`).
const UNIT_PACKAGES: &[&str] = &["svc-lb-common", "svc-lb", "svc-lb-bench", "xtask"];

/// Where bpffs is mounted on a node (and where the tests and the agent mount it when missing).
const BPFFS: &CStr = c"/sys/fs/bpf";

/// Each test run takes a few minutes at most; this only catches a hang.
const TEST_LIMIT: Duration = Duration::from_secs(600);

pub fn test() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "cargo xtask test needs root: it installs packages, and runs the tests in a private \
             mount namespace (the privileged ones load BPF and create network namespaces)"
        );
    }
    let started = Instant::now();
    let mut steps = Steps::new(8);
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
        let _ = steps.step("cargo test (unit; no capabilities, no bpffs)", || {
            let mut cmd = Command::new("setpriv");
            // Root without any capability (an empty bounding set takes root's implicit ones
            // away at exec): a unit test that needs root, BPF or a mount fails here instead of
            // passing only where CI happens to be root.
            cmd.args([
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--no-new-privs",
                "--",
            ]);
            cmd.arg(run::cargo().get_program()).arg("test");
            for p in UNIT_PACKAGES {
                cmd.args(["-p", p]);
            }
            in_fresh_mount_ns(&mut cmd);
            let res = run::run_with_limit("cargo test (unit)", &mut cmd, Some(TEST_LIMIT));
            match res? {
                st if st.success() => Ok(()),
                st => bail!("cargo test (unit) failed ({st})"),
            }
        });
        let _ = steps.step("cargo test (program, e2e; root, private mount ns)", || {
            let mut cmd = run::cargo();
            cmd.args(["test", "-p", "svc-lb-tests"]);
            // CI mode: privileged tests must fail, never skip, when they cannot run; and
            // tests/tests/fresh_machine.rs checks that they run in the namespace below.
            cmd.env("SVC_LB_CI", "1");
            // The host's side of the check: this process stays in the host's namespace.
            cmd.env("SVC_LB_HOST_PID", std::process::id().to_string());
            in_fresh_mount_ns(&mut cmd);
            // Pins of the tests now live in the namespace's own bpffs and vanish with it, so
            // reaping pins is moot for this run; this still reaps what older runs (or a
            // developer's `cargo test -p svc-lb-tests` on the host) left in the host's bpffs,
            // and network namespaces: `ip netns add` creates its /run/netns file on the shared
            // /run, only the bind mount that holds the namespace stays private.
            reap_stale();
            let res = run::run_with_limit("cargo test (program, e2e)", &mut cmd, Some(TEST_LIMIT));
            // A killed or crashed test binary cannot run its guards: remove what it left (its
            // pins went with the mount namespace).
            reap_stale();
            match res? {
                st if st.success() => Ok(()),
                st => bail!("cargo test (program, e2e) failed ({st})"),
            }
        });
    } else {
        steps.skip(
            "cargo test (unit; no capabilities, no bpffs)",
            "build failed",
        );
        steps.skip(
            "cargo test (program, e2e; root, private mount ns)",
            "build failed",
        );
    }
    steps.summary(started);
    if steps.failed() {
        bail!("some steps failed");
    }
    println!("all steps passed");
    Ok(())
}

/// Makes `cmd` start in a new mount namespace of its own, private (nothing mounted there reaches
/// the host and the other way round), in which /sys/fs/bpf is not mounted: the state of a fresh
/// machine, whatever a developer's machine has mounted. Everything a test needs (bpffs, its pin
/// directory) it must set up itself; a missing step fails here instead of passing on a machine
/// where something mounted bpffs earlier. The cgroup mounts stay as the host has them, so the
/// agent's cgroup2 discovery runs against the host's real layout. Needs root (CAP_SYS_ADMIN).
fn in_fresh_mount_ns(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only makes system calls (no
    // allocation, no locks): unshare(2), mount(2), umount2(2).
    unsafe {
        cmd.pre_exec(enter_fresh_mount_ns);
    }
}

fn enter_fresh_mount_ns() -> io::Result<()> {
    // SAFETY: plain system calls with NUL-terminated static strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = libc::MS_REC | libc::MS_PRIVATE;
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // bpffs may be stacked several times; EINVAL = nothing (more) is mounted there.
        for _ in 0..64 {
            if libc::umount2(BPFFS.as_ptr(), libc::MNT_DETACH) != 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EINVAL | libc::ENOENT) => Ok(()),
                    _ => Err(e),
                };
            }
        }
    }
    Err(io::Error::other(
        "/sys/fs/bpf: still mounted after 64 unmounts",
    ))
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
