//! End to end: externalTrafficPolicy Local sends NodePort traffic only to endpoints on this
//! node (`--node-name node-1`) and drops it when there is none, while the ClusterIP keeps
//! using every endpoint. Needs root.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use svc_lb_tests::{
    agent::AgentGuard,
    client, fixture,
    manifests::{self, Port},
    netns::{NODE_IP, Pod},
};

/// A NodePort Service with externalTrafficPolicy Local whose endpoints are on node-1 unless
/// named in `remote` (then node-2).
fn local_service(name: &str, ip: &str, node_port: u16, pods: &[&Pod], remote: &[&str]) -> String {
    let ports = [Port {
        node_port: Some(node_port),
        ..Port::tcp("http", 80, 5000)
    }];
    let svc = manifests::service(name, ip.parse().unwrap(), ("app", "frontend"), &ports).replace(
        "  sessionAffinity: None\n",
        "  sessionAffinity: None\n  externalTrafficPolicy: Local\n",
    );
    let mut slice = manifests::endpoint_slice(name, &ports, pods);
    for r in remote {
        slice = slice.replace(
            &format!("nodeName: node-1\n  targetRef:\n    kind: Pod\n    name: {r}\n"),
            &format!("nodeName: node-2\n  targetRef:\n    kind: Pod\n    name: {r}\n"),
        );
    }
    manifests::join(&[svc, slice])
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_or_drops() {
    let (topo, dir) = fixture::standard();
    let pods: Vec<_> = topo.pods.iter().collect();
    dir.write(
        "local.yaml",
        &manifests::join(&[
            local_service("mixed", "10.96.0.81", 30181, &pods, &["pod-b", "pod-c"]),
            local_service(
                "remote",
                "10.96.0.82",
                30182,
                &pods,
                &["pod-a", "pod-b", "pod-c"],
            ),
        ]),
    );
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--node-name", "node-1"]);
    fixture::wait_serving(&topo, &mut agent);

    let names = |addr: SocketAddr| -> BTreeSet<String> {
        (0..20)
            .map(|i| {
                client::http_get(&topo.client, addr).unwrap_or_else(|e| panic!("{addr} #{i}: {e}"))
            })
            .collect()
    };
    // NodePort: only pod-a is on this node. ClusterIP: internal traffic, every endpoint.
    assert_eq!(
        names(SocketAddr::from((NODE_IP, 30181))),
        BTreeSet::from(["pod-a".into()])
    );
    assert_eq!(names(SocketAddr::from(([10, 96, 0, 81], 80))).len(), 3);
    // No endpoint on this node: dropped (a timeout, not a refusal), ClusterIP still works.
    let err = client::http_get_within(
        &topo.client,
        SocketAddr::from((NODE_IP, 30182)),
        Duration::from_millis(500),
    )
    .expect_err("NodePort without a local endpoint must not answer");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(!names(SocketAddr::from(([10, 96, 0, 82], 80))).is_empty());
    let out = agent.cli(&["debug", "services"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("NodePort local"), "{table}");
}

/// kube-proxy's short-circuit: with `--cluster-cidr`, pods reach the NodePort and externalIP of
/// an externalTrafficPolicy Local Service through every endpoint (here all on "node-2"),
/// while the external client, with no local endpoint to go to, is still dropped.
#[test]
fn external_traffic_policy_local_does_not_restrict_in_cluster_clients() {
    let (topo, dir) = fixture::standard();
    let external_ip = std::net::Ipv4Addr::new(192, 0, 2, 83);
    topo.client.run(
        "ip",
        &["route", "add", "192.0.2.0/24", "via", &NODE_IP.to_string()],
    );
    let pods: Vec<_> = topo.pods.iter().collect();
    let svc = local_service(
        "shortcircuit",
        "10.96.0.83",
        30183,
        &pods,
        &["pod-a", "pod-b", "pod-c"],
    )
    .replace(
        "  externalTrafficPolicy: Local\n",
        &format!("  externalTrafficPolicy: Local\n  externalIPs:\n  - {external_ip}\n"),
    );
    dir.write("shortcircuit.yaml", &svc);
    let mut agent = AgentGuard::start_with(
        &topo,
        &dir.path,
        &["--node-name", "node-1", "--cluster-cidr", "10.244.0.0/16"],
    );
    fixture::wait_serving(&topo, &mut agent);

    let frontends = [
        SocketAddr::from((NODE_IP, 30183)),
        SocketAddr::from((external_ip, 80)),
    ];
    for addr in frontends {
        let err = client::http_get_within(&topo.client, addr, Duration::from_millis(500))
            .expect_err("external client, no local endpoint: must not answer");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{addr}: {err}");
    }
    let all: BTreeSet<String> = ["pod-a", "pod-b", "pod-c"].map(String::from).into();
    for pod in &topo.pods {
        for addr in frontends {
            let seen: BTreeSet<String> = (0..12)
                .map(|i| {
                    client::http_get(&pod.ns, addr)
                        .unwrap_or_else(|e| panic!("{} -> {addr} #{i}: {e}", pod.name))
                })
                .collect();
            assert!(seen.is_subset(&all), "{seen:?}");
            assert!(
                seen.len() >= 2,
                "{} -> {addr}: one endpoint only: {seen:?}",
                pod.name
            );
        }
    }
}
