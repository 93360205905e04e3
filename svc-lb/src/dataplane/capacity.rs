//! Map capacities chosen at load time (`svc-lb run --max-services/--max-backends/--max-conntrack`)
//! instead of the compile-time defaults in `svc_lb_common::maps`, and the capacities the pinned
//! maps really have.
//!
//! The agent adopts maps that are already pinned (a restarted agent keeps conntrack and every
//! programmed Service), and the kernel cannot resize a map. So a pinned map keeps the capacity
//! it was created with even when the flags now ask for another one: the agent logs a warning
//! naming the map, both sizes and how to apply the new size (`svc-lb uninstall`, which also
//! drops conntrack, then start again), and keeps running with the pinned size. Refusing to start
//! instead would take the node's Service traffic down over a sizing flag. The reconcile limits
//! are always taken from the pinned maps (`reconcile::Limits::pinned`, which reads
//! [`MapCapacity::from_pins`]), so a frontend or backend beyond the real capacity is reported
//! as "ids exhausted" / "service map full" instead of failing on a map write.

use std::path::{Path, PathBuf};

use aya::{EbpfLoader, maps::MapInfo};
use clap::Args;
use svc_lb_common::{
    BACKENDS_MAP, BE_STATS_MAP, CT_MAP, Counter, MAGLEV_MAP, MAX_BACKENDS, MAX_CT_ENTRIES,
    MAX_REVNAT, REVNAT_MAP, SERVICES_MAP, SVC_NAMES_MAP, SVC_STATS_MAP,
};
use tracing::warn;

/// Why the capacities of the pinned maps could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("reading map info of {path}")]
    Info {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{what} must be at least {min} (got {got})")]
    TooSmall {
        what: &'static str,
        min: u32,
        got: u32,
    },
}

/// `svc-lb run` flags sizing the maps (flattened into `RunArgs`).
#[derive(Clone, Copy, Debug, Args)]
#[command(next_help_heading = "Map sizes (fixed when the maps are first created)")]
pub struct CapacityArgs {
    /// Frontends the maps hold (one per Service port and address: ClusterIP, each node
    /// address of a NodePort, external IPs). LB4_SERVICES gets max(4 x N, N + --max-backends)
    /// entries. Maps already pinned keep their size: the agent warns and uses it;
    /// `svc-lb uninstall` and a restart apply a new size (and drop conntrack).
    #[arg(long, default_value_t = MAX_REVNAT, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub max_services: u32,

    /// Distinct backends (pod address and port) the maps hold. The per-backend counters cost
    /// 16 bytes per backend per possible CPU (1M backends on 64 CPUs: 1 GiB).
    #[arg(long, default_value_t = MAX_BACKENDS, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub max_backends: u32,

    /// Conntrack entries (LRU; two per load-balanced flow, about 110 bytes each with the
    /// kernel's overhead). Default: from the node, the larger of 0.25% of its memory (like
    /// Cilium's bpf-map-dynamic-size-ratio, at most 16,777,216 entries) and two entries per flow
    /// of kube-proxy's conntrack floor, max(32,768 per core, 131,072) flows; that is 262,144 on
    /// a node of up to 4 cores and 10 GiB. The agent logs the value it used.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub max_conntrack: Option<u32>,
}

impl From<&CapacityArgs> for MapCapacity {
    fn from(a: &CapacityArgs) -> Self {
        MapCapacity {
            max_services: a.max_services,
            max_backends: a.max_backends,
            max_conntrack: a.max_conntrack.unwrap_or_else(node_default_conntrack),
        }
    }
}

/// Share of the node's memory the conntrack map takes by default, like Cilium's
/// `--bpf-map-dynamic-size-ratio` (0.0025 in Cilium's Helm chart).
pub const CT_MEMORY_RATIO: f64 = 0.0025;
/// The most entries the memory share gives (Cilium's `LimitTableMax`, 1 << 24).
pub const CT_MEMORY_MAX: u64 = 1 << 24;
/// kube-proxy's `--conntrack-max-per-core` default (flows per core).
pub const KUBE_PROXY_CT_PER_CORE: u64 = 32_768;
/// kube-proxy's `--conntrack-min` default (flows).
pub const KUBE_PROXY_CT_MIN: u64 = 131_072;
/// `LB4_CT` entries one load-balanced flow takes (forward and reply); nf_conntrack, which
/// kube-proxy sizes, holds both directions in one entry.
pub const CT_ENTRIES_PER_FLOW: u64 = 2;

/// The default `--max-conntrack` for a node with `total_memory` bytes and `cores` CPUs, when
/// one `LB4_CT` entry takes `entry_bytes` of kernel memory: the larger of the memory share and
/// kube-proxy's floor in entries, within what the kernel accepts.
pub fn default_conntrack(total_memory: u64, cores: u64, entry_bytes: u64) -> u32 {
    // f64 is exact enough: the result is a size, not an address.
    let by_memory =
        ((total_memory as f64 * CT_MEMORY_RATIO) as u64 / entry_bytes.max(1)).min(CT_MEMORY_MAX);
    let floor =
        CT_ENTRIES_PER_FLOW * (KUBE_PROXY_CT_PER_CORE * cores.max(1)).max(KUBE_PROXY_CT_MIN);
    let entries = by_memory
        .max(floor)
        .min(u64::from(super::footprint::KERNEL_MAX_ENTRIES));
    u32::try_from(entries).unwrap_or(u32::MAX)
}

/// Kernel memory of one `LB4_CT` entry (LRU hash element and its share of the buckets).
pub fn ct_entry_bytes() -> u64 {
    let def = super::footprint::MapDef {
        name: CT_MAP.into(),
        map_type: super::footprint::BPF_MAP_TYPE_LRU_HASH,
        key_size: std::mem::size_of::<svc_lb_common::CtKeyV4>() as u32,
        value_size: std::mem::size_of::<svc_lb_common::CtEntry>() as u32,
        max_entries: 1 << 20,
        flags: 0,
    };
    def.footprint(1).at_create >> 20
}

/// CPUs this process may run on, as kube-proxy counts cores (Go's `runtime.NumCPU`: the
/// affinity mask, not a cgroup quota).
fn cores() -> u64 {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer and size for pid 0 (this thread).
    let ret = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if ret != 0 {
        return std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    }
    // SAFETY: `set` was filled by sched_getaffinity.
    u64::try_from(unsafe { libc::CPU_COUNT(&set) }).unwrap_or(1)
}

/// [`default_conntrack`] for this node (`MAX_CT_ENTRIES` if its memory cannot be read).
pub fn node_default_conntrack() -> u32 {
    let cores = cores();
    match super::footprint::NodeMemory::read() {
        Ok(mem) => {
            let n = default_conntrack(mem.total, cores, ct_entry_bytes());
            tracing::info!(
                max_conntrack = n,
                memory = %super::footprint::human(mem.total),
                cores,
                "--max-conntrack from the node (0.25% of memory, at least 2 x max(32768 x cores, 131072))"
            );
            n
        }
        Err(e) => {
            warn!(error = %e, default = MAX_CT_ENTRIES, "cannot read the node's memory; --max-conntrack uses the built-in default");
            MAX_CT_ENTRIES
        }
    }
}

/// Slots per frontend `LB4_SERVICES` gets at least (today's 262,144 for 65,536 frontends).
const SLOTS_PER_SERVICE: u32 = 4;

/// How many frontends, backends and flows the maps hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    /// Frontends (a Service port on one address; rev-NAT ids `1..max_services`): sizes
    /// `LB4_REVNAT`, `LB4_SVC_STATS`, `LB_SVC_NAMES`, `LB4_MAGLEV`, and with `max_backends`
    /// `LB4_SERVICES`.
    pub max_services: u32,
    /// Distinct backend addresses (ids `1..max_backends`): sizes `LB4_BACKENDS` and the
    /// per-CPU `LB4_BE_STATS` (16 bytes per backend per possible CPU).
    pub max_backends: u32,
    /// Conntrack entries (`LB4_CT`, LRU; two per load-balanced flow).
    pub max_conntrack: u32,
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self {
            max_services: MAX_REVNAT,
            max_backends: MAX_BACKENDS,
            max_conntrack: MAX_CT_ENTRIES,
        }
    }
}

impl MapCapacity {
    /// Refuses sizes the datapath cannot work with (id 0 is reserved, so one entry is useless).
    pub fn validate(&self) -> Result<(), CapacityError> {
        for (what, got, min) in [
            ("--max-services", self.max_services, 2),
            ("--max-backends", self.max_backends, 2),
            ("--max-conntrack", self.max_conntrack, 2),
        ] {
            if got < min {
                return Err(CapacityError::TooSmall { what, min, got });
            }
        }
        Ok(())
    }

    /// `LB4_SERVICES` entries: slot 0 of every frontend plus one slot per backend of each. A
    /// backend behind several Services takes a slot in each, so the size is at least
    /// `SLOTS_PER_SERVICE` per frontend (the default 262,144) and at least one slot per backend
    /// on top of the frontends (100k Services x 10 endpoints fit in 131,072 + 1,048,576).
    pub fn service_entries(&self) -> u32 {
        let per_service = self.max_services.saturating_mul(SLOTS_PER_SERVICE);
        let per_backend = self.max_services.saturating_add(self.max_backends);
        per_service.max(per_backend)
    }

    /// `max_entries` of every map whose size follows the capacity (`EbpfLoader` applies them).
    pub fn map_sizes(&self) -> [(&'static str, u32); 8] {
        [
            (SERVICES_MAP, self.service_entries()),
            (BACKENDS_MAP, self.max_backends),
            (BE_STATS_MAP, self.max_backends),
            (REVNAT_MAP, self.max_services),
            (SVC_STATS_MAP, self.max_services),
            (SVC_NAMES_MAP, self.max_services),
            (MAGLEV_MAP, self.max_services),
            (CT_MAP, self.max_conntrack),
        ]
    }

    /// Makes `loader` create the maps with these sizes (maps that are already pinned are
    /// adopted as they are; see [`MapCapacity::warn_adopted`]).
    pub fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for (name, size) in self.map_sizes() {
            loader.map_max_entries(name, size);
        }
    }

    /// Logs a warning for every map pinned under `pin_dir` whose size differs from what this
    /// capacity asks for, and returns them as (map, pinned size, requested size). Call before
    /// loading: afterwards the pins are the maps in use. Maps not pinned yet will be created
    /// with the requested size and are not reported.
    pub fn warn_adopted(&self, pin_dir: &Path) -> Vec<(&'static str, u32, u32)> {
        let mut differ = Vec::new();
        for (name, want) in self.map_sizes() {
            let path = pin_dir.join(name);
            let Ok(info) = MapInfo::from_pin(&path) else {
                continue;
            };
            if info.max_entries() != want {
                differ.push((name, info.max_entries(), want));
                warn!(
                    map = name,
                    pinned = info.max_entries(),
                    requested = want,
                    pin = %path.display(),
                    "pinned map has another capacity than requested; keeping the pinned one \
                     (a map cannot be resized; `svc-lb uninstall` then a restart applies the \
                     new size, dropping conntrack)"
                );
            }
        }
        differ
    }

    /// The capacities of the maps pinned under `pin_dir` (the ones the datapath uses).
    pub fn from_pins(pin_dir: &Path) -> Result<MapCapacity, CapacityError> {
        let size = |name: &str| {
            let path = pin_dir.join(name);
            MapInfo::from_pin(&path)
                .map(|i| i.max_entries())
                .map_err(|source| CapacityError::Info {
                    path,
                    source: Box::new(source),
                })
        };
        // The id spaces are bounded by the smallest map they index.
        Ok(MapCapacity {
            max_services: size(REVNAT_MAP)?.min(size(SVC_STATS_MAP)?),
            max_backends: size(BACKENDS_MAP)?.min(size(BE_STATS_MAP)?),
            max_conntrack: size(CT_MAP)?,
        })
    }

    /// Kernel memory of the per-CPU per-backend and per-frontend counters on this machine
    /// (`LB4_BE_STATS` + `LB4_SVC_STATS`): the part of the maps that grows with the CPU count.
    pub fn per_cpu_stats_bytes(&self, possible_cpus: usize) -> u64 {
        (u64::from(self.max_backends) + u64::from(self.max_services))
            * std::mem::size_of::<Counter>() as u64
            * possible_cpus as u64
    }
}

/// The `svc-lb run` flag that sizes map `name`, for error messages.
pub fn flag_of(name: &str) -> &'static str {
    match name {
        SERVICES_MAP => "--max-services or --max-backends",
        BACKENDS_MAP | BE_STATS_MAP => "--max-backends",
        REVNAT_MAP | SVC_STATS_MAP | SVC_NAMES_MAP | MAGLEV_MAP => "--max-services",
        CT_MAP => "--max-conntrack",
        _ => "the map size (fixed in the eBPF object)",
    }
}

#[cfg(test)]
mod tests {
    use svc_lb_common::MAX_SERVICE_ENTRIES;

    use super::*;

    #[test]
    fn defaults_are_the_compile_time_sizes() {
        let c = MapCapacity::default();
        assert_eq!(c.service_entries(), MAX_SERVICE_ENTRIES);
        let sizes = c.map_sizes();
        assert!(sizes.contains(&(BACKENDS_MAP, MAX_BACKENDS)));
        assert!(sizes.contains(&(REVNAT_MAP, MAX_REVNAT)));
        assert!(sizes.contains(&(CT_MAP, MAX_CT_ENTRIES)));
    }

    #[test]
    fn a_million_backends_fit_with_their_slots() {
        let c = MapCapacity {
            max_services: 131_072,
            max_backends: 1_048_576,
            max_conntrack: 262_144,
        };
        // 100k Services x 10 endpoints: 100k slot-0 entries + 1M backend slots.
        assert!(c.service_entries() >= 100_000 + 1_000_000);
        // 2 CPUs: 16 B x (1M + 128k) x 2 = 36 MiB.
        assert_eq!(c.per_cpu_stats_bytes(2), 16 * (1_048_576 + 131_072) * 2);
    }

    // Sizes of real pinned maps (needs root and bpffs): tests/tests/prog_maps.rs.

    #[test]
    fn conntrack_default_follows_memory_above_kube_proxys_floor() {
        const GIB: u64 = 1 << 30;
        let e = ct_entry_bytes();
        // 48 B element header + 16 B key + 24 B value + 16 B bucket per entry.
        assert_eq!(e, 104);
        // Small nodes: kube-proxy's minimum of 131,072 flows, two entries each.
        assert_eq!(default_conntrack(2 * GIB, 1, e), 262_144);
        assert_eq!(default_conntrack(8 * GIB, 4, e), 262_144);
        // More cores: 32,768 flows per core.
        assert_eq!(default_conntrack(8 * GIB, 16, e), 2 * 32_768 * 16);
        // Much memory: 0.25 % of it, e.g. 256 GiB / 400 / 104 B.
        let big = default_conntrack(256 * GIB, 8, e);
        assert_eq!(u64::from(big), (256 * GIB) / 400 / e);
        assert!(big > 6_000_000, "{big}");
        // The memory share stops at Cilium's 16M; kube-proxy's floor can exceed it.
        assert_eq!(default_conntrack(64 * 1024 * GIB, 8, e), 1 << 24);
        assert_eq!(default_conntrack(64 * GIB, 512, e), 2 * 32_768 * 512);
        assert_eq!(
            default_conntrack(GIB, 1 << 20, e),
            super::super::footprint::KERNEL_MAX_ENTRIES
        );
        // Zero cores (unreadable) counts as one.
        assert_eq!(default_conntrack(GIB, 0, e), 262_144);
    }

    #[test]
    fn small_capacities_are_refused() {
        let c = MapCapacity {
            max_backends: 1,
            ..MapCapacity::default()
        };
        assert!(matches!(
            c.validate(),
            Err(CapacityError::TooSmall {
                what: "--max-backends",
                ..
            })
        ));
        assert!(MapCapacity::default().validate().is_ok());
    }
}
