//! `LbMaps` over the maps pinned under the pin dir (contract 1). Opened from the pins, not from
//! the loaded object, so `svc-lb debug` works whether or not an agent is running.

use std::path::{Path, PathBuf};

use aya::maps::{
    HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use svc_lb_common::RevNatId;
use svc_lb_common::{
    AFFINITY_MAP, AffinityEntry, AffinityKeyV4, BACKENDS_MAP, BE_STATS_MAP, BackendV4, CT_MAP,
    Counter, CtEntry, CtKeyV4, LOCAL_SRC_MAP, MAGLEV_MAP, MaglevTable, REVNAT_MAP, RevNatV4,
    SERVICES_MAP, SRC_RANGE_FIXED_BITS, SRC_RANGES_MAP, STATS_MAP, SVC_NAMES_MAP, SVC_STATS_MAP,
    ServiceEntry, ServiceKeyV4, SrcRangeKeyV4, SvcName, ip_from_net, ip_to_net,
};

use super::{LbMaps, LbStats, MapState, MapsError, Op, Purge, SrcRange};

type Hash<K, V> = HashMap<MapData, K, V>;
type PerCpu<V> = PerCpuArray<MapData, V>;

pub struct BpfLbMaps {
    pin_dir: PathBuf,
    services: Hash<ServiceKeyV4, ServiceEntry>,
    backends: Hash<u32, BackendV4>,
    revnat: Hash<RevNatId, RevNatV4>,
    names: Hash<RevNatId, SvcName>,
    maglev: Hash<RevNatId, MaglevTable>,
    src_ranges: LpmTrie<MapData, SrcRangeKeyV4, u8>,
    ct: Hash<CtKeyV4, CtEntry>,
    affinity: Hash<AffinityKeyV4, AffinityEntry>,
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

fn src_range_key(r: &SrcRange) -> Key<SrcRangeKeyV4> {
    Key::new(
        SRC_RANGE_FIXED_BITS + u32::from(r.len),
        SrcRangeKeyV4 {
            rev_nat_id: r.rev_nat_id,
            addr: ip_to_net(r.addr),
        },
    )
}

/// Deletes the entries matching `doomed` and returns how many. Keys are collected first:
/// deleting while walking with get_next_key would restart the walk.
fn purge_where<K, V>(
    map: &mut Hash<K, V>,
    name: &'static str,
    doomed: impl Fn(&K, &V) -> bool,
) -> Result<usize, MapsError>
where
    K: aya::Pod,
    V: aya::Pod,
{
    let keys: Vec<K> = map
        .iter()
        .filter_map(|r| match r {
            Ok((k, v)) => doomed(&k, &v).then_some(Ok(k)),
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()
        .map_err(map_err(name, "iterate"))?;
    for k in &keys {
        // The LRU may have evicted it meanwhile.
        ignore_missing(name, map.remove(k))?;
    }
    Ok(keys.len())
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
            maglev: open_typed(pin_dir, MAGLEV_MAP)?,
            src_ranges: open_typed(pin_dir, SRC_RANGES_MAP)?,
            ct: open_typed(pin_dir, CT_MAP)?,
            affinity: open_typed(pin_dir, AFFINITY_MAP)?,
            svc_stats: open_typed(pin_dir, SVC_STATS_MAP)?,
            be_stats: open_typed(pin_dir, BE_STATS_MAP)?,
            stats: open_typed(pin_dir, STATS_MAP)?,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Removes the conntrack and affinity entries `purge` names.
    fn purge_flows(&mut self, purge: &Purge) -> Result<(), MapsError> {
        let flows = purge_where(&mut self.ct, CT_MAP, |k, e| purge.flow(k, e))?;
        let affinity = purge_where(&mut self.affinity, AFFINITY_MAP, |k, e| {
            purge.affinity(k, e)
        })?;
        if flows + affinity > 0 {
            tracing::debug!(flows, affinity, ?purge, "purged conntrack/affinity entries");
        }
        Ok(())
    }
}

impl LbMaps for BpfLbMaps {
    fn dump(&self) -> Result<MapState, MapsError> {
        Ok(MapState {
            services: collect(&self.services, SERVICES_MAP)?,
            backends: collect(&self.backends, BACKENDS_MAP)?,
            revnat: collect(&self.revnat, REVNAT_MAP)?,
            names: collect(&self.names, SVC_NAMES_MAP)?,
            maglev: collect(&self.maglev, MAGLEV_MAP)?
                .into_iter()
                .map(|(k, v)| (k, Box::new(v)))
                .collect(),
            src_ranges: self
                .src_ranges
                .keys()
                .map(|k| {
                    k.map(|k| {
                        let d = k.data();
                        SrcRange {
                            rev_nat_id: d.rev_nat_id,
                            addr: ip_from_net(d.addr),
                            len: k.prefix_len().saturating_sub(SRC_RANGE_FIXED_BITS) as u8,
                        }
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(map_err(SRC_RANGES_MAP, "iterate"))?,
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
                .insert(k, **v, 0)
                .map_err(map_err(SVC_NAMES_MAP, "update")),
            Op::DeleteName(k) => ignore_missing(SVC_NAMES_MAP, self.names.remove(k)),
            Op::UpsertMaglev(k, v) => self
                .maglev
                .insert(k, v.as_ref(), 0)
                .map_err(map_err(MAGLEV_MAP, "update")),
            Op::DeleteMaglev(k) => ignore_missing(MAGLEV_MAP, self.maglev.remove(k)),
            Op::UpsertSrcRange(r) => self
                .src_ranges
                .insert(&src_range_key(r), 1, 0)
                .map_err(map_err(SRC_RANGES_MAP, "update")),
            Op::DeleteSrcRange(r) => {
                ignore_missing(SRC_RANGES_MAP, self.src_ranges.remove(&src_range_key(r)))
            }
            Op::ZeroSvcStats(id) => zero_slot(&mut self.svc_stats, SVC_STATS_MAP, *id),
            Op::ZeroBackendStats(id) => zero_slot(&mut self.be_stats, BE_STATS_MAP, *id),
            Op::PurgeFlows(purge) => self.purge_flows(purge),
        }
    }

    fn flows(&self) -> Result<(u64, Vec<(CtKeyV4, CtEntry)>), MapsError> {
        // Clock first: an entry stamped while we walk is then "in the future", i.e. live.
        let now = monotonic_now_ns();
        Ok((now, self.conntrack()?))
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns()`.
fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl LbStats for BpfLbMaps {
    /// Read from the pins at each call (a few syscalls): views call it once per render.
    /// Unreadable pins fall back to the defaults; the entry counts next to them stay right.
    fn capacity(&self) -> crate::dataplane::capacity::MapCapacity {
        crate::dataplane::capacity::MapCapacity::from_pins(self.pin_dir()).unwrap_or_default()
    }

    fn svc_counter(&self, rev_nat_id: RevNatId) -> Result<Counter, MapsError> {
        sum_counter(&self.svc_stats, SVC_STATS_MAP, rev_nat_id)
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

/// Against real kernel maps: needs root and bpffs on /sys/fs/bpf, and fails (does not skip)
/// without them. Only maps are created (from the embedded object); no program is attached.
/// Makes the pinned `LB4_LOCAL_SRC` trie hold exactly `prefixes` (address, prefix length):
/// the sources the datapath treats as inside the cluster. Returns how many entries changed.
pub fn program_local_sources(
    pin_dir: &Path,
    prefixes: &[(std::net::Ipv4Addr, u8)],
) -> Result<usize, MapsError> {
    let mut trie: LpmTrie<MapData, u32, u8> = open_typed(pin_dir, LOCAL_SRC_MAP)?;
    let wanted: std::collections::BTreeSet<(u32, u32)> = prefixes
        .iter()
        .map(|(a, l)| (u32::from(*l).min(32), ip_to_net(*a)))
        .collect();
    let present: std::collections::BTreeSet<(u32, u32)> = trie
        .keys()
        .map(|k| k.map(|k| (k.prefix_len(), k.data())))
        .collect::<Result<_, _>>()
        .map_err(map_err(LOCAL_SRC_MAP, "iterate"))?;
    let mut changed = 0;
    for (len, addr) in present.difference(&wanted) {
        ignore_missing(LOCAL_SRC_MAP, trie.remove(&Key::new(*len, *addr)))?;
        changed += 1;
    }
    for (len, addr) in wanted.difference(&present) {
        trie.insert(&Key::new(*len, *addr), 1, 0)
            .map_err(map_err(LOCAL_SRC_MAP, "update"))?;
        changed += 1;
    }
    Ok(changed)
}

// The tests against kernel maps need root and bpffs: they are in tests/tests/prog_maps.rs.
