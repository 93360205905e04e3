//! The writes of a plan: which entries a change touches, in which order, and that every state
//! in between is consistent (also when a write fails and the next reconcile retries).

use super::*;

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
