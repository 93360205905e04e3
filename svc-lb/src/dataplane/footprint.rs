//! Kernel memory of the maps, checked before anything is created, and the node's memory.
//!
//! The kernel allocates a preallocated hash or LRU map, and every array, in full when the map
//! is created, and charges it to the creating process's memory cgroup (kernels >= 5.11). A size
//! the node cannot give fails with ENOMEM or E2BIG half-way through creating the maps; this
//! module computes the same figures first, so such a start is refused with the numbers before
//! the node is touched. The formulas follow kernel/bpf/{hashtab,arraymap,lpm_trie}.c on 64-bit
//! kernels; they are estimates (allocator rounding is approximated), good to a few percent.

use std::path::{Path, PathBuf};

/// `BPF_F_NO_PREALLOC`: elements are allocated on insert.
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub(crate) const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// `struct htab_elem` before the key (hash node, LRU node, hash).
const HTAB_ELEM: u64 = 48;
/// `struct bucket` (list head + spinlock).
const HTAB_BUCKET: u64 = 16;
/// `struct lpm_trie_node` before the data (rcu head, two children, prefix length, flags).
const LPM_NODE: u64 = 40;
/// The largest map the kernel accepts for a hash map (its bucket array must stay below 4 GiB:
/// `n_buckets > U32_MAX / sizeof(struct bucket)` is E2BIG) and, through the per-CPU pointer
/// array, for a per-CPU array. `--max-backends 4294967295` hits it.
pub const KERNEL_MAX_ENTRIES: u32 = 1 << 28;

const fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// kmalloc's size classes: small objects round up to a cache size, large ones to a power of
/// two of pages.
fn kmalloc_size(n: u64) -> u64 {
    const CLASSES: [u64; 13] = [
        8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192,
    ];
    CLASSES
        .iter()
        .copied()
        .find(|&c| c >= n)
        .unwrap_or_else(|| n.next_power_of_two())
}

/// One map as the object defines it (after the `--max-*` sizes were applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// What a map costs in kernel memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footprint {
    pub name: String,
    pub max_entries: u32,
    /// Allocated when the map is created.
    pub at_create: u64,
    /// With every entry in use (maps allocating on insert grow up to this).
    pub when_full: u64,
}

impl MapDef {
    /// The kernel memory of this map on a machine with `cpus` possible CPUs.
    pub fn footprint(&self, cpus: u64) -> Footprint {
        let n = u64::from(self.max_entries);
        let (k, v) = (u64::from(self.key_size), u64::from(self.value_size));
        let prealloc = self.flags & BPF_F_NO_PREALLOC == 0;
        let (at_create, when_full) = match self.map_type {
            BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_PERCPU_HASH => {
                let buckets = n.next_power_of_two() * HTAB_BUCKET;
                let value = if self.map_type == BPF_MAP_TYPE_PERCPU_HASH {
                    // The element holds a pointer to per-CPU values.
                    8 + round8(v) * cpus
                } else {
                    round8(v)
                };
                let elem = HTAB_ELEM + round8(k) + value;
                // Non-LRU preallocated maps keep one spare element per CPU for updates.
                let spare = if self.map_type == BPF_MAP_TYPE_LRU_HASH {
                    0
                } else {
                    cpus
                };
                if prealloc || self.map_type == BPF_MAP_TYPE_LRU_HASH {
                    let all = buckets + elem * (n + spare);
                    (all, all)
                } else {
                    (buckets, buckets + kmalloc_size(elem) * n)
                }
            }
            BPF_MAP_TYPE_ARRAY => {
                let all = round8(v) * n;
                (all, all)
            }
            BPF_MAP_TYPE_PERCPU_ARRAY => {
                let all = round8(v) * n * cpus + 8 * n;
                (all, all)
            }
            // Nodes are allocated on insert; a full trie has about as many intermediate
            // nodes as leaves.
            BPF_MAP_TYPE_LPM_TRIE => (0, 2 * n * kmalloc_size(LPM_NODE + k.saturating_sub(4) + v)),
            BPF_MAP_TYPE_RINGBUF => (n, n),
            _ => {
                let all = (round8(k) + round8(v)) * n;
                (all, all)
            }
        };
        Footprint {
            name: self.name.clone(),
            max_entries: self.max_entries,
            at_create,
            when_full,
        }
    }

    /// Whether the kernel would refuse this size outright (E2BIG).
    pub fn too_big(&self) -> bool {
        matches!(
            self.map_type,
            BPF_MAP_TYPE_HASH
                | BPF_MAP_TYPE_LRU_HASH
                | BPF_MAP_TYPE_PERCPU_HASH
                | BPF_MAP_TYPE_ARRAY
                | BPF_MAP_TYPE_PERCPU_ARRAY
        ) && self.max_entries > KERNEL_MAX_ENTRIES
    }
}

/// The maps of the eBPF object `bytes` with `sizes` (name, max_entries) applied, like
/// `EbpfLoader::map_max_entries` applies them.
pub fn object_maps(
    bytes: &[u8],
    sizes: &[(&str, u32)],
) -> Result<Vec<MapDef>, aya_obj::ParseError> {
    let obj = aya_obj::Object::parse(bytes)?;
    let mut defs: Vec<MapDef> = obj
        .maps
        .iter()
        // `.rodata`, `.bss`, ... are not maps svc-lb sizes or pins; they are tiny.
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, m)| MapDef {
            name: name.clone(),
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, s)| *s),
            flags: m.map_flags(),
        })
        .collect();
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(defs)
}

/// The node's memory as the maps see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMemory {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable`: what can be allocated without swapping.
    pub available: u64,
    /// The agent's memory cgroup (v2) limit minus its usage, where one is set: BPF maps are
    /// charged to it (kernels >= 5.11).
    pub cgroup: Option<(PathBuf, u64)>,
}

impl NodeMemory {
    /// What map creation can take: the smaller of available memory and the cgroup's room.
    pub fn budget(&self) -> u64 {
        self.cgroup
            .as_ref()
            .map_or(self.available, |(_, room)| self.available.min(*room))
    }

    /// Reads /proc/meminfo and the agent's memory cgroup.
    pub fn read() -> std::io::Result<NodeMemory> {
        let (total, available) = parse_meminfo(&std::fs::read_to_string("/proc/meminfo")?)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "/proc/meminfo has no MemTotal/MemAvailable",
                )
            })?;
        Ok(NodeMemory {
            total,
            available,
            cgroup: cgroup_room(),
        })
    }
}

/// (MemTotal, MemAvailable) in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kb * 1024)
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// The room left in the agent's cgroup v2 memory limit, if it has one.
fn cgroup_room() -> Option<(PathBuf, u64)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let root = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })?;
    let dir = root.join(rel.trim_start_matches('/'));
    room_in(&dir).map(|room| (dir, room))
}

fn room_in(dir: &Path) -> Option<u64> {
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max": no limit
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
}

/// Checks that the maps about to be created (`new`) fit in what the node can give; returns the
/// three largest for the log. The error names the total, the largest maps and the budget.
pub fn fits(new: &[Footprint], mem: &NodeMemory) -> Result<String, super::DataplaneError> {
    let need: u64 = new.iter().map(|f| f.at_create).sum();
    let mut big: Vec<&Footprint> = new.iter().collect();
    big.sort_by_key(|f| std::cmp::Reverse(f.at_create));
    let detail = big
        .iter()
        .take(3)
        .map(|f| {
            format!(
                "{} {} entries: {}",
                f.name,
                f.max_entries,
                human(f.at_create)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    if need > mem.budget() {
        let budget_what = match &mem.cgroup {
            Some((dir, room)) if *room < mem.available => {
                format!("room left in memory cgroup {}", dir.display())
            }
            _ => "MemAvailable".to_string(),
        };
        return Err(super::DataplaneError::MapsTooLarge {
            need: human(need),
            detail,
            budget: human(mem.budget()),
            budget_what,
        });
    }
    Ok(detail)
}

/// Bytes as "12.3 MiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use svc_lb_common::{BACKENDS_MAP, CT_MAP, MAGLEV_MAP, SRC_RANGES_MAP, SVC_STATS_MAP};

    use super::*;
    use crate::dataplane::{capacity::MapCapacity, ebpf_object};
    use svc_lb_common::ALL_MAPS;

    fn defs(c: &MapCapacity) -> Vec<MapDef> {
        object_maps(ebpf_object(), &c.map_sizes()).unwrap()
    }

    fn find<'d>(defs: &'d [MapDef], name: &str) -> &'d MapDef {
        defs.iter().find(|d| d.name == name).unwrap()
    }

    #[test]
    fn the_object_defines_every_pinned_map_with_the_requested_sizes() {
        let c = MapCapacity {
            max_services: 1_000,
            max_backends: 5_000,
            max_conntrack: 70_000,
        };
        let d = defs(&c);
        for name in ALL_MAPS {
            assert!(d.iter().any(|m| m.name == name), "{name} not in the object");
        }
        assert_eq!(find(&d, CT_MAP).max_entries, 70_000);
        assert_eq!(find(&d, CT_MAP).map_type, BPF_MAP_TYPE_LRU_HASH);
        assert_eq!(find(&d, BACKENDS_MAP).max_entries, 5_000);
        assert_eq!(find(&d, SVC_STATS_MAP).map_type, BPF_MAP_TYPE_PERCPU_ARRAY);
        assert_eq!(find(&d, SRC_RANGES_MAP).map_type, BPF_MAP_TYPE_LPM_TRIE);
        assert_ne!(find(&d, MAGLEV_MAP).flags & BPF_F_NO_PREALLOC, 0);
    }

    #[test]
    fn footprints_follow_the_kernel_allocations() {
        let d = defs(&MapCapacity::default());
        // LRU conntrack, 262,144 entries: (48 + 16 + 24) per element + 16 per bucket.
        let ct = find(&d, CT_MAP).footprint(2);
        assert_eq!(ct.at_create, 262_144 * (48 + 16 + 24) + 262_144 * 16);
        assert_eq!(ct.at_create, ct.when_full);
        // Per-CPU counters: 16 bytes per entry per CPU plus a pointer per entry.
        let stats = find(&d, SVC_STATS_MAP).footprint(4);
        assert_eq!(stats.at_create, 65_536 * 16 * 4 + 65_536 * 8);
        // Maglev allocates on insert: only the buckets at creation, 64 KiB tables when full.
        let maglev = find(&d, MAGLEV_MAP).footprint(2);
        assert_eq!(maglev.at_create, 65_536 * 16);
        assert!(maglev.when_full > 65_536 * 65_536, "{maglev:?}");
        // The LPM trie allocates nothing at creation.
        assert_eq!(find(&d, SRC_RANGES_MAP).footprint(2).at_create, 0);
        // The default sizes take tens of MiB on two CPUs, not GiB.
        let total: u64 = d.iter().map(|m| m.footprint(2).at_create).sum();
        assert!(total > 30 << 20 && total < 200 << 20, "{}", human(total));
    }

    #[test]
    fn sizes_beyond_the_kernel_limit_are_too_big() {
        let d = defs(&MapCapacity {
            max_backends: u32::MAX,
            ..MapCapacity::default()
        });
        let big: Vec<&str> = d
            .iter()
            .filter(|m| m.too_big())
            .map(|m| m.name.as_str())
            .collect();
        assert!(big.contains(&BACKENDS_MAP), "{big:?}");
        assert!(!big.contains(&CT_MAP), "{big:?}");
        let ok = defs(&MapCapacity {
            max_backends: KERNEL_MAX_ENTRIES - 65_536,
            ..MapCapacity::default()
        });
        assert!(!ok.iter().any(MapDef::too_big));
    }

    #[test]
    fn maps_beyond_the_budget_are_refused_naming_the_largest() {
        let new = [
            Footprint {
                name: "LB4_CT".into(),
                max_entries: 1 << 24,
                at_create: 2 << 30,
                when_full: 2 << 30,
            },
            Footprint {
                name: "LB4_BACKENDS".into(),
                max_entries: 1 << 20,
                at_create: 100 << 20,
                when_full: 100 << 20,
            },
        ];
        let mem = NodeMemory {
            total: 8 << 30,
            available: 4 << 30,
            cgroup: None,
        };
        assert!(
            fits(&new, &mem)
                .unwrap()
                .starts_with("LB4_CT 16777216 entries: 2.0 GiB")
        );
        let small = NodeMemory {
            available: 1 << 30,
            ..mem.clone()
        };
        let err = fits(&new, &small).unwrap_err().to_string();
        assert!(
            err.contains("2.1 GiB")
                && err.contains("LB4_CT")
                && err.contains("MemAvailable: 1.0 GiB"),
            "{err}"
        );
        // A memory cgroup with less room than the machine is the limit, and named.
        let cg = NodeMemory {
            cgroup: Some((PathBuf::from("/sys/fs/cgroup/svc-lb"), 512 << 20)),
            ..mem
        };
        let err = fits(&new, &cg).unwrap_err().to_string();
        assert!(
            err.contains("memory cgroup /sys/fs/cgroup/svc-lb") && err.contains("512.0 MiB"),
            "{err}"
        );
    }

    #[test]
    fn meminfo_and_sizes_parse() {
        let t = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(
            parse_meminfo(t),
            Some((24_000_000 * 1024, 20_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(kmalloc_size(65_524 + 48 + 8), 128 << 10);
        assert_eq!(kmalloc_size(90), 96);
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 B");
    }
}
