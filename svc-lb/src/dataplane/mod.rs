//! Loads the embedded eBPF object, reuses or creates the pinned maps, and attaches the TC ingress
//! program to the node's interfaces through pinned links, so the datapath keeps forwarding when
//! the agent exits or is killed, and a restarted agent takes over without a gap.
//!
//! Interfaces are chosen by name or glob pattern ([`pattern`]); a thread follows rtnetlink
//! ([`watch`]) so interfaces created later (pod veths) get the program too, and the pins of
//! interfaces that disappear are removed.

mod bpffs;
pub mod capacity;
mod error;
mod links;
mod logger;
mod netlink;
pub mod pattern;
mod socklb;
mod sys;
mod sysctl;
mod watch;
mod xdp;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use svc_lb_common::maps;
use tracing::{debug, info};

use crate::dataplane::capacity::MapCapacity;

pub use error::DataplaneError;
pub use socklb::{SOCK_PROGS, check_cgroup};
pub use xdp::XdpMode;

// The optional XDP DNAT program (`XDP_PROG`) is attached only with `svc-lb run --xdp
// generic|native`: XDP cannot see CHECKSUM_PARTIAL packets from local veth peers and would
// corrupt their L4 checksums, so it is meant for interfaces whose frames come off the wire.
pub use svc_lb_common::programs::{TC_INGRESS_PROG, XDP_PROG};
/// Sub-directory of the pin dir holding one pinned link per attached interface.
pub const LINKS_DIR: &str = "links";

/// The object built from `svc-lb-ebpf` by build.rs. Aligned because aya parses it in place.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svc-lb"));

/// The embedded eBPF object bytes (program tests load it with their own pin directory).
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// bpffs directory holding the map pins and `links/`.
    pub pin_dir: PathBuf,
    /// Interfaces that get the TC ingress program: exact names (must exist) or glob patterns
    /// (`lxc*`; followed as interfaces appear and disappear).
    pub ifaces: Vec<String>,
}

/// A loaded and attached dataplane. Dropping it stops log forwarding; programs stay attached
/// through their pinned links until [`uninstall`].
pub struct Dataplane {
    // Stopped first (fields drop in order): it attaches with the program in `ebpf`.
    _watcher: watch::LinkWatcher,
    // Keeps the program and map fds open for the agent's lifetime (the logger's ring buffer
    // belongs to this object). Shared with the interface watcher thread.
    ebpf: Arc<Mutex<Ebpf>>,
    _logger: Option<logger::LogForwarder>,
    pin_dir: PathBuf,
    ifaces: Vec<String>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("ifaces", &self.ifaces)
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Mounts bpffs if needed, loads the object reusing existing pinned maps (creating and
    /// pinning absent ones), attaches `svc_lb_tc_ingress` at TC ingress of every matching
    /// interface with pinned links (replacing a previous agent's links), sets rp_filter=0, and
    /// starts following interfaces that appear or disappear later.
    pub fn load(cfg: &DataplaneConfig) -> Result<Dataplane, DataplaneError> {
        Self::load_with_capacity(cfg, &MapCapacity::default())
    }

    /// [`Dataplane::load`] creating absent maps with the sizes of `capacity` (`svc-lb run
    /// --max-*`). Pinned maps are adopted with their own size; a different one is logged.
    pub fn load_with_capacity(
        cfg: &DataplaneConfig,
        capacity: &MapCapacity,
    ) -> Result<Dataplane, DataplaneError> {
        Self::load_with_options(cfg, capacity, XdpMode::Off)
    }

    /// [`Dataplane::load_with_capacity`] that also attaches `svc_lb_xdp` in `xdp` mode to every
    /// interface that gets the TC program (now and when they appear later), with pinned links
    /// under `links/`. With [`XdpMode::Off`], XDP links a previous agent pinned are removed.
    pub fn load_with_options(
        cfg: &DataplaneConfig,
        capacity: &MapCapacity,
        xdp_mode: XdpMode,
    ) -> Result<Dataplane, DataplaneError> {
        let sel = pattern::IfaceSelector::parse(&cfg.ifaces)?;
        // Subscribed before the dump, so a link created in between is seen (twice at worst).
        let events = netlink::NlSocket::subscribe_links().map_err(DataplaneError::Netlink)?;
        let links = netlink::dump_links().map_err(DataplaneError::Netlink)?;
        if let Some(missing) = sel
            .names()
            .iter()
            .find(|n| !links.iter().any(|(_, l)| l == *n))
        {
            // Before anything is loaded: a typo leaves the node untouched.
            return Err(DataplaneError::NoSuchInterface(missing.clone()));
        }
        bump_memlock_rlimit();
        bpffs::ensure_bpffs(&cfg.pin_dir)?;
        let links_dir = cfg.pin_dir.join(LINKS_DIR);
        for dir in [&cfg.pin_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }

        let mut ebpf = load_object(&cfg.pin_dir, capacity)?;
        let logger = logger::LogForwarder::start(&mut ebpf);

        let prog: &mut SchedClassifier = ebpf
            .program_mut(TC_INGRESS_PROG)
            .ok_or(DataplaneError::ProgramNotFound(TC_INGRESS_PROG))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                program: TC_INGRESS_PROG,
                source,
            })?;
        prog.load().map_err(|source| DataplaneError::Program {
            program: TC_INGRESS_PROG,
            source,
        })?;
        if xdp_mode != XdpMode::Off {
            xdp::load(&mut ebpf)?;
        }

        let ebpf = Arc::new(Mutex::new(ebpf));
        let mut attacher = watch::Attacher::new(
            watch::TcLinks {
                ebpf: ebpf.clone(),
                links_dir: links_dir.clone(),
                xdp: xdp_mode,
            },
            sel,
        );
        attacher.attach_initial(&links)?;
        let attached = attacher.attached();
        links::remove_stale(&links_dir, &attached)?;
        // With --xdp off nothing is kept: the previous agent's XDP links go away here.
        let keep_xdp: &[String] = if xdp_mode == XdpMode::Off {
            &[]
        } else {
            &attached
        };
        xdp::remove_stale(&links_dir, keep_xdp)?;
        sysctl::configure(&attached)?;
        let watcher = watch::LinkWatcher::start(attacher, events)?;

        info!(
            pin_dir = %cfg.pin_dir.display(),
            ifaces = ?cfg.ifaces,
            ?attached,
            xdp = %xdp_mode,
            "dataplane loaded"
        );
        Ok(Dataplane {
            _watcher: watcher,
            ebpf,
            _logger: logger,
            pin_dir: cfg.pin_dir.clone(),
            ifaces: cfg.ifaces.clone(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Socket LB: with a cgroup v2 path, attaches the `connect4`/`sendmsg4`/`recvmsg4`/
    /// `getpeername4` programs there (pinned links, replacing a predecessor's); with `None`,
    /// detaches links a previous agent left.
    pub fn set_socket_lb(&self, cgroup: Option<&Path>) -> Result<(), DataplaneError> {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        match cgroup {
            Some(cgroup) => {
                let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
                socklb::attach(&mut ebpf, cgroup, &links_dir)
            }
            None => socklb::detach(&links_dir),
        }
    }
}

/// Loads [`ebpf_object`] with `pin_dir` as the directory of its by-name pinned maps and checks
/// that every map of [`maps::ALL_MAPS`] was created (the linker must not have dropped an unused one).
fn load_object(pin_dir: &Path, capacity: &MapCapacity) -> Result<Ebpf, DataplaneError> {
    capacity.warn_adopted(pin_dir);
    let log_level = logger::kernel_level();
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    // Not required: an object built without aya-log simply has nothing to filter.
    loader.override_global(aya_log::LEVEL, &log_level, false);
    capacity.apply(&mut loader);
    let ebpf = loader
        .load(ebpf_object())
        .map_err(|e| DataplaneError::Load(Box::new(e)))?;
    for name in maps::ALL_MAPS {
        if ebpf.map(name).is_none() {
            return Err(DataplaneError::MissingMap(name));
        }
        let pin = pin_dir.join(name);
        if !pin.exists() {
            return Err(DataplaneError::MissingPin(pin));
        }
    }
    Ok(ebpf)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg, so failing to
/// raise it (no CAP_SYS_RESOURCE) is harmless on the kernels we target.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; continuing (memcg accounting on kernels >= 5.11)"
        );
    }
}

/// Detaches every pinned link under `pin_dir/links`, removes all map pins and the directory.
/// A missing `pin_dir` is not an error (nothing installed).
pub fn uninstall(pin_dir: &Path) -> Result<(), DataplaneError> {
    if !pin_dir.exists() {
        info!(pin_dir = %pin_dir.display(), "nothing to uninstall");
        return Ok(());
    }
    let links_dir = pin_dir.join(LINKS_DIR);
    links::remove_all(&links_dir)?;
    std::fs::remove_dir_all(pin_dir).map_err(|source| DataplaneError::Remove {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    info!(pin_dir = %pin_dir.display(), "dataplane uninstalled");
    Ok(())
}
