//! `svc-lb run`: load and attach the datapath, then keep the maps equal to what the manifests
//! describe (this file), or to what the API server holds (`api`, without `--manifests`).
//!
//! Manifest mode: changes are picked up through inotify (debounced) with a periodic rescan as a
//! safety net; a failing reconcile is logged and retried, never fatal.
//!
//! Bad input policy: an object that fails to parse or translate is absent from the new state
//! (its frontends go away, like an object deleted from the API). A file that cannot be read at
//! all, or none of whose documents parse, is more likely caught mid-write or broken by an
//! editor than meant to be empty, so the objects it had at the last good read are kept until
//! it reads again (or is deleted).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use notify::{EventKind, RecursiveMode, Watcher as _, event::AccessKind};
use thiserror::Error;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use crate::{
    cli::RunArgs,
    dataplane::{Dataplane, DataplaneConfig, DataplaneError},
    k8s::{
        alloc::{AllocConfig, RecordStore, StandaloneAllocator},
        manifest::{Loader, Location, ManifestError, manifest_files},
    },
    maps::{BpfLbMaps, MapsError},
    netif::{self, NetifError},
    reconcile::{self, Outcome},
    translate::{SharedObjects, TranslateConfig},
};

mod api;
mod sync;

use sync::{MapSync, Scope};

/// How long to wait after a change event for the rest of a multi-file update. Short: a sync
/// only costs what changed, and this delay is part of every change's latency.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// Rescan interval, in case an inotify event was missed (or the directory was replaced): only
/// files whose stamp changed are read again.
const RESCAN: Duration = Duration::from_secs(2);
/// How often a rescan also reconciles fully: reads the maps back and repairs what someone
/// else changed in them (like API mode's default `--resync-interval`).
const FULL_RESYNC: Duration = Duration::from_secs(30);

/// `svc-lb run` startup failures (the loop itself logs and retries instead of failing).
#[derive(Debug, Error)]
pub enum RunError {
    #[error("cannot load the datapath")]
    Dataplane(#[from] DataplaneError),

    #[error(transparent)]
    Maps(#[from] MapsError),

    #[error("cannot determine node IPs")]
    Netif(#[from] NetifError),

    #[error(transparent)]
    Manifests(#[from] ManifestError),

    #[error("cannot watch {}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },

    #[error("cannot install a signal handler")]
    Signal(#[source] std::io::Error),

    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),

    #[error("cannot program the maps")]
    Reconcile(#[source] reconcile::ReconcileError),

    #[error("cannot configure the Kubernetes client")]
    Client(#[from] crate::k8s::client::ClientError),

    #[error(transparent)]
    Views(#[from] crate::serve::ServeError),

    #[error("cannot serve the health endpoint on {addr}")]
    Health {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Objects of one file, as last read successfully (shared with the translator).
#[derive(Clone, Debug, Default)]
struct FileObjects {
    services: Vec<Arc<Service>>,
    endpoint_slices: Vec<Arc<EndpointSlice>>,
    pods: Vec<Arc<Pod>>,
    nodes: Vec<Arc<Node>>,
}

impl FileObjects {
    fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.pods.is_empty()
            && self.nodes.is_empty()
    }
}

/// The duplicate-detection key the loader uses: (kind, namespace, name).
type ObjectKey = (&'static str, String, String);

/// What identifies a version of a file without reading it: inode, size and modification time
/// (following symlinks, like the loader).
type Stamp = (u64, u64, i64, i64);

/// What identifies a version of the directory: its files and their stamps.
type Fingerprint = Vec<(PathBuf, Stamp)>;

fn fingerprint(dir: &Path) -> Result<Fingerprint, ManifestError> {
    Ok(manifest_files(dir)?
        .into_iter()
        .map(|f| {
            let m = fs::metadata(&f).ok();
            let stamp = m.map_or((0, 0, 0, 0), |m| {
                (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
            });
            (f, stamp)
        })
        .collect())
}

/// One file as read at `stamp`.
#[derive(Debug)]
struct FileEntry {
    stamp: Stamp,
    /// What it contributes: its objects, or the last good ones while it cannot be read.
    objects: FileObjects,
    /// Problems of that read (reported on every load, logged once by the caller).
    errors: Vec<Arc<ManifestError>>,
    /// `objects` are the last good read's: the file could not be read at `stamp`.
    stale: bool,
}

/// Reads the manifest directory, re-parsing only the files that changed since the last read
/// and remembering each file's last good objects.
#[derive(Debug, Default)]
pub struct ManifestCache {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    last_fingerprint: Option<Fingerprint>,
    /// How many files name each object (by a hash of its key: a collision only costs a load
    /// the slow duplicate check), kept up to date as files are read, so that a load knows
    /// without hashing every object whether any object is in two files.
    key_files: HashMap<u64, u32>,
    /// Objects named by more than one file.
    shared_keys: usize,
}

/// One read of the directory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: SharedObjects,
    pub errors: Vec<Arc<ManifestError>>,
    /// Files whose previous objects were kept because they could not be read now.
    pub kept_stale: Vec<PathBuf>,
}

impl ManifestCache {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            last_fingerprint: None,
            key_files: HashMap::new(),
            shared_keys: 0,
        }
    }

    /// Loads unless nothing changed on disk since the last load (`None`). The periodic rescan
    /// uses this so an idle agent neither re-parses every file nor repeats its warnings.
    pub fn load_if_changed(&mut self) -> Result<Option<Loaded>, ManifestError> {
        let fp = fingerprint(&self.dir)?;
        if self.last_fingerprint.as_ref() == Some(&fp) {
            return Ok(None);
        }
        self.load().map(Some)
    }

    /// Reads `file` on its own. `prev` is its entry from the last load, whose objects are kept
    /// if the file cannot be read now.
    fn read_file(file: &Path, stamp: Stamp, prev: Option<FileEntry>) -> FileEntry {
        let mut loader = Loader::default();
        loader.load_file(file);
        let o = loader.objects;
        let now = FileObjects {
            services: o.services.into_iter().map(Arc::new).collect(),
            endpoint_slices: o.endpoint_slices.into_iter().map(Arc::new).collect(),
            pods: o.pods.into_iter().map(Arc::new).collect(),
            nodes: o.nodes.into_iter().map(Arc::new).collect(),
        };
        let unreadable = now.is_empty()
            && loader.errors.iter().any(|e| {
                matches!(
                    e,
                    ManifestError::ReadFile { .. } | ManifestError::Malformed { .. }
                )
            });
        let errors = loader.errors.into_iter().map(Arc::new).collect();
        match prev {
            Some(prev) if unreadable && !prev.objects.is_empty() => FileEntry {
                stamp,
                errors,
                stale: true,
                ..prev
            },
            _ => FileEntry {
                stamp,
                objects: now,
                errors,
                stale: false,
            },
        }
    }

    /// `Err` only when the directory itself cannot be listed.
    pub fn load(&mut self) -> Result<Loaded, ManifestError> {
        // Taken before reading: a write that lands during the read changes the fingerprint,
        // so the next rescan reads again.
        let fp = fingerprint(&self.dir)?;
        let mut prev = std::mem::take(&mut self.files);
        for (file, stamp) in &fp {
            let entry = match prev.remove(file) {
                Some(e) if e.stamp == *stamp => e,
                e => {
                    if let Some(e) = &e {
                        self.count_keys(e, false);
                    }
                    let entry = Self::read_file(file, *stamp, e);
                    self.count_keys(&entry, true);
                    entry
                }
            };
            self.files.insert(file.clone(), entry);
        }
        // Deleted files drop out (`prev` is what is left): removing a file is deliberate.
        for e in prev.values() {
            self.count_keys(e, false);
        }
        self.last_fingerprint = Some(fp);
        Ok(self.assemble())
    }

    /// Adds (or removes) the objects of `e` to the per-object file counts.
    fn count_keys(&mut self, e: &FileEntry, add: bool) {
        use std::hash::{BuildHasher as _, BuildHasherDefault};
        let hasher = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        let o = &e.objects;
        let named = o
            .services
            .iter()
            .map(|x| ("Service", &x.metadata))
            .chain(
                o.endpoint_slices
                    .iter()
                    .map(|x| ("EndpointSlice", &x.metadata)),
            )
            .chain(o.pods.iter().map(|x| ("Pod", &x.metadata)))
            .chain(o.nodes.iter().map(|x| ("Node", &x.metadata)));
        for (kind, meta) in named {
            let Some(name) = meta.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let ns = meta.namespace.as_deref().unwrap_or_default();
            let key = hasher.hash_one((kind, ns, name));
            if add {
                let n = self.key_files.entry(key).or_insert(0);
                *n += 1;
                if *n == 2 {
                    self.shared_keys += 1;
                }
            } else if let Some(n) = self.key_files.get_mut(&key) {
                *n -= 1;
                if *n == 1 {
                    self.shared_keys -= 1;
                }
                if *n == 0 {
                    self.key_files.remove(&key);
                }
            }
        }
    }

    /// All files' objects in file order. An object already read from an earlier file is a
    /// duplicate (reported, as the loader reports duplicates inside one file); the objects of
    /// files that cannot be read come last and silently give way to a readable copy (it
    /// moved there).
    fn assemble<'s>(&'s self) -> Loaded {
        if self.shared_keys == 0 {
            return self.concatenate();
        }
        let mut out = Loaded::default();
        // Borrowed keys: this runs on every change, over every object of every file.
        let mut seen: HashMap<(&str, &str, &str), &'s Path> = HashMap::new();
        // Where objects are is not kept (it would cost more memory than the objects' names):
        // the files with a duplicate are parsed again to say where it is.
        let mut locations: HashMap<&Path, HashMap<ObjectKey, Location>> = HashMap::new();
        let mut locate = |file: &'s Path, key: &ObjectKey| -> Location {
            let found = locations
                .entry(file)
                .or_insert_with(|| {
                    let mut loader = Loader::default();
                    loader.load_file(file);
                    loader.seen
                })
                .get(key)
                .cloned();
            // Changed again since it was read: the next load reports it properly.
            found.unwrap_or_else(|| Location {
                file: file.to_path_buf(),
                document: 0,
                line: 0,
                item: None,
            })
        };
        for stale in [false, true] {
            for (file, e) in self.files.iter().filter(|(_, e)| e.stale == stale) {
                out.errors.extend(e.errors.iter().cloned());
                if stale {
                    out.kept_stale.push(file.clone());
                }
                let mut take = |kind: &'static str, meta: &'s ObjectMeta| -> bool {
                    let Some(name) = meta.name.as_deref().filter(|n| !n.is_empty()) else {
                        return true;
                    };
                    let ns = meta.namespace.as_deref().unwrap_or_default();
                    let Some(first) = seen.get(&(kind, ns, name)).copied() else {
                        seen.insert((kind, ns, name), file);
                        return true;
                    };
                    if !stale {
                        let key = (kind, ns.to_owned(), name.to_owned());
                        let (at, first) = (locate(file, &key), locate(first, &key));
                        let ns = (kind != "Node").then_some(ns);
                        out.errors.push(Arc::new(ManifestError::Duplicate {
                            at,
                            object: crate::k8s::describe(kind, ns, Some(name)),
                            first: Box::new(first),
                        }));
                    }
                    false
                };
                let o = &e.objects;
                let objects = &mut out.objects;
                objects.services.extend(
                    o.services
                        .iter()
                        .filter(|x| take("Service", &x.metadata))
                        .cloned(),
                );
                objects.endpoint_slices.extend(
                    o.endpoint_slices
                        .iter()
                        .filter(|x| take("EndpointSlice", &x.metadata))
                        .cloned(),
                );
                objects
                    .pods
                    .extend(o.pods.iter().filter(|x| take("Pod", &x.metadata)).cloned());
                objects.nodes.extend(
                    o.nodes
                        .iter()
                        .filter(|x| take("Node", &x.metadata))
                        .cloned(),
                );
            }
        }
        out
    }

    /// [`Self::assemble`] when no object is in two files: nothing to look up.
    fn concatenate(&self) -> Loaded {
        let mut out = Loaded::default();
        for stale in [false, true] {
            for (file, e) in self.files.iter().filter(|(_, e)| e.stale == stale) {
                out.errors.extend(e.errors.iter().cloned());
                if stale {
                    out.kept_stale.push(file.clone());
                }
                let (o, objects) = (&e.objects, &mut out.objects);
                objects.services.extend(o.services.iter().cloned());
                objects
                    .endpoint_slices
                    .extend(o.endpoint_slices.iter().cloned());
                objects.pods.extend(o.pods.iter().cloned());
                objects.nodes.extend(o.nodes.iter().cloned());
            }
        }
        out
    }
}

/// Why a sync runs (logged with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Startup,
    /// inotify saw a change.
    Change,
    /// Periodic safety net: re-reads only if the files changed, always re-applies.
    Rescan,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trigger::Startup => "startup",
            Trigger::Change => "change",
            Trigger::Rescan => "rescan",
        })
    }
}

/// Logs a set of messages only when it differs from the previous round, so the periodic
/// rescan does not repeat the same warnings every two seconds.
#[derive(Default)]
struct Dedup(Vec<String>);

impl Dedup {
    fn changed(&mut self, msgs: Vec<String>) -> Option<Vec<String>> {
        if msgs == self.0 {
            return None;
        }
        self.0 = msgs.clone();
        Some(msgs)
    }
}

struct Agent {
    sync: MapSync,
    cache: ManifestCache,
    manifest_log: Dedup,
    /// ClusterIPs and node ports, as an API server would give them (issue 11).
    alloc: StandaloneAllocator,
    alloc_log: Dedup,
    /// When the last full reconcile ran (the periodic one repairs drift in the maps).
    last_full: Instant,
}

impl Agent {
    /// Read (changed files only), translate (changed Services only), reconcile (changed
    /// frontends only, or everything every [`FULL_RESYNC`]). Problems with individual objects
    /// are logged; only a failed dump/apply or an unreadable directory is an error.
    fn sync(&mut self, why: Trigger) -> Result<Outcome, RunError> {
        let started = std::time::Instant::now();
        let loaded = match why {
            // `run_async` read the manifests before attaching the datapath.
            Trigger::Startup => None,
            Trigger::Change => Some(self.cache.load()?),
            Trigger::Rescan => self.cache.load_if_changed()?,
        };
        if let Some(loaded) = loaded {
            debug!(
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "manifests read (changed files only)"
            );
            self.read(loaded);
        }
        let full = match why {
            Trigger::Startup => true,
            Trigger::Change => false,
            Trigger::Rescan => self.last_full.elapsed() >= FULL_RESYNC,
        };
        if full {
            self.last_full = Instant::now();
        }
        let scope = if full { Scope::Full } else { Scope::Changes };
        self.sync.reconcile(scope, why)
    }

    /// Takes a manifest read, logging what was skipped (each distinct set once).
    fn read(&mut self, loaded: Loaded) {
        let mut msgs: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        msgs.extend(loaded.kept_stale.iter().map(|f| {
            format!(
                "{}: keeping the objects of the last good read until it reads again",
                f.display()
            )
        }));
        if let Some(msgs) = self.manifest_log.changed(msgs) {
            if msgs.is_empty() {
                info!("manifests read without problems again");
            }
            for m in msgs {
                warn!("manifest: {m}");
            }
        }
        let mut objects = loaded.objects;
        if let Some(update) = self.alloc.update_from_dir(&objects.services) {
            let mut msgs: Vec<String> = update.problems.iter().map(ToString::to_string).collect();
            if let Some(e) = &update.save_error {
                msgs.push(format!("{e} (retried on the next change)"));
            }
            if let Some(msgs) = self.alloc_log.changed(msgs) {
                for m in msgs {
                    warn!("allocation: {m}");
                }
            }
        }
        objects.services = self.alloc.current().services.clone();
        self.sync.update(&objects);
    }

    /// A sync inside the loop: errors are logged (once per distinct error) and retried.
    /// Returns whether the manifest directory could be listed (false = it is gone, and so
    /// is its inotify watch).
    fn sync_logged(&mut self, why: Trigger) -> bool {
        let result = self.sync(why);
        self.sync.log_result(&result);
        !matches!(
            result,
            Err(RunError::Manifests(ManifestError::ReadDir { .. }))
        )
    }
}

fn node_ips(args: &RunArgs) -> Result<Vec<std::net::Ipv4Addr>, NetifError> {
    if !args.node_ips.is_empty() {
        return Ok(args.node_ips.clone());
    }
    netif::ipv4_addrs(&args.ifaces)
}

/// Loads the datapath (reusing the pinned maps, so programmed frontends keep working) and
/// opens its maps.
fn load_datapath(args: &RunArgs) -> Result<(Dataplane, BpfLbMaps), RunError> {
    // Before anything is loaded: a wrong --cgroup-path leaves the node untouched.
    let cgroup = args
        .socket_lb_cgroup()
        .map(crate::dataplane::cgroup::resolve)
        .transpose()?;
    // A failed start also undoes a cgroup v2 mount made for it just now.
    let undo_cgroup = || {
        if cgroup
            .as_ref()
            .is_some_and(|c| c.origin == crate::dataplane::cgroup::CgroupOrigin::Mounted)
        {
            let _ = crate::dataplane::cgroup::unmount_own();
        }
    };
    let dataplane = match Dataplane::load_with_options(
        &DataplaneConfig {
            pin_dir: args.pin.pin_dir.clone(),
            ifaces: args.ifaces.clone(),
        },
        &(&args.capacity).into(),
        args.xdp,
    ) {
        Ok(d) => d,
        Err(e) => {
            undo_cgroup();
            return Err(e.into());
        }
    };
    let rest = || -> Result<BpfLbMaps, RunError> {
        dataplane.set_socket_lb(cgroup.as_ref().map(|c| c.path.as_path()))?;
        program_local_sources(args)?;
        Ok(BpfLbMaps::open(&args.pin.pin_dir)?)
    };
    match rest() {
        Ok(maps) => Ok((dataplane, maps)),
        Err(e) => {
            // A failed start leaves the node as it found it.
            dataplane.roll_back();
            undo_cgroup();
            Err(e)
        }
    }
}

/// Checks that the datapath is whole (at every resync and after interface changes) and
/// repairs it or fails per `--on-datapath-loss`.
pub(crate) fn verify_datapath(dataplane: &Dataplane, args: &RunArgs) -> Result<(), RunError> {
    Ok(dataplane.verify(args.on_datapath_loss)?)
}

/// Tells the datapath which sources are inside the cluster (`--cluster-cidr` and this node's
/// addresses): their traffic to externalTrafficPolicy Local frontends may use every endpoint.
fn program_local_sources(args: &RunArgs) -> Result<(), RunError> {
    let mut prefixes: Vec<(std::net::Ipv4Addr, u8)> =
        args.cluster_cidrs.iter().map(|c| (c.addr, c.len)).collect();
    prefixes.extend(node_ips(args)?.into_iter().map(|ip| (ip, 32)));
    let changed = crate::maps::program_local_sources(&args.pin.pin_dir, &prefixes)?;
    info!(
        cluster_cidrs = ?args.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        prefixes = prefixes.len(),
        changed,
        "in-cluster sources (externalTrafficPolicy Local does not restrict them)"
    );
    Ok(())
}

fn log_exit(args: &RunArgs) {
    info!(
        pin_dir = %args.pin.pin_dir.display(),
        "exiting; programs stay attached and maps pinned (`svc-lb uninstall` removes them)"
    );
}

/// Runs the agent until SIGINT/SIGTERM. Programs and pins stay in place on exit, like
/// kube-proxy leaves its rules; `svc-lb uninstall` removes them.
pub fn run(args: &RunArgs) -> Result<(), RunError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    // A node moving from kube-proxy: its stale rules would still act on Service traffic.
    crate::kube_proxy::warn_leftovers();
    match &args.manifests {
        Some(dir) => rt.block_on(run_async(args, dir)),
        None => rt.block_on(api::run(args)),
    }
}

async fn run_async(args: &RunArgs, dir: &Path) -> Result<(), RunError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;

    // Everything that can fail on bad arguments runs before the datapath is attached, so a
    // typo leaves the node untouched.
    let node_ips = node_ips(args)?;
    if node_ips.is_empty() {
        warn!(
            "no node IPs (none given with --node-ip and the interfaces have no IPv4 address): NodePorts only listen on Node object addresses"
        );
    } else {
        info!(?node_ips, "NodePort addresses");
    }
    // Watching starts before the first read, so no change can fall between the two.
    let changed = Arc::new(Notify::new());
    let notify_changed = changed.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            // Our own reads show up as open/close-nowrite events; only writes matter.
            Ok(ev) => match ev.kind {
                EventKind::Access(AccessKind::Close(notify::event::AccessMode::Write)) => {
                    notify_changed.notify_one()
                }
                EventKind::Access(_) => {}
                _ => notify_changed.notify_one(),
            },
            // Overflow or similar: rescan.
            Err(_) => notify_changed.notify_one(),
        }
    })
    .map_err(|source| RunError::Watch {
        dir: dir.to_path_buf(),
        source,
    })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|source| RunError::Watch {
            dir: dir.to_path_buf(),
            source,
        })?;
    info!(dir = %dir.display(), "watching manifests");
    let mut cache = ManifestCache::new(dir);
    let first = cache.load()?;
    let alloc_cfg = AllocConfig {
        service_cidrs: args.service_cidrs.clone(),
        node_ports: args.nodeport_range.min..=args.nodeport_range.max,
    };
    let store = RecordStore::new(&args.state_dir);
    let (alloc, record_err) = StandaloneAllocator::new(alloc_cfg, Some(store.clone()));
    let alloc = alloc.reading(dir);
    match record_err {
        None => info!(
            record = %store.path().display(),
            services = alloc.record().services.len(),
            "allocation record loaded"
        ),
        Some(e) => warn!("{e}; allocating afresh"),
    }
    sync::release_free_memory();
    // Bound before the datapath is touched, so a taken address leaves the node as it was.
    let telemetry = crate::serve::Telemetry::new();
    crate::serve::servers::start(&args.views, &args.pin.pin_dir, &telemetry).await?;

    let (dataplane, maps) = load_datapath(args)?;
    let translate_cfg = TranslateConfig {
        node_ips,
        node_name: args.node_name.clone(),
        nodeport_range: args.nodeport_range,
    };
    let mut agent = Agent {
        sync: MapSync::new(maps, translate_cfg, args, telemetry),
        cache,
        manifest_log: Dedup::default(),
        alloc,
        alloc_log: Dedup::default(),
        last_full: Instant::now(),
    };
    agent.read(first);
    // Plans against what is programmed, so a restarted agent adopts its predecessor's ids.
    agent.sync(Trigger::Startup)?;
    sync::release_free_memory();

    let mut rescan = tokio::time::interval_at(Instant::now() + RESCAN, RESCAN);
    rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deadline: Option<Instant> = None;
    let mut dir_lost = false;
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT"); break; }
            _ = sigterm.recv() => { info!("SIGTERM"); break; }
            _ = changed.notified() => {
                // The first event of a burst opens the window; later ones ride along.
                deadline.get_or_insert_with(|| Instant::now() + DEBOUNCE);
            }
            _ = sync::until(deadline) => {
                deadline = None;
                dir_lost = !agent.sync_logged(Trigger::Change);
            }
            _ = dataplane.link_events() => verify_datapath(&dataplane, args)?,
            _ = rescan.tick() => {
                verify_datapath(&dataplane, args)?;
                let listed = agent.sync_logged(Trigger::Rescan);
                if listed && dir_lost {
                    // The directory was removed and is back: its old watch died with it.
                    let _ = watcher.unwatch(dir);
                    match watcher.watch(dir, RecursiveMode::NonRecursive) {
                        Ok(()) => info!(dir = %dir.display(), "watching manifests again"),
                        Err(e) => warn!("cannot watch {} again (rescans continue): {e}", dir.display()),
                    }
                }
                dir_lost = !listed;
            }
        }
    }
    drop(watcher);
    drop(dataplane);
    log_exit(args);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: NAME\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";

    fn svc(name: &str) -> String {
        SVC.replace("NAME", name)
    }

    fn names(o: &SharedObjects) -> Vec<String> {
        o.services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect()
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("svc-lb-run-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn broken_file_keeps_its_last_good_objects_other_files_update() {
        let d = TempDir::new("stale");
        fs::write(d.0.join("a.yaml"), svc("a")).unwrap();
        fs::write(d.0.join("b.yaml"), svc("b")).unwrap();
        let mut cache = ManifestCache::new(&d.0);
        let l = cache.load().unwrap();
        assert_eq!(names(&l.objects), ["a", "b"]);
        assert!(l.kept_stale.is_empty());

        // a.yaml becomes garbage, b.yaml gets a second Service.
        fs::write(d.0.join("a.yaml"), "kind: [unclosed\n  : : :\n").unwrap();
        fs::write(
            d.0.join("b.yaml"),
            format!("{}---\n{}", svc("b"), svc("b2")),
        )
        .unwrap();
        let l = cache.load().unwrap();
        assert_eq!(names(&l.objects), ["b", "b2", "a"]);
        assert_eq!(l.kept_stale, [d.0.join("a.yaml")]);
        assert!(!l.errors.is_empty());

        // Still broken: still kept (the remembered objects survive more than one round).
        let l = cache.load().unwrap();
        assert_eq!(l.kept_stale.len(), 1);

        // The object moved to a readable file meanwhile: that copy wins, no duplicate.
        fs::write(
            d.0.join("c.yaml"),
            svc("a").replace("10.96.0.10", "10.96.0.11"),
        )
        .unwrap();
        let l = cache.load().unwrap();
        assert_eq!(names(&l.objects), ["b", "b2", "a"]);
        assert_eq!(
            l.objects.services[2]
                .spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .as_deref(),
            Some("10.96.0.11")
        );
        fs::remove_file(d.0.join("c.yaml")).unwrap();

        // Fixed with different content: the new content wins.
        fs::write(d.0.join("a.yaml"), svc("a-new")).unwrap();
        let l = cache.load().unwrap();
        assert_eq!(names(&l.objects), ["a-new", "b", "b2"]);
        assert!(l.kept_stale.is_empty());

        // Deleted: its objects go away.
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        let l = cache.load().unwrap();
        assert_eq!(names(&l.objects), ["b", "b2"]);
    }

    #[test]
    fn invalid_object_in_a_readable_file_is_dropped() {
        let d = TempDir::new("invalid");
        fs::write(d.0.join("a.yaml"), format!("{}---\n{}", svc("a"), svc("x"))).unwrap();
        let mut cache = ManifestCache::new(&d.0);
        assert_eq!(names(&cache.load().unwrap().objects), ["a", "x"]);
        // The second document now has a wrong field type: only that object disappears.
        let bad = svc("x").replace("port: 80", "port: eighty");
        fs::write(d.0.join("a.yaml"), format!("{}---\n{}", svc("a"), bad)).unwrap();
        let l = cache.load().unwrap();
        assert_eq!(names(&l.objects), ["a"]);
        assert!(l.kept_stale.is_empty());
        assert_eq!(l.errors.len(), 1);
    }

    #[test]
    fn a_file_never_read_successfully_contributes_nothing() {
        let d = TempDir::new("never");
        fs::write(d.0.join("a.yaml"), "{{{{").unwrap();
        fs::write(d.0.join(".hidden.yaml"), svc("h")).unwrap();
        fs::write(d.0.join("notes.txt"), svc("t")).unwrap();
        let mut cache = ManifestCache::new(&d.0);
        let l = cache.load().unwrap();
        assert!(l.objects.services.is_empty());
        assert!(l.kept_stale.is_empty());
    }

    #[test]
    fn rescan_skips_unchanged_directories() {
        let d = TempDir::new("fp");
        fs::write(d.0.join("a.yaml"), svc("a")).unwrap();
        let mut cache = ManifestCache::new(&d.0);
        assert!(cache.load_if_changed().unwrap().is_some());
        assert!(cache.load_if_changed().unwrap().is_none());
        // Same size, new content: the mtime/inode still differ.
        fs::write(d.0.join("a.yaml"), svc("b")).unwrap();
        let l = cache.load_if_changed().unwrap().expect("changed");
        assert_eq!(names(&l.objects), ["b"]);
        fs::write(d.0.join("c.yaml"), svc("c")).unwrap();
        assert!(cache.load_if_changed().unwrap().is_some());
        fs::remove_file(d.0.join("c.yaml")).unwrap();
        assert!(cache.load_if_changed().unwrap().is_some());
        assert!(cache.load_if_changed().unwrap().is_none());
    }

    #[test]
    fn only_changed_files_are_read_again_and_duplicates_across_files_are_reported() {
        let d = TempDir::new("incremental");
        fs::write(d.0.join("a.yaml"), svc("a")).unwrap();
        fs::write(d.0.join("b.yaml"), svc("b")).unwrap();
        let mut cache = ManifestCache::new(&d.0);
        let first = cache.load().unwrap();
        fs::write(d.0.join("b.yaml"), svc("b2")).unwrap();
        let second = cache.load().unwrap();
        assert_eq!(names(&second.objects), ["a", "b2"]);
        // a.yaml was not parsed again: the translator sees the very same object.
        assert!(Arc::ptr_eq(
            &first.objects.services[0],
            &second.objects.services[0]
        ));
        // A later file naming an object an earlier one has: the first one is kept.
        fs::write(d.0.join("c.yaml"), svc("a")).unwrap();
        let third = cache.load().unwrap();
        assert_eq!(names(&third.objects), ["a", "b2"]);
        assert_eq!(third.errors.len(), 1);
        assert!(
            matches!(&*third.errors[0], ManifestError::Duplicate { at, first, .. }
                if at.file == d.0.join("c.yaml") && first.file == d.0.join("a.yaml")),
            "{:?}",
            third.errors
        );
    }

    #[test]
    fn missing_dir_is_an_error() {
        let mut cache = ManifestCache::new(Path::new("/nonexistent/svc-lb-manifests"));
        assert!(matches!(cache.load(), Err(ManifestError::ReadDir { .. })));
    }

    #[test]
    fn dedup_reports_only_changes() {
        let mut d = Dedup::default();
        assert_eq!(d.changed(vec!["a".into()]), Some(vec!["a".to_string()]));
        assert_eq!(d.changed(vec!["a".into()]), None);
        assert_eq!(d.changed(vec![]), Some(vec![]));
    }
}
