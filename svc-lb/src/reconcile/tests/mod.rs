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

mod incremental;

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

#[test]
fn golden_example_dump() {
    let (s, ops) = step(&MapState::default(), &example());
    assert_eq!(
        dump_text(&s),
        "\
SVC: ADDR=10.96.0.10:80/TCP SLOT=0 COUNT=3 REVNAT=1 FLAGS=ClusterIP
SVC: ADDR=10.96.0.10:80/TCP SLOT=1 BACKEND=1 REVNAT=1
SVC: ADDR=10.96.0.10:80/TCP SLOT=2 BACKEND=2 REVNAT=1
SVC: ADDR=10.96.0.10:80/TCP SLOT=3 BACKEND=3 REVNAT=1
SVC: ADDR=10.96.0.20:8080/TCP SLOT=0 COUNT=3 REVNAT=2 FLAGS=ClusterIP
SVC: ADDR=10.96.0.20:8080/TCP SLOT=1 BACKEND=4 REVNAT=2
SVC: ADDR=10.96.0.20:8080/TCP SLOT=2 BACKEND=5 REVNAT=2
SVC: ADDR=10.96.0.20:8080/TCP SLOT=3 BACKEND=6 REVNAT=2
SVC: ADDR=10.96.0.53:53/UDP SLOT=0 COUNT=3 REVNAT=3 FLAGS=ClusterIP
SVC: ADDR=10.96.0.53:53/UDP SLOT=1 BACKEND=7 REVNAT=3
SVC: ADDR=10.96.0.53:53/UDP SLOT=2 BACKEND=8 REVNAT=3
SVC: ADDR=10.96.0.53:53/UDP SLOT=3 BACKEND=9 REVNAT=3
SVC: ADDR=172.31.0.1:30080/TCP SLOT=0 COUNT=3 REVNAT=4 FLAGS=NodePort
SVC: ADDR=172.31.0.1:30080/TCP SLOT=1 BACKEND=4 REVNAT=4
SVC: ADDR=172.31.0.1:30080/TCP SLOT=2 BACKEND=5 REVNAT=4
SVC: ADDR=172.31.0.1:30080/TCP SLOT=3 BACKEND=6 REVNAT=4
BE: ID=1 ADDR=10.244.1.2:5000/TCP STATE=active
BE: ID=2 ADDR=10.244.2.2:5000/TCP STATE=active
BE: ID=3 ADDR=10.244.3.2:5000/TCP STATE=active
BE: ID=4 ADDR=10.244.1.2:80/TCP STATE=active
BE: ID=5 ADDR=10.244.2.2:80/TCP STATE=active
BE: ID=6 ADDR=10.244.3.2:80/TCP STATE=active
BE: ID=7 ADDR=10.244.1.2:5353/UDP STATE=active
BE: ID=8 ADDR=10.244.2.2:5353/UDP STATE=active
BE: ID=9 ADDR=10.244.3.2:5353/UDP STATE=active
REV: ID=1 ADDR=10.96.0.10:80
REV: ID=2 ADDR=10.96.0.20:8080
REV: ID=3 ADDR=10.96.0.53:53
REV: ID=4 ADDR=172.31.0.1:30080
NAME: ID=1 NAME=default/frontend-svc:80
NAME: ID=2 NAME=default/web-service:http
NAME: ID=3 NAME=kube-system/dns-like:dns
NAME: ID=4 NAME=default/web-service:http
"
    );
    // Fresh ids: every one gets its counters reset before it becomes reachable.
    let zeroed_be = ops
        .iter()
        .filter(|o| matches!(o, Op::ZeroBackendStats(_)))
        .count();
    let zeroed_svc = ops
        .iter()
        .filter(|o| matches!(o, Op::ZeroSvcStats(_)))
        .count();
    assert_eq!((zeroed_be, zeroed_svc), (9, 4));
}

#[test]
fn golden_frontend_without_backends() {
    let (s, _) = step(&MapState::default(), &state([frontend_svc(0)]));
    assert_eq!(
        dump_text(&s),
        "\
SVC: ADDR=10.96.0.10:80/TCP SLOT=0 COUNT=0 REVNAT=1 FLAGS=ClusterIP
REV: ID=1 ADDR=10.96.0.10:80
NAME: ID=1 NAME=default/frontend-svc:80
"
    );
}

#[test]
fn exact_op_order_for_a_new_frontend() {
    let p = plan(&state([frontend_svc(2)]), &MapState::default());
    assert_eq!(
        touched(&p.ops),
        [
            "0be 1",
            "+be 1",
            "0be 2",
            "+be 2",
            "0svc 1",
            "+rev 1",
            "+name 1",
            "+svc 10.96.0.10:80#1",
            "+svc 10.96.0.10:80#2",
            "+svc 10.96.0.10:80#0",
        ]
    );
}

#[test]
fn unchanged_state_plans_zero_ops() {
    let (s, _) = step(&MapState::default(), &example());
    assert!(plan(&example(), &s).ops.is_empty());
}

#[test]
fn adding_a_backend_touches_only_its_slot_and_the_count() {
    let (s, _) = step(&MapState::default(), &state([frontend_svc(2)]));
    let (_, ops) = step(&s, &state([frontend_svc(3)]));
    assert_eq!(
        touched(&ops),
        [
            "0be 3",
            "+be 3",
            "+svc 10.96.0.10:80#3",
            "+svc 10.96.0.10:80#0"
        ]
    );
}

#[test]
fn removing_the_last_slot_backend_touches_only_that_slot_and_the_count() {
    let (s, _) = step(&MapState::default(), &state([frontend_svc(3)]));
    let (after, ops) = step(&s, &state([frontend_svc(2)]));
    assert_eq!(
        touched(&ops),
        [
            "+svc 10.96.0.10:80#0",
            "-svc 10.96.0.10:80#3",
            "purge be[3] rev[]",
            "-be 3"
        ]
    );
    assert_eq!(after.services[&svc_key("10.96.0.10", 80, 0)].count, 2);
}

#[test]
fn removing_a_middle_backend_moves_the_last_into_its_slot() {
    let (s, _) = step(&MapState::default(), &state([frontend_svc(3)]));
    let only_a_c = state([fe(
        "10.96.0.10",
        80,
        Proto::Tcp,
        FrontendKind::ClusterIp,
        "default/frontend-svc:80",
        &[(PODS[0], 5000), (PODS[2], 5000)],
    )]);
    let (after, ops) = step(&s, &only_a_c);
    assert_eq!(
        touched(&ops),
        [
            "+svc 10.96.0.10:80#2",
            "+svc 10.96.0.10:80#0",
            "-svc 10.96.0.10:80#3",
            "purge be[2] rev[]",
            "-be 2"
        ]
    );
    // Backend ids (what conntrack stores) did not change, only the slot of pod-c did.
    assert_eq!(after.services[&svc_key("10.96.0.10", 80, 1)].backend_id, 1);
    assert_eq!(after.services[&svc_key("10.96.0.10", 80, 2)].backend_id, 3);
}

#[test]
fn scale_3_2_0_3() {
    let (s3, _) = step(&MapState::default(), &state([frontend_svc(3)]));
    let (s2, _) = step(&s3, &state([frontend_svc(2)]));
    let (s0, ops) = step(&s2, &state([frontend_svc(0)]));
    assert_eq!(
        touched(&ops),
        [
            "+svc 10.96.0.10:80#0",
            "-svc 10.96.0.10:80#1",
            "-svc 10.96.0.10:80#2",
            "purge be[1, 2] rev[]",
            "-be 1",
            "-be 2"
        ]
    );
    assert_eq!(s0.services.len(), 1, "slot 0 stays with count 0 (reject)");
    assert_eq!(s0.services[&svc_key("10.96.0.10", 80, 0)].count, 0);
    assert_eq!(s0.revnat.len(), 1);
    let (back, _) = step(&s0, &state([frontend_svc(3)]));
    // Freed ids are reused lowest-first, and the frontend kept its rev-NAT id throughout.
    assert_eq!(dump_text(&back), dump_text(&s3));
}

#[test]
fn removing_a_frontend_deletes_only_its_entries_slot0_first() {
    let (s, _) = step(&MapState::default(), &example());
    let mut desired = example();
    desired.frontends.retain(|k, _| k.port != 30080);
    let (after, ops) = step(&s, &desired);
    assert_eq!(
        touched(&ops),
        [
            "-svc 172.31.0.1:30080#0",
            "-svc 172.31.0.1:30080#1",
            "-svc 172.31.0.1:30080#2",
            "-svc 172.31.0.1:30080#3",
            "purge be[] rev[4]",
            "-rev 4",
            "-name 4",
        ],
        "backends 4..6 are still used by the ClusterIP frontend of the same service"
    );
    assert_eq!(after.backends.len(), 9);
}

#[test]
fn restarted_agent_keeps_ids_from_the_maps() {
    // Churn so the ids are not what a fresh allocation would give.
    let (s, _) = step(&MapState::default(), &state([frontend_svc(3)]));
    let (s, _) = step(&s, &example());
    let (s, _) = step(&s, &state(example().frontends.into_values().skip(1)));
    let mut maps = FakeLbMaps::new(s.clone());
    // A new agent only has the dump.
    let dumped = maps.dump().unwrap();
    let restart = plan(&state(example().frontends.into_values().skip(1)), &dumped);
    assert!(restart.ops.is_empty(), "{:?}", restart.ops);
    // Adding the frontend back allocates fresh ids but keeps every existing one.
    let outcome = reconcile(&mut maps, &example(), Limits::default()).unwrap();
    assert_eq!((outcome.frontends, outcome.backends), (4, 9));
    for (k, v) in s.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        assert_eq!(maps.state.services[k].rev_nat_id, v.rev_nat_id);
    }
    for (id, b) in &s.backends {
        assert_eq!(maps.state.backends.get(id), Some(b));
    }
}

#[test]
fn terminating_backend_is_rewritten_active_with_same_id() {
    let (mut s, _) = step(&MapState::default(), &state([frontend_svc(1)]));
    s.backends.get_mut(&1).unwrap().state = BE_STATE_TERMINATING;
    let p = plan(&state([frontend_svc(1)]), &s);
    assert_eq!(touched(&p.ops), ["+be 1"]);
}

#[test]
fn garbage_in_the_maps_is_cleaned_up() {
    let (mut s, _) = step(&MapState::default(), &state([frontend_svc(1)]));
    // A slot past the count, an orphan backend and an orphan rev-NAT entry.
    s.services.insert(
        svc_key("10.96.0.10", 80, 5),
        ServiceEntry {
            backend_id: 1,
            rev_nat_id: 1,
            ..Default::default()
        },
    );
    s.backends.insert(40, BackendV4::default());
    s.revnat.insert(9, RevNatV4::default());
    let (_, ops) = step(&s, &state([frontend_svc(1)]));
    assert_eq!(
        touched(&ops),
        [
            "-svc 10.96.0.10:80#5",
            "purge be[40] rev[9]",
            "-rev 9",
            "-be 40"
        ]
    );
}

fn small(max_revnat: u32, max_backends: u32) -> Limits {
    Limits {
        max_revnat,
        max_backends,
        max_service_entries: 1000,
        ..Limits::default()
    }
}

#[test]
fn backend_id_exhaustion_skips_only_that_frontend() {
    // Ids 1..=3 exist. frontend-svc takes 3, the UDP service cannot get any.
    let desired = state([
        frontend_svc(3),
        fe(
            "10.96.0.53",
            53,
            Proto::Udp,
            FrontendKind::ClusterIp,
            "kube-system/dns-like:dns",
            &[(PODS[0], 5353)],
        ),
    ]);
    let p = plan_with_limits(&desired, &MapState::default(), small(100, 4));
    assert_eq!(p.errors.len(), 1);
    assert_eq!(p.errors[0].kind, PlanErrorKind::BackendIdsExhausted);
    assert!(!p.errors[0].kept_previous);
    assert_eq!(
        p.errors[0].to_string(),
        "kube-system/dns-like:dns frontend 10.96.0.53:53/UDP: no free backend id; not programmed"
    );
    assert_eq!(frontend_count(&p), 1);
    let after = apply_checked(&MapState::default(), &p.ops);
    assert_eq!(after, p.target);
}

#[test]
fn full_maps_keep_what_is_programmed() {
    let limits = small(100, 4);
    let desired = state([frontend_svc(2)]);
    let p = plan_with_limits(&desired, &MapState::default(), limits);
    let s = apply_checked(&MapState::default(), &p.ops);
    // A second service takes the last id; then frontend-svc wants a third backend.
    let other = fe(
        "10.96.0.99",
        80,
        Proto::Tcp,
        FrontendKind::ClusterIp,
        "default/other:80",
        &[("10.244.9.9", 80)],
    );
    let p = plan_with_limits(&state([frontend_svc(2), other.clone()]), &s, limits);
    let s = apply_checked(&s, &p.ops);
    let p = plan_with_limits(&state([frontend_svc(3), other.clone()]), &s, limits);
    assert_eq!(p.errors.len(), 1);
    assert!(p.errors[0].kept_previous);
    assert!(p.ops.is_empty(), "nothing changes: {:?}", p.ops);
    // Once the other service goes away its id is freed (deleted), and the next plan succeeds.
    let p = plan_with_limits(&state([frontend_svc(2)]), &s, limits);
    let s = apply_checked(&s, &p.ops);
    let p = plan_with_limits(&state([frontend_svc(3)]), &s, limits);
    assert!(p.errors.is_empty());
    let s = apply_checked(&s, &p.ops);
    assert_eq!(s.services[&svc_key("10.96.0.10", 80, 0)].count, 3);
}

#[test]
fn rev_nat_id_exhaustion() {
    let mut desired = example();
    desired.frontends.retain(|k, _| k.proto == Proto::Tcp);
    // Rev-NAT ids 1..=2 only: three TCP frontends.
    let p = plan_with_limits(&desired, &MapState::default(), small(3, 100));
    assert_eq!(p.errors.len(), 1);
    assert_eq!(p.errors[0].kind, PlanErrorKind::RevNatIdsExhausted);
    assert_eq!(p.errors[0].frontend.port, 30080, "the last in key order");
    assert_eq!(frontend_count(&p), 2);
    // The backends the failed frontend would share stay (used by the ClusterIP frontend),
    // and nothing was allocated for it alone.
    assert_eq!(p.target.backends.len(), 6);
}

#[test]
fn service_map_capacity_is_respected() {
    let limits = Limits {
        max_revnat: 100,
        max_backends: 100,
        max_service_entries: 5,
        ..Limits::default()
    };
    // 4 entries fit; the second frontend would need 2 more.
    let desired = state([
        frontend_svc(3),
        fe(
            "10.96.0.99",
            80,
            Proto::Tcp,
            FrontendKind::ClusterIp,
            "default/other:80",
            &[("10.244.9.9", 80)],
        ),
    ]);
    let p = plan_with_limits(&desired, &MapState::default(), limits);
    assert_eq!(p.errors.len(), 1);
    assert_eq!(p.errors[0].kind, PlanErrorKind::ServiceMapFull);
    assert_eq!(p.target.services.len(), 4);
    assert_eq!(
        p.target.backends.len(),
        3,
        "no id leaked to the skipped frontend"
    );
}

#[test]
fn fault_at_any_op_then_retry_converges() {
    let (base, _) = step(&MapState::default(), &state([frontend_svc(3)]));
    let transitions = [example(), state([frontend_svc(1)]), DesiredState::default()];
    for desired in &transitions {
        let n_ops = plan(desired, &base).ops.len();
        assert!(n_ops > 0);
        for fail in 0..n_ops {
            let mut maps = FakeLbMaps::new(base.clone());
            maps.fail_nth_from_now(fail);
            let err = reconcile(&mut maps, desired, Limits::default()).unwrap_err();
            let ReconcileError::Apply(e) = err else {
                panic!("expected apply error, got {err:?}")
            };
            assert_eq!(e.index, fail);
            check_consistent(&maps.state).unwrap();
            // The next tick re-plans from the (partially updated) maps.
            let retry = plan(desired, &maps.state);
            let after = apply_checked(&maps.state, &retry.ops);
            let fresh = plan(desired, &base).target;
            assert_eq!(
                dump_text(&after),
                dump_text(&fresh),
                "failing op {fail} changed the outcome"
            );
            assert!(plan(desired, &after).ops.is_empty());
        }
    }
}

#[test]
fn flows_of_removed_backends_and_frontends_are_purged_before_their_ids_can_be_reused() {
    let mut maps = FakeLbMaps::default();
    reconcile(&mut maps, &state([frontend_svc(3)]), Limits::default()).unwrap();
    let flow = |sport: u16, backend_id: u32| {
        (
            CtKeyV4 {
                sport,
                ..Default::default()
            },
            CtEntry {
                backend_id,
                rev_nat_id: 1,
                ..Default::default()
            },
        )
    };
    maps.ct = vec![flow(1, 1), flow(2, 3), flow(3, 3), flow(4, 2)];
    // Idle longer than the drain timeout: the removed backend is not kept for them.
    maps.now_ns = Limits::default().drain_idle.as_nanos() as u64 + 1;
    reconcile(&mut maps, &state([frontend_svc(2)]), Limits::default()).unwrap();
    let left: Vec<u32> = maps.ct.iter().map(|(_, e)| e.backend_id).collect();
    assert_eq!(left, [1, 2]);
    // Removing the frontend drops the rest of its flows (its rev-NAT id is freed too).
    reconcile(&mut maps, &DesiredState::default(), Limits::default()).unwrap();
    assert!(maps.ct.is_empty());
    reconcile(&mut maps, &state([frontend_svc(2)]), Limits::default()).unwrap();
    // Id 3 is free again; a different Service's backend may get it, with no flow pointing at it.
    let other = fe(
        "10.96.0.99",
        80,
        Proto::Tcp,
        FrontendKind::ClusterIp,
        "default/other:80",
        &[("10.244.9.9", 80)],
    );
    reconcile(
        &mut maps,
        &state([frontend_svc(2), other]),
        Limits::default(),
    )
    .unwrap();
    assert_eq!(maps.state.backends[&3].ip(), ip("10.244.9.9"));
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

fn random_state(rng: &mut XorShift) -> DesiredState {
    let mut frontends = Vec::new();
    for f in 0..4u8 {
        if rng.below(4) == 0 {
            continue;
        }
        let n = rng.below(6) as u8;
        let backends: Vec<(String, u16)> = (0..n)
            .filter(|_| rng.below(3) != 0)
            .map(|b| (format!("10.244.{b}.2"), 8000 + u16::from(f % 2)))
            .collect();
        let refs: Vec<(&str, u16)> = backends.iter().map(|(a, p)| (a.as_str(), *p)).collect();
        let kind = if f == 3 {
            FrontendKind::NodePort
        } else {
            FrontendKind::ClusterIp
        };
        let mut frontend = fe(
            &format!("10.96.0.{}", 10 + f),
            80,
            if f == 2 { Proto::Udp } else { Proto::Tcp },
            kind,
            &format!("default/svc{f}:p"),
            &refs,
        );
        // Sometimes Maglev (not often: building tables is slow in debug builds).
        if rng.below(5) == 0 {
            frontend.policy.algorithm = Some(LbAlgorithm::Maglev);
        }
        frontends.push(frontend);
    }
    state(frontends)
}

#[test]
fn random_walk_keeps_every_intermediate_state_consistent() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut s = MapState::default();
    for _ in 0..300 {
        let desired = random_state(&mut rng);
        let before = s.clone();
        let (after, _) = step(&s, &desired);
        // Ids of frontends and backends that stayed did not change.
        for (k, v) in before.services.iter().filter(|(k, _)| k.backend_slot == 0) {
            if let Some(n) = after.services.get(k) {
                assert_eq!(n.rev_nat_id, v.rev_nat_id);
            }
        }
        for (id, b) in &before.backends {
            if let Some((nid, _)) = after.backends.iter().find(|(_, nb)| *nb == b) {
                assert_eq!(nid, id);
            }
        }
        s = after;
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

#[test]
fn removed_tcp_backend_with_live_flows_drains_then_goes() {
    let mut maps = FakeLbMaps::default();
    reconcile(&mut maps, &state([frontend_svc(3)]), Limits::default()).unwrap();
    let id_c = 3; // 10.244.3.2
    maps.now_ns = 10_000_000_000;
    maps.ct = vec![
        tcp_flow(1, id_c, 1, 9_000_000_000),
        tcp_flow(2, 1, 1, 9_000_000_000),
    ];

    // pod-c leaves: its slot goes, its backend stays TERMINATING with its flows.
    let out = reconcile(&mut maps, &state([frontend_svc(2)]), Limits::default()).unwrap();
    assert_eq!(out.draining, 1);
    assert_eq!(maps.state.backends[&id_c].state, BE_STATE_TERMINATING);
    assert!(
        !maps.state.services.values().any(|e| e.backend_id == id_c),
        "no slot may name a draining backend"
    );
    assert_eq!(maps.ct.len(), 2, "its established flow is kept");
    check_consistent(&maps.state).unwrap();
    // Nothing changes while the flow lives; its id is never handed out meanwhile.
    let other = fe(
        "10.96.0.99",
        80,
        Proto::Tcp,
        FrontendKind::ClusterIp,
        "default/other:80",
        &[("10.244.9.9", 80)],
    );
    let desired = state([frontend_svc(2), other]);
    reconcile(&mut maps, &desired, Limits::default()).unwrap();
    assert_eq!(maps.state.backends[&id_c].ip(), ip("10.244.3.2"));
    assert_eq!(maps.state.backends[&4].ip(), ip("10.244.9.9"));

    // The pod comes back while draining: same id, active again.
    let back = reconcile(&mut maps, &state([frontend_svc(3)]), Limits::default()).unwrap();
    assert_eq!(back.draining, 0);
    assert_eq!(maps.state.backends[&id_c].state, BE_STATE_ACTIVE);
    reconcile(&mut maps, &state([frontend_svc(2)]), Limits::default()).unwrap();
    assert_eq!(maps.state.backends[&id_c].state, BE_STATE_TERMINATING);

    // The flow goes quiet past the drain timeout: backend and its leftover flow are removed.
    maps.now_ns += Limits::default().drain_idle.as_nanos() as u64;
    let out = reconcile(&mut maps, &state([frontend_svc(2)]), Limits::default()).unwrap();
    assert_eq!(out.draining, 0);
    assert!(!maps.state.backends.contains_key(&id_c));
    assert!(maps.ct.iter().all(|(_, e)| e.backend_id != id_c));
}

#[test]
fn removed_udp_backend_is_deleted_at_once_with_its_flows() {
    let dns = |n: usize| {
        let b: Vec<_> = PODS[..n].iter().map(|p| (*p, 5353)).collect();
        fe(
            "10.96.0.53",
            53,
            Proto::Udp,
            FrontendKind::ClusterIp,
            "default/dns:53",
            &b,
        )
    };
    let mut maps = FakeLbMaps::default();
    reconcile(&mut maps, &state([dns(3)]), Limits::default()).unwrap();
    maps.now_ns = 10;
    let mut udp = tcp_flow(1, 3, 1, 10);
    udp.0.proto = IPPROTO_UDP;
    maps.ct = vec![udp];
    let out = reconcile(&mut maps, &state([dns(2)]), Limits::default()).unwrap();
    assert_eq!(out.draining, 0);
    assert!(!maps.state.backends.contains_key(&3));
    assert!(
        maps.ct.is_empty(),
        "the UDP flow must move to another backend"
    );
}

#[test]
fn udp_flows_of_a_backend_another_frontend_keeps_are_purged_per_frontend() {
    // Two UDP frontends share backend 10.244.1.2:5353; the first drops it.
    let udp = |addr: &str, name: &str, pods: &[&str]| {
        let b: Vec<_> = pods.iter().map(|p| (*p, 5353)).collect();
        fe(addr, 53, Proto::Udp, FrontendKind::ClusterIp, name, &b)
    };
    let mut maps = FakeLbMaps::default();
    let both = state([
        udp("10.96.0.53", "default/a:53", &PODS[..2]),
        udp("10.96.0.54", "default/b:53", &PODS[..1]),
    ]);
    reconcile(&mut maps, &both, Limits::default()).unwrap();
    let rev = |addr: &str| {
        maps.state.services[&ServiceKeyV4::new(ip(addr), 53, IPPROTO_UDP, 0, 0)].rev_nat_id
    };
    let (rev_a, rev_b) = (rev("10.96.0.53"), rev("10.96.0.54"));
    let be = maps
        .state
        .backends
        .iter()
        .find(|(_, b)| b.ip() == ip(PODS[0]))
        .map(|(id, _)| *id)
        .unwrap();
    let flow = |sport, rev| {
        let mut f = tcp_flow(sport, be, rev, 0);
        f.0.proto = IPPROTO_UDP;
        f
    };
    maps.ct = vec![flow(1, rev_a), flow(2, rev_b)];
    let dropped = state([
        udp("10.96.0.53", "default/a:53", &PODS[1..2]),
        udp("10.96.0.54", "default/b:53", &PODS[..1]),
    ]);
    let p = plan(&dropped, &maps.state);
    assert!(
        touched(&p.ops).contains(&format!("purge be[] rev[] pairs[({rev_a}, {be})]")),
        "{:?}",
        touched(&p.ops)
    );
    reconcile(&mut maps, &dropped, Limits::default()).unwrap();
    let left: Vec<RevNatId> = maps.ct.iter().map(|(_, e)| e.rev_nat_id).collect();
    assert_eq!(
        left,
        [rev_b],
        "only the frontend that dropped the backend loses its flow"
    );
}

#[test]
fn affinity_is_programmed_and_reset_when_turned_off_or_a_backend_leaves() {
    use svc_lb_common::{AffinityEntry, AffinityKeyV4};
    let with_affinity = |n: usize, timeout: u32| {
        let mut f = frontend_svc(n);
        f.policy.affinity_timeout_s = timeout;
        f
    };
    let mut maps = FakeLbMaps::default();
    reconcile(&mut maps, &state([with_affinity(3, 60)]), Limits::default()).unwrap();
    let k0 = svc_key("10.96.0.10", 80, 0);
    assert_eq!(maps.state.services[&k0].affinity_timeout_s, 60);
    assert!(dump_text(&maps.state).contains("AFFINITY=60s"));
    let rev = maps.state.services[&k0].rev_nat_id;
    let sticky = |client: &str, backend_id: u32| {
        (
            AffinityKeyV4::new(ip(client), rev),
            AffinityEntry {
                backend_id,
                ..Default::default()
            },
        )
    };
    maps.affinity = vec![
        sticky("172.31.0.2", 1),
        sticky("172.31.0.3", 2),
        sticky("172.31.0.4", 3),
    ];
    // Unchanged: nothing purged.
    reconcile(&mut maps, &state([with_affinity(3, 60)]), Limits::default()).unwrap();
    assert_eq!(maps.affinity.len(), 3);
    // Backend 3 leaves (and is deleted): only the client stuck to it forgets.
    reconcile(&mut maps, &state([with_affinity(2, 60)]), Limits::default()).unwrap();
    let left: Vec<u32> = maps.affinity.iter().map(|(_, e)| e.backend_id).collect();
    assert_eq!(left, [1, 2]);
    // Another timeout: the old stickiness is dropped.
    let p = plan(&state([with_affinity(2, 30)]), &maps.state);
    assert!(
        touched(&p.ops).contains(&format!("purge be[] rev[] affinity[{rev}]")),
        "{:?}",
        touched(&p.ops)
    );
    maps.affinity = vec![sticky("172.31.0.2", 1)];
    // Turned off: purged, and the frontend no longer asks for it.
    reconcile(&mut maps, &state([with_affinity(2, 0)]), Limits::default()).unwrap();
    assert!(maps.affinity.is_empty());
    assert_eq!(maps.state.services[&k0].affinity_timeout_s, 0);
    // Turning it on needs no purge.
    let p = plan(&state([with_affinity(2, 60)]), &maps.state);
    assert_eq!(touched(&p.ops), ["+svc 10.96.0.10:80#0"]);
}

#[test]
fn maglev_frontends_get_a_table_written_before_slot_0_and_removed_after() {
    let maglev = |n: usize| {
        let mut f = frontend_svc(n);
        f.policy.algorithm = Some(LbAlgorithm::Maglev);
        f
    };
    let (s1, ops) = step(&MapState::default(), &state([maglev(3)]));
    let k0 = svc_key("10.96.0.10", 80, 0);
    let rev = s1.services[&k0].rev_nat_id;
    assert_ne!(s1.services[&k0].flags & SVC_F_MAGLEV, 0);
    let t = ops.iter().position(|o| matches!(o, Op::UpsertMaglev(..)));
    let slot0 = ops
        .iter()
        .position(|o| matches!(o, Op::UpsertService(k, _) if k.backend_slot == 0));
    assert!(t < slot0, "table after slot 0: {:?}", touched(&ops));
    let dump = dump_text(&s1);
    assert!(dump.contains("FLAGS=ClusterIP|Maglev"), "{dump}");
    assert!(
        dump.contains(&format!("MAGLEV: REVNAT={rev} POSITIONS=1:")),
        "{dump}"
    );

    // One of three backends goes: its positions move, about 1/3 of the table, the rest stay.
    let (s2, _) = step(&s1, &state([maglev(2)]));
    let (a, b) = (&s1.maglev[&rev].backend_ids, &s2.maglev[&rev].backend_ids);
    let changed = a.iter().zip(b.iter()).filter(|(x, y)| x != y).count();
    let lost = a.iter().filter(|&&id| id == 3).count();
    assert!(b.iter().all(|&id| id == 1 || id == 2));
    assert!(
        changed <= lost + MAGLEV_TABLE_SIZE / 50,
        "{changed} positions changed, {lost} were the removed backend's"
    );

    // The global default applies to Services without the annotation.
    let limits = Limits {
        default_algorithm: LbAlgorithm::Maglev,
        ..Limits::default()
    };
    let p = plan_with_limits(&state([frontend_svc(2)]), &s2, limits);
    assert!(p.ops.is_empty(), "{:?}", touched(&p.ops));
    let mut random = frontend_svc(2);
    random.policy.algorithm = Some(LbAlgorithm::Random);
    let p = plan_with_limits(&state([random]), &s2, limits);
    assert_eq!(
        touched(&p.ops),
        ["+svc 10.96.0.10:80#0", &format!("-maglev {rev}")]
    );

    // Back to random (the default): slot 0 first, then the table goes.
    let (s3, ops) = step(&s2, &state([frontend_svc(2)]));
    assert!(s3.maglev.is_empty());
    assert_eq!(
        touched(&ops),
        ["+svc 10.96.0.10:80#0", &format!("-maglev {rev}")]
    );
    // Removing a Maglev frontend removes its table before its rev-NAT entry.
    let (s4, _) = step(&s3, &state([maglev(2)]));
    let (_, ops) = step(&s4, &DesiredState::default());
    let t = touched(&ops);
    let del_t = t.iter().position(|o| o.starts_with("-maglev"));
    let del_rev = t.iter().position(|o| o.starts_with("-rev"));
    assert!(del_t.is_some() && del_t < del_rev, "{t:?}");
}

#[test]
fn source_ranges_are_written_before_enforcement_and_removed_after() {
    let lb = |ranges: &[(&str, u8)]| {
        let mut f = fe(
            "203.0.113.10",
            80,
            Proto::Tcp,
            FrontendKind::LoadBalancer,
            "default/lb:80",
            &[("10.244.1.2", 80)],
        );
        f.policy.source_ranges = ranges.iter().map(|(a, l)| (ip(a), *l)).collect();
        f
    };
    let (s1, ops) = step(&MapState::default(), &state([lb(&[("192.0.2.0", 24)])]));
    let k0 = svc_key("203.0.113.10", 80, 0);
    assert_ne!(s1.services[&k0].flags & SVC_F_SOURCE_RANGES, 0);
    let t = touched(&ops);
    let src = t.iter().position(|o| o == "+src 1:192.0.2.0/24").unwrap();
    let slot0 = t
        .iter()
        .position(|o| o == "+svc 203.0.113.10:80#0")
        .unwrap();
    assert!(src < slot0, "{t:?}");
    assert!(dump_text(&s1).contains("SRCRANGE: REVNAT=1 CIDR=192.0.2.0/24"));

    // Changed ranges: the new one first, the old one after.
    let (s2, ops) = step(&s1, &state([lb(&[("198.51.100.0", 25)])]));
    assert_eq!(
        touched(&ops),
        ["+src 1:198.51.100.0/25", "-src 1:192.0.2.0/24"]
    );
    // No ranges any more: stop enforcing, then delete.
    let (s3, ops) = step(&s2, &state([lb(&[])]));
    assert_eq!(
        touched(&ops),
        ["+svc 203.0.113.10:80#0", "-src 1:198.51.100.0/25"]
    );
    assert_eq!(s3.services[&k0].flags & SVC_F_SOURCE_RANGES, 0);
    // A removed frontend's ranges go before its rev-NAT id is freed.
    let (s4, _) = step(&s3, &state([lb(&[("192.0.2.0", 24)])]));
    let (_, ops) = step(&s4, &DesiredState::default());
    let t = touched(&ops);
    let del_src = t.iter().position(|o| o.starts_with("-src")).unwrap();
    let del_rev = t.iter().position(|o| o.starts_with("-rev")).unwrap();
    assert!(del_src < del_rev, "{t:?}");
}

#[test]
fn remote_backends_are_flagged_and_the_flag_follows_the_node() {
    let with_remote = |remote: &[&str]| {
        let mut f = fe(
            "172.31.0.1",
            30080,
            Proto::Tcp,
            FrontendKind::NodePort,
            "default/web:http",
            &[(PODS[0], 80), (PODS[1], 80)],
        );
        f.policy.remote_backends = remote.iter().map(|a| ip(a)).collect();
        state([f])
    };
    let flags = |s: &MapState| -> Vec<(Ipv4Addr, bool, bool)> {
        s.backends
            .values()
            .map(|b| (b.ip(), b.is_remote(), b.is_active()))
            .collect()
    };
    let (s, _) = step(&MapState::default(), &with_remote(&[PODS[1]]));
    assert_eq!(
        flags(&s),
        [(ip(PODS[0]), false, true), (ip(PODS[1]), true, true)]
    );
    assert!(dump_text(&s).contains("active remote"), "{}", dump_text(&s));
    // The pod is now on this node: only its backend entry is rewritten, same id.
    let (s2, ops) = step(&s, &with_remote(&[]));
    assert_eq!(
        flags(&s2),
        [(ip(PODS[0]), false, true), (ip(PODS[1]), false, true)]
    );
    assert_eq!(touched(&ops), ["+be 2"], "{ops:?}");
}

/// externalTrafficPolicy Local: the NodePort's own slots hold the local endpoint, its in-cluster
/// twin (scope internal, same address) every endpoint; both can change and go independently.
#[test]
fn in_cluster_twin_is_programmed_in_the_internal_scope() {
    let mut local = fe(
        "172.31.0.1",
        30080,
        Proto::Tcp,
        FrontendKind::NodePort,
        "default/web:http",
        &[("10.244.1.2", 80)],
    );
    local.policy.local_only = true;
    let mut twin = fe(
        "172.31.0.1",
        30080,
        Proto::Tcp,
        FrontendKind::NodePort,
        "default/web:http",
        &[("10.244.1.2", 80), ("10.244.2.2", 80)],
    );
    twin.key = twin.key.internal_twin();
    twin.policy.remote_backends = [ip("10.244.2.2")].into();
    let (s, _) = step(&MapState::default(), &state([local.clone(), twin.clone()]));

    let ext0 = svc_key("172.31.0.1", 30080, 0);
    let int0 = ServiceKeyV4 {
        scope: SCOPE_INTERNAL,
        ..ext0
    };
    let (e, i) = (s.services[&ext0], s.services[&int0]);
    assert_eq!((e.count, i.count), (1, 2));
    assert_eq!(e.flags, SVC_F_NODE_PORT | SVC_F_LOCAL);
    assert_eq!(i.flags, SVC_F_NODE_PORT, "the twin is not restricted");
    assert_ne!(e.rev_nat_id, i.rev_nat_id);
    // Replies of both scopes look like the one frontend.
    assert_eq!(s.revnat[&e.rev_nat_id], s.revnat[&i.rev_nat_id]);
    let slot_backends = |k0: ServiceKeyV4, n: u16| -> Vec<Ipv4Addr> {
        (1..=n)
            .map(|slot| s.backends[&s.services[&k0.with_slot(slot)].backend_id].ip())
            .collect()
    };
    assert_eq!(slot_backends(ext0, 1), [ip("10.244.1.2")]);
    let mut all = slot_backends(int0, 2);
    all.sort();
    assert_eq!(all, [ip("10.244.1.2"), ip("10.244.2.2")]);
    let remote = s
        .backends
        .values()
        .find(|b| b.ip() == ip("10.244.2.2"))
        .unwrap();
    assert!(remote.is_remote());

    // A second endpoint on another node changes only the twin.
    twin.backends.push(BackendAddr {
        ip: ip("10.244.3.2"),
        port: 80,
    });
    twin.policy.remote_backends.insert(ip("10.244.3.2"));
    let (s2, ops) = step(&s, &state([local.clone(), twin.clone()]));
    assert!(
        ops.iter()
            .all(|op| !matches!(op, Op::UpsertService(k, _) if k.scope == SCOPE_EXTERNAL)),
        "{ops:?}"
    );
    assert_eq!(s2.services[&int0].count, 3);

    // Policy back to Cluster: the twin goes, the external entry stays.
    local.policy.local_only = false;
    let (s3, _) = step(&s2, &state([local]));
    assert!(s3.services.keys().all(|k| k.scope == SCOPE_EXTERNAL));
    assert_eq!(s3.services[&ext0].flags, SVC_F_NODE_PORT);
}

#[test]
fn limits_of_the_default_capacity_are_the_default_limits() {
    let capacity = crate::dataplane::capacity::MapCapacity::default();
    assert_eq!(Limits::from(&capacity), Limits::default());
    let bigger = crate::dataplane::capacity::MapCapacity {
        max_services: 131_072,
        max_backends: 1_048_576,
        ..capacity
    };
    let limits = Limits::default().with_capacity(&bigger);
    assert_eq!(
        (
            limits.max_revnat,
            limits.max_backends,
            limits.max_service_entries
        ),
        (131_072, 1_048_576, bigger.service_entries())
    );
}
