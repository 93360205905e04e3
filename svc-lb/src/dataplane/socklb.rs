//! Socket LB: the cgroup v2 `connect4`/`sendmsg4`/`recvmsg4`/`getpeername4` programs that
//! balance connections made by processes of the node itself (which TC ingress never sees).
//!
//! They attach to one cgroup (default the root, `/sys/fs/cgroup`, i.e. every process of the
//! node) through pinned links `<pin_dir>/links/sock-<hook>`, so they keep working when the agent
//! exits; a restarted agent attaches its programs first and then drops its predecessor's links
//! (for a moment both run; the second finds a backend address, not a frontend, and does
//! nothing). `--no-socket-lb` and `svc-lb uninstall` detach them.

use std::{
    fs::File,
    io,
    os::{fd::AsFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use svc_lb_common::programs;
use tracing::info;

use super::{
    DataplaneError,
    links::{self, Takeover},
};

/// (program name in the object, hook name used in the pin name).
pub const SOCK_PROGS: [(&str, &str); 4] = [
    (programs::SOCK_CONNECT4_PROG, "connect4"),
    (programs::SOCK_SENDMSG4_PROG, "sendmsg4"),
    (programs::SOCK_RECVMSG4_PROG, "recvmsg4"),
    (programs::SOCK_GETPEERNAME4_PROG, "getpeername4"),
];

/// Pin names of socket-LB links start with this (TC link pins end in `-tc-ingress`).
const PIN_PREFIX: &str = "sock-";

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub fn link_pin_path(links_dir: &Path, hook: &str) -> PathBuf {
    links_dir.join(format!("{PIN_PREFIX}{hook}"))
}

/// Whether `name` is the pin name of a socket-LB link.
pub fn is_pin_name(name: &str) -> bool {
    name.strip_prefix(PIN_PREFIX)
        .is_some_and(|hook| SOCK_PROGS.iter().any(|(_, h)| *h == hook))
}

fn is_cgroup2(path: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
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

/// Mount points of cgroup v2 in `mounts` (the text of /proc/self/mounts).
fn cgroup2_mounts(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_string())
        })
        .collect()
}

/// The cgroup v2 directory the socket LB attaches to for `--cgroup-path` (checked before
/// anything is attached, so a wrong path leaves the node untouched). On a hybrid layout
/// (systemd's: tmpfs on /sys/fs/cgroup with v1 controllers and cgroup v2 on
/// `/sys/fs/cgroup/unified`), `<path>/unified` is used.
pub fn check_cgroup(path: &Path) -> Result<PathBuf, DataplaneError> {
    let err = |reason: String| DataplaneError::Cgroup {
        path: path.to_path_buf(),
        reason,
    };
    if is_cgroup2(path).map_err(|e| err(e.to_string()))? {
        return Ok(path.to_path_buf());
    }
    let unified = path.join("unified");
    if is_cgroup2(&unified).unwrap_or(false) {
        info!(
            cgroup = %unified.display(),
            "hybrid cgroup layout: the socket LB uses the cgroup v2 hierarchy under it"
        );
        return Ok(unified);
    }
    let mounts = cgroup2_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap_or_default());
    Err(err(if mounts.is_empty() {
        "not a cgroup v2 directory and no cgroup v2 is mounted (mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup`, or pass --no-socket-lb)"
            .into()
    } else {
        format!(
            "not a cgroup v2 directory (cgroup v2 is mounted on {}; pass one of those or a \
             directory below it, or --no-socket-lb)",
            mounts.join(", ")
        )
    }))
}

/// Loads the socket-LB programs and attaches them to `cgroup` with pinned links, replacing
/// links a previous agent pinned (possibly on another cgroup).
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, links_dir: &Path) -> Result<(), DataplaneError> {
    let cgroup = &check_cgroup(cgroup)?;
    let dir = File::open(cgroup).map_err(|e| DataplaneError::Cgroup {
        path: cgroup.to_path_buf(),
        reason: e.to_string(),
    })?;
    for (name, hook) in SOCK_PROGS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::ProgramNotFound(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                program: name,
                source,
            })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Program {
                program: name,
                source,
            })?;
        }
        let attach_err = |source| DataplaneError::AttachCgroup {
            program: name,
            path: cgroup.to_path_buf(),
            source,
        };
        let prog_fd = prog
            .fd()
            .and_then(|fd| Ok(fd.try_clone()?))
            .map_err(attach_err)?;
        // Ours runs before the predecessor's link is dropped: no connect goes unbalanced.
        links::replace_pinned(
            &link_pin_path(links_dir, hook),
            prog_fd.as_fd(),
            Takeover::AttachThenDetach,
            &format!("socket LB {hook}"),
            || {
                // Links are always "multi" on a cgroup; bpf_link_create takes no mode flags.
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                    iface: format!("cgroup {}", cgroup.display()),
                    source,
                })
            },
        )?;
    }
    info!(
        cgroup = %cgroup.display(),
        "socket LB attached (connect4, sendmsg4, recvmsg4, getpeername4; pinned): processes in \
         this cgroup reach Services without the packet path"
    );
    Ok(())
}

/// Detaches the socket-LB links, if a previous agent left any (`--no-socket-lb`).
pub fn detach(links_dir: &Path) -> Result<(), DataplaneError> {
    let mut removed = false;
    for (_, hook) in SOCK_PROGS {
        let pin = link_pin_path(links_dir, hook);
        if pin.exists() {
            links::remove_pin(&pin)?;
            removed = true;
        }
    }
    if removed {
        info!("socket LB detached (--no-socket-lb)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_do_not_look_like_tc_links() {
        let p = link_pin_path(Path::new("/sys/fs/bpf/x/links"), "connect4");
        assert_eq!(p, PathBuf::from("/sys/fs/bpf/x/links/sock-connect4"));
        assert!(!p.to_string_lossy().ends_with("-tc-ingress"));
    }

    #[test]
    fn cgroup2_mounts_are_found_in_mount_tables() {
        let t = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mounts(t), ["/sys/fs/cgroup/unified"]);
        assert!(cgroup2_mounts("proc /proc proc rw 0 0\n").is_empty());
    }

    #[test]
    fn cgroup_check_names_the_problem() {
        let err = check_cgroup(Path::new("/proc")).unwrap_err().to_string();
        assert!(
            err.contains("/proc") && err.contains("not a cgroup v2"),
            "{err}"
        );
        let err = check_cgroup(Path::new("/nonexistent-cgroup"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("No such file"), "{err}");
    }
}
