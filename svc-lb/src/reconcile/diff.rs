//! The writes from what the maps hold to a plan's target, in the order that keeps the datapath
//! consistent after each one: nothing is referenced before it is written, nothing is deleted
//! while something still references it, and flows that would outlive their ids are purged
//! first.

use std::collections::BTreeSet;

use svc_lb_common::RevNatId;

use crate::maps::{MapState, Op, Purge};

/// Ordered writes from `current` to `target`:
/// backends -> rev-NAT + names -> Maglev tables -> allowed sources -> backend slots -> slot 0
/// -> delete slot 0 of removed frontends -> delete surplus slots -> purge flows of what goes
/// away (and UDP flows of frontends that dropped a backend) -> delete allowed sources ->
/// delete Maglev tables no longer used -> delete rev-NAT + names -> delete backends.
/// Only entries that differ are written.
pub(super) fn diff(
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

/// Where `diff` puts the writes: a list (a scoped plan's), or the maps directly (a full
/// reconcile, see `reconciler::ApplySink`).
pub(super) trait OpSink {
    fn push(&mut self, op: Op);
}

impl OpSink for Vec<Op> {
    fn push(&mut self, op: Op) {
        Vec::push(self, op);
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
