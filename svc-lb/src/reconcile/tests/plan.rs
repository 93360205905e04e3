//! The target of a plan: the golden dumps, ids kept across restarts, limits, and the
//! per-frontend policies (affinity, Maglev, source ranges, remote backends, internal scope).

use super::*;

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
