//! The agent's reconciler: it is the only writer of the LB maps, so it keeps what it programmed
//! in memory ([`Memory`]) and plans a change against that record, touching only the changed
//! frontends. The maps are read back (and any drift repaired) only by a full reconcile: at
//! startup (adopting a previous agent's ids), on the periodic resync, and after a failed write
//! (the record no longer says what the maps hold).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use svc_lb_common::{IPPROTO_TCP, RevNatId};
use tracing::debug;

use super::{
    ApplyError, Limits, Outcome, PlanError, ReconcileError,
    diff::{OpSink, diff},
    drain::{self, Live, draining, live_tcp, may_drain},
    ids::IdPool,
    plan::{BackendIdent, Planner, backend_index, id_pools, programmed_frontend, src_ranges_of},
};
use crate::{
    maps::{LbMaps, MapState, MapsError, Op},
    model::{DesiredState, FrontendKey},
};

/// What the maps hold (as far as the agent knows: it wrote all of it), with the indexes a
/// scoped plan needs so that it never has to walk every entry.
#[derive(Debug)]
pub(super) struct Memory {
    pub(super) maps: MapState,
    /// Backend address -> id (lowest id if an address is there twice).
    pub(super) backend_ids: HashMap<BackendIdent, u32>,
    /// Backend id -> slots naming it, over every frontend.
    pub(super) backend_refs: HashMap<u32, u32>,
    pub(super) be_pool: IdPool,
    pub(super) rev_pool: IdPool,
    /// Slot 0 entries (frontends, draining ones included).
    frontends: usize,
    limits: Limits,
}

impl Memory {
    /// The record of `maps`, which the maps hold right now.
    pub(super) fn new(maps: MapState, limits: Limits) -> Self {
        let mut backend_refs: HashMap<u32, u32> = HashMap::new();
        let mut frontends = 0;
        for (k, v) in &maps.services {
            if k.backend_slot == 0 {
                frontends += 1;
            } else {
                *backend_refs.entry(v.backend_id).or_default() += 1;
            }
        }
        let (be_pool, rev_pool) = id_pools(&maps, &limits);
        Self {
            backend_ids: backend_index(&maps, &limits),
            backend_refs,
            be_pool,
            rev_pool,
            frontends,
            maps,
            limits,
        }
    }

    /// Records a write that reached the maps, keeping the indexes in step.
    pub(super) fn apply(&mut self, op: &Op) {
        match op {
            Op::UpsertService(k, v) => match self.maps.services.get(k) {
                None if k.backend_slot == 0 => self.frontends += 1,
                None => self.add_ref(v.backend_id),
                Some(old) if k.backend_slot != 0 => {
                    let old = old.backend_id;
                    self.drop_ref(old);
                    self.add_ref(v.backend_id);
                }
                Some(_) => {}
            },
            Op::DeleteService(k) => match self.maps.services.get(k) {
                Some(_) if k.backend_slot == 0 => self.frontends -= 1,
                Some(old) => {
                    let old = old.backend_id;
                    self.drop_ref(old);
                }
                None => {}
            },
            Op::UpsertBackend(id, b) => {
                if let Some(old) = self.maps.backends.get(id) {
                    let old = (old.ip(), old.port_host(), old.proto);
                    if self.backend_ids.get(&old) == Some(id) {
                        self.backend_ids.remove(&old);
                    }
                }
                if (1..self.limits.max_backends).contains(id) {
                    let ident = (b.ip(), b.port_host(), b.proto);
                    let e = self.backend_ids.entry(ident).or_insert(*id);
                    *e = (*e).min(*id);
                }
                self.be_pool.take(*id);
            }
            Op::DeleteBackend(id) => {
                if let Some(old) = self.maps.backends.get(id) {
                    // Another id with the same address (only in adopted maps) is not looked
                    // for: a later plan then gives the address a new id, which is harmless.
                    let old = (old.ip(), old.port_host(), old.proto);
                    if self.backend_ids.get(&old) == Some(id) {
                        self.backend_ids.remove(&old);
                    }
                }
            }
            Op::UpsertRevNat(id, _) | Op::UpsertName(id, _) | Op::UpsertMaglev(id, _) => {
                self.rev_pool.take(*id)
            }
            Op::UpsertSrcRange(r) => self.rev_pool.take(r.rev_nat_id),
            Op::DeleteRevNat(_)
            | Op::DeleteName(_)
            | Op::DeleteMaglev(_)
            | Op::DeleteSrcRange(_)
            | Op::ZeroSvcStats(_)
            | Op::ZeroBackendStats(_)
            | Op::PurgeFlows(_) => {}
        }
        op.apply_to(&mut self.maps);
        // Ids go back to the pools once nothing names them any more.
        match op {
            Op::DeleteBackend(id) if !self.backend_refs.contains_key(id) => self.be_pool.free(*id),
            Op::DeleteRevNat(id) | Op::DeleteName(id) | Op::DeleteMaglev(id) => {
                self.release_rev(*id)
            }
            Op::DeleteSrcRange(r) => self.release_rev(r.rev_nat_id),
            _ => {}
        }
    }

    fn add_ref(&mut self, id: u32) {
        *self.backend_refs.entry(id).or_default() += 1;
        self.be_pool.take(id);
    }

    fn drop_ref(&mut self, id: u32) {
        if let Some(n) = self.backend_refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.backend_refs.remove(&id);
                if !self.maps.backends.contains_key(&id) {
                    self.be_pool.free(id);
                }
            }
        }
    }

    fn release_rev(&mut self, id: RevNatId) {
        let m = &self.maps;
        let named = m.revnat.contains_key(&id)
            || m.names.contains_key(&id)
            || m.maglev.contains_key(&id)
            || m.src_ranges.range(src_ranges_of(id)).next().is_some();
        if !named {
            self.rev_pool.free(id);
        }
    }

    /// Whether planning `keys` may have to decide about draining: a covered TCP frontend goes
    /// away, or a TCP backend loses its last slot. Otherwise conntrack is not read.
    fn needs_flow_scan(&self, desired: &DesiredState, keys: &BTreeSet<FrontendKey>) -> bool {
        let mut in_scope: HashMap<u32, u32> = HashMap::new();
        let mut wanted: BTreeSet<u32> = BTreeSet::new();
        for key in keys {
            let programmed = programmed_frontend(&self.maps, key);
            let fe = desired.frontends.get(key);
            if fe.is_none() && programmed.is_some() && may_drain(key) {
                return true;
            }
            for id in programmed.iter().flat_map(|p| p.slots.iter().flatten()) {
                *in_scope.entry(*id).or_default() += 1;
            }
            let proto = key.proto.number();
            for b in fe.iter().flat_map(|f| f.backends.iter()) {
                if let Some(id) = self.backend_ids.get(&(b.ip, b.port, proto)) {
                    wanted.insert(*id);
                }
            }
        }
        in_scope.iter().any(|(id, n)| {
            let outside = self.backend_refs.get(id).copied().unwrap_or(0) > *n;
            let tcp = self
                .maps
                .backends
                .get(id)
                .is_some_and(|b| b.proto == IPPROTO_TCP);
            tcp && !outside && !wanted.contains(id)
        })
    }
}

/// Full reconciles when needed, scoped plans against [`Memory`] otherwise.
#[derive(Debug)]
pub struct Reconciler {
    limits: Limits,
    /// `None` until the first full reconcile, and after a failed write.
    memory: Option<Memory>,
    /// Frontends the last plans could not program as desired, by frontend (retried with every
    /// change, since a change elsewhere may have freed what they lacked).
    errors: BTreeMap<FrontendKey, PlanError>,
}

impl Reconciler {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            memory: None,
            errors: BTreeMap::new(),
        }
    }

    /// What the maps hold, as recorded (`None` before the first full reconcile or after a
    /// failed write).
    #[cfg(test)]
    pub(super) fn programmed(&self) -> Option<&MapState> {
        self.memory.as_ref().map(|m| &m.maps)
    }

    /// Dump -> plan everything -> apply: adopts what is programmed and repairs any drift.
    pub fn full(
        &mut self,
        maps: &mut impl LbMaps,
        desired: &DesiredState,
    ) -> Result<Outcome, ReconcileError> {
        // Dropped first: a failure below leaves the maps in an unknown state.
        self.memory = None;
        let (outcome, target, errors) = reconcile_full(maps, desired, self.limits)?;
        self.errors = errors.into_iter().map(|e| (e.frontend, e)).collect();
        self.memory = Some(Memory::new(target, self.limits));
        Ok(outcome)
    }

    /// Programs the frontends `changed` (as `desired` has them now, or gone), planned against
    /// the record of the maps; a full reconcile when there is no record.
    pub fn changed(
        &mut self,
        maps: &mut impl LbMaps,
        desired: &DesiredState,
        changed: &BTreeSet<FrontendKey>,
    ) -> Result<Outcome, ReconcileError> {
        let Some(memory) = self.memory.as_mut() else {
            debug!("no record of the maps: full reconcile");
            return self.full(maps, desired);
        };
        let mut keys = changed.clone();
        keys.extend(self.errors.keys().copied());
        let live = if memory.needs_flow_scan(desired, &keys) {
            let (now_ns, flows) = match maps.flows() {
                Ok(f) => f,
                Err(e) => return Err(ReconcileError::Dump(e)),
            };
            live_tcp(&flows, now_ns, &self.limits)
        } else {
            Live::default()
        };
        let plan = Planner::scoped(memory, &keys, self.limits, &live).plan_scoped(desired);
        if let Err(e) = apply(maps, &plan.ops) {
            self.memory = None;
            return Err(e.into());
        }
        for op in &plan.ops {
            memory.apply(op);
        }
        for k in &keys {
            self.errors.remove(k);
        }
        self.errors
            .extend(plan.errors.into_iter().map(|e| (e.frontend, e)));
        Ok(Outcome {
            frontends: memory.frontends,
            backends: memory.maps.backends.len(),
            ops: plan.ops.len(),
            errors: self.errors.values().cloned().collect(),
            draining: draining(&memory.maps),
        })
    }
}

/// Dump -> plan -> apply: adopts whatever is programmed (a previous agent's ids included).
/// Conntrack is read only when a TCP backend or frontend is removed or draining, to find live
/// flows. Returns what the maps hold afterwards (and the plan's errors) with the outcome.
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

/// Applies `ops` in order, stopping at the first error.
fn apply(maps: &mut impl LbMaps, ops: &[Op]) -> Result<(), ApplyError> {
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
