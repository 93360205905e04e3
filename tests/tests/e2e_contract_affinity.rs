//! End to end: sessionAffinity ClientIP sends every new connection of a client to one backend,
//! and turning it off and on in the manifests takes effect. Needs root.

use std::{collections::BTreeSet, time::Duration};

use svc_lb_tests::{agent::AgentGuard, client, fixture, manifests, netns::Topology};

/// The standard manifests with frontend-svc (the first Service) set to ClientIP affinity.
fn services(topo: &Topology, affinity: bool) -> String {
    let pods: Vec<_> = topo.pods.iter().collect();
    let all = manifests::standard(&pods);
    if affinity {
        all.replacen(
            "sessionAffinity: None",
            "sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600",
            1,
        )
    } else {
        all
    }
}

fn backends_of(topo: &Topology, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            client::http_get(&topo.client, fixture::frontend())
                .unwrap_or_else(|e| panic!("request {i}: {e}"))
        })
        .collect()
}

/// Polls until `n` new connections in a row either all hit one backend (`sticky`) or not.
fn wait_until(topo: &Topology, agent: &mut AgentGuard<'_>, sticky: bool, what: &str) {
    svc_lb_tests::wait_for(what, Duration::from_secs(10), || {
        agent.assert_running();
        let seen: BTreeSet<String> = backends_of(topo, 15).into_iter().collect();
        ((seen.len() == 1) == sticky).then_some(())
    });
}

#[test]
fn client_ip_affinity_sticks_and_toggles() {
    let (topo, dir) = fixture::standard();
    dir.write("services.yaml", &services(&topo, true));
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let seen: BTreeSet<String> = backends_of(&topo, 30).into_iter().collect();
    assert_eq!(
        seen.len(),
        1,
        "30 connections of one client spread: {seen:?}"
    );
    let out = agent.cli(&["debug", "services"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("affinity=600s"), "{table}");

    dir.write("services.yaml", &services(&topo, false));
    wait_until(
        &topo,
        &mut agent,
        false,
        "connections to spread with affinity off",
    );
    let seen: BTreeSet<String> = backends_of(&topo, 30).into_iter().collect();
    assert!(seen.len() >= 2, "affinity still on: {seen:?}");

    dir.write("services.yaml", &services(&topo, true));
    wait_until(
        &topo,
        &mut agent,
        true,
        "connections to stick with affinity on again",
    );
    let seen: BTreeSet<String> = backends_of(&topo, 30).into_iter().collect();
    assert_eq!(seen.len(), 1, "affinity on again, but spread: {seen:?}");
}
