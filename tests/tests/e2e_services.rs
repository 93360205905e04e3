//! End to end: the real `svc-lb run` agent in a node namespace, real echo servers in pod
//! namespaces, real traffic from a client namespace. Needs root; fails (never skips) otherwise.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use svc_lb_tests::{
    agent::AgentGuard,
    client::{self, HttpConn},
    fixture,
    manifests::{self, DNS_VIP, Port, WEB_NODE_PORT, WEB_VIP},
    netns::{NODE_IP, POD_NAMES},
};

fn tally(answers: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a).or_insert(0) += 1;
    }
    m
}

fn assert_known_backends(seen: &BTreeMap<String, usize>) {
    for name in seen.keys() {
        assert!(
            POD_NAMES.contains(&name.as_str()),
            "unexpected answer {name:?}"
        );
    }
}

#[test]
fn clusterip_reaches_every_backend_and_uninstall_cleans_up() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    // A new connection per request: each one is balanced on its own.
    let answers = (0..30).map(|i| {
        client::http_get(&topo.client, fixture::frontend())
            .unwrap_or_else(|e| panic!("request {i} to frontend-svc: {e}"))
    });
    let seen = tally(answers);
    assert_known_backends(&seen);
    assert_eq!(
        seen.len(),
        3,
        "30 new connections should reach all 3 backends, got {seen:?}"
    );

    // Many requests on one connection stay on one backend (conntrack, not per-packet choice).
    let mut conn =
        HttpConn::connect(&topo.client, fixture::frontend()).expect("keep-alive connect");
    let first = conn.get().expect("first request on keep-alive connection");
    for i in 0..10 {
        assert_eq!(
            conn.get().expect("keep-alive request"),
            first,
            "request {i}"
        );
    }
    drop(conn);

    let out = agent.shutdown();
    assert!(
        out.status.success(),
        "svc-lb uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !agent.pin_dir.exists(),
        "{} left behind by uninstall",
        agent.pin_dir.display()
    );
    // Programs detached: the VIP is not served any more (the node has no route for it).
    let err = client::connect(&topo.client, fixture::frontend(), Duration::from_secs(2));
    assert!(err.is_err(), "10.96.0.10:80 still answers after uninstall");
}

#[test]
fn nodeport_and_its_clusterip_answer() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let node_port = SocketAddr::from((NODE_IP, WEB_NODE_PORT));
    let seen = tally((0..15).map(|i| {
        client::http_get(&topo.client, node_port)
            .unwrap_or_else(|e| panic!("request {i} to NodePort {node_port}: {e}"))
    }));
    assert_known_backends(&seen);
    assert!(
        seen.len() >= 2,
        "NodePort balanced over one backend only: {seen:?}"
    );

    let cluster_ip = SocketAddr::from((WEB_VIP, 8080));
    let name = client::http_get(&topo.client, cluster_ip)
        .unwrap_or_else(|e| panic!("web-service ClusterIP {cluster_ip}: {e}"));
    assert!(POD_NAMES.contains(&name.as_str()), "answer {name:?}");

    // Other ports of the node are not touched (nothing listens on 8081: refused by
    // the node's own stack).
    let other = client::connect(
        &topo.client,
        SocketAddr::from((NODE_IP, 8081)),
        client::TIMEOUT,
    );
    assert_eq!(
        other.map(drop).map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused)
    );
}

#[test]
fn udp_service_answers_from_its_vip() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let dns = SocketAddr::from((DNS_VIP, 53));
    // A new socket (source port) per request; the connected socket only accepts replies whose
    // source is the VIP, so a missing reverse NAT shows up as a timeout.
    let seen = tally((0..15).map(|i| {
        client::udp_request(&topo.client, dns, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("UDP request {i} to {dns}: {e}"))
    }));
    assert_known_backends(&seen);
    assert!(
        seen.len() >= 2,
        "UDP balanced over one backend only: {seen:?}"
    );
}

#[test]
fn traffic_not_for_a_service_is_untouched() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    for pod in &topo.pods {
        let http = SocketAddr::from((pod.ip, 5000));
        let name = client::http_get(&topo.client, http)
            .unwrap_or_else(|e| panic!("direct HTTP to {http}: {e}"));
        assert_eq!(name, pod.name, "direct request to {http}");
        let udp = SocketAddr::from((pod.ip, 5353));
        let name = client::udp_request(&topo.client, udp, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("direct UDP to {udp}: {e}"));
        assert_eq!(name, pod.name, "direct datagram to {udp}");
    }
}

#[test]
fn service_without_endpoints_is_refused_quickly() {
    let (topo, dir) = fixture::standard();
    let empty_vip = std::net::Ipv4Addr::new(10, 96, 0, 30);
    let ports = [Port::tcp("http", 80, 8080)];
    dir.write(
        "empty.yaml",
        &manifests::join(&[
            manifests::service("empty-svc", empty_vip, ("app", "nothing"), &ports),
            manifests::endpoint_slice("empty-svc", &ports, &[]),
        ]),
    );
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let addr = SocketAddr::from((empty_vip, 80));
    for _ in 0..3 {
        let t = Instant::now();
        let res = client::connect(&topo.client, addr, Duration::from_secs(3));
        let took = t.elapsed();
        match res {
            Ok(_) => panic!("connected to {addr}, a Service without endpoints"),
            Err(e) => assert_eq!(
                e.kind(),
                io::ErrorKind::ConnectionRefused,
                "connect to {addr}: want ECONNREFUSED, got {e} after {took:?}"
            ),
        }
        assert!(
            took < Duration::from_secs(1),
            "refusal took {took:?} (want < 1 s)"
        );
    }
}

#[test]
fn external_ip_and_load_balancer_ingress_answer() {
    let (topo, dir) = fixture::standard();
    let external_ip = std::net::Ipv4Addr::new(192, 0, 2, 10);
    let lb_ip = std::net::Ipv4Addr::new(198, 51, 100, 10);
    // Traffic for both addresses reaches the node, as an upstream router would send it.
    for net in ["192.0.2.0/24", "198.51.100.0/24"] {
        topo.client
            .run("ip", &["route", "add", net, "via", &NODE_IP.to_string()]);
    }
    let ports = [Port {
        node_port: Some(30090),
        ..Port::tcp("http", 443, 5000)
    }];
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: public\n  namespace: default\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.70\n  clusterIPs:\n  - 10.96.0.70\n\
         \x20 externalIPs:\n  - {external_ip}\n  selector:\n    app: frontend\n  ports:\n\
         \x20 - name: http\n    protocol: TCP\n    port: 443\n    targetPort: 5000\n    nodePort: 30090\n\
         status:\n  loadBalancer:\n    ingress:\n    - ip: {lb_ip}\n      ipMode: VIP\n"
    );
    let pods: Vec<_> = topo.pods.iter().collect();
    dir.write(
        "public.yaml",
        &manifests::join(&[svc, manifests::endpoint_slice("public", &ports, &pods)]),
    );
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    for addr in [
        SocketAddr::from((external_ip, 443)),
        SocketAddr::from((lb_ip, 443)),
        SocketAddr::from((NODE_IP, 30090)),
        SocketAddr::from(([10, 96, 0, 70], 443)),
    ] {
        let seen = tally((0..12).map(|i| {
            client::http_get(&topo.client, addr)
                .unwrap_or_else(|e| panic!("request {i} to {addr}: {e}"))
        }));
        assert_known_backends(&seen);
        assert!(
            seen.len() >= 2,
            "{addr} balanced over one backend only: {seen:?}"
        );
    }
}
