//! Keeps the TC program attached to every interface the `--iface` selector matches, including
//! interfaces created after the agent started (pod veths): a thread follows rtnetlink link
//! events, attaches to new matching links and forgets (detaches, unpins) links that go away.

use std::{
    collections::BTreeMap,
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
    sysctl,
};

/// The attach state shared by the initial pass (in `Dataplane::load`) and the watcher thread.
pub struct Attacher {
    ebpf: Arc<Mutex<Ebpf>>,
    links_dir: PathBuf,
    sel: IfaceSelector,
    /// Interfaces we attached to: name -> ifindex at attach time.
    attached: BTreeMap<String, u32>,
}

impl Attacher {
    pub fn new(ebpf: Arc<Mutex<Ebpf>>, links_dir: PathBuf, sel: IfaceSelector) -> Attacher {
        Attacher {
            ebpf,
            links_dir,
            sel,
            attached: BTreeMap::new(),
        }
    }

    pub fn attached(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
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
        {
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
        }
        self.attached.insert(name.to_string(), index);
        sysctl::configure_iface(name)?;
        Ok(())
    }

    /// Detaches and unpins our link on `name` (its interface went away or was renamed).
    fn forget(&mut self, name: &str, why: &str) {
        self.attached.remove(name);
        match links::remove_link(&self.links_dir, name) {
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
        if let Err(e) = self.attach(index, name) {
            // Typically the link went away again already; its delete event follows.
            warn!(iface = name, error = %e, "could not attach to new interface");
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
        let links = match netlink::dump_links() {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot list interfaces to resynchronise");
                return;
            }
        };
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
    pub fn start(
        mut attacher: Attacher,
        mut events: NlSocket,
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
                    match events.recv() {
                        Ok(parsed) => parsed.events.into_iter().for_each(|ev| attacher.handle(ev)),
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            warn!("link events were lost (socket buffer full); resynchronising");
                            attacher.resync();
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
