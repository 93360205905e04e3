//! Socket LB: the cgroup v2 `connect4`/`sendmsg4`/`recvmsg4`/`getpeername4` programs that
//! balance connections made by processes of the node itself (which TC ingress never sees).
//!
//! They attach to one cgroup (default the root of the node's cgroup v2 hierarchy, i.e. every
//! process of the node; see [`super::cgroup`] for how it is found) through pinned links `<pin_dir>/links/sock-<hook>`, so they keep working when the agent
//! exits; a restarted agent attaches its programs first and then drops its predecessor's links
//! (for a moment both run; the second finds a backend address, not a frontend, and does
//! nothing). `--no-socket-lb` and `svc-lb uninstall` detach them.

use std::{
    fs::File,
    os::fd::AsFd as _,
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

pub fn link_pin_path(links_dir: &Path, hook: &str) -> PathBuf {
    links_dir.join(format!("{PIN_PREFIX}{hook}"))
}

/// Whether `name` is the pin name of a socket-LB link.
pub fn is_pin_name(name: &str) -> bool {
    name.strip_prefix(PIN_PREFIX)
        .is_some_and(|hook| SOCK_PROGS.iter().any(|(_, h)| *h == hook))
}

/// Loads the socket-LB programs and attaches them to `cgroup` (resolved by
/// [`super::cgroup::resolve`]) with pinned links, replacing links a previous agent pinned
/// (possibly on another cgroup).
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, links_dir: &Path) -> Result<(), DataplaneError> {
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
}
