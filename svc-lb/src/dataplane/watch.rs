//! Keeps the TC program attached to every interface the `--iface` selector matches, including
//! interfaces created after the agent started (pod veths): a thread follows rtnetlink link
//! events, attaches to new matching links and forgets (detaches, unpins) links that go away.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use aya::{Ebpf, programs::SchedClassifier};
use tracing::{debug, info, warn};

use super::{
    DataplaneError, TC_INGRESS_PROG, links,
    netlink::{self, LinkEvent, NlSocket},
    pattern::IfaceSelector,
    sysctl::Sysctls,
    xdp::{self, XdpMode},
};

/// What the [`Attacher`] does to an interface (a trait so the event logic is unit-tested
/// without a kernel).
pub trait LinkOps {
    /// Attaches the program to `name` (pinned; logs the attach).
    fn attach(&mut self, name: &str) -> Result<(), DataplaneError>;
    /// Detaches and unpins our link on `name`.
    fn detach(&mut self, name: &str) -> Result<(), DataplaneError>;
}

/// The real operations: pinned TCX links under `links_dir`, the optional pinned XDP links
/// (same interfaces, so a pod veth that appears later gets both) and the interface sysctls.
pub struct TcLinks {
    pub ebpf: Arc<Mutex<Ebpf>>,
    pub links_dir: PathBuf,
    /// `Off`: no XDP link (`Dataplane::load` already removed every XDP pin a previous agent
    /// left).
    pub xdp: XdpMode,
    /// Records what the interface sysctls were before svc-lb changed them.
    pub sysctls: Arc<Sysctls>,
}

impl LinkOps for TcLinks {
    fn attach(&mut self, name: &str) -> Result<(), DataplaneError> {
        let xdp = {
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            let prog: &mut SchedClassifier = ebpf
                .program_mut(TC_INGRESS_PROG)
                .ok_or(DataplaneError::ProgramNotFound(TC_INGRESS_PROG))?
                .try_into()
                .map_err(|source| DataplaneError::Program {
                    program: TC_INGRESS_PROG,
                    source,
                })?;
            links::attach_pinned(prog, name, &self.links_dir)?;
            if self.xdp == XdpMode::Off {
                Ok(())
            } else {
                xdp::program(&mut ebpf)
                    .and_then(|p| xdp::attach_pinned(p, name, self.xdp, &self.links_dir))
            }
        };
        // The TC link is pinned even if XDP failed: its reverse NAT needs the sysctls.
        let sysctl = self.sysctls.configure_iface(name);
        xdp.and(sysctl)
    }

    fn detach(&mut self, name: &str) -> Result<(), DataplaneError> {
        // The interface is gone (or renamed): its sysctls are not ours to restore any more.
        if let Err(e) = self.sysctls.forget_iface(name) {
            warn!(iface = name, error = %e, "could not update the sysctl record");
        }
        // Both, even when XDP is off now: a previous agent may have left an XDP pin.
        let tc = links::remove_link(&self.links_dir, name);
        xdp::remove_link(&self.links_dir, name)?;
        tc
    }
}

/// The attach state shared by the initial pass (in `Dataplane::load`) and the watcher thread.
pub struct Attacher<O: LinkOps = TcLinks> {
    ops: O,
    sel: IfaceSelector,
    /// Interfaces we attached to: name -> ifindex at attach time.
    attached: BTreeMap<String, u32>,
    /// Attached interfaces whose XDP attach failed (TC only; the health check does not expect
    /// an XDP link there).
    xdp_failed: BTreeSet<String>,
}

impl<O: LinkOps> Attacher<O> {
    pub fn new(ops: O, sel: IfaceSelector) -> Attacher<O> {
        Attacher {
            ops,
            sel,
            attached: BTreeMap::new(),
            xdp_failed: BTreeSet::new(),
        }
    }

    pub fn attached(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    /// The attached interfaces with the ifindex they had when attached.
    pub fn attached_indexes(&self) -> Vec<(String, u32)> {
        self.attached.iter().map(|(n, i)| (n.clone(), *i)).collect()
    }

    /// Attached interfaces served by TC only because their XDP attach failed.
    pub fn xdp_failed(&self) -> BTreeSet<String> {
        self.xdp_failed.clone()
    }

    /// The operations (the repair re-attaches through them).
    pub fn ops(&mut self) -> &mut O {
        &mut self.ops
    }

    /// Attaches to every matching link of `links` (one dump of the namespace). Fails on the
    /// first attach error: at startup a half-attached node is worse than a clear error.
    pub fn attach_initial(&mut self, links: &[(u32, String)]) -> Result<(), DataplaneError> {
        for (index, name) in links {
            if self.sel.matches(name) {
                self.attach(*index, name)?;
            }
        }
        if !self.sel.patterns().is_empty() {
            info!(
                patterns = ?self.sel.patterns(),
                attached = ?self.attached(),
                "following interfaces that match the --iface patterns"
            );
        }
        Ok(())
    }

    fn attach(&mut self, index: u32, name: &str) -> Result<(), DataplaneError> {
        let result = self.ops.attach(name);
        // Recorded even when only the sysctls or the optional XDP attach failed (native XDP on
        // a driver without it): the TC link is pinned and serves the interface, and its pin
        // must be forgotten when the interface goes. Retrying would not make a driver
        // support XDP.
        let tc_attached = matches!(
            result,
            Ok(()) | Err(DataplaneError::Sysctl { .. } | DataplaneError::XdpAttach { .. })
        );
        if tc_attached {
            self.attached.insert(name.to_string(), index);
        }
        if matches!(result, Err(DataplaneError::XdpAttach { .. })) {
            self.xdp_failed.insert(name.to_string());
        } else {
            self.xdp_failed.remove(name);
        }
        result
    }

    /// Detaches and unpins our link on `name` (its interface went away or was renamed).
    fn forget(&mut self, name: &str, why: &str) {
        self.attached.remove(name);
        self.xdp_failed.remove(name);
        match self.ops.detach(name) {
            Ok(()) => info!(iface = name, "{why}: detached and unpinned its TC link"),
            Err(e) => warn!(iface = name, error = %e, "{why}: could not remove its TC link pin"),
        }
    }

    /// A link exists (new, or changed state/name).
    fn link_new(&mut self, index: u32, name: &str) {
        if self.attached.get(name) == Some(&index) {
            return; // state change of a link we already serve
        }
        // Renamed: the old name's pin would point at this ifindex under a wrong name.
        let renamed: Vec<String> = self
            .attached
            .iter()
            .filter(|(n, i)| **i == index && n.as_str() != name)
            .map(|(n, _)| n.clone())
            .collect();
        for old in renamed {
            self.forget(&old, "interface renamed");
        }
        if !self.sel.matches(name) {
            return;
        }
        if self.attached.contains_key(name) {
            // Same name, new ifindex: deleted and recreated (the delete event was missed).
            self.forget(name, "interface recreated");
        }
        match self.attach(index, name) {
            Ok(()) => {}
            Err(e @ DataplaneError::XdpAttach { .. }) => {
                warn!(iface = name, error = %e, "new interface served by TC only: XDP not attached");
            }
            // Typically the link went away again already; its delete event follows.
            Err(e) => warn!(iface = name, error = %e, "could not attach to new interface"),
        }
    }

    fn link_del(&mut self, index: u32, name: &str) {
        if self.attached.get(name) == Some(&index) {
            self.forget(name, "interface removed");
        }
    }

    fn handle(&mut self, ev: LinkEvent) {
        debug!(?ev, "link event");
        match ev {
            LinkEvent::New { index, name } => self.link_new(index, &name),
            LinkEvent::Del { index, name } => self.link_del(index, &name),
        }
    }

    /// Brings the attached set in line with a fresh dump (after lost events).
    fn resync(&mut self) {
        match netlink::dump_links() {
            Ok(links) => self.resync_with(links),
            Err(e) => warn!(error = %e, "cannot list interfaces to resynchronise"),
        }
    }

    fn resync_with(&mut self, links: Vec<(u32, String)>) {
        let gone: Vec<(String, u32)> = self
            .attached
            .iter()
            .filter(|(n, i)| !links.iter().any(|(li, ln)| li == *i && ln == *n))
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        for (name, index) in gone {
            self.link_del(index, &name);
        }
        for (index, name) in links {
            self.link_new(index, &name);
        }
    }
}

/// The watcher thread; dropping it stops the thread (links stay attached and pinned).
pub struct LinkWatcher {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl LinkWatcher {
    /// Starts following `events` (subscribed before the initial dump, so no link can appear
    /// unnoticed in between).
    /// After each batch of events, `changed` is notified: the agent then checks that its
    /// datapath is whole (a link event is when interfaces and their links change).
    pub fn start(
        attacher: Arc<Mutex<Attacher<TcLinks>>>,
        mut events: NlSocket,
        changed: Arc<tokio::sync::Notify>,
    ) -> Result<LinkWatcher, DataplaneError> {
        // SAFETY: plain eventfd(2); the fd is owned below.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if stop < 0 {
            return Err(DataplaneError::Watch(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd we own.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let stop_fd = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("link-watch".into())
            .spawn(move || {
                loop {
                    let mut fds = [
                        libc::pollfd {
                            fd: events.raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: stop_fd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: two valid pollfds; both fds outlive the thread (`stop` is only
                    // closed after join).
                    let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if ret < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        warn!(error = %e, "link watcher poll failed; new interfaces are no longer attached");
                        return;
                    }
                    if fds[1].revents != 0 {
                        return;
                    }
                    let lock = || attacher.lock().unwrap_or_else(|e| e.into_inner());
                    match events.recv() {
                        Ok(parsed) => {
                            let mut a = lock();
                            parsed.events.into_iter().for_each(|ev| a.handle(ev));
                            drop(a);
                            changed.notify_one();
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            warn!("link events were lost (socket buffer full); resynchronising");
                            lock().resync();
                            changed.notify_one();
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            warn!(error = %e, "link watcher receive failed; new interfaces are no longer attached");
                            return;
                        }
                    }
                }
            })
            .map_err(DataplaneError::Watch)?;
        Ok(LinkWatcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LinkWatcher {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the attacher asked for; `fail` names interfaces whose attach fails.
    #[derive(Default)]
    struct Fake {
        calls: Vec<String>,
        fail: Vec<String>,
        /// TC attaches, XDP fails (native mode on a driver without XDP).
        xdp_fail: Vec<String>,
    }

    impl LinkOps for Fake {
        fn attach(&mut self, name: &str) -> Result<(), DataplaneError> {
            self.calls.push(format!("attach {name}"));
            if self.fail.iter().any(|f| f == name) {
                return Err(DataplaneError::NoSuchInterface(name.into()));
            }
            if self.xdp_fail.iter().any(|f| f == name) {
                return Err(DataplaneError::XdpAttach {
                    iface: name.into(),
                    mode: XdpMode::Native,
                    source: aya::programs::ProgramError::NotLoaded,
                });
            }
            Ok(())
        }
        fn detach(&mut self, name: &str) -> Result<(), DataplaneError> {
            self.calls.push(format!("detach {name}"));
            Ok(())
        }
    }

    fn attacher(specs: &[&str]) -> Attacher<Fake> {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        Attacher::new(Fake::default(), IfaceSelector::parse(&specs).unwrap())
    }

    fn new(index: u32, name: &str) -> LinkEvent {
        LinkEvent::New {
            index,
            name: name.into(),
        }
    }

    fn del(index: u32, name: &str) -> LinkEvent {
        LinkEvent::Del {
            index,
            name: name.into(),
        }
    }

    fn calls(a: &mut Attacher<Fake>) -> Vec<String> {
        std::mem::take(&mut a.ops.calls)
    }

    #[test]
    fn initial_pass_attaches_matching_links_only() {
        let mut a = attacher(&["eth0", "lxc*"]);
        let links =
            [(1, "lo"), (2, "eth0"), (3, "lxc1"), (4, "docker0")].map(|(i, n)| (i, n.to_string()));
        a.attach_initial(&links).unwrap();
        assert_eq!(calls(&mut a), ["attach eth0", "attach lxc1"]);
        assert_eq!(a.attached(), ["eth0", "lxc1"]);
    }

    #[test]
    fn new_links_are_attached_once_and_deleted_ones_forgotten() {
        let mut a = attacher(&["lxc*"]);
        a.handle(new(7, "lxc7"));
        // State changes (up, MTU, ...) repeat RTM_NEWLINK for the same link.
        a.handle(new(7, "lxc7"));
        a.handle(new(8, "eth1"));
        assert_eq!(calls(&mut a), ["attach lxc7"]);
        // A delete for another ifindex under the same name is not ours.
        a.handle(del(9, "lxc7"));
        a.handle(del(8, "eth1"));
        assert!(calls(&mut a).is_empty());
        a.handle(del(7, "lxc7"));
        assert_eq!(calls(&mut a), ["detach lxc7"]);
        assert!(a.attached().is_empty());
    }

    #[test]
    fn renames_and_recreations() {
        let mut a = attacher(&["lxc*"]);
        a.handle(new(7, "lxc7"));
        // Renamed out of the pattern: forgotten.
        a.handle(new(7, "tmp7"));
        // Renamed into the pattern: attached under the new name.
        a.handle(new(8, "tmp8"));
        a.handle(new(8, "lxc8"));
        assert_eq!(calls(&mut a), ["attach lxc7", "detach lxc7", "attach lxc8"]);
        // Deleted and recreated with the same name while the delete was missed.
        a.handle(new(9, "lxc8"));
        assert_eq!(calls(&mut a), ["detach lxc8", "attach lxc8"]);
        assert_eq!(a.attached.get("lxc8"), Some(&9));
    }

    #[test]
    fn a_failed_attach_is_not_recorded_and_retried_on_the_next_event() {
        let mut a = attacher(&["lxc*"]);
        a.ops.fail.push("lxc1".into());
        a.handle(new(1, "lxc1"));
        assert!(a.attached().is_empty());
        a.ops.fail.clear();
        a.handle(new(1, "lxc1"));
        assert_eq!(calls(&mut a), ["attach lxc1", "attach lxc1"]);
        assert_eq!(a.attached(), ["lxc1"]);
    }

    #[test]
    fn a_failed_xdp_attach_keeps_the_tc_link_recorded() {
        let mut a = attacher(&["lxc*"]);
        a.ops.xdp_fail.push("lxc1".into());
        a.handle(new(1, "lxc1"));
        assert_eq!(a.attached(), ["lxc1"]);
        a.handle(new(1, "lxc1"));
        a.handle(del(1, "lxc1"));
        assert_eq!(calls(&mut a), ["attach lxc1", "detach lxc1"]);
        assert!(a.attached().is_empty());
    }

    #[test]
    fn resync_after_lost_events() {
        let mut a = attacher(&["lxc*"]);
        a.handle(new(1, "lxc1"));
        a.handle(new(2, "lxc2"));
        calls(&mut a);
        // lxc1 vanished, lxc2 was recreated (new ifindex), lxc3 appeared: all unseen.
        a.resync_with(vec![(5, "lxc2".into()), (6, "lxc3".into())]);
        assert_eq!(
            calls(&mut a),
            ["detach lxc1", "detach lxc2", "attach lxc2", "attach lxc3"]
        );
        assert_eq!(a.attached(), ["lxc2", "lxc3"]);
    }
}
