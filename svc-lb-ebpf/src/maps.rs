//! Map definitions. Every map is pinned by name so the agent (and a restarted agent, and
//! `svc-lb debug`) shares them through `<pin_dir>/<NAME>`; names are
//! `svc_lb_common::maps::ALL_MAPS` (`#[map(name)]` needs a literal: `tests/tests/prog_contract.rs`
//! fails when the two differ).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use svc_lb_common::{
    AffinityEntry, AffinityKeyV4, BackendV4, Counter, CtEntry, CtKeyV4, MAX_AFFINITY_ENTRIES,
    MAX_BACKENDS, MAX_CT_ENTRIES, MAX_LOCAL_SRC, MAX_REVNAT, MAX_SERVICE_ENTRIES, MAX_SRC_RANGES,
    MaglevTable, RevNatId, RevNatV4, STAT_COUNT, ServiceEntry, ServiceKeyV4, SrcRangeKeyV4,
    SvcName,
};

#[map(name = "LB4_SERVICES")]
pub static LB4_SERVICES: HashMap<ServiceKeyV4, ServiceEntry> =
    HashMap::pinned(MAX_SERVICE_ENTRIES, 0);

#[map(name = "LB4_BACKENDS")]
pub static LB4_BACKENDS: HashMap<u32, BackendV4> = HashMap::pinned(MAX_BACKENDS, 0);

#[map(name = "LB4_REVNAT")]
pub static LB4_REVNAT: HashMap<RevNatId, RevNatV4> = HashMap::pinned(MAX_REVNAT, 0);

#[map(name = "LB4_CT")]
pub static LB4_CT: LruHashMap<CtKeyV4, CtEntry> = LruHashMap::pinned(MAX_CT_ENTRIES, 0);

/// One 64 KiB table per Maglev frontend; not preallocated, so only those cost memory. The
/// agent replaces a table with one update, which readers see atomically.
#[map(name = "LB4_MAGLEV")]
pub static LB4_MAGLEV: HashMap<RevNatId, MaglevTable> =
    HashMap::pinned(MAX_REVNAT, BPF_F_NO_PREALLOC);

/// Allowed client prefixes of frontends with loadBalancerSourceRanges (value unused).
#[map(name = "LB4_SRC_RANGES")]
pub static LB4_SRC_RANGES: LpmTrie<SrcRangeKeyV4, u8> = LpmTrie::pinned(MAX_SRC_RANGES, 0);

/// In-cluster source prefixes (cluster CIDRs, node addresses; value unused), see `lb::scoped`.
#[map(name = "LB4_LOCAL_SRC")]
pub static LB4_LOCAL_SRC: LpmTrie<u32, u8> = LpmTrie::pinned(MAX_LOCAL_SRC, 0);

#[map(name = "LB4_AFFINITY")]
pub static LB4_AFFINITY: LruHashMap<AffinityKeyV4, AffinityEntry> =
    LruHashMap::pinned(MAX_AFFINITY_ENTRIES, 0);

#[map(name = "LB4_SVC_STATS")]
pub static LB4_SVC_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_REVNAT, 0);

#[map(name = "LB4_BE_STATS")]
pub static LB4_BE_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "LB_STATS")]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

/// Only the agent reads and writes it (names for `svc-lb debug`); it lives here so loading the
/// object creates and pins it with the others. Without preallocation it costs nothing when empty.
#[map(name = "LB_SVC_NAMES")]
pub static LB_SVC_NAMES: HashMap<RevNatId, SvcName> =
    HashMap::pinned(MAX_REVNAT, BPF_F_NO_PREALLOC);

/// Socket LB (`sock`): which frontend a socket's rewritten destination stands for, so replies
/// (recvmsg) and getpeername show the frontend. LRU: closed sockets age out on their own.
#[map(name = "LB4_SOCK_REVNAT")]
pub static LB4_SOCK_REVNAT: LruHashMap<
    svc_lb_common::SockRevNatKeyV4,
    svc_lb_common::SockRevNatV4,
> = LruHashMap::pinned(svc_lb_common::MAX_SOCK_REVNAT, 0);

/// Increments global counter `idx` (a `STAT_*` index).
#[inline(always)]
pub fn stat(idx: u32) {
    if let Some(p) = LB_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, idx: u32, bytes: u32) {
    if let Some(p) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, see `stat`.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += u64::from(bytes);
        }
    }
}

/// Per-frontend and per-backend packet/byte counters.
#[inline(always)]
pub fn count_flow(rev_nat_id: RevNatId, backend_id: u32, bytes: u32) {
    bump(&LB4_SVC_STATS, rev_nat_id, bytes);
    bump(&LB4_BE_STATS, backend_id, bytes);
}
