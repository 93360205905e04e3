//! End to end: `svc-lb run --metrics-addr` serves Prometheus metrics that follow real traffic,
//! conntrack, syncs and a rejected Service.

use std::net::SocketAddr;

use svc_lb_tests::{
    agent::AgentGuard,
    client, fixture,
    manifests::{self, Port},
    views::{http_get_path, sample},
    wait_for,
};

const METRICS: &str = "127.0.0.1:9963";

#[test]
fn metrics_follow_traffic_and_rejections() {
    let (topo, dir) = fixture::standard();
    // A Service whose nodePort is outside the range: translated without its NodePort frontend.
    let bad = manifests::service(
        "bad-nodeport",
        std::net::Ipv4Addr::new(10, 96, 0, 99),
        ("app", "none"),
        &[Port {
            node_port: Some(80),
            ..Port::tcp("http", 80, 80)
        }],
    );
    dir.write("bad.yaml", &bad);
    // An explicit --max-conntrack: the default follows the node's memory (docs/operating.md),
    // and the capacity row must report the size of the map in use.
    let mut agent = AgentGuard::start_with(
        &topo,
        &dir.path,
        &["--metrics-addr", METRICS, "--max-conntrack", "262144"],
    );
    fixture::wait_serving(&topo, &mut agent);

    for i in 0..6 {
        client::http_get(&topo.client, fixture::frontend())
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    let addr: SocketAddr = METRICS.parse().unwrap();
    let scrape = || {
        let (status, body) = http_get_path(&topo.node, addr, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200, "{body}");
        body
    };
    let body = scrape();
    let fe = [r#"service="frontend-svc""#, r#"frontend="10.96.0.10:80""#];
    let packets = sample(&body, "svc_lb_service_packets_total", &fe).expect("frontend-svc packets");
    // 6 connections: at least SYN, ACK, request and FIN each.
    assert!(packets >= 24.0, "frontend-svc packets {packets}\n{body}");
    let bytes = sample(&body, "svc_lb_service_bytes_total", &fe).unwrap();
    assert!(bytes > packets * 40.0, "bytes {bytes}");
    let backend_total: f64 = ["10.244.1.2:5000", "10.244.2.2:5000", "10.244.3.2:5000"]
        .iter()
        .map(|b| {
            sample(
                &body,
                "svc_lb_backend_packets_total",
                &[&format!("backend=\"{b}\"")],
            )
            .unwrap_or_else(|| panic!("no backend metric for {b}\n{body}"))
        })
        .sum();
    assert!(
        backend_total >= packets,
        "backends {backend_total} < frontend {packets}"
    );
    let ct = sample(&body, "svc_lb_conntrack_entries", &[]).unwrap();
    assert!(ct >= 1.0, "conntrack entries {ct}");
    assert_eq!(
        sample(&body, "svc_lb_map_entries", &[r#"map="LB4_CT""#]),
        Some(ct)
    );
    assert_eq!(
        sample(&body, "svc_lb_map_capacity", &[r#"map="LB4_CT""#]),
        Some(262144.0)
    );
    assert!(sample(&body, "svc_lb_sync_duration_seconds_count", &[]).unwrap() >= 1.0);
    assert!(sample(&body, "svc_lb_syncs_total", &[r#"result="ok""#]).unwrap() >= 1.0);
    let rejected = sample(
        &body,
        "svc_lb_rejected_objects",
        &[
            r#"object="Service default/bad-nodeport""#,
            "nodePort 80 is outside",
        ],
    );
    assert_eq!(rejected, Some(1.0), "{body}");

    // The counters move with more traffic (read at scrape time, not cached).
    for _ in 0..4 {
        client::http_get(&topo.client, fixture::frontend()).expect("request");
    }
    wait_for("packets to grow", std::time::Duration::from_secs(5), || {
        let now = sample(&scrape(), "svc_lb_service_packets_total", &fe)?;
        (now >= packets + 16.0).then_some(())
    });
    // Fixing the manifest clears the rejection.
    dir.write("bad.yaml", &bad.replace("nodePort: 80", "nodePort: 30099"));
    wait_for(
        "rejection to clear",
        std::time::Duration::from_secs(10),
        || {
            let body = scrape();
            sample(&body, "svc_lb_rejected_objects", &["bad-nodeport"])
                .is_none()
                .then_some(())
        },
    );
    let (status, _) = http_get_path(&topo.node, addr, "/nope").unwrap();
    assert_eq!(status, 404);
}
