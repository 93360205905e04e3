//! End to end: a Service annotated `svc-lb.io/lb-algorithm: maglev` balances through its Maglev
//! table (shown by `svc-lb debug services`), and keeps working when a backend goes away.
//! Minimal disruption itself is checked packet-exactly in prog_tc. Needs root.

use std::{collections::BTreeSet, time::Duration};

use svc_lb_tests::{agent::AgentGuard, client, fixture, manifests, netns::Pod};

fn services(pods: &[&Pod]) -> String {
    manifests::standard(pods).replacen(
        "  name: frontend-svc\n  namespace: default\n",
        "  name: frontend-svc\n  namespace: default\n  annotations:\n    svc-lb.io/lb-algorithm: maglev\n",
        1,
    )
}

#[test]
fn maglev_annotation_balances_and_survives_backend_removal() {
    let (topo, dir) = fixture::standard();
    let pods: Vec<_> = topo.pods.iter().collect();
    dir.write("services.yaml", &services(&pods));
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let out = agent.cli(&["debug", "services", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let algos: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["frontend"].as_str().unwrap_or("").to_owned(),
                s["lb_algorithm"].as_str().unwrap_or("random").to_owned(),
            )
        })
        .collect();
    assert!(
        algos.contains(&("10.96.0.10:80".into(), "maglev".into()))
            && algos.contains(&("10.96.0.20:8080".into(), "random".into())),
        "{algos:?}"
    );

    // New connections (new source ports, so new hashes) use every backend.
    let seen: BTreeSet<String> = (0..40)
        .map(|_| client::http_get(&topo.client, fixture::frontend()).expect("request"))
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");

    let remaining: Vec<_> = topo.pods.iter().filter(|p| p.name != "pod-b").collect();
    dir.write("services.yaml", &services(&remaining));
    let mut streak = 0;
    svc_lb_tests::wait_for(
        "pod-b to leave the Maglev table",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            match client::http_get(&topo.client, fixture::frontend()) {
                Ok(n) if n != "pod-b" => streak += 1,
                _ => streak = 0,
            }
            (streak >= 30).then_some(())
        },
    );
    let seen: BTreeSet<String> = (0..30)
        .map(|_| client::http_get(&topo.client, fixture::frontend()).expect("request"))
        .collect();
    assert_eq!(seen, BTreeSet::from(["pod-a".into(), "pod-c".into()]));
}
