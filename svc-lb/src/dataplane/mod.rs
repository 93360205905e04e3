//! Loads the embedded eBPF object, reuses or creates the pinned maps, and attaches the TC ingress
//! program to the node's interfaces through pinned links, so the datapath keeps forwarding when
//! the agent exits or is killed, and a restarted agent takes over without a gap.
//!
//! Interfaces are chosen by name or glob pattern ([`pattern`]); a thread follows rtnetlink
//! ([`watch`]) so interfaces created later (pod veths) get the program too, and the pins of
//! interfaces that disappear are removed.
//!
//! On the node: one agent per pin directory ([`state`]: a lock in `/run/svc-lb`), map sizes
//! checked against the kernel's limits and the node's memory before anything is created
//! ([`footprint`]), a failed start removes what it created, the sysctls it changes are recorded
//! and restored by [`uninstall`] (which removes only what svc-lb pinned), and a running agent
//! notices when its pins or links are gone ([`health`]) and repairs them.

mod bpffs;
pub mod capacity;
pub mod cgroup;
mod error;
pub mod footprint;
pub mod health;
mod links;
mod logger;
mod netlink;
pub mod pattern;
mod socklb;
pub mod state;
mod sys;
mod sysctl;
mod uninstall;
mod watch;
mod xdp;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use svc_lb_common::maps;
use tracing::{debug, error, info, warn};

use capacity::MapCapacity;
use state::AgentLock;
use sysctl::Sysctls;

pub use error::DataplaneError;
pub use health::{Loss, OnDatapathLoss};
pub use socklb::SOCK_PROGS;
pub use state::{Holder, running_agent};
pub use uninstall::{
    Inventory, UninstallOptions, Uninstalled, inventory, uninstall, uninstall_with,
};
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
    watcher: watch::LinkWatcher,
    // Keeps the program and map fds open for the agent's lifetime (the logger's ring buffer
    // belongs to this object). Shared with the interface watcher thread.
    ebpf: Arc<Mutex<Ebpf>>,
    /// The interfaces served, shared with the watcher thread (the repair re-attaches them).
    attacher: Arc<Mutex<watch::Attacher>>,
    _logger: Option<logger::LogForwarder>,
    pin_dir: PathBuf,
    ifaces: Vec<String>,
    xdp: XdpMode,
    sysctls: Arc<Sysctls>,
    /// The cgroup the socket LB is attached to (`None`: not attached).
    socket_lb: Mutex<Option<PathBuf>>,
    /// Notified by the watcher thread after link events.
    link_events: Arc<tokio::sync::Notify>,
    /// What existed before this start, so a start that fails later can be rolled back.
    undo: Undo,
    // Dropped last: the next agent may start once everything above is released.
    lock: AgentLock,
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
        // Also before anything is created: sizes the kernel or the node cannot give.
        check_maps_fit(&cfg.pin_dir, capacity)?;
        let state_dir = state::state_dir(&cfg.pin_dir)?;
        let state_existed = state_dir.exists();
        let lock = AgentLock::acquire_in(&state_dir, &cfg.pin_dir)?;
        bump_memlock_rlimit();
        if let Err(e) = bpffs::ensure_bpffs(&cfg.pin_dir) {
            release_state(lock, state_existed);
            return Err(e);
        }
        let undo = Undo::snapshot(&cfg.pin_dir, state_existed);
        let sysctls = Arc::new(Sysctls::new(&state_dir));
        let link_events = Arc::new(tokio::sync::Notify::new());
        let started = Self::start(
            cfg,
            capacity,
            xdp_mode,
            sel,
            events,
            &links,
            &sysctls,
            &link_events,
        );
        let (watcher, ebpf, attacher, logger) = match started {
            Ok(parts) => parts,
            Err(e) => {
                undo.roll_back(&sysctls);
                release_state(lock, state_existed);
                return Err(e);
            }
        };
        info!(
            pin_dir = %cfg.pin_dir.display(),
            ifaces = ?cfg.ifaces,
            attached = ?attacher.lock().unwrap_or_else(|e| e.into_inner()).attached(),
            xdp = %xdp_mode,
            "dataplane loaded"
        );
        Ok(Dataplane {
            watcher,
            ebpf,
            attacher,
            _logger: logger,
            pin_dir: cfg.pin_dir.clone(),
            ifaces: cfg.ifaces.clone(),
            xdp: xdp_mode,
            sysctls,
            socket_lb: Mutex::new(None),
            link_events,
            undo,
            lock,
        })
    }

    /// The part of [`Dataplane::load_with_options`] that creates things on the node (rolled
    /// back by the caller when it fails).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn start(
        cfg: &DataplaneConfig,
        capacity: &MapCapacity,
        xdp_mode: XdpMode,
        sel: pattern::IfaceSelector,
        events: netlink::NlSocket,
        links: &[(u32, String)],
        sysctls: &Arc<Sysctls>,
        link_events: &Arc<tokio::sync::Notify>,
    ) -> Result<
        (
            watch::LinkWatcher,
            Arc<Mutex<Ebpf>>,
            Arc<Mutex<watch::Attacher>>,
            Option<logger::LogForwarder>,
        ),
        DataplaneError,
    > {
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
                sysctls: sysctls.clone(),
            },
            sel,
        );
        attacher.attach_initial(links)?;
        let attached = attacher.attached();
        links::remove_stale(&links_dir, &attached)?;
        // With --xdp off nothing is kept: the previous agent's XDP links go away here.
        let keep_xdp: &[String] = if xdp_mode == XdpMode::Off {
            &[]
        } else {
            &attached
        };
        xdp::remove_stale(&links_dir, keep_xdp)?;
        sysctls.configure(&attached)?;
        let attacher = Arc::new(Mutex::new(attacher));
        let watcher = watch::LinkWatcher::start(attacher.clone(), events, link_events.clone())?;
        Ok((watcher, ebpf, attacher, logger))
    }

    /// Undoes a start whose later steps failed (socket LB, first map writes): removes the pins,
    /// links and directories this start created and restores the sysctls it changed. What a
    /// previous agent left (adopted maps, its links) stays.
    pub fn roll_back(self) {
        let Dataplane {
            watcher,
            ebpf,
            attacher,
            _logger,
            sysctls,
            undo,
            lock,
            ..
        } = self;
        drop(watcher);
        drop(attacher);
        drop(_logger);
        drop(ebpf);
        undo.roll_back(&sysctls);
        release_state(lock, undo.state_existed);
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Socket LB: with a cgroup v2 path, attaches the `connect4`/`sendmsg4`/`recvmsg4`/
    /// `getpeername4` programs there (pinned links, replacing a predecessor's); with `None`,
    /// detaches links a previous agent left.
    pub fn set_socket_lb(&self, cgroup: Option<&Path>) -> Result<(), DataplaneError> {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let mut current = self.socket_lb.lock().unwrap_or_else(|e| e.into_inner());
        match cgroup {
            Some(cgroup) => {
                let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
                socklb::attach(&mut ebpf, cgroup, &links_dir)?;
                *current = Some(cgroup.to_path_buf());
            }
            None => {
                socklb::detach(&links_dir)?;
                *current = None;
            }
        }
        Ok(())
    }

    /// What is missing of this agent's datapath: the pin directory, map pins, and the link
    /// pins of every interface it serves and of the socket LB (gone, or detached).
    pub fn check(&self) -> Vec<Loss> {
        let mut lost = Vec::new();
        if !self.pin_dir.is_dir() {
            lost.push(Loss::PinDir(self.pin_dir.clone()));
        }
        for name in maps::ALL_MAPS {
            let pin = self.pin_dir.join(name);
            if std::fs::symlink_metadata(&pin).is_err() {
                lost.push(Loss::MapPin(pin));
            }
        }
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let (attached, no_xdp) = {
            let a = self.attacher.lock().unwrap_or_else(|e| e.into_inner());
            (a.attached_indexes(), a.xdp_failed())
        };
        for (iface, index) in &attached {
            // An interface being deleted (or recreated) loses its link before the watcher
            // handles the netlink event: that is the watcher's business, not a loss.
            if ifindex(iface) != Some(*index) {
                continue;
            }
            lost.extend(health::link_loss(links::link_pin_path(&links_dir, iface)));
            if self.xdp != XdpMode::Off && !no_xdp.contains(iface) {
                lost.extend(health::link_loss(xdp::pin_path(
                    &links_dir, iface, self.xdp,
                )));
            }
        }
        if self.socket_lb_cgroup().is_some() {
            for (_, hook) in SOCK_PROGS {
                lost.extend(health::link_loss(socklb::link_pin_path(&links_dir, hook)));
            }
        }
        lost
    }

    fn socket_lb_cgroup(&self) -> Option<PathBuf> {
        self.socket_lb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Brings back what [`Dataplane::check`] finds missing: re-pins the maps from the agent's
    /// own fds (conntrack and every programmed Service are kept), re-attaches the links and
    /// re-applies the sysctls. Returns what was missing (empty: nothing to do).
    pub fn repair(&self) -> Result<Vec<Loss>, DataplaneError> {
        let lost = self.check();
        if lost.is_empty() {
            return Ok(lost);
        }
        bpffs::ensure_bpffs(&self.pin_dir)?;
        let links_dir = self.pin_dir.join(LINKS_DIR);
        for dir in [&self.pin_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        {
            let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            for name in maps::ALL_MAPS {
                let path = self.pin_dir.join(name);
                if std::fs::symlink_metadata(&path).is_ok() {
                    continue;
                }
                ebpf.map(name)
                    .ok_or(DataplaneError::MissingMap(name))?
                    .pin(&path)
                    .map_err(|source| DataplaneError::PinMap { name, path, source })?;
            }
        }
        let lost_link = |pin: &Path| {
            lost.iter().any(
                |l| matches!(l, Loss::LinkPin(p) | Loss::LinkDetached(p) if p.as_path() == pin),
            )
        };
        let mut first_err = None;
        let attached = {
            let mut a = self.attacher.lock().unwrap_or_else(|e| e.into_inner());
            for (iface, index) in a.attached_indexes() {
                if ifindex(&iface) != Some(index) {
                    continue;
                }
                let tc = links::link_pin_path(&links_dir, &iface);
                let xdp = xdp::pin_path(&links_dir, &iface, self.xdp);
                if lost_link(&tc) || lost_link(&xdp) {
                    // The same path as a new interface: TC (and XDP) link, sysctls.
                    if let Err(e) = watch::LinkOps::attach(a.ops(), &iface) {
                        warn!(iface, error = %e, "could not re-attach");
                        first_err.get_or_insert(e);
                    }
                }
            }
            a.attached()
        };
        if let Some(cgroup) = self.socket_lb_cgroup()
            && SOCK_PROGS
                .iter()
                .any(|(_, hook)| lost_link(&socklb::link_pin_path(&links_dir, hook)))
        {
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = socklb::attach(&mut ebpf, &cgroup, &links_dir) {
                first_err.get_or_insert(e);
            }
        }
        // `svc-lb uninstall` restores them; without them reverse-NATed replies are dropped.
        self.sysctls.configure(&attached)?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(lost),
        }
    }

    /// Checks the datapath and handles a loss per `policy`: repairs it with a warning, or
    /// returns [`DataplaneError::DatapathLost`] for the agent to exit non-zero.
    pub fn verify(&self, policy: OnDatapathLoss) -> Result<(), DataplaneError> {
        let lost = self.check();
        if lost.is_empty() {
            return Ok(());
        }
        let what: Vec<String> = lost.iter().map(ToString::to_string).collect();
        match policy {
            OnDatapathLoss::Exit => {
                error!(lost = ?what, "the datapath was removed under the agent; exiting (--on-datapath-loss exit)");
                Err(DataplaneError::DatapathLost(lost))
            }
            OnDatapathLoss::Repair => {
                warn!(lost = ?what, "the datapath was removed under the agent; repairing it (--on-datapath-loss repair)");
                let repaired = self.repair()?;
                info!(repaired = repaired.len(), "datapath repaired");
                Ok(())
            }
        }
    }

    /// Resolves after the interface watcher handled netlink link events (a moment to
    /// [`Dataplane::verify`]).
    pub async fn link_events(&self) {
        self.link_events.notified().await;
    }

    /// The state directory of this agent (`/run/svc-lb/<key>`).
    pub fn state_dir(&self) -> &Path {
        self.lock.dir()
    }
}

/// The current index of interface `name` in this network namespace.
fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Drops the agent lock of a start that failed, removing the state directory if this start
/// created it (nothing in it is needed: the sysctl record was rolled back).
fn release_state(lock: AgentLock, state_existed: bool) {
    if state_existed {
        drop(lock);
    } else if let Err(e) = lock.remove_state() {
        warn!(error = %crate::error::chain(&e), "could not remove the state directory");
    }
}

/// What the pin directory held before a start, so a failed start removes only what it created.
#[derive(Debug)]
struct Undo {
    pin_dir: PathBuf,
    pin_dir_existed: bool,
    links_dir_existed: bool,
    maps_before: Vec<&'static str>,
    links_before: Vec<String>,
    state_existed: bool,
}

impl Undo {
    fn snapshot(pin_dir: &Path, state_existed: bool) -> Undo {
        let links_dir = pin_dir.join(LINKS_DIR);
        Undo {
            pin_dir: pin_dir.to_path_buf(),
            pin_dir_existed: pin_dir.exists(),
            links_dir_existed: links_dir.exists(),
            maps_before: maps::ALL_MAPS
                .into_iter()
                .filter(|m| pin_dir.join(m).exists())
                .collect(),
            links_before: links::pins(&links_dir)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
            state_existed,
        }
    }

    fn roll_back(&self, sysctls: &Sysctls) {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let mut removed = Vec::new();
        for (name, path) in links::pins(&links_dir).unwrap_or_default() {
            if !self.links_before.contains(&name) && uninstall::is_link_pin_name(&name) {
                match links::remove_pin(&path) {
                    Ok(()) => removed.push(path),
                    Err(e) => warn!(error = %e, "rollback: could not remove a link pin"),
                }
            }
        }
        for name in maps::ALL_MAPS {
            let path = self.pin_dir.join(name);
            if !self.maps_before.contains(&name) && path.exists() {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed.push(path),
                    Err(e) => {
                        warn!(pin = %path.display(), error = %e, "rollback: could not remove a map pin")
                    }
                }
            }
        }
        for (dir, existed) in [
            (&links_dir, self.links_dir_existed),
            (&self.pin_dir, self.pin_dir_existed),
        ] {
            // rmdir, not a recursive removal: anything left in it is not this start's.
            if !existed && std::fs::remove_dir(dir).is_ok() {
                removed.push(dir.clone());
            }
        }
        sysctls.roll_back();
        warn!(
            removed = ?removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "start failed: removed what it had created and restored the sysctls it changed"
        );
    }
}

/// Refuses map sizes the kernel rejects (E2BIG) or whose kernel memory (for the maps not
/// pinned yet, which are created now) exceeds what the node can give, before anything exists.
fn check_maps_fit(pin_dir: &Path, capacity: &MapCapacity) -> Result<(), DataplaneError> {
    let sizes = capacity.map_sizes();
    let defs = footprint::object_maps(ebpf_object(), &sizes)
        .map_err(|e| DataplaneError::ObjectMaps(e.to_string()))?;
    for def in &defs {
        if def.too_big() {
            return Err(DataplaneError::MapTooBig {
                map: def.name.clone(),
                entries: def.max_entries,
                max: footprint::KERNEL_MAX_ENTRIES,
                flag: capacity::flag_of(&def.name),
            });
        }
    }
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
    // Pinned maps are adopted, not created: they cost nothing new.
    let new: Vec<footprint::Footprint> = defs
        .iter()
        .filter(|d| !pin_dir.join(&d.name).exists())
        .map(|d| d.footprint(cpus))
        .collect();
    let need: u64 = new.iter().map(|f| f.at_create).sum();
    let full: u64 = new.iter().map(|f| f.when_full).sum();
    let mem = footprint::NodeMemory::read().map_err(DataplaneError::NodeMemory)?;
    let detail = footprint::fits(&new, &mem)?;
    if !new.is_empty() {
        info!(
            at_create = %footprint::human(need),
            when_full = %footprint::human(full),
            available = %footprint::human(mem.budget()),
            largest = %detail,
            "kernel memory of the maps created now"
        );
    }
    Ok(())
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
