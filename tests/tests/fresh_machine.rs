//! The privileged tests set up what they need themselves. `cargo xtask test` (CI) runs them in
//! a private mount namespace where /sys/fs/bpf starts unmounted, like on a fresh machine; this
//! checks that it really does, so a developer machine's leftovers (a bpffs someone mounted
//! earlier, stale pins) cannot hide a missing setup step again. Needs root; fails, never skips.

use std::{fs, path::Path};

/// `(mount point, fs type, super block major:minor)` of every mount in `mountinfo`.
fn mounts(mountinfo: &str) -> Vec<(String, String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                f.get(4)?.to_string(),
                f.get(sep + 1)?.to_string(),
                f.get(2)?.to_string(),
            ))
        })
        .collect()
}

/// The super blocks of the bpffs mounts on /sys/fs/bpf in `mountinfo`.
fn bpffs_devs(mountinfo: &str) -> Vec<String> {
    mounts(mountinfo)
        .into_iter()
        .filter(|(at, fs, _)| at == "/sys/fs/bpf" && fs == "bpf")
        .map(|(_, _, dev)| dev)
        .collect()
}

/// The mount namespace of process `pid` (`mnt:[inode]`).
fn mnt_ns(pid: &str) -> std::path::PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/ns/mnt: {e}"))
}

#[test]
fn the_harness_mounts_bpffs_itself_in_a_private_mount_namespace_under_ci() {
    svc_lb_tests::require_root();
    svc_lb_tests::ensure_bpffs();
    let ours = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let devs = bpffs_devs(&ours);
    assert!(
        !devs.is_empty(),
        "ensure_bpffs left no bpffs on /sys/fs/bpf:\n{ours}"
    );
    // A pin directory of the tests' kind can be made and is on that bpffs.
    let pins = svc_lb_tests::prog::PinDir::new("fresh");
    assert!(pins.0.starts_with("/sys/fs/bpf") && pins.0.is_dir());

    if std::env::var_os("SVC_LB_CI").is_none() {
        // Run by hand (`cargo test -p svc-lb-tests`): the host's namespace, checked above.
        return;
    }
    // Under `cargo xtask test`, which stays in the host's mount namespace and says its pid (pid
    // 1's namespace is not always readable, and in a container it is not the host's anyway).
    let host_pid = std::env::var("SVC_LB_HOST_PID")
        .expect("SVC_LB_CI is set but SVC_LB_HOST_PID is not: run the tests with cargo xtask test");
    // Not the host's mount namespace ...
    assert_ne!(
        mnt_ns("self"),
        mnt_ns(&host_pid),
        "the tests run in the host's mount namespace: cargo xtask test must run them in a \
         private one (xtask/src/test.rs)"
    );
    // ... and none of the host's bpffs instances is visible here: it was unmounted before the
    // tests started, and the one here was mounted by the harness (a bpffs mount is a new
    // instance with its own super block, so an inherited one would show the host's device).
    let host = fs::read_to_string(format!("/proc/{host_pid}/mountinfo"))
        .unwrap_or_else(|e| panic!("read /proc/{host_pid}/mountinfo: {e}"));
    for dev in bpffs_devs(&host) {
        assert!(
            !devs.contains(&dev),
            "the host's bpffs ({dev}) is still mounted on /sys/fs/bpf in the tests' namespace"
        );
    }
    // The cgroup mounts are the host's, so the agent's cgroup2 discovery sees the real layout.
    let cgroup = |m: &str| -> Vec<(String, String)> {
        mounts(m)
            .into_iter()
            .filter(|(at, fs, _)| fs.starts_with("cgroup") && Path::new(at).starts_with("/sys"))
            .map(|(at, fs, _)| (at, fs))
            .collect()
    };
    assert_eq!(
        cgroup(&ours),
        cgroup(&host),
        "cgroup mounts differ from the host's"
    );
}
