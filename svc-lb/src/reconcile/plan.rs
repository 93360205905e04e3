//! The planner: from the desired state and what the maps hold now to what they should hold
//! (the target), with ids reused where possible. The writes that get the maps there are
//! `diff`'s.
//!
//! A full plan covers every frontend and adopts whatever the maps hold (another agent's ids,
//! leftovers of an interrupted apply, garbage); a scoped plan covers only the frontends that
//! changed, against the agent's own record of the maps ([`Memory`]).

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use svc_lb_common::{
    BE_F_REMOTE, BE_STATE_ACTIVE, BackendV4, MaglevTable, RevNatId, RevNatV4, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_LOCAL,
    SVC_F_MAGLEV, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES, ServiceEntry, ServiceKeyV4, SvcName,
    maglev::{self, MAGLEV_TABLE_SIZE},
};

use super::{
    Limits, PlanError, PlanErrorKind, diff::diff, drain::Live, ids::IdPool, reconciler::Memory,
    slots,
};
use crate::{
    maps::{MapState, Op, SrcRange},
    model::{BackendAddr, DesiredState, Frontend, FrontendKey, LbAlgorithm, Proto},
};

/// What the maps should contain, and the writes that get them there from `current`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) target: MapState,
    pub(super) ops: Vec<Op>,
    pub(super) errors: Vec<PlanError>,
}

/// A full plan's target before its writes are worked out (the agent applies them as `diff`
/// produces them instead of collecting them in a [`Plan`]).
pub(super) struct Planned {
    pub(super) target: MapState,
    pub(super) errors: Vec<PlanError>,
    pub(super) new_backend_ids: BTreeSet<u32>,
    pub(super) new_rev_ids: BTreeSet<RevNatId>,
}

/// A backend's address and IP protocol: what its id stands for.
pub(super) type BackendIdent = (Ipv4Addr, u16, u8);

/// A frontend as currently programmed (slot 0 of its scope).
pub(super) struct ProgrammedFe {
    pub(super) rev_nat_id: RevNatId,
    /// Backend id per slot `1..=count`; `None` = slot missing.
    pub(super) slots: Vec<Option<u32>>,
}

pub(super) fn frontend_key(fe: &FrontendKey, slot: u16) -> ServiceKeyV4 {
    ServiceKeyV4::new(fe.ip, fe.port, fe.proto.number(), fe.scope(), slot)
}

/// The programmed frontend `key`, if its slot 0 is in `current`.
pub(super) fn programmed_frontend(current: &MapState, key: &FrontendKey) -> Option<ProgrammedFe> {
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
pub(super) fn backend_index(state: &MapState, limits: &Limits) -> HashMap<BackendIdent, u32> {
    let mut ids = HashMap::with_capacity(state.backends.len());
    for (id, b) in &state.backends {
        if (1..limits.max_backends).contains(id) {
            ids.entry((b.ip(), b.port_host(), b.proto)).or_insert(*id);
        }
    }
    ids
}

/// The backend and rev-NAT id pools of `state`: every id it names anywhere counts as used.
pub(super) fn id_pools(state: &MapState, limits: &Limits) -> (IdPool, IdPool) {
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

/// The `SVC_F_*` bits that say which Service field a frontend comes from.
pub(super) const KIND_FLAGS: u16 =
    SVC_F_CLUSTER_IP | SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;

/// Every `SrcRange` of frontend `rev` (the set is ordered by rev-NAT id first).
pub(super) fn src_ranges_of(rev: RevNatId) -> std::ops::RangeInclusive<SrcRange> {
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

/// The backend ids of one frontend's backends, in its order.
struct BackendIds {
    ids: Vec<u32>,
    /// The ids of `ids` this frontend allocated (given back if it cannot be programmed).
    allocated: Vec<(BackendIdent, u32)>,
}

pub(super) struct Planner<'a> {
    pub(super) current: &'a MapState,
    pub(super) limits: Limits,
    /// Ids live TCP flows use (see `drain`).
    pub(super) live: &'a Live,
    scope: Scope<'a>,
    /// The programmed frontends the plan covers.
    pub(super) programmed: BTreeMap<FrontendKey, ProgrammedFe>,
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
    pub(super) target: MapState,
    errors: Vec<PlanError>,
}

impl<'a> Planner<'a> {
    /// A plan over every frontend, adopting whatever `current` holds (another agent's ids,
    /// leftovers of an interrupted apply, garbage).
    pub(super) fn full(current: &'a MapState, limits: Limits, live: &'a Live) -> Self {
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
    pub(super) fn scoped(
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

    /// Plans every frontend of `desired` and drains or removes the rest; the writes are left
    /// to `diff` against `self.current`.
    pub(super) fn planned_full(mut self, desired: &DesiredState) -> Planned {
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

    /// A full plan with its writes as a list (what the tests compare).
    #[cfg(test)]
    pub(super) fn plan_full(self, desired: &DesiredState) -> Plan {
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
    pub(super) fn plan_scoped(mut self, desired: &DesiredState) -> Plan {
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

    /// Plans `fe`, or records why it could not be (keeping what is programmed of it).
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

    /// Ids, room and slots for `fe`, then its entries in the target. On an error nothing of
    /// `fe` is in the target and every id it took is free again.
    fn try_add(&mut self, fe: &Frontend) -> Result<(), PlanErrorKind> {
        if fe.backends.len() > usize::from(u16::MAX) {
            return Err(PlanErrorKind::TooManyBackends(fe.backends.len()));
        }
        let ids = self.backend_ids_for(fe)?;
        let slot_ids = self.slot_layout(&fe.key, &ids.ids);
        let added = self.entries_added(&fe.key, slot_ids.len());
        let rev_nat_id = match self
            .check_room(added)
            .and_then(|()| self.rev_nat_id_for(&fe.key))
        {
            Ok(id) => id,
            Err(kind) => {
                self.release_backends(&ids.allocated);
                return Err(kind);
            }
        };
        self.peak_services += added;
        self.new_backend_ids
            .extend(ids.allocated.iter().map(|(_, id)| *id));
        self.write_backends(fe, &ids.ids);
        let flags = self.write_policy(fe, rev_nat_id, &ids.ids);
        self.write_slots(fe, rev_nat_id, flags, &slot_ids);
        Ok(())
    }

    fn backend_id(&self, ident: &BackendIdent) -> Option<u32> {
        self.allocated_ids
            .get(ident)
            .or_else(|| self.backend_ids.get(ident))
            .copied()
    }

    /// The id of each backend of `fe`: the one it has, or a new one. When the ids run out,
    /// the ones allocated here are given back.
    fn backend_ids_for(&mut self, fe: &Frontend) -> Result<BackendIds, PlanErrorKind> {
        let proto = fe.key.proto.number();
        let mut allocated = Vec::new();
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            let ident = (b.ip, b.port, proto);
            let id = match self.backend_id(&ident) {
                Some(id) => id,
                None => match self.be_alloc.alloc() {
                    Some(id) => {
                        allocated.push((ident, id));
                        self.allocated_ids.insert(ident, id);
                        id
                    }
                    None => {
                        self.release_backends(&allocated);
                        return Err(PlanErrorKind::BackendIdsExhausted);
                    }
                },
            };
            ids.push(id);
        }
        Ok(BackendIds { ids, allocated })
    }

    fn release_backends(&mut self, allocated: &[(BackendIdent, u32)]) {
        for (ident, id) in allocated {
            self.allocated_ids.remove(ident);
            self.be_alloc.free(*id);
        }
    }

    /// The backend id of each slot `1..=n` of frontend `key` (see `slots`).
    fn slot_layout(&self, key: &FrontendKey, ids: &[u32]) -> Vec<u32> {
        let old_slots = self.programmed.get(key).map_or(&[][..], |p| &p.slots[..]);
        slots::layout(old_slots, ids)
    }

    /// Entries frontend `key` with `slots` slots adds that are not in the map yet: they exist
    /// alongside all current entries until the trailing deletes run.
    fn entries_added(&self, key: &FrontendKey, slots: usize) -> u64 {
        (0..=slots)
            .filter(|s| {
                // Cannot truncate: slots <= u16::MAX was checked in `try_add`.
                let key = frontend_key(key, *s as u16);
                !self.current.services.contains_key(&key)
            })
            .count() as u64
    }

    /// Whether `added` more entries fit in `LB4_SERVICES` at the peak of the apply.
    fn check_room(&self, added: u64) -> Result<(), PlanErrorKind> {
        if self.peak_services + added > u64::from(self.limits.max_service_entries) {
            return Err(PlanErrorKind::ServiceMapFull);
        }
        Ok(())
    }

    /// The rev-NAT id of frontend `key`: the one it has (or an orphan written for it), or a
    /// new one.
    fn rev_nat_id_for(&mut self, key: &FrontendKey) -> Result<RevNatId, PlanErrorKind> {
        if let Some(id) = self.reused_rev_id(key) {
            return Ok(id);
        }
        let id = self
            .rev_alloc
            .alloc()
            .ok_or(PlanErrorKind::RevNatIdsExhausted)?;
        self.new_rev_ids.insert(id);
        Ok(id)
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

    /// `LB4_BACKENDS` entries of `fe`'s backends (`ids` in the same order).
    fn write_backends(&mut self, fe: &Frontend, ids: &[u32]) {
        let proto = fe.key.proto.number();
        for (b, id) in fe.backends.iter().zip(ids) {
            // On another node: the datapath SNATs external traffic to it.
            let state = if fe.policy.remote_backends.contains(&b.ip) {
                BE_STATE_ACTIVE | BE_F_REMOTE
            } else {
                BE_STATE_ACTIVE
            };
            self.target
                .backends
                .insert(*id, BackendV4::new(b.ip, b.port, proto, state));
        }
    }

    /// The Maglev table and allowed source ranges of `fe`; returns its slot 0 flags.
    fn write_policy(&mut self, fe: &Frontend, rev_nat_id: RevNatId, ids: &[u32]) -> u16 {
        let algorithm = fe.policy.algorithm.unwrap_or(self.limits.default_algorithm);
        let table = if algorithm == LbAlgorithm::Maglev {
            self.unchanged_maglev_table(&fe.key, rev_nat_id, ids)
                .or_else(|| self.maglev_table(&fe.backends, ids))
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
        flags
    }

    /// Slot 0, the backend slots, the rev-NAT entry and the name of `fe`.
    fn write_slots(&mut self, fe: &Frontend, rev_nat_id: RevNatId, flags: u16, slot_ids: &[u32]) {
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
    fn maglev_table(&mut self, backends: &[BackendAddr], ids: &[u32]) -> Option<Box<MaglevTable>> {
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
}
