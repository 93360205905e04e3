//! Noticing that the datapath is gone under a running agent, and bringing it back.
//!
//! Pins and links can disappear while the agent runs: `svc-lb uninstall --force`, `rm` in
//! bpffs, `bpftool link detach`, an interface's link dropped by someone else. The programs and
//! maps stay loaded as long as the agent holds their fds, but without its pinned link a
//! program no longer runs and without a map pin `svc-lb debug` and the next agent cannot find
//! the state. [`Loss`] names what is gone; the agent checks at every resync and after netlink
//! link events, then repairs (re-pins its maps, which keeps conntrack and every programmed
//! Service, re-attaches links, re-applies sysctls) or exits non-zero so its DaemonSet restarts
//! it, per `--on-datapath-loss`.

use std::path::PathBuf;

use super::sys;

/// What the agent does when its datapath is gone (`svc-lb run --on-datapath-loss`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnDatapathLoss {
    /// Re-pin the maps, re-attach the links and re-apply the sysctls, logging a warning.
    #[default]
    Repair,
    /// Log an error and exit non-zero (a DaemonSet restarts the agent, which loads afresh).
    Exit,
}

impl std::fmt::Display for OnDatapathLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnDatapathLoss::Repair => "repair",
            OnDatapathLoss::Exit => "exit",
        })
    }
}

/// One missing piece of the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// The pin directory itself.
    PinDir(PathBuf),
    /// A map pin.
    MapPin(PathBuf),
    /// A link pin that is gone.
    LinkPin(PathBuf),
    /// A link pin whose link was detached (`bpftool link detach`): the program does not run.
    LinkDetached(PathBuf),
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::PinDir(p) => write!(f, "pin directory {} removed", p.display()),
            Loss::MapPin(p) => write!(f, "map pin {} removed", p.display()),
            Loss::LinkPin(p) => write!(f, "link pin {} removed", p.display()),
            Loss::LinkDetached(p) => write!(f, "link {} detached", p.display()),
        }
    }
}

/// The state of a pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Attached,
    Detached,
    Missing,
}

/// Whether the link pinned at `pin` exists and is still attached. An error reading it counts
/// as attached: a check must never make the agent tear down a working link.
pub fn link_state(pin: &std::path::Path) -> LinkState {
    match sys::obj_get(pin) {
        Ok(None) => LinkState::Missing,
        Ok(Some(fd)) => match sys::link_attached(&fd) {
            Ok(false) => LinkState::Detached,
            _ => LinkState::Attached,
        },
        Err(_) => LinkState::Attached,
    }
}

/// The loss for the link pinned at `pin`, if it is not attached.
pub fn link_loss(pin: PathBuf) -> Option<Loss> {
    match link_state(&pin) {
        LinkState::Attached => None,
        LinkState::Detached => Some(Loss::LinkDetached(pin)),
        LinkState::Missing => Some(Loss::LinkPin(pin)),
    }
}
