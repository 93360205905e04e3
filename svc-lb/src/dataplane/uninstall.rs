//! `svc-lb uninstall`: removes what svc-lb pinned, and only that.
//!
//! The pin directory must be a real directory (not a symlink) on bpffs, and every entry in it
//! must be something svc-lb pins: a map of [`svc_lb_common::ALL_MAPS`] or the `links/` directory holding link
//! pins svc-lb names (`<iface>-tc-ingress`, `<iface>-xdp-<mode>`, `sock-<hook>`). Anything else
//! (another filesystem, a symlink, a file or directory of another tool, another mount inside)
//! makes uninstall refuse before it removes anything, naming the path: a wrong `--pin-dir`
//! must never cost the node data. Entries are removed one by one (never recursively) and the
//! directories with rmdir, so something created meanwhile makes the removal fail instead of
//! disappearing.

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::{
    DataplaneError, LINKS_DIR, bpffs, links, socklb,
    state::{self, AgentLock},
    sysctl::Sysctls,
    xdp,
};

/// What svc-lb has pinned in a pin directory (checked: nothing else is there).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Map pins.
    pub maps: Vec<PathBuf>,
    /// The `links/` directory, if present.
    pub links_dir: Option<PathBuf>,
    /// Link pins in `links/`.
    pub links: Vec<PathBuf>,
    /// The pin directory is a mount point (e.g. `--pin-dir /sys/fs/bpf`): emptied, not removed.
    pub mount_point: bool,
}

/// Whether `name` is a link pin svc-lb creates in `links/`.
pub fn is_link_pin_name(name: &str) -> bool {
    links::pin_iface(name).is_some_and(|i| !i.is_empty())
        || xdp::pin_iface(name).is_some_and(|i| !i.is_empty())
        || socklb::is_pin_name(name)
}

fn not_ours(path: &Path, reason: impl Into<String>) -> DataplaneError {
    DataplaneError::NotOurs {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Lists `dir` (a directory on the device `dev`) as (name, path, metadata) without following
/// symlinks.
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf, std::fs::Metadata)>, DataplaneError> {
    let read_err = |source| DataplaneError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(read_err)?;
        out.push((entry.file_name().to_string_lossy().into_owned(), path, meta));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Checks that `pin_dir` holds only what svc-lb pins and lists it; `Ok(None)` when it does not
/// exist. Removes nothing.
pub fn inventory(pin_dir: &Path) -> Result<Option<Inventory>, DataplaneError> {
    let meta = match std::fs::symlink_metadata(pin_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DataplaneError::ReadDir {
                path: pin_dir.to_path_buf(),
                source,
            });
        }
    };
    if meta.file_type().is_symlink() {
        return Err(not_ours(
            pin_dir,
            "is a symbolic link; pass the directory it points to if that is really svc-lb's",
        ));
    }
    if !meta.is_dir() {
        return Err(not_ours(pin_dir, "is not a directory"));
    }
    let on_bpffs = bpffs::is_bpffs(pin_dir).map_err(|source| DataplaneError::ReadDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    if !on_bpffs {
        return Err(not_ours(
            pin_dir,
            "is not on a bpf filesystem, so svc-lb cannot have pinned anything there",
        ));
    }
    let dev = meta.dev();
    let mount_point = pin_dir
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|parent| parent.dev() != dev);

    let mut inv = Inventory {
        mount_point,
        ..Inventory::default()
    };
    let mut unknown = Vec::new();
    for (name, path, m) in entries(pin_dir)? {
        let ft = m.file_type();
        if m.dev() != dev {
            unknown.push(format!("{name} (another mount)"));
        } else if name == LINKS_DIR && ft.is_dir() {
            inv.links_dir = Some(path);
        } else if svc_lb_common::ALL_MAPS.contains(&name.as_str()) && ft.is_file() {
            inv.maps.push(path);
        } else {
            unknown.push(name);
        }
    }
    if let Some(links_dir) = &inv.links_dir {
        for (name, path, m) in entries(links_dir)? {
            if m.dev() == dev && m.file_type().is_file() && is_link_pin_name(&name) {
                inv.links.push(path);
            } else {
                unknown.push(format!("{LINKS_DIR}/{name}"));
            }
        }
    }
    if !unknown.is_empty() {
        return Err(not_ours(
            pin_dir,
            format!(
                "holds entries svc-lb did not create: {}; nothing was removed (is --pin-dir \
                 right? remove those entries yourself if they are leftovers)",
                unknown.join(", ")
            ),
        ));
    }
    Ok(Some(inv))
}

/// Options of [`uninstall_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct UninstallOptions {
    /// Proceed while an agent runs on the pin directory. That agent notices the missing
    /// datapath at its next check and re-creates it (or exits with `--on-datapath-loss exit`).
    pub force: bool,
}

/// What [`uninstall_with`] removed.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub maps: usize,
    pub links: usize,
    pub sysctls_restored: usize,
    /// The agent that was running (with `force`).
    pub agent: Option<state::Holder>,
}

/// Detaches every svc-lb link under `pin_dir/links`, removes the map pins and the directory,
/// restores the sysctls svc-lb changed, and removes its state in `/run/svc-lb`. Refuses (naming
/// the path, removing nothing) when `pin_dir` holds anything svc-lb did not pin or is not on
/// bpffs, and while an agent runs on it. A missing `pin_dir` is not an error.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, DataplaneError> {
    uninstall_with(pin_dir, UninstallOptions::default())
}

/// [`uninstall`] with options.
pub fn uninstall_with(
    pin_dir: &Path,
    opts: UninstallOptions,
) -> Result<Uninstalled, DataplaneError> {
    // Checked before the lock: a wrong path is refused even while an agent runs elsewhere.
    let inv = inventory(pin_dir)?;
    let state_dir = state::state_dir(pin_dir)?;
    // Held while removing, so no agent can start on the directory half-way.
    let (lock, agent) = match AgentLock::acquire_in(&state_dir, pin_dir) {
        Ok(lock) => (Some(lock), None),
        Err(DataplaneError::AgentRunning { holder, .. }) if opts.force => {
            warn!(
                pin_dir = %pin_dir.display(), agent = %holder,
                "an agent is running on this pin directory; uninstalling anyway (--force): it \
                 re-creates the datapath at its next check unless it runs with \
                 --on-datapath-loss exit"
            );
            (None, Some(holder))
        }
        Err(DataplaneError::AgentRunning { holder, .. }) => {
            return Err(DataplaneError::UninstallWhileRunning {
                pin_dir: pin_dir.to_path_buf(),
                holder,
            });
        }
        Err(e) => return Err(e),
    };
    let mut done = Uninstalled {
        agent,
        ..Uninstalled::default()
    };
    match &inv {
        None => info!(pin_dir = %pin_dir.display(), "nothing pinned"),
        Some(inv) => {
            for pin in &inv.links {
                links::remove_pin(pin)?;
                info!(pin = %pin.display(), "detached pinned link");
            }
            done.links = inv.links.len();
            if let Some(dir) = &inv.links_dir {
                remove_dir(dir)?;
            }
            for pin in &inv.maps {
                std::fs::remove_file(pin).map_err(|source| DataplaneError::Remove {
                    path: pin.clone(),
                    source,
                })?;
            }
            done.maps = inv.maps.len();
            if inv.mount_point {
                info!(pin_dir = %pin_dir.display(), "pin directory is a mount point: emptied, left mounted");
            } else {
                remove_dir(pin_dir)?;
            }
        }
    }
    done.sysctls_restored = Sysctls::new(&state_dir).restore()?.restored.len();
    // The node's, not the pin dir's: only a cgroup v2 mount svc-lb made (dataplane/cgroup.rs).
    super::cgroup::unmount_own()?;
    if let Some(lock) = lock {
        lock.remove_state()?;
    }
    info!(
        pin_dir = %pin_dir.display(),
        maps = done.maps,
        links = done.links,
        sysctls_restored = done.sysctls_restored,
        "dataplane uninstalled"
    );
    Ok(done)
}

/// rmdir: fails (naming the directory) if anything appeared in it since the inventory.
fn remove_dir(dir: &Path) -> Result<(), DataplaneError> {
    std::fs::remove_dir(dir).map_err(|source| DataplaneError::Remove {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names() {
        for ok in [
            "eth0-tc-ingress",
            "lxc1-xdp-generic",
            "n-c-xdp-native",
            "sock-connect4",
            "sock-getpeername4",
        ] {
            assert!(is_link_pin_name(ok), "{ok}");
        }
        for bad in ["-tc-ingress", "sock-bind4", "eth0", "tc", "x-xdp-off", ".."] {
            assert!(!is_link_pin_name(bad), "{bad}");
        }
    }

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The issue's `/tmp/x` case, on whatever filesystem the temp dir is (never bpffs).
    #[test]
    fn a_directory_outside_bpffs_is_refused_and_kept() {
        let t =
            Tmp(std::env::temp_dir().join(format!("svc-lb-unit-uninstall-{}", std::process::id())));
        std::fs::create_dir_all(t.0.join("sub")).unwrap();
        std::fs::write(t.0.join("f"), "a").unwrap();
        let err = uninstall(&t.0).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&t.0.display().to_string()) && msg.contains("not on a bpf filesystem"),
            "{msg}"
        );
        assert!(t.0.join("sub").is_dir() && t.0.join("f").is_file());

        // A symlink to it is refused as a symlink, not followed.
        let link = t.0.with_extension("link");
        std::os::unix::fs::symlink(&t.0, &link).unwrap();
        let msg = uninstall(&link).unwrap_err().to_string();
        let _ = std::fs::remove_file(&link);
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(t.0.join("f").is_file());
    }
}
