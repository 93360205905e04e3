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

    /// Conntrack entries (LRU; two per load-balanced flow, about 100 bytes each).
    #[arg(long, default_value_t = MAX_CT_ENTRIES, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub max_conntrack: u32,
}

impl From<&CapacityArgs> for MapCapacity {
    fn from(a: &CapacityArgs) -> Self {
        MapCapacity {
            max_services: a.max_services,
            max_backends: a.max_backends,
            max_conntrack: a.max_conntrack,
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

    /// `max_entries` of every map whose size follows the capacity.
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
