//! Makes sure the pin directory lives on a bpf filesystem, mounting /sys/fs/bpf if needed.

use std::{
    ffi::CString,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::DataplaneError;

/// `statfs.f_type` of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Whether `path` (which must exist) is on bpffs.
pub fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let ret = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libc targets
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The deepest existing ancestor of `path` (itself included).
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if p.exists() {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return PathBuf::from("/"),
        }
    }
}

/// Ensures `pin_dir` will be created on bpffs. Pins only work on bpffs; /sys/fs/bpf is not
/// mounted by default on every host, so it is mounted when the pin dir is below it.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let anc = existing_ancestor(pin_dir);
    if is_bpffs(&anc).unwrap_or(false) {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if !pin_dir.starts_with(root) {
        return Err(DataplaneError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    if mount_bpffs(root)?
        && let Some(why) = private_mount_ns()
    {
        warn!(
            pin_dir = %pin_dir.display(),
            why,
            "svc-lb mounted bpffs inside a private mount namespace: its pins (maps, programs, \
             links) vanish when this process exits, so the datapath will NOT survive an agent \
             restart and Services stop working when the agent stops. To make pins outlive the \
             agent, mount bpffs on the host first (`mount -t bpf bpf /sys/fs/bpf`), or pass \
             --pin-dir on a bpffs the host mounted, or start svc-lb in the host's mount \
             namespace (`nsenter --mount=/proc/1/ns/mnt --net=/run/netns/NAME svc-lb run ...` \
             rather than `ip netns exec`, which remounts /sys privately)"
        );
    }
    Ok(())
}

/// Why a bpffs this process mounts would vanish with it, if it would: its mount namespace is
/// not the host's (pid 1's), or, where pid 1's cannot be read (some sandboxes and containers),
/// no other process shares it. The usual cases: `ip netns exec` (a mount namespace of its own
/// with /sys remounted) and a container without the host's /sys/fs/bpf.
fn private_mount_ns() -> Option<String> {
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    classify_mount_ns(&ours, std::fs::read_link("/proc/1/ns/mnt"), || {
        shared_with_another_process(&ours)
    })
}

fn classify_mount_ns(
    ours: &Path,
    pid1: std::io::Result<PathBuf>,
    shared: impl FnOnce() -> bool,
) -> Option<String> {
    match pid1 {
        Ok(host) if host == ours => None,
        Ok(host) => Some(format!(
            "this process's mount namespace {} is not the host's (pid 1: {})",
            ours.display(),
            host.display()
        )),
        Err(_) if shared() => None,
        Err(_) => Some(format!(
            "no other process shares this process's mount namespace {}",
            ours.display()
        )),
    }
}

/// Whether a process other than this one is in the mount namespace `ns`.
fn shared_with_another_process(ns: &Path) -> bool {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true; // cannot tell: do not cry wolf
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name != me.as_str()
            && name.bytes().all(|b| b.is_ascii_digit())
            && std::fs::read_link(e.path().join("ns/mnt")).is_ok_and(|other| other == ns)
    })
}

/// Mounts bpffs on `root`; `false` if another process mounted it meanwhile. Several agents (or test processes) may start at once; two mounts
/// would stack and hide the first one's pins, so the check-and-mount runs under an exclusive
/// flock on the mount point directory (a process arriving after the mount locks the new bpffs
/// root instead and then sees it mounted).
fn mount_bpffs(root: &Path) -> Result<bool, DataplaneError> {
    let mount_err = |source| DataplaneError::Mount {
        path: root.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(root).map_err(mount_err)?;
    let dir = std::fs::File::open(root).map_err(mount_err)?;
    // SAFETY: valid fd owned by `dir`; the lock is released when `dir` is closed.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(mount_err(std::io::Error::last_os_error()));
    }
    if is_bpffs(root).unwrap_or(false) {
        return Ok(false);
    }
    let target = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| mount_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(mount_err(std::io::Error::last_os_error()));
    }
    info!(path = %root.display(), "mounted bpffs");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_ancestor_walks_up() {
        assert_eq!(
            existing_ancestor(Path::new("/proc/self/does-not-exist/x")),
            PathBuf::from("/proc/self")
        );
        assert_eq!(existing_ancestor(Path::new("/")), PathBuf::from("/"));
    }

    #[test]
    fn procfs_is_not_bpffs() {
        assert!(!is_bpffs(Path::new("/proc")).unwrap());
        assert!(is_bpffs(Path::new("/does-not-exist-svc-lb")).is_err());
    }

    #[test]
    fn a_mount_namespace_other_than_the_hosts_is_private() {
        let ours = Path::new("mnt:[4026532900]");
        let host = || Ok(PathBuf::from("mnt:[4026531841]"));
        let unreadable = || Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        // pid 1's namespace decides when it can be read, whoever else shares ours.
        assert_eq!(
            classify_mount_ns(ours, Ok(ours.to_path_buf()), || false),
            None
        );
        let why = classify_mount_ns(ours, host(), || true).unwrap();
        assert!(
            why.contains("4026532900") && why.contains("4026531841"),
            "{why}"
        );
        // Otherwise: private when no other process is in it (`ip netns exec` execs the agent).
        assert_eq!(classify_mount_ns(ours, unreadable(), || true), None);
        let why = classify_mount_ns(ours, unreadable(), || false).unwrap();
        assert!(why.contains("no other process"), "{why}");
    }

    #[test]
    fn this_test_shares_its_mount_namespace() {
        // cargo (our parent) is in the same one.
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        assert!(shared_with_another_process(&ours));
        assert!(!shared_with_another_process(Path::new("mnt:[1]")));
    }

    #[test]
    fn pin_dir_outside_sys_fs_bpf_needs_bpffs() {
        let err = ensure_bpffs(Path::new("/proc/svc-lb-pins")).unwrap_err();
        assert!(matches!(err, DataplaneError::NotBpffs { .. }), "{err}");
    }
}
