//! The agent's incremental path ([`Reconciler::changed`]) against the full one: after any
//! sequence of changes both must leave exactly the same map contents (same ids included).

use std::collections::BTreeSet;

use super::*;
use crate::reconcile::reconciler::Memory;

/// Frontend keys whose desired value differs between `a` and `b`.
fn changed_keys(a: &DesiredState, b: &DesiredState) -> BTreeSet<FrontendKey> {
    a.frontends
        .keys()
        .chain(b.frontends.keys())
        .filter(|k| a.frontends.get(k) != b.frontends.get(k))
        .copied()
        .collect()
}

/// Up to 8 frontends over a pool of 6 pods; TCP frontends 1, 3, 5, 7 share their backends
/// (same target port), so backends are referenced from several frontends.
fn random_desired(rng: &mut XorShift, base: &DesiredState) -> DesiredState {
    let mut out = base.clone();
    // Change one to three frontends per step, as a burst of events would.
    for _ in 0..=rng.below(3) {
        let f = rng.below(8) as u8;
        let key_ip = format!("10.96.1.{}", 10 + f);
        let proto = if f == 2 { Proto::Udp } else { Proto::Tcp };
        let key = FrontendKey {
            ip: ip(&key_ip),
            port: 80,
            proto,
            internal: false,
        };
        if rng.below(4) == 0 {
            out.frontends.remove(&key);
            continue;
        }
        let backends: Vec<(String, u16)> = (0..6)
            .filter(|_| rng.below(2) == 0)
            .map(|b| (format!("10.244.{b}.2"), 8000 + u16::from(f % 2)))
            .collect();
        let refs: Vec<(&str, u16)> = backends.iter().map(|(a, p)| (a.as_str(), *p)).collect();
        let kind = if f >= 6 {
            FrontendKind::LoadBalancer
        } else {
            FrontendKind::ClusterIp
        };
        let mut frontend = fe(&key_ip, 80, proto, kind, &format!("ns/svc{f}:p"), &refs);
        if rng.below(8) == 0 {
            frontend.policy.algorithm = Some(LbAlgorithm::Maglev);
        }
        if rng.below(3) == 0 {
            frontend.policy.affinity_timeout_s = 10 + rng.below(2) as u32;
        }
        if kind == FrontendKind::LoadBalancer && rng.below(2) == 0 {
            frontend.policy.source_ranges = vec![(ip("10.0.0.0"), 8 + rng.below(2) as u8)];
        }
        out.frontends.insert(key, frontend);
    }
    out
}

#[test]
fn incremental_changes_end_where_full_reconciles_end() {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut full = FakeLbMaps::default();
    let mut inc = FakeLbMaps::default();
    let mut rec = Reconciler::new(Limits::default());
    let mut desired = DesiredState::default();
    rec.full(&mut inc, &desired).unwrap();
    for step in 0..400 {
        let next = random_desired(&mut rng, &desired);
        let keys = changed_keys(&desired, &next);
        desired = next;
        let before = inc.state.clone();
        let logged = inc.log.len();
        let a = reconcile(&mut full, &desired, Limits::default()).unwrap();
        let b = rec.changed(&mut inc, &desired, &keys).unwrap();
        // Every intermediate state of the scoped writes is consistent too.
        apply_checked(&before, &inc.log[logged..]);
        assert_eq!(
            dump_text(&inc.state),
            dump_text(&full.state),
            "step {step}: changed {keys:?}"
        );
        assert_eq!(inc.state, full.state, "step {step}");
        assert_eq!(rec.programmed(), Some(&inc.state), "step {step}: record");
        assert_eq!(
            (a.frontends, a.backends, a.draining, a.errors.len()),
            (b.frontends, b.backends, b.draining, b.errors.len()),
            "step {step}"
        );
        let again = plan(&desired, &inc.state);
        assert!(again.ops.is_empty(), "step {step}: re-plan {:?}", again.ops);
    }
}

#[test]
fn the_record_keeps_id_pools_and_indexes_equal_to_a_fresh_one() {
    let mut rng = XorShift(0x0123_4567_89ab_cdef);
    let mut inc = FakeLbMaps::default();
    let mut rec = Reconciler::new(Limits::default());
    let mut desired = DesiredState::default();
    rec.full(&mut inc, &desired).unwrap();
    let mut memory = Memory::new(MapState::default(), Limits::default());
    for step in 0..200 {
        let next = random_desired(&mut rng, &desired);
        let keys = changed_keys(&desired, &next);
        desired = next;
        let logged = inc.log.len();
        rec.changed(&mut inc, &desired, &keys).unwrap();
        for op in &inc.log[logged..] {
            memory.apply(op);
        }
        let fresh = Memory::new(inc.state.clone(), Limits::default());
        assert_eq!(memory.backend_ids, fresh.backend_ids, "step {step}");
        assert_eq!(memory.backend_refs, fresh.backend_refs, "step {step}");
        assert_eq!(memory.be_pool, fresh.be_pool, "step {step}");
        assert_eq!(memory.rev_pool, fresh.rev_pool, "step {step}");
    }
}

#[test]
fn one_changed_frontend_among_many_writes_only_its_own_entries() {
    let many: Vec<Frontend> = (0..200u32)
        .map(|i| {
            let addr = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            let b = [
                (format!("10.244.{}.2", i % 50), 80),
                ("10.244.99.2".into(), 80),
            ];
            let refs: Vec<(&str, u16)> = b.iter().map(|(a, p)| (a.as_str(), *p)).collect();
            fe(
                &addr,
                80,
                Proto::Tcp,
                FrontendKind::ClusterIp,
                &format!("ns/s{i}:80"),
                &refs,
            )
        })
        .collect();
    let mut desired = state(many);
    let mut maps = FakeLbMaps::default();
    let mut rec = Reconciler::new(Limits::default());
    rec.full(&mut maps, &desired).unwrap();
    let key = FrontendKey {
        ip: ip("10.96.0.7"),
        port: 80,
        proto: Proto::Tcp,
        internal: false,
    };
    // Its own pod is replaced; the shared 10.244.99.2 stays (199 others still use it).
    let f = desired.frontends.get_mut(&key).unwrap();
    f.backends[0].ip = ip("10.244.200.2");
    f.backends.sort();
    let logged = maps.log.len();
    let out = rec
        .changed(&mut maps, &desired, &BTreeSet::from([key]))
        .unwrap();
    assert_eq!(
        touched(&maps.log[logged..]),
        [
            "0be 52",
            "+be 52",
            "+svc 10.96.0.7:80#1",
            "purge be[] rev[] pairs[(7, 8)]"
        ],
        "pod 10.244.6.2 (id 8) still backs another Service, so it stays"
    );
    assert_eq!(out.ops, 4);
    assert_eq!(out.frontends, 200);
    assert_eq!(
        dump_text(&maps.state),
        dump_text(&full_state(&desired, &maps))
    );
}

/// What a full reconcile of `desired` against `maps` would leave.
fn full_state(desired: &DesiredState, maps: &FakeLbMaps) -> MapState {
    let mut copy = FakeLbMaps::new(maps.state.clone());
    reconcile(&mut copy, desired, Limits::default()).unwrap();
    copy.state
}

#[test]
fn a_failed_write_drops_the_record_and_the_next_change_reconciles_fully() {
    let mut maps = FakeLbMaps::default();
    let mut rec = Reconciler::new(Limits::default());
    rec.full(&mut maps, &example()).unwrap();
    let desired = state([frontend_svc(1)]);
    let keys = changed_keys(&example(), &desired);
    maps.fail_nth_from_now(2);
    assert!(rec.changed(&mut maps, &desired, &keys).is_err());
    assert!(rec.programmed().is_none());
    // Whatever the next change covers, it starts from a dump of the half-written maps.
    rec.changed(&mut maps, &desired, &BTreeSet::new()).unwrap();
    assert_eq!(maps.state, full_state(&desired, &maps));
    assert_eq!(rec.programmed(), Some(&maps.state));
    check_consistent(&maps.state).unwrap();
}

#[test]
fn drift_is_repaired_by_the_full_reconcile_not_by_changes() {
    let mut maps = FakeLbMaps::default();
    let mut rec = Reconciler::new(Limits::default());
    rec.full(&mut maps, &example()).unwrap();
    let expected = maps.state.clone();
    // Someone deletes a slot by hand: the record does not know.
    let slot = svc_key("10.96.0.10", 80, 2);
    maps.state.services.remove(&slot);
    let out = rec
        .changed(&mut maps, &example(), &BTreeSet::new())
        .unwrap();
    assert_eq!(out.ops, 0);
    assert!(!maps.state.services.contains_key(&slot));
    let out = rec.full(&mut maps, &example()).unwrap();
    assert_eq!(out.ops, 1);
    assert_eq!(maps.state, expected);
}

#[test]
fn frontends_that_did_not_fit_are_retried_with_the_next_change() {
    let limits = small(3, 10);
    let mut maps = FakeLbMaps::default();
    let mut rec = Reconciler::new(limits);
    // Rev-NAT ids 1 and 2 only: the two frontends last in key order do not fit.
    let out = rec.full(&mut maps, &example()).unwrap();
    assert_eq!(out.errors.len(), 2);
    // web-service's ClusterIP goes: its id is free for one of the others.
    let mut desired = example();
    let web = FrontendKey {
        ip: ip("10.96.0.20"),
        port: 8080,
        proto: Proto::Tcp,
        internal: false,
    };
    desired.frontends.remove(&web);
    let out = rec
        .changed(&mut maps, &desired, &BTreeSet::from([web]))
        .unwrap();
    // Freed ids are reused only from the next plan on (a plan never reuses an id it deletes).
    assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
    let out = rec.changed(&mut maps, &desired, &BTreeSet::new()).unwrap();
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    let again = plan_with_limits(&desired, &maps.state, limits);
    assert!(again.ops.is_empty(), "{:?}", again.ops);
}

#[test]
fn a_deleted_tcp_service_drains_its_flows_and_a_udp_one_is_purged() {
    let mut maps = FakeLbMaps::default();
    let mut rec = Reconciler::new(Limits::default());
    rec.full(&mut maps, &example()).unwrap();
    let k0 = svc_key("10.96.0.10", 80, 0);
    let rev = maps.state.services[&k0].rev_nat_id;
    let dns_key = ServiceKeyV4::new(ip("10.96.0.53"), 53, IPPROTO_UDP, 0, 0);
    let dns_rev = maps.state.services[&dns_key].rev_nat_id;
    let dns_be = maps.state.services[&dns_key.with_slot(1)].backend_id;
    maps.now_ns = 10_000_000_000;
    let udp = (
        CtKeyV4 {
            proto: IPPROTO_UDP,
            sport: 9,
            ..Default::default()
        },
        CtEntry {
            backend_id: dns_be,
            rev_nat_id: dns_rev,
            last_seen_ns: 9_000_000_000,
            ..Default::default()
        },
    );
    // frontend-svc's pods are 1..3; flows to pod 1 (also web's and dns's, ids differ by port).
    let be = maps.state.services[&k0.with_slot(1)].backend_id;
    maps.ct = vec![tcp_flow(1, be, rev, 9_000_000_000), udp];

    let mut desired = example();
    let gone: BTreeSet<FrontendKey> = desired
        .frontends
        .keys()
        .filter(|k| k.port == 80 || k.port == 53)
        .copied()
        .collect();
    desired.frontends.retain(|k, _| !gone.contains(k));
    let out = rec.changed(&mut maps, &desired, &gone).unwrap();
    // The TCP frontend stays without slots: established flows finish, new ones are refused.
    let e0 = maps.state.services[&k0];
    assert_eq!((e0.count, e0.rev_nat_id), (0, rev));
    assert!(
        maps.state.revnat.contains_key(&rev),
        "replies are still rewritten"
    );
    assert_eq!(maps.state.backends[&be].state, BE_STATE_TERMINATING);
    assert_eq!(out.draining, 1);
    assert_eq!(maps.ct.len(), 1, "the TCP flow is kept, the UDP one purged");
    assert_eq!(maps.ct[0].1.rev_nat_id, rev);
    assert!(!maps.state.services.contains_key(&dns_key));
    check_consistent(&maps.state).unwrap();
    // The periodic full reconcile agrees while the flow lives...
    assert_eq!(rec.full(&mut maps, &desired).unwrap().ops, 0);
    // ...and removes everything once it went quiet.
    maps.now_ns += Limits::default().drain_idle.as_nanos() as u64;
    rec.full(&mut maps, &desired).unwrap();
    assert!(!maps.state.services.contains_key(&k0));
    assert!(!maps.state.revnat.contains_key(&rev));
    assert!(!maps.state.backends.contains_key(&be));
    assert!(maps.ct.is_empty());
    // The Service coming back while its flows drain takes its id again.
    let mut maps2 = FakeLbMaps::default();
    let mut rec2 = Reconciler::new(Limits::default());
    rec2.full(&mut maps2, &example()).unwrap();
    maps2.now_ns = 10_000_000_000;
    maps2.ct = vec![tcp_flow(1, be, rev, 9_000_000_000)];
    rec2.changed(&mut maps2, &desired, &gone).unwrap();
    rec2.changed(&mut maps2, &example(), &gone).unwrap();
    assert_eq!(maps2.state.services[&k0].rev_nat_id, rev);
    assert_eq!(maps2.state.services[&k0].count, 3);
    assert_eq!(maps2.state.backends[&be].state, BE_STATE_ACTIVE);
    assert_eq!(maps2.ct.len(), 1);
}
