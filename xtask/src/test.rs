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

const UNIT_STEP: &str = "cargo test (unit; no capabilities, no bpffs)";
const PRIVILEGED_STEP: &str = "cargo test (program, e2e; root, private mount ns)";

/// `cargo test` selections of the unit tests: nothing in them may need root, BPF, bpffs or a
/// namespace (those belong in `svc-lb-tests`, or below).
const UNIT_TESTS: &[&[&str]] = &[
    &["-p", "svc-lb-common", "-p", "svc-lb", "-p", "xtask"],
    &["-p", "svc-lb-bench", "--lib", "--bins"],
];

/// `cargo test` selections of the privileged tests, run as root in the private mount namespace.
const PRIVILEGED_TESTS: &[&[&str]] = &[
    &["-p", "svc-lb-tests"],
    // Loads the generated kube-proxy rules with the real tools in a network namespace; svc-lb
    // finds them as kube-proxy's leftovers.
    &[
        "-p",
        "svc-lb-bench",
        "--test",
        "rules_load",
        "--test",
        "kube_proxy_leftovers",
    ],
];

/// Where bpffs is mounted on a node (and where the tests and the agent mount it when missing).
const BPFFS: &CStr = c"/sys/fs/bpf";

/// Running one selection of tests (built already) takes a few minutes at most; this only
/// catches a hang.
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
    let mut steps = Steps::new(9);
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
    let _ = steps.step(
        "cargo clippy svc-lb-ebpf (BPF target) -D warnings",
        setup::ebpf_clippy,
    );
    let built = steps.step("cargo build --bins (svc-lb, svc-lb-echo)", || {
        run::run_ok(
            "cargo build",
            run::cargo().args(["build", "-p", "svc-lb", "-p", "svc-lb-tests", "--bins"]),
        )
    });
    if built.is_ok() {
        let _ = steps.step(UNIT_STEP, || {
            run_tests("unit", UNIT_TESTS, |cargo_test| {
                // Root without any capability (an empty bounding set takes root's implicit
                // ones away at exec): a unit test that needs root, BPF or a mount fails here
                // instead of passing only where CI happens to be root.
                let mut cmd = Command::new("setpriv");
                cmd.args([
                    "--bounding-set=-all",
                    "--inh-caps=-all",
                    "--no-new-privs",
                    "--",
                ]);
                cmd.arg(cargo_test.get_program())
                    .args(cargo_test.get_args());
                cmd
            })
        });
        let _ = steps.step(PRIVILEGED_STEP, || {
            // Pins of the tests live in the namespace's own bpffs and vanish with it, so
            // reaping pins is moot for this run; this still reaps what older runs (or a
            // developer's `cargo test -p svc-lb-tests` on the host) left in the host's bpffs,
            // and network namespaces: `ip netns add` creates its /run/netns file on the shared
            // /run, only the bind mount that holds the namespace stays private.
            reap_stale();
            let res = run_tests("privileged", PRIVILEGED_TESTS, |mut cmd| {
                // CI mode: privileged tests must fail, never skip, when they cannot run; and
                // tests/tests/fresh_machine.rs checks that they run in a private namespace.
                cmd.env("SVC_LB_CI", "1");
                // The host's side of that check: this process stays in the host's namespace.
                cmd.env("SVC_LB_HOST_PID", std::process::id().to_string());
                cmd
            });
            // A killed or crashed test binary cannot run its guards: remove what it left (its
            // pins went with the mount namespace).
            reap_stale();
            res
        });
    } else {
        steps.skip(UNIT_STEP, "build failed");
        steps.skip(PRIVILEGED_STEP, "build failed");
    }
    steps.summary(started);
    if steps.failed() {
        bail!("some steps failed");
    }
    println!("all steps passed");
    Ok(())
}

/// Builds, then runs, each selection of `sets` (`cargo test <set>`, wrapped by `wrap`) in a
/// fresh private mount namespace ([`in_fresh_mount_ns`]). Only the run has [`TEST_LIMIT`]: on a
/// busy machine compiling alone can take longer. Every set runs even after a failure.
fn run_tests(what: &str, sets: &[&[&str]], wrap: impl Fn(Command) -> Command) -> Result<()> {
    let mut failed = Vec::new();
    for set in sets {
        let mut build = run::cargo();
        build.args(["test", "--no-run"]).args(*set);
        if let Err(e) = run::run_ok("cargo test --no-run", &mut build) {
            failed.push(format!("{}: {e:#}", set.join(" ")));
            continue;
        }
        let mut test = run::cargo();
        test.arg("test").args(*set);
        let mut cmd = wrap(test);
        in_fresh_mount_ns(&mut cmd);
        let label = format!("cargo test {}", set.join(" "));
        match run::run_with_limit(&label, &mut cmd, Some(TEST_LIMIT)) {
            Ok(st) if st.success() => {}
            Ok(st) => failed.push(format!("{} ({st})", set.join(" "))),
            Err(e) => failed.push(format!("{}: {e:#}", set.join(" "))),
        }
        run::check_interrupted()?;
    }
    if !failed.is_empty() {
        bail!("{what} tests failed: {}", failed.join("; "));
    }
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
