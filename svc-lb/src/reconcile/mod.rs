//! Desired state -> map contents -> ordered writes. Pure except for `apply`/`reconcile`, which
//! go through `LbMaps`.
//!
//! Ids are reused from what is programmed (so a restarted agent keeps them and established
//! conntrack entries, which store ids, stay valid); new ids take the lowest free value. Writes
//! are ordered so the datapath never follows a slot 0 to a slot, backend or rev-NAT entry that
//! does not exist yet or any more.

mod drain;
mod ids;
mod reconciler;
mod slots;
#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
    time::Duration,
};

use svc_lb_common::RevNatId;
use svc_lb_common::{
    BE_STATE_ACTIVE, BE_STATE_TERMINATING, BackendV4, IPPROTO_TCP, MAX_BACKENDS, MAX_REVNAT,
    MAX_SERVICE_ENTRIES, MaglevTable, RevNatV4, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_CLUSTER_IP,
    SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_NODE_PORT,
    SVC_F_SOURCE_RANGES, ServiceEntry, ServiceKeyV4, SvcName,
    maglev::{self, MAGLEV_TABLE_SIZE},
};
use thiserror::Error;

use self::ids::IdPool;
use crate::{
    error::MapsError,
    maps::{LbMaps, MapState, Op, Purge, SrcRange},
    model::{DesiredState, Frontend, FrontendKey, LbAlgorithm, Proto},
};

pub(crate) use self::reconciler::Memory;
pub use self::{
    drain::{Live, live_tcp, live_tcp_backends},
    reconciler::Reconciler,
};

/// Map capacities the plan must respect. `Default` = the sizes the datapath declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rev-NAT ids are `1..max_revnat`.
    pub max_revnat: u32,
    /// Backend ids are `1..max_backends`.
    pub max_backends: u32,
    /// Entries in `LB4_SERVICES` (slot 0 + backend slots of every frontend).
    pub max_service_entries: u32,
    /// A removed TCP backend stays (draining) while a flow to it was active this recently.
    pub drain_idle: Duration,
    /// The same for flows that saw a FIN or RST.
    pub drain_closing: Duration,
    /// Backend selection of Services without the `svc-lb.io/lb-algorithm` annotation.
    pub default_algorithm: LbAlgorithm,
}

/// An idle keep-alive connection to a removed pod survives this long; after that its backend
/// id is released (bounded, so flows the LRU never evicts cannot pin ids forever).
pub const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(3600);
/// Long enough for the FIN/ACK exchange and retransmissions of a close.
pub const DEFAULT_DRAIN_CLOSING: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_revnat: MAX_REVNAT,
            max_backends: MAX_BACKENDS,
            max_service_entries: MAX_SERVICE_ENTRIES,
            drain_idle: DEFAULT_DRAIN_IDLE,
            drain_closing: DEFAULT_DRAIN_CLOSING,
            default_algorithm: LbAlgorithm::Random,
        }
    }
}

/// Why a frontend could not be programmed as desired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanErrorKind {
    RevNatIdsExhausted,
    BackendIdsExhausted,
    ServiceMapFull,
    /// More backends than a slot number can address.
    TooManyBackends(usize),
}

/// A frontend the plan left out (or left as it was). Other frontends are unaffected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub struct PlanError {
    pub frontend: FrontendKey,
    pub service: String,
    pub kind: PlanErrorKind,
    /// The frontend was already programmed and keeps its previous backends.
    pub kept_previous: bool,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} frontend {}: ", self.service, self.frontend)?;
        match &self.kind {
            PlanErrorKind::RevNatIdsExhausted => f.write_str("no free rev-NAT id")?,
            PlanErrorKind::BackendIdsExhausted => f.write_str("no free backend id")?,
            PlanErrorKind::ServiceMapFull => f.write_str("service map is full")?,
            PlanErrorKind::TooManyBackends(n) => {
                write!(f, "{n} backends, at most {} fit", u16::MAX)?
            }
        }
        f.write_str(if self.kept_previous {
            "; keeping what is programmed"
        } else {
            "; not programmed"
        })
    }
}

/// What the maps should contain, and the writes that get them there from `current`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub target: MapState,
    pub ops: Vec<Op>,
    pub errors: Vec<PlanError>,
}

impl Plan {
    /// Frontends (slot 0 entries) in the target.
    pub fn frontend_count(&self) -> usize {
        self.target
            .services
            .keys()
            .filter(|k| k.backend_slot == 0)
            .count()
    }
}

/// A full plan's target before its writes are worked out.
struct Planned {
    target: MapState,
    errors: Vec<PlanError>,
    new_backend_ids: BTreeSet<u32>,
    new_rev_ids: BTreeSet<RevNatId>,
}

type BackendIdent = (Ipv4Addr, u16, u8);

/// A frontend as currently programmed (slot 0 of its scope).
struct ProgrammedFe {
    rev_nat_id: RevNatId,
    /// Backend id per slot `1..=count`; `None` = slot missing.
    slots: Vec<Option<u32>>,
}

fn frontend_key(fe: &FrontendKey, slot: u16) -> ServiceKeyV4 {
    ServiceKeyV4::new(fe.ip, fe.port, fe.proto.number(), fe.scope(), slot)
}

/// The programmed frontend `key`, if its slot 0 is in `current`.
fn programmed_frontend(current: &MapState, key: &FrontendKey) -> Option<ProgrammedFe> {
    let k0 = frontend_key(key, 0);
    let v = current.services.get(&k0)?;
    let slots = (1..=v.count)
        .map(|s| current.services.get(&k0.with_slot(s)).map(|e| e.backend_id))
        .collect();
    Some(ProgrammedFe {
        rev_nat_id: v.rev_nat_id,
        slots,
    })
}

fn programmed_frontends(current: &MapState) -> BTreeMap<FrontendKey, ProgrammedFe> {
    current
        .services
        .keys()
        .filter(|k| k.backend_slot == 0 && matches!(k.scope, SCOPE_EXTERNAL | SCOPE_INTERNAL))
        .filter_map(|k| {
            let key = FrontendKey {
                ip: k.ip(),
                port: k.port(),
                proto: Proto::from_number(k.proto)?,
                internal: k.scope == SCOPE_INTERNAL,
            };
            Some((key, programmed_frontend(current, &key)?))
        })
        .collect()
}

/// Backend address -> id over `state` (the lowest id wins if an address is there twice).
fn backend_index(state: &MapState, limits: &Limits) -> HashMap<BackendIdent, u32> {
    let mut ids = HashMap::with_capacity(state.backends.len());
    for (id, b) in &state.backends {
        if (1..limits.max_backends).contains(id) {
            ids.entry((b.ip(), b.port_host(), b.proto)).or_insert(*id);
        }
    }
    ids
}

/// The backend and rev-NAT id pools of `state`: every id it names anywhere counts as used.
fn id_pools(state: &MapState, limits: &Limits) -> (IdPool, IdPool) {
    let used_be = state
        .backends
        .keys()
        .copied()
        .chain(state.services.values().map(|e| e.backend_id));
    let used_rev = state
        .revnat
        .keys()
        .chain(state.names.keys())
        // Tables and ranges an interrupted apply left behind still name their id.
        .chain(state.maglev.keys())
        .chain(state.src_ranges.iter().map(|r| &r.rev_nat_id))
        .copied()
        .chain(state.services.values().map(|e| e.rev_nat_id));
    (
        IdPool::new(limits.max_backends, used_be),
        IdPool::new(limits.max_revnat, used_rev),
    )
}

/// Which frontends a plan covers.
enum Scope<'a> {
    /// Every frontend: the target is the whole map contents.
    Full,
    /// Only these frontends (desired or not); every other programmed frontend stays exactly as
    /// it is in `current`, which must be consistent (what the agent itself programmed). The
    /// target then holds only the covered frontends' entries and the backends they touch.
    Frontends {
        keys: &'a BTreeSet<FrontendKey>,
        /// Slots naming each backend id over all of `current`.
        backend_refs: &'a HashMap<u32, u32>,
    },
}

struct Planner<'a> {
    current: &'a MapState,
    limits: Limits,
    /// Ids live TCP flows use (see `drain`).
    live: &'a Live,
    scope: Scope<'a>,
    /// The programmed frontends the plan covers.
    programmed: BTreeMap<FrontendKey, ProgrammedFe>,
    /// Backend address -> id, from current (lowest id wins if duplicated)...
    backend_ids: Cow<'a, HashMap<BackendIdent, u32>>,
    /// ...plus the ids this plan allocated (kept apart so a scoped plan borrows the agent's
    /// index instead of copying it).
    allocated_ids: HashMap<BackendIdent, u32>,
    be_alloc: IdPool,
    rev_alloc: IdPool,
    /// Current rev-NAT ids claimed by a desired frontend (each id serves one frontend).
    claimed_rev: BTreeSet<RevNatId>,
    /// Rev-NAT entries no programmed frontend points at, by value: what an interrupted apply
    /// left behind. Adopted by the frontend they were written for, so a retry after a failed
    /// write ends with the same ids as an uninterrupted apply.
    orphan_rev: BTreeMap<RevNatV4, Vec<RevNatId>>,
    new_backend_ids: BTreeSet<u32>,
    new_rev_ids: BTreeSet<RevNatId>,
    /// Entries `LB4_SERVICES` holds at the peak of applying the plan (current ∪ target).
    peak_services: u64,
    /// Maglev tables built in this plan, by backend id list (frontends of one Service port
    /// share their backends, so their tables are equal).
    maglev_cache: HashMap<Vec<u32>, Box<MaglevTable>>,
    target: MapState,
    errors: Vec<PlanError>,
}

impl<'a> Planner<'a> {
    /// A plan over every frontend, adopting whatever `current` holds (another agent's ids,
    /// leftovers of an interrupted apply, garbage).
    fn full(current: &'a MapState, limits: Limits, live: &'a Live) -> Self {
        let referenced: BTreeSet<RevNatId> = current
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        let mut orphan_rev: BTreeMap<RevNatV4, Vec<RevNatId>> = BTreeMap::new();
        for (id, r) in &current.revnat {
            if !referenced.contains(id) && (1..limits.max_revnat).contains(id) {
                orphan_rev.entry(*r).or_default().push(*id);
            }
        }
        let (be_alloc, rev_alloc) = id_pools(current, &limits);
        Self {
            current,
            limits,
            live,
            scope: Scope::Full,
            programmed: programmed_frontends(current),
            backend_ids: Cow::Owned(backend_index(current, &limits)),
            allocated_ids: HashMap::new(),
            be_alloc,
            rev_alloc,
            claimed_rev: BTreeSet::new(),
            orphan_rev,
            new_backend_ids: BTreeSet::new(),
            new_rev_ids: BTreeSet::new(),
            peak_services: current.services.len() as u64,
            maglev_cache: HashMap::new(),
            target: MapState::default(),
            errors: Vec::new(),
        }
    }

    /// A plan over `keys` only, against the agent's own record of the maps.
    fn scoped(
        memory: &'a Memory,
        keys: &'a BTreeSet<FrontendKey>,
        limits: Limits,
        live: &'a Live,
    ) -> Self {
        let current = &memory.maps;
        Self {
            current,
            limits,
            live,
            scope: Scope::Frontends {
                keys,
                backend_refs: &memory.backend_refs,
            },
            programmed: keys
                .iter()
                .filter_map(|k| Some((*k, programmed_frontend(current, k)?)))
                .collect(),
            backend_ids: Cow::Borrowed(&memory.backend_ids),
            allocated_ids: HashMap::new(),
            be_alloc: memory.be_pool.clone(),
            rev_alloc: memory.rev_pool.clone(),
            claimed_rev: BTreeSet::new(),
            // What the agent programmed itself has no orphans (a failed apply drops the
            // record, and the next plan is a full one).
            orphan_rev: BTreeMap::new(),
            new_backend_ids: BTreeSet::new(),
            new_rev_ids: BTreeSet::new(),
            peak_services: current.services.len() as u64,
            maglev_cache: HashMap::new(),
            target: MapState::default(),
            errors: Vec::new(),
        }
    }

    fn backend_id(&self, ident: &BackendIdent) -> Option<u32> {
        self.allocated_ids
            .get(ident)
            .or_else(|| self.backend_ids.get(ident))
            .copied()
    }

    /// First pass: every programmed frontend that is still desired keeps its rev-NAT id, before
    /// any new frontend can take an id.
    fn claim_rev_ids<'k>(&mut self, desired: impl Iterator<Item = &'k FrontendKey>) {
        for key in desired {
            if let Some(p) = self.programmed.get(key) {
                let id = p.rev_nat_id;
                if (1..self.limits.max_revnat).contains(&id) {
                    self.claimed_rev.insert(id);
                }
            }
        }
    }

    fn reused_rev_id(&mut self, key: &FrontendKey) -> Option<RevNatId> {
        if let Some(p) = self.programmed.get(key) {
            let id = p.rev_nat_id;
            // Claimed in the first pass; taking it out makes a duplicated id serve only one
            // frontend (the other gets a fresh one).
            if self.claimed_rev.remove(&id) {
                return Some(id);
            }
        }
        let orphans = self.orphan_rev.get_mut(&RevNatV4::new(key.ip, key.port))?;
        (!orphans.is_empty()).then(|| orphans.remove(0))
    }

    fn add(&mut self, fe: &Frontend) {
        if let Err(kind) = self.try_add(fe) {
            let kept_previous = self.keep_previous(&fe.key);
            self.errors.push(PlanError {
                frontend: fe.key,
                service: fe.service.to_string(),
                kind,
                kept_previous,
            });
        }
    }

    fn try_add(&mut self, fe: &Frontend) -> Result<(), PlanErrorKind> {
        if fe.backends.len() > usize::from(u16::MAX) {
            return Err(PlanErrorKind::TooManyBackends(fe.backends.len()));
        }
        let proto = fe.key.proto.number();
        let mut allocated_be = Vec::new();
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            let ident = (b.ip, b.port, proto);
            let id = match self.backend_id(&ident) {
                Some(id) => id,
                None => match self.be_alloc.alloc() {
                    Some(id) => {
                        allocated_be.push((ident, id));
                        self.allocated_ids.insert(ident, id);
                        id
                    }
                    None => {
                        self.release_backends(&allocated_be);
                        return Err(PlanErrorKind::BackendIdsExhausted);
                    }
                },
            };
            ids.push(id);
        }

        let old_slots = self
            .programmed
            .get(&fe.key)
            .map(|p| p.slots.clone())
            .unwrap_or_default();
        let slot_ids = slots::layout(&old_slots, &ids);

        // Entries this frontend adds that are not in the map yet: they exist alongside all
        // current entries until the trailing deletes run.
        let added = (0..=slot_ids.len())
            .filter(|s| {
                // Cannot truncate: slot_ids.len() <= u16::MAX was checked above.
                let key = frontend_key(&fe.key, *s as u16);
                !self.current.services.contains_key(&key)
            })
            .count() as u64;
        if self.peak_services + added > u64::from(self.limits.max_service_entries) {
            self.release_backends(&allocated_be);
            return Err(PlanErrorKind::ServiceMapFull);
        }

        let rev_nat_id = match self.reused_rev_id(&fe.key) {
            Some(id) => id,
            None => match self.rev_alloc.alloc() {
                Some(id) => {
                    self.new_rev_ids.insert(id);
                    id
                }
                None => {
                    self.release_backends(&allocated_be);
                    return Err(PlanErrorKind::RevNatIdsExhausted);
                }
            },
        };

        self.peak_services += added;
        for (_, id) in &allocated_be {
            self.new_backend_ids.insert(*id);
        }
        for (b, id) in fe.backends.iter().zip(&ids) {
            // On another node: the datapath SNATs external traffic to it.
            let state = if fe.policy.remote_backends.contains(&b.ip) {
                BE_STATE_ACTIVE | svc_lb_common::BE_F_REMOTE
            } else {
                BE_STATE_ACTIVE
            };
            self.target
                .backends
                .insert(*id, BackendV4::new(b.ip, b.port, proto, state));
        }
        let algorithm = fe.policy.algorithm.unwrap_or(self.limits.default_algorithm);
        let table = if algorithm == LbAlgorithm::Maglev {
            self.unchanged_maglev_table(&fe.key, rev_nat_id, &ids)
                .or_else(|| self.maglev_table(&fe.backends, &ids))
        } else {
            None
        };
        let mut flags = fe.kind.flag();
        if let Some(table) = table {
            flags |= SVC_F_MAGLEV;
            self.target.maglev.insert(rev_nat_id, table);
        }
        if fe.policy.local_only {
            flags |= SVC_F_LOCAL;
        }
        if !fe.policy.source_ranges.is_empty() {
            flags |= SVC_F_SOURCE_RANGES;
            for &(addr, len) in &fe.policy.source_ranges {
                self.target.src_ranges.insert(SrcRange {
                    rev_nat_id,
                    addr,
                    len,
                });
            }
        }
        self.target.services.insert(
            frontend_key(&fe.key, 0),
            ServiceEntry {
                count: slot_ids.len() as u16,
                rev_nat_id,
                flags,
                affinity_timeout_s: fe.policy.affinity_timeout_s,
                ..Default::default()
            },
        );
        for (i, id) in slot_ids.iter().enumerate() {
            self.target.services.insert(
                frontend_key(&fe.key, (i + 1) as u16),
                ServiceEntry {
                    backend_id: *id,
                    rev_nat_id,
                    ..Default::default()
                },
            );
        }
        self.target
            .revnat
            .insert(rev_nat_id, RevNatV4::new(fe.key.ip, fe.key.port));
        self.target
            .names
            .insert(rev_nat_id, SvcName::new(&fe.service.to_string()));
        Ok(())
    }

    /// The programmed table of a Maglev frontend whose backends did not change (building one
    /// costs ~M log M steps; the agent re-plans every few seconds).
    fn unchanged_maglev_table(
        &self,
        key: &FrontendKey,
        rev_nat_id: RevNatId,
        ids: &[u32],
    ) -> Option<Box<MaglevTable>> {
        let p = self.programmed.get(key)?;
        let before: BTreeSet<u32> = p.slots.iter().map(|s| s.unwrap_or(0)).collect();
        let now: BTreeSet<u32> = ids.iter().copied().collect();
        if p.rev_nat_id != rev_nat_id || before != now || p.slots.len() != ids.len() {
            return None;
        }
        let k0 = frontend_key(key, 0);
        let flags = self.current.services.get(&k0)?.flags;
        if flags & SVC_F_MAGLEV == 0 {
            return None;
        }
        self.current.maglev.get(&rev_nat_id).cloned()
    }

    /// The Maglev table over `backends` (sorted, so equal sets give equal tables on every node)
    /// with their `ids`; `None` without backends (the frontend rejects) or with more backends
    /// than positions (random slots then).
    fn maglev_table(
        &mut self,
        backends: &[crate::model::BackendAddr],
        ids: &[u32],
    ) -> Option<Box<MaglevTable>> {
        if ids.is_empty() || ids.len() > MAGLEV_TABLE_SIZE {
            return None;
        }
        if let Some(t) = self.maglev_cache.get(ids) {
            return Some(t.clone());
        }
        let perms: Vec<(usize, usize)> = backends
            .iter()
            .map(|b| {
                let addr = svc_lb_common::ip_to_net(b.ip);
                let port = svc_lb_common::port_to_net(b.port);
                maglev::permutation(addr, port, MAGLEV_TABLE_SIZE)
            })
            .collect();
        let mut positions = vec![0u32; MAGLEV_TABLE_SIZE];
        let mut next = vec![0usize; perms.len()];
        maglev::populate(&perms, &mut positions, &mut next).ok()?;
        let mut table = Box::<MaglevTable>::default();
        for (slot, pos) in table.backend_ids.iter_mut().zip(&positions) {
            *slot = ids[*pos as usize];
        }
        self.maglev_cache.insert(ids.to_vec(), table.clone());
        Some(table)
    }

    fn release_backends(&mut self, allocated: &[(BackendIdent, u32)]) {
        for (ident, id) in allocated {
            self.allocated_ids.remove(ident);
            self.be_alloc.free(*id);
        }
    }

    /// Copies a programmed frontend unchanged into the target ("full maps" must not make a
    /// working frontend disappear). Returns whether there was anything to keep.
    fn keep_previous(&mut self, key: &FrontendKey) -> bool {
        let Some(p) = self.programmed.get(key) else {
            return false;
        };
        let cur = self.current;
        let k0 = frontend_key(key, 0);
        let Some(entry0) = cur.services.get(&k0) else {
            return false;
        };
        self.target.services.insert(k0, *entry0);
        for s in 1..=entry0.count {
            let k = k0.with_slot(s);
            if let Some(e) = cur.services.get(&k) {
                self.target.services.insert(k, *e);
                if let Some(b) = cur.backends.get(&e.backend_id) {
                    self.target.backends.entry(e.backend_id).or_insert(*b);
                }
            }
        }
        let rev = p.rev_nat_id;
        // Its rev-NAT id stays claimed (it was claimed in the first pass and nobody else can
        // take a current id), so copying its entries cannot collide.
        self.claimed_rev.remove(&rev);
        if let Some(r) = cur.revnat.get(&rev) {
            self.target.revnat.insert(rev, *r);
        }
        if let Some(n) = cur.names.get(&rev) {
            self.target.names.insert(rev, *n);
        }
        if let Some(t) = cur.maglev.get(&rev) {
            self.target.maglev.insert(rev, t.clone());
        }
        for r in cur.src_ranges.iter().filter(|r| r.rev_nat_id == rev) {
            self.target.src_ranges.insert(*r);
        }
        true
    }

    /// A programmed TCP frontend that is no longer desired but still has live flows stays as
    /// slot 0 without slots (the datapath then serves established flows and refuses new ones)
    /// with its rev-NAT entry and name; its backends drain in `drain_backends`. Maglev tables,
    /// source ranges and affinity go: they only matter for new connections.
    fn drain_frontend(&mut self, key: &FrontendKey) {
        let Some(p) = self.programmed.get(key) else {
            return;
        };
        let rev = p.rev_nat_id;
        let cur = self.current;
        let k0 = frontend_key(key, 0);
        let (Some(entry0), Some(r)) = (cur.services.get(&k0), cur.revnat.get(&rev)) else {
            return;
        };
        if !drain::may_drain(key)
            || !self.live.frontends.contains(&rev)
            // A desired frontend adopted the id (only in maps with duplicated ids).
            || self.target.revnat.contains_key(&rev)
        {
            return;
        }
        tracing::info!(
            frontend = %key,
            rev_nat_id = rev,
            "removed frontend kept without backends while established flows use it"
        );
        self.target.services.insert(
            k0,
            ServiceEntry {
                count: 0,
                rev_nat_id: rev,
                flags: entry0.flags & KIND_FLAGS,
                ..Default::default()
            },
        );
        self.target.revnat.insert(rev, *r);
        if let Some(n) = cur.names.get(&rev) {
            self.target.names.insert(rev, *n);
        }
    }

    /// Removed TCP backends that live flows still use stay, TERMINATING (in no slot, so no new
    /// flow can pick them); the rest are deleted by the diff. Only `candidates` are looked at.
    fn drain_backends(&mut self, candidates: impl IntoIterator<Item = u32>) {
        for id in candidates {
            let Some(b) = self.current.backends.get(&id) else {
                continue;
            };
            if b.proto == IPPROTO_TCP
                && self.live.backends.contains(&id)
                && (1..self.limits.max_backends).contains(&id)
                && !self.target.backends.contains_key(&id)
            {
                let draining = BackendV4 {
                    state: BE_STATE_TERMINATING,
                    ..*b
                };
                self.target.backends.insert(id, draining);
            }
        }
    }

    /// Plans every frontend of `desired` and drains or removes the rest; the writes are left
    /// to `diff` against `self.current`.
    fn planned_full(mut self, desired: &DesiredState) -> Planned {
        self.claim_rev_ids(desired.frontends.keys());
        for fe in desired.frontends.values() {
            self.add(fe);
        }
        let removed: Vec<FrontendKey> = self
            .programmed
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in &removed {
            self.drain_frontend(key);
        }
        let current = self.current;
        self.drain_backends(current.backends.keys().copied());
        Planned {
            target: self.target,
            errors: self.errors,
            new_backend_ids: self.new_backend_ids,
            new_rev_ids: self.new_rev_ids,
        }
    }

    fn plan_full(self, desired: &DesiredState) -> Plan {
        let current = self.current;
        let p = self.planned_full(desired);
        let mut ops = Vec::new();
        diff(
            current,
            &p.target,
            &p.new_backend_ids,
            &p.new_rev_ids,
            &mut ops,
        );
        Plan {
            target: p.target,
            ops,
            errors: p.errors,
        }
    }

    /// Plans only `keys` (each as desired now, or gone). The diff runs between the covered part
    /// of `current` and the target, which then also holds, unchanged, every touched backend
    /// that frontends outside the scope still use.
    fn plan_scoped(mut self, desired: &DesiredState) -> Plan {
        let Scope::Frontends { keys, backend_refs } = self.scope else {
            unreachable!("plan_scoped on a full planner");
        };
        self.claim_rev_ids(keys.iter().filter(|k| desired.frontends.contains_key(k)));
        for key in keys {
            match desired.frontends.get(key) {
                Some(fe) => self.add(fe),
                None => self.drain_frontend(key),
            }
        }
        let cur = self.current;
        let mut before = MapState::default();
        // Slots of the covered frontends per backend id: what is left is used outside.
        let mut in_scope: HashMap<u32, u32> = HashMap::new();
        for (key, p) in &self.programmed {
            let k0 = frontend_key(key, 0);
            if let Some(e) = cur.services.get(&k0) {
                before.services.insert(k0, *e);
            }
            for (slot, id) in p.slots.iter().enumerate() {
                let k = k0.with_slot(slot as u16 + 1);
                if let (Some(id), Some(e)) = (id, cur.services.get(&k)) {
                    before.services.insert(k, *e);
                    *in_scope.entry(*id).or_default() += 1;
                }
            }
            let rev = p.rev_nat_id;
            if let Some(r) = cur.revnat.get(&rev) {
                before.revnat.insert(rev, *r);
            }
            if let Some(n) = cur.names.get(&rev) {
                before.names.insert(rev, *n);
            }
            if let Some(t) = cur.maglev.get(&rev) {
                before.maglev.insert(rev, t.clone());
            }
            before
                .src_ranges
                .extend(cur.src_ranges.range(src_ranges_of(rev)).copied());
        }
        let touched: BTreeSet<u32> = in_scope
            .keys()
            .chain(self.target.backends.keys())
            .copied()
            .collect();
        for id in &touched {
            let Some(b) = cur.backends.get(id) else {
                continue;
            };
            before.backends.insert(*id, *b);
            let total = backend_refs.get(id).copied().unwrap_or(0);
            let outside = total.saturating_sub(in_scope.get(id).copied().unwrap_or(0));
            if outside > 0 {
                self.target.backends.entry(*id).or_insert(*b);
            }
        }
        self.drain_backends(touched);
        let mut ops = Vec::new();
        diff(
            &before,
            &self.target,
            &self.new_backend_ids,
            &self.new_rev_ids,
            &mut ops,
        );
        Plan {
            target: self.target,
            ops,
            errors: self.errors,
        }
    }
}

/// The `SVC_F_*` bits that say which Service field a frontend comes from.
const KIND_FLAGS: u16 =
    SVC_F_CLUSTER_IP | SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;

/// Every `SrcRange` of frontend `rev` (the set is ordered by rev-NAT id first).
fn src_ranges_of(rev: RevNatId) -> std::ops::RangeInclusive<SrcRange> {
    SrcRange {
        rev_nat_id: rev,
        addr: Ipv4Addr::UNSPECIFIED,
        len: 0,
    }..=SrcRange {
        rev_nat_id: rev,
        addr: Ipv4Addr::BROADCAST,
        len: u8::MAX,
    }
}

/// Ordered writes from `current` to `target`:
/// backends -> rev-NAT + names -> Maglev tables -> backend slots -> slot 0 -> delete slot 0 of
/// removed frontends -> delete surplus slots -> delete Maglev tables no longer used -> purge flows of what goes away (and UDP flows of
/// frontends that dropped a backend) -> delete rev-NAT + names -> delete backends.
/// Only entries that differ are written.
fn diff(
    current: &MapState,
    target: &MapState,
    new_backend_ids: &BTreeSet<u32>,
    new_rev_ids: &BTreeSet<RevNatId>,
    ops: &mut impl OpSink,
) {
    for (id, b) in &target.backends {
        if current.backends.get(id) != Some(b) {
            if new_backend_ids.contains(id) {
                ops.push(Op::ZeroBackendStats(*id));
            }
            ops.push(Op::UpsertBackend(*id, *b));
        }
    }
    let rev_ids: BTreeSet<RevNatId> = target
        .revnat
        .keys()
        .chain(target.names.keys())
        .copied()
        .collect();
    for id in rev_ids {
        if new_rev_ids.contains(&id) {
            ops.push(Op::ZeroSvcStats(id));
        }
        if let Some(r) = target.revnat.get(&id)
            && current.revnat.get(&id) != Some(r)
        {
            ops.push(Op::UpsertRevNat(id, *r));
        }
        if let Some(n) = target.names.get(&id)
            && current.names.get(&id) != Some(n)
        {
            ops.push(Op::UpsertName(id, Box::new(*n)));
        }
    }
    // Tables before any slot changes and before the slot 0 that turns Maglev on: they name
    // only backends written above, and none that a slot change is about to retire.
    for (id, t) in &target.maglev {
        if current.maglev.get(id) != Some(t) {
            ops.push(Op::UpsertMaglev(*id, t.clone()));
        }
    }
    // Allowed sources before the slot 0 that starts enforcing them.
    for r in target.src_ranges.difference(&current.src_ranges) {
        ops.push(Op::UpsertSrcRange(*r));
    }
    let changed_services = || {
        target
            .services
            .iter()
            .filter(|(k, v)| current.services.get(k) != Some(v))
    };
    for (k, v) in changed_services().filter(|(k, _)| k.backend_slot != 0) {
        ops.push(Op::UpsertService(*k, *v));
    }
    for (k, v) in changed_services().filter(|(k, _)| k.backend_slot == 0) {
        ops.push(Op::UpsertService(*k, *v));
    }
    let removed_services = || {
        current
            .services
            .keys()
            .filter(|k| !target.services.contains_key(k))
    };
    for k in removed_services().filter(|k| k.backend_slot == 0) {
        ops.push(Op::DeleteService(*k));
    }
    for k in removed_services().filter(|k| k.backend_slot != 0) {
        ops.push(Op::DeleteService(*k));
    }
    let removed_rev: Vec<RevNatId> = current
        .revnat
        .keys()
        .filter(|id| !target.revnat.contains_key(id))
        .copied()
        .collect();
    let removed_be: Vec<u32> = current
        .backends
        .keys()
        .filter(|id| !target.backends.contains_key(id))
        .copied()
        .collect();
    let purge = Purge {
        backend_ids: removed_be.clone(),
        rev_nat_ids: removed_rev.clone(),
        pairs: dropped_pairs(current, target),
        affinity_reset: affinity_changed(current, target),
    };
    if !purge.is_empty() {
        // Before the deletes: if the purge fails, the ids are still in the maps and the next
        // plan purges and deletes them again.
        ops.push(Op::PurgeFlows(Box::new(purge)));
    }
    for r in current.src_ranges.difference(&target.src_ranges) {
        ops.push(Op::DeleteSrcRange(*r));
    }
    // After slot 0 stopped using them; before the rev-NAT ids and backends they name go.
    for id in current.maglev.keys() {
        if !target.maglev.contains_key(id) {
            ops.push(Op::DeleteMaglev(*id));
        }
    }
    for id in removed_rev {
        ops.push(Op::DeleteRevNat(id));
    }
    for id in current.names.keys() {
        if !target.names.contains_key(id) {
            ops.push(Op::DeleteName(*id));
        }
    }
    for id in removed_be {
        ops.push(Op::DeleteBackend(id));
    }
}

/// Where `diff` puts the writes: a list (a [`Plan`]), or the maps directly.
trait OpSink {
    fn push(&mut self, op: Op);
}

impl OpSink for Vec<Op> {
    fn push(&mut self, op: Op) {
        Vec::push(self, op);
    }
}

/// Applies each write as `diff` produces it, so a full sync never holds all of them (one per
/// map entry: ~240k for 10k Services x 10 endpoints). Stops writing at the first failure and
/// keeps counting, so the error can say how many writes the plan had.
struct ApplySink<'m, M: LbMaps> {
    maps: &'m mut M,
    count: usize,
    failed: Option<(usize, Op, MapsError)>,
}

impl<M: LbMaps> OpSink for ApplySink<'_, M> {
    fn push(&mut self, op: Op) {
        if self.failed.is_none()
            && let Err(e) = self.maps.apply(&op)
        {
            self.failed = Some((self.count, op, e));
        }
        self.count += 1;
    }
}

impl<M: LbMaps> ApplySink<'_, M> {
    fn finish(self) -> Result<usize, ApplyError> {
        match self.failed {
            None => Ok(self.count),
            Some((index, op, source)) => Err(ApplyError {
                index,
                total: self.count,
                op: Box::new(op),
                source,
            }),
        }
    }
}

/// (rev-NAT id, backend id) of frontends that no longer use a backend which itself stays
/// (another frontend still has it, or it drains). Their UDP flows must go, or a connected UDP
/// client keeps talking to a pod that left this Service, and so must their affinity entries.
/// Pairs whose backend or frontend is deleted are covered by the id purge.
fn dropped_pairs(current: &MapState, target: &MapState) -> Vec<(RevNatId, u32)> {
    let pairs = |s: &MapState| -> BTreeSet<(RevNatId, u32)> {
        s.services
            .iter()
            .filter(|(k, _)| k.backend_slot != 0)
            .map(|(_, v)| (v.rev_nat_id, v.backend_id))
            .collect()
    };
    let now = pairs(target);
    pairs(current)
        .into_iter()
        .filter(|p| !now.contains(p))
        .filter(|(rev, be)| target.revnat.contains_key(rev) && target.backends.contains_key(be))
        .collect()
}

/// Rev-NAT ids of frontends that stay but whose affinity timeout changed (or was turned off):
/// clients must not keep a stickiness the Service no longer asks for.
fn affinity_changed(current: &MapState, target: &MapState) -> Vec<RevNatId> {
    current
        .services
        .iter()
        .filter(|(k, v)| k.backend_slot == 0 && v.affinity_timeout_s != 0)
        .filter_map(|(k, v)| {
            let t = target.services.get(k)?;
            (t.rev_nat_id == v.rev_nat_id && t.affinity_timeout_s != v.affinity_timeout_s)
                .then_some(v.rev_nat_id)
        })
        .collect()
}

/// Plans with the datapath's map sizes.
pub fn plan(desired: &DesiredState, current: &MapState) -> Plan {
    plan_with_limits(desired, current, Limits::default())
}

/// Plans the map contents for `desired`, reusing ids from `current`, and the writes to get
/// there. Frontends that do not fit are reported in `Plan::errors`; all others proceed.
/// Removed backends are deleted at once (no flow is known to be live).
pub fn plan_with_limits(desired: &DesiredState, current: &MapState, limits: Limits) -> Plan {
    plan_draining(desired, current, limits, &Live::default())
}

/// [`plan_with_limits`], keeping removed TCP backends and frontends that `live` flows use
/// (see [`live_tcp`]) instead of deleting them.
pub fn plan_draining(
    desired: &DesiredState,
    current: &MapState,
    limits: Limits,
    live: &Live,
) -> Plan {
    Planner::full(current, limits, live).plan_full(desired)
}

/// Plans only the frontends `keys` (as `desired` has them now, or gone) against the agent's
/// record of what it programmed; everything else stays as it is. Same ids and writes as a
/// [`plan_draining`] over all of `desired` would give when only `keys` changed, at the cost of
/// the changed frontends alone.
pub(crate) fn plan_changed(
    memory: &Memory,
    desired: &DesiredState,
    keys: &BTreeSet<FrontendKey>,
    limits: Limits,
    live: &Live,
) -> Plan {
    Planner::scoped(memory, keys, limits, live).plan_scoped(desired)
}

/// A write failed; the ones before it were applied. Re-planning from a fresh dump and applying
/// again converges (every write is idempotent).
#[derive(Debug, Error)]
#[error("map write {index} of {total} ({op:?}) failed")]
pub struct ApplyError {
    pub index: usize,
    pub total: usize,
    /// Boxed: keeps the error small.
    pub op: Box<Op>,
    #[source]
    pub source: MapsError,
}

/// Applies `ops` in order, stopping at the first error.
pub fn apply(maps: &mut impl LbMaps, ops: &[Op]) -> Result<(), ApplyError> {
    for (index, op) in ops.iter().enumerate() {
        maps.apply(op).map_err(|source| ApplyError {
            index,
            total: ops.len(),
            op: Box::new(op.clone()),
            source,
        })?;
    }
    Ok(())
}

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error("cannot read the programmed maps")]
    Dump(#[source] MapsError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// What one reconcile did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub frontends: usize,
    pub backends: usize,
    pub ops: usize,
    pub errors: Vec<PlanError>,
    /// Removed TCP backends kept for their established connections.
    pub draining: usize,
}

/// Dump -> plan -> apply: adopts whatever is programmed (a previous agent's ids included).
/// Conntrack is read only when a TCP backend or frontend is removed or draining, to find live
/// flows. The agent uses a [`Reconciler`], which does this only at startup and on periodic
/// resyncs and plans changes against its own record of the maps in between.
pub fn reconcile(
    maps: &mut impl LbMaps,
    desired: &DesiredState,
    limits: Limits,
) -> Result<Outcome, ReconcileError> {
    let (outcome, ..) = reconcile_full(maps, desired, limits)?;
    Ok(outcome)
}

/// [`reconcile`], also returning what the maps hold afterwards (and the plan's errors).
fn reconcile_full(
    maps: &mut impl LbMaps,
    desired: &DesiredState,
    limits: Limits,
) -> Result<(Outcome, MapState, Vec<PlanError>), ReconcileError> {
    let current = maps.dump().map_err(ReconcileError::Dump)?;
    let live = if drain::needs_flow_scan(desired, &current) {
        let (now_ns, flows) = maps.flows().map_err(ReconcileError::Dump)?;
        live_tcp(&flows, now_ns, &limits)
    } else {
        Live::default()
    };
    let p = Planner::full(&current, limits, &live).planned_full(desired);
    let mut sink = ApplySink {
        maps,
        count: 0,
        failed: None,
    };
    diff(
        &current,
        &p.target,
        &p.new_backend_ids,
        &p.new_rev_ids,
        &mut sink,
    );
    let ops = sink.finish()?;
    let outcome = Outcome {
        frontends: p
            .target
            .services
            .keys()
            .filter(|k| k.backend_slot == 0)
            .count(),
        backends: p.target.backends.len(),
        ops,
        errors: p.errors.clone(),
        draining: draining(&p.target),
    };
    Ok((outcome, p.target, p.errors))
}

/// Removed TCP backends kept for their flows.
fn draining(state: &MapState) -> usize {
    state
        .backends
        .values()
        .filter(|b| b.state == BE_STATE_TERMINATING)
        .count()
}
