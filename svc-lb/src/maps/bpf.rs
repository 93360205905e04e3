//! `LbMaps` over the maps pinned under the pin dir (contract 1). Opened from the pins, not from
//! the loaded object, so `svc-lb debug` works whether or not an agent is running.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use svc_lb_common::{
    BACKENDS_MAP, BE_STATS_MAP, BackendV4, CT_MAP, Counter, CtEntry, CtKeyV4, REVNAT_MAP, RevNatV4,
    SERVICES_MAP, STATS_MAP, SVC_NAMES_MAP, SVC_STATS_MAP, ServiceEntry, ServiceKeyV4, SvcName,
};

use super::{LbMaps, LbStats, MapState, Op};
use crate::error::MapsError;

type Hash<K, V> = HashMap<MapData, K, V>;
type PerCpu<V> = PerCpuArray<MapData, V>;

pub struct BpfLbMaps {
    pin_dir: PathBuf,
    services: Hash<ServiceKeyV4, ServiceEntry>,
    backends: Hash<u32, BackendV4>,
    revnat: Hash<u16, RevNatV4>,
    names: Hash<u16, SvcName>,
    ct: Hash<CtKeyV4, CtEntry>,
    svc_stats: PerCpu<Counter>,
    be_stats: PerCpu<Counter>,
    stats: PerCpu<u64>,
}

impl std::fmt::Debug for BpfLbMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfLbMaps")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn open_map(dir: &Path, name: &str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| {
        if MapsError::is_not_found(&source) {
            MapsError::PinMissing { path: path.clone() }
        } else {
            MapsError::Open {
                path: path.clone(),
                source: Box::new(source),
            }
        }
    })?;
    Map::from_map_data(data).map_err(|source| MapsError::Open {
        path,
        source: Box::new(source),
    })
}

/// Opens a pinned map as the typed wrapper `T` (checks the map type and key/value sizes, so a
/// datapath built from different shared types is refused instead of misread).
fn open_typed<T>(dir: &Path, name: &str) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(open_map(dir, name)?).map_err(|source| MapsError::Open {
        path: dir.join(name),
        source: Box::new(source),
    })
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map {
        map,
        op,
        source: Box::new(source),
    }
}

/// Deleting a key that is already gone is what the caller wanted.
fn ignore_missing(map: &'static str, res: Result<(), MapError>) -> Result<(), MapsError> {
    match res {
        Err(e) if MapsError::is_not_found(&e) => Ok(()),
        other => other.map_err(map_err(map, "delete")),
    }
}

fn nr_cpus() -> Result<usize, MapsError> {
    aya::util::nr_cpus().map_err(|(what, source)| MapsError::Cpus { what, source })
}

fn zero_slot(map: &mut PerCpu<Counter>, name: &'static str, index: u32) -> Result<(), MapsError> {
    let values =
        PerCpuValues::try_from(vec![Counter::default(); nr_cpus()?]).map_err(|source| {
            MapsError::Cpus {
                what: "/sys/devices/system/cpu/possible",
                source,
            }
        })?;
    map.set(index, values, 0).map_err(map_err(name, "zero"))
}

fn sum_counter(
    map: &PerCpu<Counter>,
    name: &'static str,
    index: u32,
) -> Result<Counter, MapsError> {
    let values = map.get(&index, 0).map_err(map_err(name, "lookup"))?;
    Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets.wrapping_add(c.packets),
        bytes: acc.bytes.wrapping_add(c.bytes),
    }))
}

fn collect<K, V>(
    map: &Hash<K, V>,
    name: &'static str,
) -> Result<std::collections::BTreeMap<K, V>, MapsError>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    map.iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(name, "iterate"))
}

impl BpfLbMaps {
    /// Opens every pinned LB map under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, MapsError> {
        // A missing dir or service map means nothing was ever loaded here: one clear message
        // instead of a raw ENOENT on the first map.
        if !pin_dir.join(SERVICES_MAP).exists() {
            return Err(MapsError::PinsMissing {
                dir: pin_dir.to_path_buf(),
            });
        }
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            services: open_typed(pin_dir, SERVICES_MAP)?,
            backends: open_typed(pin_dir, BACKENDS_MAP)?,
            revnat: open_typed(pin_dir, REVNAT_MAP)?,
            names: open_typed(pin_dir, SVC_NAMES_MAP)?,
            ct: open_typed(pin_dir, CT_MAP)?,
            svc_stats: open_typed(pin_dir, SVC_STATS_MAP)?,
            be_stats: open_typed(pin_dir, BE_STATS_MAP)?,
            stats: open_typed(pin_dir, STATS_MAP)?,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl LbMaps for BpfLbMaps {
    fn dump(&self) -> Result<MapState, MapsError> {
        Ok(MapState {
            services: collect(&self.services, SERVICES_MAP)?,
            backends: collect(&self.backends, BACKENDS_MAP)?,
            revnat: collect(&self.revnat, REVNAT_MAP)?,
            names: collect(&self.names, SVC_NAMES_MAP)?,
        })
    }

    fn apply(&mut self, op: &Op) -> Result<(), MapsError> {
        match op {
            Op::UpsertService(k, v) => self
                .services
                .insert(k, v, 0)
                .map_err(map_err(SERVICES_MAP, "update")),
            Op::DeleteService(k) => ignore_missing(SERVICES_MAP, self.services.remove(k)),
            Op::UpsertBackend(k, v) => self
                .backends
                .insert(k, v, 0)
                .map_err(map_err(BACKENDS_MAP, "update")),
            Op::DeleteBackend(k) => ignore_missing(BACKENDS_MAP, self.backends.remove(k)),
            Op::UpsertRevNat(k, v) => self
                .revnat
                .insert(k, v, 0)
                .map_err(map_err(REVNAT_MAP, "update")),
            Op::DeleteRevNat(k) => ignore_missing(REVNAT_MAP, self.revnat.remove(k)),
            Op::UpsertName(k, v) => self
                .names
                .insert(k, v, 0)
                .map_err(map_err(SVC_NAMES_MAP, "update")),
            Op::DeleteName(k) => ignore_missing(SVC_NAMES_MAP, self.names.remove(k)),
            Op::ZeroSvcStats(id) => zero_slot(&mut self.svc_stats, SVC_STATS_MAP, u32::from(*id)),
            Op::ZeroBackendStats(id) => zero_slot(&mut self.be_stats, BE_STATS_MAP, *id),
        }
    }
}

impl LbStats for BpfLbMaps {
    fn svc_counter(&self, rev_nat_id: u16) -> Result<Counter, MapsError> {
        sum_counter(&self.svc_stats, SVC_STATS_MAP, u32::from(rev_nat_id))
    }

    fn backend_counter(&self, backend_id: u32) -> Result<Counter, MapsError> {
        sum_counter(&self.be_stats, BE_STATS_MAP, backend_id)
    }

    fn global_counters(&self) -> Result<Vec<u64>, MapsError> {
        self.stats
            .iter()
            .map(|values| {
                values
                    .map(|v| v.iter().fold(0u64, |acc, x| acc.wrapping_add(*x)))
                    .map_err(map_err(STATS_MAP, "lookup"))
            })
            .collect()
    }

    fn conntrack(&self) -> Result<Vec<(CtKeyV4, CtEntry)>, MapsError> {
        // The datapath inserts and the LRU evicts while we walk; aya's iterator already skips
        // keys that vanish between get_next_key and lookup.
        self.ct
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(CT_MAP, "iterate"))
    }
}
