use std::net::Ipv4Addr;

use svc_lb_common::{
    BE_STATE_ACTIVE, BE_STATE_TERMINATING, BackendV4, CtEntry, CtKeyV4, IPPROTO_TCP, IPPROTO_UDP,
    RevNatId, RevNatV4, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_NODE_PORT,
    SVC_F_SOURCE_RANGES, ServiceEntry, ServiceKeyV4, maglev::MAGLEV_TABLE_SIZE,
};

use super::{
    Limits, Outcome, PlanErrorKind, ReconcileError, Reconciler,
    drain::Live,
    plan::{Plan, Planner},
};
use crate::{
    maps::{FakeLbMaps, LbMaps, MapState, Op, dump_text},
    model::{
        BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, LbAlgorithm, LbPolicy,
        Proto, ServicePortRef,
    },
};

mod diff;
mod drain;
mod incremental;
mod plan;

/// A full plan with the datapath's map sizes, its writes as a list.
fn plan(desired: &DesiredState, current: &MapState) -> Plan {
    plan_with_limits(desired, current, Limits::default())
}

/// A full plan (no flow known to be live, so nothing drains), its writes as a list.
fn plan_with_limits(desired: &DesiredState, current: &MapState, limits: Limits) -> Plan {
    Planner::full(current, limits, &Live::default()).plan_full(desired)
}

/// Frontends (slot 0 entries) in a plan's target.
fn frontend_count(p: &Plan) -> usize {
    p.target
        .services
        .keys()
        .filter(|k| k.backend_slot == 0)
        .count()
}

/// A full reconcile through the agent's entry point, as a fresh agent runs it.
fn reconcile(
    maps: &mut impl LbMaps,
    desired: &DesiredState,
    limits: Limits,
) -> Result<Outcome, ReconcileError> {
    Reconciler::new(limits).full(maps, desired)
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn fe(
    addr: &str,
    port: u16,
    proto: Proto,
    kind: FrontendKind,
    svc: &str,
    backends: &[(&str, u16)],
) -> Frontend {
    let (ns_name, port_name) = svc.split_once(':').unwrap();
    let (namespace, name) = ns_name.split_once('/').unwrap();
    let mut backends: Vec<BackendAddr> = backends
        .iter()
        .map(|(a, p)| BackendAddr {
            ip: ip(a),
            port: *p,
        })
        .collect();
    backends.sort();
    backends.dedup();
    Frontend {
        key: FrontendKey {
            ip: ip(addr),
            port,
            proto,
            internal: false,
        },
        kind,
        service: ServicePortRef {
            namespace: namespace.into(),
            name: name.into(),
            port: port_name.into(),
        },
        backends,
        policy: LbPolicy::default(),
    }
}

fn state(frontends: impl IntoIterator<Item = Frontend>) -> DesiredState {
    DesiredState {
        frontends: frontends.into_iter().map(|f| (f.key, f)).collect(),
    }
}

const PODS: [&str; 3] = ["10.244.1.2", "10.244.2.2", "10.244.3.2"];

fn frontend_svc(n: usize) -> Frontend {
    let b: Vec<_> = PODS[..n].iter().map(|p| (*p, 5000)).collect();
    fe(
        "10.96.0.10",
        80,
        Proto::Tcp,
        FrontendKind::ClusterIp,
        "default/frontend-svc:80",
        &b,
    )
}

/// The example topology: a ClusterIP service, a NodePort service (ClusterIP + NodePort
/// frontends sharing backends) and a UDP service.
fn example() -> DesiredState {
    let web: Vec<_> = PODS.iter().map(|p| (*p, 80)).collect();
    let dns: Vec<_> = PODS.iter().map(|p| (*p, 5353)).collect();
    state([
        frontend_svc(3),
        fe(
            "10.96.0.20",
            8080,
            Proto::Tcp,
            FrontendKind::ClusterIp,
            "default/web-service:http",
            &web,
        ),
        fe(
            "172.31.0.1",
            30080,
            Proto::Tcp,
            FrontendKind::NodePort,
            "default/web-service:http",
            &web,
        ),
        fe(
            "10.96.0.53",
            53,
            Proto::Udp,
            FrontendKind::ClusterIp,
            "kube-system/dns-like:dns",
            &dns,
        ),
    ])
}

/// Every frontend the datapath can see (slot 0) leads only to existing entries: its rev-NAT
/// entry, slots `1..=count` that belong to it, and the backends those slots name.
fn check_consistent(s: &MapState) -> Result<(), String> {
    check_consistent_with(s, true)
}

/// `tables`: also check Maglev tables (slow in debug builds: 16381 ids each), needed only after
/// a write that can affect them.
fn check_consistent_with(s: &MapState, tables: bool) -> Result<(), String> {
    for (k, v) in s.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        if !s.revnat.contains_key(&v.rev_nat_id) {
            return Err(format!("{k:?}: rev-NAT {} missing", v.rev_nat_id));
        }
        if tables && v.flags & SVC_F_MAGLEV != 0 {
            let Some(t) = s.maglev.get(&v.rev_nat_id) else {
                return Err(format!("{k:?}: Maglev table missing"));
            };
            if let Some(id) = t.backend_ids.iter().find(|id| !s.backends.contains_key(id)) {
                return Err(format!("{k:?}: Maglev table names missing backend {id}"));
            }
        }
        for slot in 1..=v.count {
            let Some(e) = s.services.get(&k.with_slot(slot)) else {
                return Err(format!("{k:?}: slot {slot} of {} missing", v.count));
            };
            if e.rev_nat_id != v.rev_nat_id {
                return Err(format!("{k:?}: slot {slot} has rev-NAT {}", e.rev_nat_id));
            }
            if !s.backends.contains_key(&e.backend_id) {
                return Err(format!(
                    "{k:?}: slot {slot} backend {} missing",
                    e.backend_id
                ));
            }
        }
    }
    Ok(())
}

/// Applies ops one at a time, checking consistency after every single write.
fn apply_checked(start: &MapState, ops: &[Op]) -> MapState {
    let mut s = start.clone();
    check_consistent(&s).expect("start state consistent");
    for (i, op) in ops.iter().enumerate() {
        op.apply_to(&mut s);
        let tables = match op {
            Op::UpsertMaglev(..) | Op::DeleteMaglev(_) | Op::DeleteBackend(_) => true,
            Op::UpsertService(k, _) => k.backend_slot == 0,
            _ => false,
        };
        if let Err(e) = check_consistent_with(&s, tables) {
            panic!("inconsistent after op {i} {op:?}: {e}\nops: {ops:#?}");
        }
    }
    s
}

/// Plans from `current`, applies with the consistency check, and checks the plan reached its
/// target and a re-plan is empty.
fn step(current: &MapState, desired: &DesiredState) -> (MapState, Vec<Op>) {
    let p = plan(desired, current);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let after = apply_checked(current, &p.ops);
    assert_eq!(after, p.target);
    let again = plan(desired, &after);
    assert!(again.ops.is_empty(), "re-plan not empty: {:?}", again.ops);
    (after, p.ops)
}

fn svc_key(addr: &str, port: u16, slot: u16) -> ServiceKeyV4 {
    ServiceKeyV4::new(ip(addr), port, IPPROTO_TCP, 0, slot)
}

/// Only map writes (not the stats resets), as (map, key) strings for compact assertions.
fn touched(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .map(|op| match op {
            Op::UpsertService(k, _) => format!("+svc {}:{}#{}", k.ip(), k.port(), k.backend_slot),
            Op::DeleteService(k) => format!("-svc {}:{}#{}", k.ip(), k.port(), k.backend_slot),
            Op::UpsertBackend(id, _) => format!("+be {id}"),
            Op::DeleteBackend(id) => format!("-be {id}"),
            Op::UpsertRevNat(id, _) => format!("+rev {id}"),
            Op::DeleteRevNat(id) => format!("-rev {id}"),
            Op::UpsertName(id, _) => format!("+name {id}"),
            Op::DeleteName(id) => format!("-name {id}"),
            Op::UpsertMaglev(id, _) => format!("+maglev {id}"),
            Op::DeleteMaglev(id) => format!("-maglev {id}"),
            Op::UpsertSrcRange(r) => format!("+src {}:{}/{}", r.rev_nat_id, r.addr, r.len),
            Op::DeleteSrcRange(r) => format!("-src {}:{}/{}", r.rev_nat_id, r.addr, r.len),
            Op::ZeroSvcStats(id) => format!("0svc {id}"),
            Op::ZeroBackendStats(id) => format!("0be {id}"),
            Op::PurgeFlows(p) => {
                let mut s = format!("purge be{:?} rev{:?}", p.backend_ids, p.rev_nat_ids);
                if !p.pairs.is_empty() {
                    s += &format!(" pairs{:?}", p.pairs);
                }
                if !p.affinity_reset.is_empty() {
                    s += &format!(" affinity{:?}", p.affinity_reset);
                }
                s
            }
        })
        .collect()
}

fn small(max_revnat: u32, max_backends: u32) -> Limits {
    Limits {
        max_revnat,
        max_backends,
        max_service_entries: 1000,
        ..Limits::default()
    }
}

/// Tiny deterministic PRNG so the random walk is reproducible.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn tcp_flow(
    sport: u16,
    backend_id: u32,
    rev_nat_id: RevNatId,
    last_seen_ns: u64,
) -> (CtKeyV4, CtEntry) {
    (
        CtKeyV4 {
            sport,
            proto: IPPROTO_TCP,
            ..Default::default()
        },
        CtEntry {
            backend_id,
            rev_nat_id,
            last_seen_ns,
            ..Default::default()
        },
    )
}
