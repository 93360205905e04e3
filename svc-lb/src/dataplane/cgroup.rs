//! Which cgroup v2 directory the socket LB attaches to.
//!
//! With `--cgroup-path` the user chose: it must be cgroup v2, or the agent refuses to start
//! naming it (never silently another directory). Without it the agent finds the node's cgroup v2
//! mount in /proc/self/mountinfo: `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on
//! a hybrid one (systemd's layout: cgroup v1 controllers on a tmpfs at /sys/fs/cgroup), any
//! other cgroup v2 mount of the whole hierarchy otherwise. With none at all (cgroup v1 only) it
//! mounts cgroup v2 itself on [`OWN_MOUNT`], as Cilium does on `/run/cilium/cgroupv2`, marking
//! the mount with the source [`OWN_SOURCE`] so that `svc-lb uninstall` unmounts that one and
//! nothing else. The choice is logged.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use tracing::info;

use super::DataplaneError;

/// Where svc-lb mounts cgroup v2 when the node has it mounted nowhere.
pub const OWN_MOUNT: &str = "/run/svc-lb/cgroupv2";
/// The mount source svc-lb gives its own cgroup v2 mount (shown in /proc/self/mountinfo): the
/// record that svc-lb mounted it, which lives and dies with the mount itself.
pub const OWN_SOURCE: &str = "svc-lb";
/// Where cgroup v2 is mounted on a unified host, and on a hybrid one (in this order).
const WELL_KNOWN: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// What `svc-lb run` was asked for: `--cgroup-path`, or nothing (find or mount cgroup v2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupChoice<'a> {
    Discover,
    Given(&'a Path),
}

/// How the socket LB's cgroup was chosen (logged, and tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupOrigin {
    /// `--cgroup-path`.
    Given,
    /// A cgroup v2 mount found in /proc/self/mountinfo.
    Found,
    /// Mounted by this agent on [`OWN_MOUNT`].
    Mounted,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLbCgroup {
    pub path: PathBuf,
    pub origin: CgroupOrigin,
}

/// One line of /proc/self/mountinfo (the fields svc-lb needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// The directory of the filesystem that is mounted (for cgroup: the cgroup, relative to
    /// the reader's cgroup namespace root; `/` = the whole hierarchy).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// mountinfo escapes space, tab, newline and backslash in paths as `\ooo` octal.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo (proc(5)): `id parent major:minor root mount-point options
/// [optional fields...] - fstype source super-options`. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().skip(6).position(|x| *x == "-")? + 6;
            Some(MountInfo {
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fs_type: (*f.get(sep + 1)?).to_owned(),
                source: unescape(f.get(sep + 2)?),
            })
        })
        .collect()
}

/// The mounts a path lookup reaches: of several mounts stacked on one mount point only the
/// last (top) one is visible.
fn visible(mounts: &[MountInfo]) -> Vec<&MountInfo> {
    mounts
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            !mounts[i + 1..]
                .iter()
                .any(|later| later.mount_point == m.mount_point)
        })
        .map(|(_, m)| m)
        .collect()
}

/// How high up the hierarchy a cgroup v2 mount's root is, higher first: above this process's
/// cgroup namespace root (`/..`, `/../..`: in a container, the host's hierarchy mounted from
/// the host), then the namespace root itself (`/`: on a node, the whole hierarchy), then a
/// subtree.
fn height(root: &str) -> i32 {
    if root == "/" {
        return 0;
    }
    let ups = root.split('/').skip(1).take_while(|c| *c == "..").count();
    if ups > 0 {
        i32::try_from(ups).unwrap_or(i32::MAX)
    } else {
        -1
    }
}

/// The cgroup v2 mount the socket LB uses when none is given: the one highest up the hierarchy
/// (so in a container the host's hierarchy mounted into it beats the container's own cgroup
/// namespace), and among equals a well-known mount point first, then svc-lb's own, then the
/// first other one. A subtree is only taken at a well-known mount point (bind-mounted there on
/// purpose, as the tests do); elsewhere it is someone else's business.
pub fn find_cgroup2(mounts: &[MountInfo]) -> Option<&MountInfo> {
    let place = |m: &MountInfo| {
        WELL_KNOWN
            .iter()
            .chain(&[OWN_MOUNT])
            .position(|p| m.mount_point == Path::new(p))
    };
    visible(mounts)
        .into_iter()
        .filter(|m| m.fs_type == "cgroup2" && (height(&m.root) >= 0 || place(m).is_some()))
        .enumerate()
        // Highest first; then known places in their order; then mountinfo order.
        .min_by_key(|(i, m)| (-height(&m.root), place(m).unwrap_or(usize::MAX), *i))
        .map(|(_, m)| m)
}

/// svc-lb's own cgroup v2 mount, if it is the visible mount on [`OWN_MOUNT`].
pub fn own_mount(mounts: &[MountInfo]) -> Option<&MountInfo> {
    visible(mounts).into_iter().find(|m| {
        m.mount_point == Path::new(OWN_MOUNT) && m.fs_type == "cgroup2" && m.source == OWN_SOURCE
    })
}

fn read_mountinfo() -> Result<Vec<MountInfo>, DataplaneError> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(|e| DataplaneError::Cgroup {
            path: PathBuf::from("/proc/self/mountinfo"),
            reason: e.to_string(),
        })
}

pub fn is_cgroup2(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not on every target
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

/// Checks that `path` (`--cgroup-path`) is a cgroup v2 directory, naming it and the cgroup v2
/// mounts that exist when it is not.
pub fn check_given(path: &Path) -> Result<(), DataplaneError> {
    let err = |reason: String| DataplaneError::Cgroup {
        path: path.to_path_buf(),
        reason,
    };
    if is_cgroup2(path).map_err(|e| err(format!("--cgroup-path: {e}")))? {
        return Ok(());
    }
    let unified = path.join("unified");
    if is_cgroup2(&unified).unwrap_or(false) {
        return Err(err(format!(
            "--cgroup-path is not cgroup v2: it holds a hybrid layout (cgroup v1 controllers) \
             whose cgroup v2 hierarchy is {}; pass that, or leave --cgroup-path out to find \
             it",
            unified.display()
        )));
    }
    let mounts: Vec<String> = read_mountinfo()
        .unwrap_or_default()
        .iter()
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point.display().to_string())
        .collect();
    Err(err(if mounts.is_empty() {
        "--cgroup-path is not cgroup v2 and no cgroup v2 is mounted (leave --cgroup-path out \
         and svc-lb mounts one on /run/svc-lb/cgroupv2, or pass --no-socket-lb)"
            .into()
    } else {
        format!(
            "--cgroup-path is not cgroup v2 (cgroup v2 is mounted on {}; pass one of those or a \
             directory below it, leave --cgroup-path out to find it, or pass --no-socket-lb)",
            mounts.join(", ")
        )
    }))
}

/// The cgroup the socket LB attaches to, checked, found or mounted before anything is
/// attached (a wrong `--cgroup-path` leaves the node untouched). Logs which one and why.
pub fn resolve(choice: CgroupChoice<'_>) -> Result<SocketLbCgroup, DataplaneError> {
    let chosen = match choice {
        CgroupChoice::Given(path) => {
            check_given(path)?;
            SocketLbCgroup {
                path: path.to_path_buf(),
                origin: CgroupOrigin::Given,
            }
        }
        CgroupChoice::Discover => match find_cgroup2(&read_mountinfo()?) {
            Some(m) => {
                info!(
                    cgroup = %m.mount_point.display(),
                    root = %m.root,
                    "socket LB cgroup: the cgroup v2 mount found in /proc/self/mountinfo \
                     (--cgroup-path overrides)"
                );
                SocketLbCgroup {
                    path: m.mount_point.clone(),
                    origin: CgroupOrigin::Found,
                }
            }
            None => {
                mount_own()?;
                info!(
                    cgroup = OWN_MOUNT,
                    "socket LB cgroup: no cgroup v2 was mounted on this node, svc-lb mounted it \
                     (`svc-lb uninstall` unmounts it)"
                );
                SocketLbCgroup {
                    path: PathBuf::from(OWN_MOUNT),
                    origin: CgroupOrigin::Mounted,
                }
            }
        },
    };
    if chosen.origin == CgroupOrigin::Given {
        info!(cgroup = %chosen.path.display(), "socket LB cgroup: --cgroup-path");
    }
    Ok(chosen)
}

/// Mounts cgroup v2 on [`OWN_MOUNT`] with source [`OWN_SOURCE`], under an exclusive flock on
/// the directory so two agents starting at once do not stack two mounts.
fn mount_own() -> Result<(), DataplaneError> {
    let root = Path::new(OWN_MOUNT);
    let mount_err = |source| DataplaneError::Mount {
        path: root.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(root).map_err(mount_err)?;
    let dir = File::open(root).map_err(mount_err)?;
    // SAFETY: valid fd owned by `dir`; the lock is released when `dir` is closed.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    if is_cgroup2(root).unwrap_or(false) {
        return Ok(());
    }
    let target = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| mount_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let source = CString::new(OWN_SOURCE).expect("no NUL");
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    Ok(())
}

/// `svc-lb uninstall`: unmounts the cgroup v2 mount svc-lb made on [`OWN_MOUNT`] (recognised by
/// its source), and nothing else; returns whether there was one. Other agents' socket-LB links
/// stay attached (a link holds its cgroup, not the mount); a restarted agent mounts it again.
pub fn unmount_own() -> Result<bool, DataplaneError> {
    let root = Path::new(OWN_MOUNT);
    let mut unmounted = false;
    // Stacked mounts (two agents racing past the lock on different namespaces' views): each.
    while own_mount(&read_mountinfo()?).is_some() {
        let target = CString::new(OWN_MOUNT).expect("no NUL");
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(DataplaneError::Mount {
                path: root.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        unmounted = true;
    }
    if unmounted {
        // Only if empty: the directory is svc-lb's, but never remove what is in it.
        let _ = std::fs::remove_dir(root);
        info!(cgroup = OWN_MOUNT, "unmounted the cgroup v2 svc-lb mounted");
    }
    Ok(unmounted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's layout (hybrid), trimmed.
    const HYBRID: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
25 23 0:24 / /sys/fs/cgroup rw,relatime shared:4 - tmpfs tmpfs rw,mode=755
26 25 0:25 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 25 0:34 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
51 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    fn at(mounts: &[MountInfo], p: &str) -> Vec<MountInfo> {
        mounts
            .iter()
            .filter(|m| m.mount_point == Path::new(p))
            .cloned()
            .collect()
    }

    #[test]
    fn mountinfo_fields_come_after_the_optional_ones() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 6);
        let tmpfs = &at(&m, "/sys/fs/cgroup")[0];
        // "shared:4" is an optional field: the fs type is after the "-".
        assert_eq!(
            (tmpfs.fs_type.as_str(), tmpfs.source.as_str()),
            ("tmpfs", "tmpfs")
        );
        let v2 = &at(&m, "/sys/fs/cgroup/unified")[0];
        assert_eq!((v2.fs_type.as_str(), v2.root.as_str()), ("cgroup2", "/"));
        assert!(parse_mountinfo("garbage\n\n1 2 3\n").is_empty());
    }

    #[test]
    fn escaped_paths_are_unescaped() {
        let m = parse_mountinfo("40 23 0:50 /a\\040b /mnt/my\\040cg rw - cgroup2 none rw\n");
        assert_eq!(m[0].mount_point, Path::new("/mnt/my cg"));
        assert_eq!(m[0].root, "/a b");
        assert_eq!(unescape("x\\134y\\01"), "x\\y\\01");
    }

    #[test]
    fn hybrid_layout_finds_unified() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(
            find_cgroup2(&m).unwrap().mount_point,
            Path::new("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn unified_layout_finds_sys_fs_cgroup() {
        let m = parse_mountinfo(
            "23 27 0:22 / /sys rw - sysfs sysfs rw\n\
             25 23 0:24 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        assert_eq!(
            find_cgroup2(&m).unwrap().mount_point,
            Path::new("/sys/fs/cgroup")
        );
    }

    #[test]
    fn only_the_top_of_stacked_mounts_counts() {
        // cgroup2 shadowed by a tmpfs mounted over it: not reachable there.
        let m = parse_mountinfo(
            "35 25 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
             60 35 0:60 / /sys/fs/cgroup/unified rw - tmpfs tmpfs rw\n",
        );
        assert_eq!(find_cgroup2(&m), None);
        // A subtree bind-mounted over the host's (a test's or a container's view): used.
        let m = parse_mountinfo(
            "35 25 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
             61 35 0:34 /slb7-1 /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(find_cgroup2(&m).unwrap().root, "/slb7-1");
    }

    #[test]
    fn elsewhere_only_the_whole_hierarchy_is_taken() {
        let m = parse_mountinfo(
            "70 23 0:34 /kubepods /var/lib/x rw - cgroup2 cgroup2 rw\n\
             71 23 0:34 / /mnt/cg2 rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(find_cgroup2(&m).unwrap().mount_point, Path::new("/mnt/cg2"));
        // svc-lb's own mount comes before other places.
        let m = parse_mountinfo(
            "71 23 0:34 / /mnt/cg2 rw - cgroup2 cgroup2 rw\n\
             72 23 0:34 / /run/svc-lb/cgroupv2 rw - cgroup2 svc-lb rw\n",
        );
        assert_eq!(find_cgroup2(&m).unwrap().mount_point, Path::new(OWN_MOUNT));
    }

    #[test]
    fn in_a_container_the_hosts_hierarchy_beats_its_own_cgroup_namespace() {
        // A pod with its own cgroup namespace and the host's /sys/fs/cgroup mounted in (the
        // DaemonSet): the host's shows as above the namespace root.
        let m = parse_mountinfo(
            "30 20 0:34 / /sys/fs/cgroup ro - cgroup2 cgroup rw\n\
             31 20 0:34 /../../.. /host/sys/fs/cgroup ro - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(
            find_cgroup2(&m).unwrap().mount_point,
            Path::new("/host/sys/fs/cgroup")
        );
        assert_eq!(
            (
                height("/"),
                height("/.."),
                height("/../../.."),
                height("/x")
            ),
            (0, 1, 3, -1)
        );
    }

    #[test]
    fn cgroup_v1_only_finds_nothing() {
        let m = parse_mountinfo(
            "25 23 0:24 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
             26 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
        );
        assert_eq!(find_cgroup2(&m), None);
    }

    #[test]
    fn uninstall_only_takes_svc_lbs_own_mount() {
        let ours = "72 23 0:34 / /run/svc-lb/cgroupv2 rw - cgroup2 svc-lb rw\n";
        assert!(own_mount(&parse_mountinfo(ours)).is_some());
        // The same place mounted by someone else (the DaemonSet's hostPath, an admin): not ours.
        for other in [
            "72 23 0:34 / /run/svc-lb/cgroupv2 rw - cgroup2 cgroup2 rw\n",
            "72 23 0:34 / /run/svc-lb/cgroupv2 rw - tmpfs svc-lb rw\n",
            "72 23 0:34 / /sys/fs/cgroup/unified rw - cgroup2 svc-lb rw\n",
        ] {
            assert!(own_mount(&parse_mountinfo(other)).is_none(), "{other}");
        }
        // Ours, covered by someone else's: unmounting would hit theirs.
        let covered = format!("{ours}73 72 0:35 / /run/svc-lb/cgroupv2 rw - cgroup2 none rw\n");
        assert!(own_mount(&parse_mountinfo(&covered)).is_none());
    }

    #[test]
    fn a_given_path_must_be_cgroup_v2_and_is_named() {
        let err = resolve(CgroupChoice::Given(Path::new("/proc")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/proc") && err.contains("--cgroup-path is not cgroup v2"),
            "{err}"
        );
        let err = resolve(CgroupChoice::Given(Path::new("/nonexistent-cgroup")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent-cgroup") && err.contains("No such file"),
            "{err}"
        );
    }
}
