//! End to end, more of kube-proxy's contract: loadBalancerSourceRanges on a LoadBalancer IP
//! (NodePort and ClusterIP of the same Service stay open), and one Service with TCP and UDP on
//! the same port number plus a named targetPort resolved per Pod. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use svc_lb_tests::{
    agent::AgentGuard,
    client, fixture,
    manifests::{self, Port},
    netns::NODE_IP,
};

const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

fn lb_service(ranges: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: public\n  namespace: default\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.71\n  clusterIPs:\n  - 10.96.0.71\n\
         \x20 loadBalancerSourceRanges: [{ranges}]\n  selector:\n    app: frontend\n  ports:\n\
         \x20 - name: http\n    protocol: TCP\n    port: 443\n    targetPort: 5000\n    nodePort: 30091\n\
         status:\n  loadBalancer:\n    ingress:\n    - ip: {LB_IP}\n      ipMode: VIP\n"
    )
}

#[test]
fn load_balancer_source_ranges_filter_clients() {
    let (topo, dir) = fixture::standard();
    topo.client.run(
        "ip",
        &[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            &NODE_IP.to_string(),
        ],
    );
    let ports = [Port {
        node_port: Some(30091),
        ..Port::tcp("http", 443, 5000)
    }];
    let pods: Vec<_> = topo.pods.iter().collect();
    let slice = manifests::endpoint_slice("public", &ports, &pods);
    // The client (172.31.0.2) is inside the range.
    dir.write(
        "public.yaml",
        &manifests::join(&[lb_service("'172.31.0.0/24', '10.0.0.0/8'"), slice.clone()]),
    );
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);
    let lb = SocketAddr::from((LB_IP, 443));
    svc_lb_tests::wait_for("the LB IP to answer", Duration::from_secs(10), || {
        client::http_get_within(&topo.client, lb, Duration::from_millis(300)).ok()
    });

    // Now the client is outside: its packets to the LB IP are dropped (a timeout, as with
    // kube-proxy), while NodePort and ClusterIP of the Service still answer.
    dir.write(
        "public.yaml",
        &manifests::join(&[lb_service("'10.0.0.0/8'"), slice]),
    );
    svc_lb_tests::wait_for(
        "the LB IP to drop the client",
        Duration::from_secs(10),
        || client::http_get_within(&topo.client, lb, Duration::from_millis(300)).err(),
    );
    for _ in 0..3 {
        let err = client::http_get_within(&topo.client, lb, Duration::from_millis(300))
            .expect_err("client outside loadBalancerSourceRanges");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    }
    for addr in [
        SocketAddr::from((NODE_IP, 30091)),
        SocketAddr::from(([10, 96, 0, 71], 443)),
    ] {
        client::http_get(&topo.client, addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    }
    let out = agent.cli(&["debug", "services"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("from=10.0.0.0/8"), "{table}");
}

#[test]
fn tcp_and_udp_on_one_port_and_named_target_ports() {
    let (topo, dir) = fixture::standard();
    // Selector-based (no slice): the named targetPort resolves per Pod from its containers.
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: both\n  namespace: default\n\
               spec:\n  clusterIP: 10.96.0.72\n  selector:\n    app: frontend\n  ports:\n\
               \x20 - name: web\n    protocol: TCP\n    port: 53\n    targetPort: web\n\
               \x20 - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: 5353\n";
    let pods: String = topo
        .pods
        .iter()
        .map(|p| {
            manifests::pod(p).replace(
                "    image: svc-lb-echo\n",
                "    image: svc-lb-echo\n    ports:\n    - name: web\n      containerPort: 80\n",
            )
        })
        .collect::<Vec<_>>()
        .join("---\n");
    dir.write("pods.yaml", &pods);
    dir.write("both.yaml", svc);
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let addr = SocketAddr::from(([10, 96, 0, 72], 53));
    let names: Vec<String> = topo.pods.iter().map(|p| p.name.clone()).collect();
    let tcp = client::http_get(&topo.client, addr).expect("TCP 53 -> named port web (80)");
    assert!(names.contains(&tcp), "{tcp}");
    let udp = client::udp_request(&topo.client, addr, Duration::from_secs(2))
        .expect("UDP 53 -> 5353 on the same port number");
    assert!(names.contains(&udp), "{udp}");
}
