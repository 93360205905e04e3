//! Makes sure the pin directory lives on a bpf filesystem, mounting /sys/fs/bpf if needed.

use std::{
    ffi::CString,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use tracing::info;

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
    mount_bpffs(root)
}

/// Mounts bpffs on `root`. Several agents (or test processes) may start at once; two mounts
/// would stack and hide the first one's pins, so the check-and-mount runs under an exclusive
/// flock on the mount point directory (a process arriving after the mount locks the new bpffs
/// root instead and then sees it mounted).
fn mount_bpffs(root: &Path) -> Result<(), DataplaneError> {
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
        return Ok(());
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
    Ok(())
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
    fn pin_dir_outside_sys_fs_bpf_needs_bpffs() {
        let err = ensure_bpffs(Path::new("/proc/svc-lb-pins")).unwrap_err();
        assert!(matches!(err, DataplaneError::NotBpffs { .. }), "{err}");
    }
}
