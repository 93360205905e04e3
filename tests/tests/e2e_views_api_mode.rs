//! End to end in API mode: the optional servers (metrics, DNS, dashboard JSON) work from what
//! the agent watches on the (fake) API server, and follow its changes; `debug env` reads the
//! Services from the API server too.

use std::{net::SocketAddr, process::Command, time::Duration};

use svc_lb_tests::{
    bin_path, client,
    kube_agent::{KubeAgent, NODE_NAME, serve_in_node},
    kube_api::FakeApi,
    kube_objects::{Endpoint, endpoint_slice, node, service},
    manifests::{FRONTEND_PORTS, FRONTEND_VIP},
    netns::{NODE_IP, Topology},
    views::{http_get_path, sample},
    wait_for,
};

const METRICS: &str = "127.0.0.1:9963";
const UI: &str = "127.0.0.1:9964";

fn dig_short(topo: &Topology, name: &str) -> String {
    let out = topo.client.run(
        "dig",
        &["@172.31.0.1", "+short", "+time=2", "+tries=1", name],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn servers_follow_the_api_server() {
    let topo = Topology::new(3);
    topo.start_echo_servers();
    let api = FakeApi::new();
    api.apply(service(
        "frontend-svc",
        &[&FRONTEND_VIP.to_string()],
        ("app", "frontend"),
        &FRONTEND_PORTS,
    ));
    let eps: Vec<Endpoint> = ["pod-a", "pod-b"]
        .iter()
        .map(|p| Endpoint::ready(topo.pod(p).ip, p))
        .collect();
    api.apply(endpoint_slice(
        "frontend-svc",
        "frontend-svc-x7k2p",
        "IPv4",
        &FRONTEND_PORTS,
        &eps,
    ));
    api.apply(node(NODE_NAME, &NODE_IP.to_string()));
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(
        &topo,
        &[
            "--metrics-addr",
            METRICS,
            "--dns-listen",
            "172.31.0.1:53",
            "--ui",
            UI,
        ],
    );
    let frontend = SocketAddr::from((FRONTEND_VIP, 80));
    wait_for(
        "frontend-svc to answer (API mode)",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            client::http_get_within(&topo.client, frontend, Duration::from_millis(300)).ok()
        },
    );
    for _ in 0..4 {
        client::http_get(&topo.client, frontend).expect("request");
    }

    let (status, body) = http_get_path(&topo.node, METRICS.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    let packets = sample(
        &body,
        "svc_lb_service_packets_total",
        &[r#"service="frontend-svc""#],
    )
    .expect("frontend-svc packets");
    assert!(packets >= 16.0, "{packets}\n{body}");
    assert!(sample(&body, "svc_lb_syncs_total", &[r#"result="ok""#]).unwrap() >= 1.0);

    assert_eq!(
        dig_short(&topo, "frontend-svc.default.svc.cluster.local"),
        "10.96.0.10"
    );
    let (status, json) = http_get_path(&topo.node, UI.parse().unwrap(), "/api/state").unwrap();
    assert_eq!(status, 200, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["namespaces"][0]["services"][0]["name"], "frontend-svc");
    assert_eq!(
        v["namespaces"][0]["services"][0]["backends"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // `debug env` lists the Services from the API server (no manifests).
    let mut env = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
    env.args(["debug", "env", "-n", "default", "--kubeconfig"])
        .arg(&agent.kubeconfig);
    topo.node.enter(&mut env);
    let out = env.output().expect("run svc-lb debug env");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vars = String::from_utf8_lossy(&out.stdout);
    for line in [
        "FRONTEND_SVC_SERVICE_HOST=10.96.0.10",
        "FRONTEND_SVC_SERVICE_PORT_HTTP=80",
        "FRONTEND_SVC_PORT_80_TCP=tcp://10.96.0.10:80",
    ] {
        assert!(vars.lines().any(|l| l == line), "{line} not in\n{vars}");
    }

    // Deleted on the API server: gone from DNS and from the metrics.
    api.delete("Service", Some("default"), "frontend-svc");
    wait_for("the name to go away", Duration::from_secs(10), || {
        dig_short(&topo, "frontend-svc.default.svc.cluster.local")
            .is_empty()
            .then_some(())
    });
    wait_for("the metric to go away", Duration::from_secs(10), || {
        let (_, body) = http_get_path(&topo.node, METRICS.parse().unwrap(), "/metrics").ok()?;
        sample(
            &body,
            "svc_lb_service_packets_total",
            &[r#"service="frontend-svc""#],
        )
        .is_none()
        .then_some(())
    });
}
