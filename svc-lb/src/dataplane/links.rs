//! Pinned TCX links: one per interface at `<pin_dir>/links/<iface>-tc-ingress`. A pinned link
//! keeps the program attached after the agent exits (even kill -9); removing the pin (with no
//! other fd open) detaches it.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::programs::{SchedClassifier, TcAttachType, links::FdLink};
use tracing::{info, warn};

use super::{DataplaneError, sys};

const SUFFIX: &str = "-tc-ingress";

pub fn link_pin_path(links_dir: &Path, iface: &str) -> PathBuf {
    links_dir.join(format!("{iface}{SUFFIX}"))
}

/// The interface of a TC link pin name (`None` for other pins).
pub fn pin_iface(name: &str) -> Option<&str> {
    name.strip_suffix(SUFFIX)
}

/// How [`replace_pinned`] takes over a link a previous agent pinned at the same path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// Swap the program inside the previous link (BPF_LINK_UPDATE, no gap); if that link is
    /// unusable (e.g. its interface was recreated), attach a new link first and only then remove
    /// the old pin. TC: two TCX links may coexist on an interface for that moment.
    SwapOrAttachThenDetach,
    /// Swap in place; if that fails, remove the old link before attaching the new one. XDP: the
    /// kernel refuses a second XDP link on an interface.
    SwapOrDetachThenAttach,
    /// Never in place: attach the new link, then remove the old one. Socket LB: the previous
    /// link may be attached to another cgroup, which an update cannot change (for a moment both
    /// run; the second sees a backend address, not a frontend, and does nothing).
    AttachThenDetach,
}

/// What [`replace_pinned`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Installed {
    /// The program now runs inside the link that was already pinned.
    Updated,
    /// A new link was attached and pinned.
    Attached,
}

/// The one way every pinned link (TC, XDP, socket LB) is installed: makes the link pinned at
/// `pin` run `prog`, taking over a link a previous agent left there as `how` says; `attach`
/// creates a new link when one is needed. `what` names the attachment in warnings.
///
/// A pinned link keeps its program attached after the agent exits (even kill -9); the pin is
/// the only reference once our fd is closed.
pub(crate) fn replace_pinned(
    pin: &Path,
    prog: BorrowedFd<'_>,
    how: Takeover,
    what: &str,
    attach: impl FnOnce() -> Result<FdLink, DataplaneError>,
) -> Result<Installed, DataplaneError> {
    if how != Takeover::AttachThenDetach {
        match sys::update_pinned_link(pin, prog) {
            Ok(()) => return Ok(Installed::Updated),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(pin = %pin.display(), error = %e, "previous pinned link of {what} unusable, attaching a new one");
                if how == Takeover::SwapOrDetachThenAttach {
                    remove_pin(pin)?;
                }
            }
        }
    }
    let fd_link = attach()?;
    // The new link is attached (held by our fd) before the old pin goes away: no gap.
    remove_pin(pin)?;
    // Dropping the returned PinnedLink only closes our fd; the pin keeps the link attached.
    fd_link.pin(pin).map_err(|source| DataplaneError::PinLink {
        path: pin.to_path_buf(),
        source,
    })?;
    Ok(Installed::Attached)
}

/// Attaches `prog` at TC ingress of `iface` with a pinned link, taking over a previous agent's
/// link atomically ([`Takeover::SwapOrAttachThenDetach`]).
pub fn attach_pinned(
    prog: &mut SchedClassifier,
    iface: &str,
    links_dir: &Path,
) -> Result<(), DataplaneError> {
    let pin = link_pin_path(links_dir, iface);
    let attach_err = |source| DataplaneError::Attach {
        iface: iface.to_string(),
        source,
    };
    // A second fd of the program: `attach` below borrows `prog` mutably.
    let prog_fd = prog
        .fd()
        .and_then(|fd| Ok(fd.try_clone()?))
        .map_err(attach_err)?;
    let installed = replace_pinned(
        &pin,
        prog_fd.as_fd(),
        Takeover::SwapOrAttachThenDetach,
        &format!("TC ingress of {iface}"),
        || {
            let id = prog
                .attach(iface, TcAttachType::Ingress)
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                iface: iface.to_string(),
                source,
            })
        },
    )?;
    match installed {
        Installed::Updated => {
            info!(iface, pin = %pin.display(), "replaced program in existing pinned TC link");
        }
        Installed::Attached => {
            info!(iface, pin = %pin.display(), "attached svc_lb_tc_ingress at TC ingress (TCX, pinned)");
        }
    }
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
    for (name, path) in pins(links_dir)? {
        let Some(iface) = pin_iface(&name) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_to_iface() {
        let p = link_pin_path(Path::new("/sys/fs/bpf/x/links"), "n-p1");
        assert_eq!(p, PathBuf::from("/sys/fs/bpf/x/links/n-p1-tc-ingress"));
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(pin_iface(&name), Some("n-p1"));
    }

    #[test]
    fn remove_stale_on_missing_dir_is_ok() {
        remove_stale(Path::new("/proc/self/no-such-links-dir"), &[]).unwrap();
    }
}
