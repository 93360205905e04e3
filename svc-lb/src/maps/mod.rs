//! The agent's view of the LB maps: their contents as plain ordered maps (`MapState`), the
//! single-entry writes the reconciler emits (`Op`), and the `LbMaps` trait with a BPF (pinned)
//! and an in-memory implementation.

mod bpf;
pub(crate) mod dump;
mod error;
mod fake;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use svc_lb_common::RevNatId;
use svc_lb_common::{
    AffinityEntry, AffinityKeyV4, BackendV4, Counter, CtEntry, CtKeyV4, IPPROTO_UDP, MaglevTable,
    RevNatV4, ServiceEntry, ServiceKeyV4, SvcName,
};

pub use bpf::{BpfLbMaps, program_local_sources};
pub use dump::dump_text;
pub use error::MapsError;
pub use fake::FakeLbMaps;

/// Contents of the maps the agent owns. Ordered so that dumps and diffs are deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKeyV4, ServiceEntry>,
    pub backends: BTreeMap<u32, BackendV4>,
    pub revnat: BTreeMap<RevNatId, RevNatV4>,
    pub names: BTreeMap<RevNatId, SvcName>,
    /// Maglev tables by rev-NAT id (boxed: 64 KiB each).
    pub maglev: BTreeMap<RevNatId, Box<MaglevTable>>,
    /// Allowed client prefixes of frontends with loadBalancerSourceRanges.
    pub src_ranges: BTreeSet<SrcRange>,
}

/// One `LB4_SRC_RANGES` entry: clients in `addr/len` may use frontend `rev_nat_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    pub rev_nat_id: RevNatId,
    pub addr: Ipv4Addr,
    pub len: u8,
}

/// One write to one map. Applying a sequence of these moves the maps from one `MapState` to
/// another; the reconciler orders them so the datapath never sees a half-built frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertService(ServiceKeyV4, ServiceEntry),
    DeleteService(ServiceKeyV4),
    UpsertBackend(u32, BackendV4),
    DeleteBackend(u32),
    UpsertRevNat(RevNatId, RevNatV4),
    DeleteRevNat(RevNatId),
    /// Boxed like the other large payloads: a full sync holds one `Op` per map entry, and the
    /// enum is as large as its largest variant.
    UpsertName(RevNatId, Box<SvcName>),
    DeleteName(RevNatId),
    UpsertMaglev(RevNatId, Box<MaglevTable>),
    DeleteMaglev(RevNatId),
    UpsertSrcRange(SrcRange),
    DeleteSrcRange(SrcRange),
    /// Reset the per-frontend counters of a newly allocated rev-NAT id (a previous frontend may
    /// have used the id; its counts must not show up under the new one).
    ZeroSvcStats(RevNatId),
    /// Same for a newly allocated backend id.
    ZeroBackendStats(u32),
    /// Drop conntrack entries (both directions) that name a backend id or rev-NAT id the plan
    /// is about to delete. Otherwise an idle flow could outlive them, and once an id is handed
    /// out again its next packet would reach, or its replies be rewritten to, whatever got the
    /// id — possibly another Service. No new entry can name them: their slots are gone.
    /// The same holds for sessionAffinity entries, which also name both ids.
    PurgeFlows(Box<Purge>),
}

impl Op {
    /// Applies the op to an in-memory state, with the same semantics as the kernel maps
    /// (upsert = insert or replace; deleting a missing key is not an error).
    pub fn apply_to(&self, state: &mut MapState) {
        match self {
            Op::UpsertService(k, v) => {
                state.services.insert(*k, *v);
            }
            Op::DeleteService(k) => {
                state.services.remove(k);
            }
            Op::UpsertBackend(k, v) => {
                state.backends.insert(*k, *v);
            }
            Op::DeleteBackend(k) => {
                state.backends.remove(k);
            }
            Op::UpsertRevNat(k, v) => {
                state.revnat.insert(*k, *v);
            }
            Op::DeleteRevNat(k) => {
                state.revnat.remove(k);
            }
            Op::UpsertName(k, v) => {
                state.names.insert(*k, **v);
            }
            Op::DeleteName(k) => {
                state.names.remove(k);
            }
            Op::UpsertMaglev(k, v) => {
                state.maglev.insert(*k, v.clone());
            }
            Op::DeleteMaglev(k) => {
                state.maglev.remove(k);
            }
            Op::UpsertSrcRange(r) => {
                state.src_ranges.insert(*r);
            }
            Op::DeleteSrcRange(r) => {
                state.src_ranges.remove(r);
            }
            Op::ZeroSvcStats(_) | Op::ZeroBackendStats(_) | Op::PurgeFlows { .. } => {}
        }
    }
}

/// Read/write access to the LB maps, so the reconciler can run against the kernel or a fake.
pub trait LbMaps {
    /// Everything currently programmed.
    fn dump(&self) -> Result<MapState, MapsError>;
    /// One write. Deleting a key that is not there succeeds (the plan may be re-applied).
    fn apply(&mut self, op: &Op) -> Result<(), MapsError>;
    /// Conntrack entries and the current CLOCK_MONOTONIC time in ns (the clock the datapath
    /// stamps `last_seen_ns` with), read before the entries.
    fn flows(&self) -> Result<(u64, Vec<(CtKeyV4, CtEntry)>), MapsError>;
}

/// What `Op::PurgeFlows` removes from conntrack and the affinity map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purge {
    /// Backends about to be deleted: every flow and affinity entry naming them.
    pub backend_ids: Vec<u32>,
    /// Frontends about to be deleted: the same.
    pub rev_nat_ids: Vec<RevNatId>,
    /// (rev-NAT id, backend id) of frontends that no longer balance to a backend which itself
    /// stays: their affinity entries, and their UDP flows (a connected UDP client must move on;
    /// TCP connections finish where they are).
    pub pairs: Vec<(RevNatId, u32)>,
    /// Frontends whose session affinity was turned off or changed: their affinity entries.
    pub affinity_reset: Vec<RevNatId>,
}

impl Purge {
    pub fn is_empty(&self) -> bool {
        self.backend_ids.is_empty()
            && self.rev_nat_ids.is_empty()
            && self.pairs.is_empty()
            && self.affinity_reset.is_empty()
    }

    fn names(&self, rev_nat_id: RevNatId, backend_id: u32) -> bool {
        self.backend_ids.contains(&backend_id) || self.rev_nat_ids.contains(&rev_nat_id)
    }

    /// Whether the conntrack entry goes.
    pub fn flow(&self, k: &CtKeyV4, e: &CtEntry) -> bool {
        self.names(e.rev_nat_id, e.backend_id)
            || (k.proto == IPPROTO_UDP && self.pairs.contains(&(e.rev_nat_id, e.backend_id)))
    }

    /// Whether the affinity entry goes.
    pub fn affinity(&self, k: &AffinityKeyV4, e: &AffinityEntry) -> bool {
        self.names(k.rev_nat_id, e.backend_id)
            || self.pairs.contains(&(k.rev_nat_id, e.backend_id))
            || self.affinity_reset.contains(&k.rev_nat_id)
    }
}

/// Read-only access to what the datapath writes: counters and conntrack. Used by `svc-lb debug`.
pub trait LbStats {
    /// Per-frontend counters (index = rev-NAT id), summed over CPUs.
    fn svc_counter(&self, rev_nat_id: RevNatId) -> Result<Counter, MapsError>;
    /// Per-backend counters (index = backend id), summed over CPUs.
    fn backend_counter(&self, backend_id: u32) -> Result<Counter, MapsError>;
    /// Global counters (`STAT_*` index order), summed over CPUs.
    fn global_counters(&self) -> Result<Vec<u64>, MapsError>;
    /// All conntrack entries, in no particular order.
    fn conntrack(&self) -> Result<Vec<(CtKeyV4, CtEntry)>, MapsError>;
    /// The sizes of the maps in use (set by `--max-*` when they were created, so not
    /// necessarily the defaults).
    fn capacity(&self) -> crate::dataplane::capacity::MapCapacity;
}
