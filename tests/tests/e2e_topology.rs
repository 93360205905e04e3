//! The test harness on its own (no agent): namespaces, routes, echo servers and the client.
//! Also the baseline the datapath tests rely on: without svc-lb, VIPs are unreachable.

use std::{net::SocketAddr, path::Path, time::Duration};

use svc_lb_tests::{
    client::{self, HttpConn},
    fixture,
    netns::Topology,
};

#[test]
fn pods_answer_directly_and_vips_do_not_without_agent() {
    let topo = Topology::new(3);
    topo.start_echo_servers();
    for pod in &topo.pods {
        for port in [5000, 80] {
            let addr = SocketAddr::from((pod.ip, port));
            let name =
                client::http_get(&topo.client, addr).unwrap_or_else(|e| panic!("HTTP {addr}: {e}"));
            assert_eq!(name, pod.name);
        }
        let udp = SocketAddr::from((pod.ip, 5353));
        let name = client::udp_request(&topo.client, udp, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("UDP {udp}: {e}"));
        assert_eq!(name, pod.name);
    }
    // Keep-alive: one connection carries many requests.
    let mut conn = HttpConn::connect(&topo.client, SocketAddr::from((topo.pods[1].ip, 5000)))
        .expect("keep-alive connect");
    for _ in 0..20 {
        assert_eq!(conn.get().expect("keep-alive request"), "pod-b");
    }
    // Without svc-lb nothing answers on a ClusterIP (the node has no route for it).
    assert!(
        client::connect(&topo.client, fixture::frontend(), Duration::from_secs(2)).is_err(),
        "10.96.0.10:80 answered without svc-lb"
    );
}

#[test]
fn drop_removes_namespaces_and_processes() {
    let topo = Topology::new(1);
    topo.start_echo_servers();
    let names = [topo.client.path(), topo.node.path(), topo.pods[0].ns.path()];
    let dir = topo.dir.clone();
    for n in &names {
        assert!(n.exists(), "{} missing", n.display());
    }
    drop(topo);
    for n in &names {
        assert!(!Path::new(n).exists(), "{} left behind", n.display());
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}
