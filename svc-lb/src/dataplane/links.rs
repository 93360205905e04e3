//! Pinned TCX links: one per interface at `<pin_dir>/links/<iface>-tc-ingress`. A pinned link
//! keeps the program attached after the agent exits (even kill -9); removing the pin (with no
//! other fd open) detaches it.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
    },
    sys::SyscallError,
};
use tracing::{info, warn};

use super::{DataplaneError, sys};

const SUFFIX: &str = "-tc-ingress";

pub fn link_pin_path(links_dir: &Path, iface: &str) -> PathBuf {
    links_dir.join(format!("{iface}{SUFFIX}"))
}

/// Attaches `prog` at TC ingress of `iface` with a pinned link. If a previous agent left a
/// pinned link there, the program is swapped inside that link atomically (BPF_LINK_UPDATE), so
/// no packet goes unprocessed; if that link is unusable (e.g. its interface was recreated), a
/// new link is attached first and only then the old pin is removed.
pub fn attach_pinned(
    prog: &mut SchedClassifier,
    iface: &str,
    links_dir: &Path,
) -> Result<(), DataplaneError> {
    let pin = link_pin_path(links_dir, iface);
    match PinnedLink::from_pin(&pin) {
        Ok(old) => match replace_in_link(prog, old) {
            Ok(()) => {
                info!(iface, pin = %pin.display(), "replaced program in existing pinned TC link");
                return Ok(());
            }
            Err(e) => {
                warn!(iface, error = %e, "previous pinned TC link unusable, attaching a new one")
            }
        },
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(iface, error = %e, "cannot open previous pinned TC link, attaching a new one")
        }
    }

    let id = prog
        .attach(iface, TcAttachType::Ingress)
        .map_err(|source| DataplaneError::Attach {
            iface: iface.to_string(),
            source,
        })?;
    let link = prog
        .take_link(id)
        .map_err(|source| DataplaneError::Attach {
            iface: iface.to_string(),
            source,
        })?;
    let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
        iface: iface.to_string(),
        source,
    })?;
    // The new link is attached (held by our fd) before the old pin goes away: no gap.
    remove_pin(&pin)?;
    // Dropping the returned PinnedLink only closes our fd; the pin keeps the link attached.
    fd_link
        .pin(&pin)
        .map_err(|source| DataplaneError::PinLink {
            path: pin.clone(),
            source,
        })?;
    info!(iface, pin = %pin.display(), "attached svc_lb_tc_ingress at TC ingress (TCX, pinned)");
    Ok(())
}

fn replace_in_link(prog: &mut SchedClassifier, old: PinnedLink) -> Result<(), String> {
    let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| e.to_string())?;
    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
    // The pin still refers to the same kernel link, now running the new program; forget our
    // copy so dropping the program does not detach it.
    let link = prog.take_link(id).map_err(|e| e.to_string())?;
    drop(FdLink::try_from(link).map_err(|e| e.to_string())?);
    Ok(())
}

/// Detaches the link pinned at `pin` (if any) and removes the pin. Only removing the pin would
/// detach too, but asynchronously (the kernel frees bpffs inodes after an RCU grace period), so
/// the program could still run for a moment after uninstall returned.
pub fn remove_pin(pin: &Path) -> Result<(), DataplaneError> {
    if let Err(e) = sys::detach_pinned_link(pin) {
        warn!(pin = %pin.display(), error = %e, "could not detach pinned link explicitly; removing the pin detaches it");
    }
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Remove {
            path: pin.to_path_buf(),
            source,
        }),
    }
}

/// Detaches and removes the TC link pinned for `iface` (no pin is not an error).
pub fn remove_link(links_dir: &Path, iface: &str) -> Result<(), DataplaneError> {
    remove_pin(&link_pin_path(links_dir, iface))
}

/// Removes (and thereby detaches) pinned TC links of interfaces not in `keep`. Other pins in the
/// directory (the socket-LB cgroup links) are left alone.
pub fn remove_stale(links_dir: &Path, keep: &[String]) -> Result<(), DataplaneError> {
    remove_matching(links_dir, keep, false)
}

/// Detaches and removes every pinned link under `links_dir` (uninstall).
pub fn remove_all(links_dir: &Path) -> Result<(), DataplaneError> {
    remove_matching(links_dir, &[], true)
}

/// The pins in `links_dir` as (file name, path); a missing directory has none.
pub(crate) fn pins(links_dir: &Path) -> Result<Vec<(String, PathBuf)>, DataplaneError> {
    let read_err = |source| DataplaneError::ReadDir {
        path: links_dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(links_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(read_err(source)),
    };
    entries
        .map(|entry| {
            let entry = entry.map_err(read_err)?;
            Ok((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            ))
        })
        .collect()
}

fn remove_matching(links_dir: &Path, keep: &[String], all: bool) -> Result<(), DataplaneError> {
    for (name, path) in pins(links_dir)? {
        let Some(iface) = name.strip_suffix(SUFFIX) else {
            if all {
                remove_pin(&path)?;
                info!(pin = %name, "detached pinned link");
            }
            continue;
        };
        if keep.iter().any(|k| k == iface) {
            continue;
        }
        remove_pin(&path)?;
        info!(iface, "detached pinned TC link");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_to_iface() {
        let p = link_pin_path(Path::new("/sys/fs/bpf/x/links"), "n-p1");
        assert_eq!(p, PathBuf::from("/sys/fs/bpf/x/links/n-p1-tc-ingress"));
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name.strip_suffix(SUFFIX), Some("n-p1"));
    }

    #[test]
    fn remove_stale_on_missing_dir_is_ok() {
        remove_stale(Path::new("/proc/self/no-such-links-dir"), &[]).unwrap();
    }
}
