//! Connection draining: removed TCP backends (and frontends) stay while live flows use them,
//! UDP ones go at once with their flows.

use super::*;

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
