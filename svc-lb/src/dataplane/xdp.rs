//! Optional XDP fast path (`svc-lb run --xdp generic|native`): `svc_lb_xdp` is attached to the
//! same interfaces as the TC program, with one pinned link per interface at
//! `<pin_dir>/links/<iface>-xdp-<mode>`. Like the TC links, a pinned link keeps the program
//! attached when the agent exits; the next agent swaps its program into the link, or removes the
//! link when it runs with `--xdp off`, and `svc-lb uninstall` removes every pin.
//!
//! The mode is part of the pin name because an XDP link's mode is fixed at creation and the
//! kernel refuses generic and native XDP on one interface at the same time: a mode change
//! must detach the old link before attaching the new one.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{Xdp, links::FdLink};
use tracing::info;

use super::{
    DataplaneError, XDP_PROG,
    links::{self, Installed, Takeover},
};

/// Where `svc_lb_xdp` runs on the selected interfaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Not attached (TC alone does all the NAT); removes links a previous agent attached.
    #[default]
    Off,
    /// SKB mode: runs in the kernel stack right after the driver, on any interface.
    Generic,
    /// Driver mode: runs inside the NIC driver before an skb exists. Attaching fails (naming
    /// the interface) when the driver has no XDP support.
    Native,
}

impl XdpMode {
    /// The pin name suffix, also used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Off => "off",
            XdpMode::Generic => "generic",
            XdpMode::Native => "native",
        }
    }

    fn aya_mode(self) -> Option<aya::programs::XdpMode> {
        match self {
            XdpMode::Off => None,
            XdpMode::Generic => Some(aya::programs::XdpMode::Skb),
            XdpMode::Native => Some(aya::programs::XdpMode::Driver),
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const ATTACHED_MODES: [XdpMode; 2] = [XdpMode::Generic, XdpMode::Native];

pub(crate) fn pin_path(links_dir: &Path, iface: &str, mode: XdpMode) -> PathBuf {
    links_dir.join(format!("{iface}-xdp-{mode}"))
}

/// The interface of an XDP link pin name (`None` for TC or socket-LB pins).
pub(crate) fn pin_iface(name: &str) -> Option<&str> {
    ATTACHED_MODES
        .iter()
        .find_map(|m| name.strip_suffix(&format!("-xdp-{m}")))
}

/// Attaches `prog` (loaded) to `iface` in `mode` with a pinned link. A previous agent's link of
/// the same mode gets the new program atomically (BPF_LINK_UPDATE, no gap); a link of the other
/// mode, or an unusable one (e.g. the interface was recreated), is detached first, because the
/// kernel allows only one XDP link per interface.
pub fn attach_pinned(
    prog: &mut Xdp,
    iface: &str,
    mode: XdpMode,
    links_dir: &Path,
) -> Result<(), DataplaneError> {
    let Some(aya_mode) = mode.aya_mode() else {
        return remove_link(links_dir, iface);
    };
    for other in ATTACHED_MODES.iter().filter(|m| **m != mode) {
        links::remove_pin(&pin_path(links_dir, iface, *other))?;
    }
    let pin = pin_path(links_dir, iface, mode);
    let attach_err = |source| DataplaneError::XdpAttach {
        iface: iface.to_string(),
        mode,
        source,
    };
    // A second fd of the program: `attach` below borrows `prog` mutably.
    let prog_fd = prog
        .fd()
        .and_then(|fd| Ok(fd.try_clone()?))
        .map_err(attach_err)?;
    let installed = links::replace_pinned(
        &pin,
        prog_fd.as_fd(),
        Takeover::SwapOrDetachThenAttach,
        &format!("XDP ({mode}) on {iface}"),
        || {
            let id = prog.attach(iface, aya_mode).map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            // aya falls back to a netlink attach when bpf_link_create fails with EINVAL (old
            // kernels); such an attachment has no link object to pin, so it would vanish with
            // the agent.
            FdLink::try_from(link).map_err(|source| DataplaneError::XdpLink {
                iface: iface.to_string(),
                source,
            })
        },
    )?;
    match installed {
        Installed::Updated => {
            info!(iface, mode = %mode, pin = %pin.display(), "replaced program in existing pinned XDP link");
        }
        Installed::Attached => {
            info!(iface, mode = %mode, pin = %pin.display(), "attached svc_lb_xdp (pinned XDP link)");
        }
    }
    Ok(())
}

/// Detaches and unpins the XDP link of `iface`, whatever its mode (no pin is not an error).
pub fn remove_link(links_dir: &Path, iface: &str) -> Result<(), DataplaneError> {
    for mode in ATTACHED_MODES {
        links::remove_pin(&pin_path(links_dir, iface, mode))?;
    }
    Ok(())
}

/// Detaches and unpins XDP links of interfaces not in `keep` (all of them with `--xdp off`).
pub fn remove_stale(links_dir: &Path, keep: &[String]) -> Result<(), DataplaneError> {
    for (name, path) in links::pins(links_dir)? {
        let Some(iface) = pin_iface(&name) else {
            continue;
        };
        if keep.iter().any(|k| k == iface) {
            continue;
        }
        links::remove_pin(&path)?;
        info!(iface, pin = %name, "detached pinned XDP link");
    }
    Ok(())
}

/// Loads `svc_lb_xdp` in `ebpf` (before any attach).
pub fn load(ebpf: &mut aya::Ebpf) -> Result<(), DataplaneError> {
    program(ebpf)?
        .load()
        .map_err(|source| DataplaneError::Program {
            program: XDP_PROG,
            source,
        })
}

pub fn program(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, DataplaneError> {
    ebpf.program_mut(XDP_PROG)
        .ok_or(DataplaneError::ProgramNotFound(XDP_PROG))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: XDP_PROG,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_to_iface() {
        let dir = Path::new("/sys/fs/bpf/x/links");
        for mode in ATTACHED_MODES {
            let p = pin_path(dir, "n-c", mode);
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(pin_iface(&name), Some("n-c"), "{name}");
        }
        assert_eq!(pin_iface("n-c-tc-ingress"), None);
        assert_eq!(pin_iface("cgroup-connect4"), None);
        assert_eq!(
            pin_path(dir, "eth0", XdpMode::Generic),
            PathBuf::from("/sys/fs/bpf/x/links/eth0-xdp-generic")
        );
    }

    #[test]
    fn remove_stale_on_missing_dir_is_ok() {
        remove_stale(Path::new("/proc/self/no-such-links-dir"), &[]).unwrap();
    }
}
