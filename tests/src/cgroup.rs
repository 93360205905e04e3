//! Test cgroups: the socket LB attaches to a cgroup and balances every process below it,
//! whatever its network namespace, so tests give the agent a child cgroup of their own (never
//! the machine's root: that would balance every process of the machine, other tests included).

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use svc_lb::dataplane::cgroup::{MountInfo, find_cgroup2, parse_mountinfo};

use crate::{bin_path, netns::Netns};

/// This process's mounts (/proc/self/mountinfo).
pub fn mounts() -> Vec<MountInfo> {
    parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo"))
}

/// The cgroup v2 mount the agent finds when given no `--cgroup-path` (the same discovery).
pub fn cgroup2_mount() -> MountInfo {
    find_cgroup2(&mounts())
        .cloned()
        .expect("no cgroup v2 mounted: the socket LB needs one")
}

/// A cgroup v2 directory for one test; removed on drop (its processes are killed first).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// A child of the node's cgroup v2 root (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
    /// a hybrid layout), named after the test's prefix.
    pub fn new(prefix: &str) -> TestCgroup {
        let path = cgroup2_mount()
            .mount_point
            .join(format!("svc-lb-test-{prefix}"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// Makes `cmd` move itself into this cgroup between fork and exec (so everything it does,
    /// from its first instruction, is in it). `cgroup.procs` stays open as long as `cmd`.
    pub fn join(&self, cmd: &mut Command) {
        let procs = File::options()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        // SAFETY: only write(2) between fork and exec ("0" = the writing process itself).
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `svc-lb-sockclient <args>` inside this cgroup (`in_cgroup`) and `ns`.
    pub fn client(&self, ns: &Netns, in_cgroup: bool, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin_path("svc-lb-sockclient", "SVC_LB_SOCKCLIENT_BIN"));
        cmd.args(args);
        if in_cgroup {
            self.join(&mut cmd);
        }
        ns.enter(&mut cmd);
        cmd.output().expect("run svc-lb-sockclient")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("warning: could not remove {}: {e}", self.path.display());
                    return;
                }
                // Busy: a client is still in it (a failed test); kill what is left.
                Err(_) => {
                    let _ = fs::write(self.path.join("cgroup.kill"), "1");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Hooks of the programs attached to `cgroup`, sorted (from `bpftool cgroup show`).
pub fn attached_progs(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("run bpftool (apt-get install bpftool)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "ID  AttachType  AttachFlags  Name"
            f.get(1)
                .filter(|_| f[0].parse::<u32>().is_ok())
                // bpftool versions spell them differently (connect4, cgroup_inet4_connect, ...).
                .map(|s| {
                    ["connect4", "sendmsg4", "recvmsg4", "getpeername4"]
                        .into_iter()
                        .find(|h| s.contains(h.trim_end_matches('4')))
                        .map_or_else(|| s.to_string(), String::from)
                })
        })
        .collect();
    v.sort();
    v
}

fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// What a child process does to its mount namespace between fork and exec (see
/// [`crate::agent::AgentProcess::start_in`]): always a new, private mount namespace.
pub enum MountSetup {
    /// `cgroup` bind-mounted over `at` (the node's cgroup v2 mount point): the agent's
    /// cgroup2 discovery finds `at`, which is the test's child cgroup.
    BindOver { cgroup: PathBuf, at: PathBuf },
    /// The process moves into `cgroup`, unshares its cgroup namespace (so `cgroup` is the root
    /// of any cgroup v2 it mounts) and unmounts every cgroup v2: a node with cgroup v1 only.
    NoCgroup2 { cgroup: PathBuf },
}

impl MountSetup {
    /// Registers the setup as a `pre_exec` step of `cmd` (after the ones already registered).
    pub fn apply(&self, cmd: &mut Command) {
        let (procs, bind, unmount) = match self {
            MountSetup::BindOver { cgroup, at } => {
                (None, Some((cstring(cgroup), cstring(at))), vec![])
            }
            MountSetup::NoCgroup2 { cgroup } => {
                let procs = File::options()
                    .write(true)
                    .open(cgroup.join("cgroup.procs"))
                    .expect("open cgroup.procs");
                let v2: Vec<CString> = mounts()
                    .iter()
                    .filter(|m| m.fs_type == "cgroup2")
                    .map(|m| cstring(&m.mount_point))
                    .collect();
                (Some(procs), None, v2)
            }
        };
        // SAFETY: between fork and exec only system calls on memory prepared before the fork
        // (no allocation): write(2), unshare(2), mount(2), umount2(2).
        unsafe {
            cmd.pre_exec(move || {
                let check = |ret: libc::c_int| {
                    if ret != 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                let mut flags = libc::CLONE_NEWNS;
                if let Some(procs) = &procs {
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    flags |= libc::CLONE_NEWCGROUP;
                }
                check(libc::unshare(flags))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                if let Some((from, to)) = &bind {
                    check(libc::mount(
                        from.as_ptr(),
                        to.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                for at in &unmount {
                    // EINVAL: already gone with a mount above it.
                    if libc::umount2(at.as_ptr(), libc::MNT_DETACH) != 0
                        && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}
