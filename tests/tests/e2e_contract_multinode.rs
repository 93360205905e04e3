//! End to end on two nodes (`svc_lb_tests::multinode`), one agent per node reading the same
//! manifests: NodePort traffic to a pod on the other node is SNATed to the node (the pod sees
//! node A's address, kube-proxy's masquerade), local pods see the client, externalTrafficPolicy
//! Local answers only on the node with endpoints, and two clients using the same source port
//! share a remote backend at the same time. Needs root.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use svc_lb_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use svc_lb_tests::{
    manifests::{self, ManifestDir},
    multinode::{
        CLIENT_A_IP, CLIENT_A2_IP, CLIENT_B_IP, Cluster, NODE_A_CLIENT_IP, NODE_A_IP,
        NODE_B_CLIENT_IP, NodeAgent, POD_A_IP, POD_B_IP, PeerConn, udp_peer,
    },
    netns::Netns,
    wait_for,
};

const PORT: u16 = 8000;
const POD_A: (Ipv4Addr, &str) = (POD_A_IP, "node-a");
const POD_B: (Ipv4Addr, &str) = (POD_B_IP, "node-b");

/// A NodePort Service (port 80 -> `PORT`) and its EndpointSlice with the endpoints
/// `(address, nodeName)`.
fn service(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    policy: &str,
    endpoints: &[(Ipv4Addr, &str)],
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  type: NodePort\n  clusterIP: {cluster_ip}\n  externalTrafficPolicy: {policy}\n\
         \x20 ports:\n  - name: tcp\n    protocol: TCP\n    port: 80\n    targetPort: {PORT}\n\
         \x20   nodePort: {node_port}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n\
         \x20 namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\n\
         addressType: IPv4\nports:\n- name: tcp\n  protocol: TCP\n  port: {PORT}\nendpoints:\n"
    );
    for (ip, node) in endpoints {
        s.push_str(&format!(
            "- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"
        ));
    }
    s
}

/// The cluster with peer servers in both pods, manifests for `services`, and both agents.
fn setup(services: &[String]) -> (Cluster, ManifestDir) {
    let cluster = Cluster::create();
    cluster.start_peer_servers(PORT);
    let dir = ManifestDir::new(&cluster.dir);
    let mut docs = vec![cluster.node_manifests()];
    docs.extend(services.iter().cloned());
    dir.write("cluster.yaml", &manifests::join(&docs));
    (cluster, dir)
}

fn agents(cluster: &Cluster, dir: &ManifestDir) -> [NodeAgent; 2] {
    [0, 1].map(|i| NodeAgent::start(cluster, &cluster.nodes[i], &dir.path, &[]))
}

/// Waits (up to 20 s) until `dst` answers from `ns`.
fn wait_answer(ns: &Netns, dst: SocketAddrV4, agents: &mut [NodeAgent; 2]) {
    wait_for(
        &format!("{dst} to answer through svc-lb"),
        Duration::from_secs(20),
        || {
            agents.iter_mut().for_each(NodeAgent::assert_running);
            PeerConn::connect(ns, None, dst, Duration::from_millis(300)).ok()
        },
    );
}

fn ip(addr: SocketAddr) -> Ipv4Addr {
    match addr {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(a) => panic!("IPv6 peer {a}"),
    }
}

/// Waits (up to 20 s) until `agent`'s maps hold the frontend `addr`.
fn wait_programmed(agent: &mut NodeAgent, addr: SocketAddrV4) {
    wait_for(
        &format!("{addr} to be programmed on {}", agent.node.name),
        Duration::from_secs(20),
        || {
            agent.assert_running();
            let out = agent.cli(&["debug", "services"]);
            String::from_utf8_lossy(&out.stdout)
                .contains(&addr.to_string())
                .then_some(())
        },
    );
}

/// A global datapath counter of `agent`'s node (`svc-lb debug stats -o json`).
fn stat(agent: &NodeAgent, name: &str) -> u64 {
    let out = agent.cli(&["debug", "stats", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {v}"))
}

fn assert_snat_port(addr: SocketAddr) {
    assert!(
        (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&addr.port()),
        "SNAT port of {addr} outside {SNAT_PORT_MIN}-{SNAT_PORT_MAX}"
    );
}

#[test]
fn nodeport_reaches_pods_on_both_nodes_snat_only_for_the_remote_one() {
    let (cluster, dir) = setup(&[service(
        "spread",
        "10.96.1.1",
        30101,
        "Cluster",
        &[POD_A, POD_B],
    )]);
    let mut agents = agents(&cluster, &dir);
    let frontend = SocketAddrV4::new(NODE_A_CLIENT_IP, 30101);
    wait_answer(&cluster.client_a, frontend, &mut agents);

    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let c = PeerConn::connect(&cluster.client_a, None, frontend, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connection {i} to {frontend}: {e}"));
        match c.pod.as_str() {
            // Local backend: the client's own address (no SNAT on the node that has the pod).
            "pod-a" => assert_eq!(ip(c.seen_from), CLIENT_A_IP, "pod-a saw {}", c.seen_from),
            // Remote backend: node A's address on the way to it, from the SNAT port range.
            "pod-b" => {
                assert_eq!(ip(c.seen_from), NODE_A_IP, "pod-b saw {}", c.seen_from);
                assert_snat_port(c.seen_from);
            }
            other => panic!("unexpected backend {other}"),
        }
        seen.insert(c.pod);
    }
    assert_eq!(seen, BTreeSet::from(["pod-a".into(), "pod-b".into()]));

    assert!(stat(&agents[0], "snat") > 0);
    let backends = agents[0].cli(&["debug", "backends"]);
    let text = String::from_utf8_lossy(&backends.stdout);
    assert!(text.contains("active remote"), "{text}");
}

#[test]
fn external_traffic_policy_local_answers_only_on_the_node_with_endpoints() {
    // The only endpoint is pod-b, on node-b.
    let (cluster, dir) = setup(&[service("local", "10.96.1.3", 30103, "Local", &[POD_B])]);
    let mut agents = agents(&cluster, &dir);

    // Node B has the endpoint: it answers, and the pod sees client-b's own address.
    let on_b = SocketAddrV4::new(NODE_B_CLIENT_IP, 30103);
    wait_answer(&cluster.client_b, on_b, &mut agents);
    for _ in 0..5 {
        let c = PeerConn::connect(&cluster.client_b, None, on_b, Duration::from_secs(3))
            .expect("node-b answers for its local endpoint");
        assert_eq!(c.pod, "pod-b");
        assert_eq!(ip(c.seen_from), CLIENT_B_IP, "source not preserved");
    }
    // Node A has none: dropped (a timeout, not a refusal and not a forward to node B). Its
    // agent may still be starting (then the node's own stack would refuse): wait until the
    // frontend is programmed there.
    let on_a = SocketAddrV4::new(NODE_A_CLIENT_IP, 30103);
    wait_programmed(&mut agents[0], on_a);
    let err = PeerConn::connect(&cluster.client_a, None, on_a, Duration::from_millis(700))
        .err()
        .expect("node-a must not answer without a local endpoint");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(stat(&agents[0], "no_local_drop") > 0);
}

#[test]
fn clients_with_the_same_source_port_share_a_remote_backend_concurrently() {
    let (cluster, dir) = setup(&[service("remote", "10.96.1.2", 30102, "Cluster", &[POD_B])]);
    let mut agents = agents(&cluster, &dir);
    let frontend = SocketAddrV4::new(NODE_A_CLIENT_IP, 30102);
    wait_answer(&cluster.client_a, frontend, &mut agents);

    let open = |src_ip| {
        let src = SocketAddrV4::new(src_ip, 40_000);
        PeerConn::connect(
            &cluster.client_a,
            Some(src),
            frontend,
            Duration::from_secs(3),
        )
        .unwrap_or_else(|e| panic!("connect from {src}: {e}"))
    };
    let mut first = open(CLIENT_A_IP);
    let mut second = open(CLIENT_A2_IP);
    for c in [&first, &second] {
        assert_eq!(c.pod, "pod-b");
        assert_eq!(ip(c.seen_from), NODE_A_IP);
        assert_snat_port(c.seen_from);
    }
    assert_ne!(
        first.seen_from, second.seen_from,
        "both clients were SNATed to the same node port"
    );
    // Both connections stay usable side by side.
    for i in 0..5 {
        assert_eq!(first.echo(&format!("a{i}")).unwrap(), format!("a{i}"));
        assert_eq!(second.echo(&format!("b{i}")).unwrap(), format!("b{i}"));
    }
}

/// A LoadBalancer Service with externalTrafficPolicy Local and healthCheckNodePort `HC_PORT`.
fn lb_service(endpoints: &[(Ipv4Addr, &str)]) -> String {
    service("lb", "10.96.1.4", 30104, "Local", endpoints).replace(
        "  type: NodePort\n",
        &format!("  type: LoadBalancer\n  healthCheckNodePort: {HC_PORT}\n"),
    )
}

const HC_PORT: u16 = 32104;

/// What `curl` got.
#[derive(Debug)]
enum Answer {
    Http(u16, String),
    /// Connection refused: nothing listens on the port.
    Refused,
    /// Anything else (a reset while a listener closes, a timeout under load): retried.
    Failed(String),
}

/// `curl` from `ns`.
fn curl(ns: &Netns, url: &str) -> Answer {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "3", "-w", "\n%{http_code}", url]);
    ns.enter(&mut cmd);
    let out = cmd.output().expect("run curl (is it installed?)");
    match out.status.code() {
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let (body, code) = text.rsplit_once('\n').expect("status line from -w");
            Answer::Http(code.parse().expect("status code"), body.to_string())
        }
        // 7: could not connect.
        Some(7) => Answer::Refused,
        _ => Answer::Failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Polls `curl` (up to 20 s) until `want` holds for its answer (agents sync on file changes
/// within ~1 s); a timeout names the last answer.
fn wait_curl(ns: &Netns, url: &str, what: &str, want: impl Fn(&Answer) -> bool) -> Answer {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = curl(ns, url);
        if want(&got) {
            return got;
        }
        let last = match &got {
            Answer::Http(code, body) => format!("HTTP {code}: {body}"),
            Answer::Refused => "connection refused".into(),
            Answer::Failed(e) => e.clone(),
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after 20 s: {what}; last answer from {url}: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status and body of an HTTP answer from `url`, waiting (up to 20 s) for one for which
/// `want(status)` holds.
fn wait_http(ns: &Netns, url: &str, what: &str, want: impl Fn(u16) -> bool) -> (u16, String) {
    match wait_curl(
        ns,
        url,
        what,
        |a| matches!(a, Answer::Http(c, _) if want(*c)),
    ) {
        Answer::Http(code, body) => (code, body),
        other => unreachable!("{other:?}"),
    }
}

#[test]
fn health_check_node_port_reports_local_endpoints_per_node() {
    let (cluster, dir) = setup(&[lb_service(&[POD_B])]);
    let mut agents = agents(&cluster, &dir);
    let on_b = SocketAddrV4::new(NODE_B_CLIENT_IP, 30104);
    wait_answer(&cluster.client_b, on_b, &mut agents);
    let url_a = format!("http://{NODE_A_CLIENT_IP}:{HC_PORT}/");
    let url_b = format!("http://{NODE_B_CLIENT_IP}:{HC_PORT}/");
    let json = |body: &str| -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    };

    // Node B has pod-b: 200 with one local endpoint; node A has none: 503 with zero.
    let (code, body) = wait_http(&cluster.client_b, &url_b, "node-b health check", |_| true);
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["service"]["namespace"], "default");
    assert_eq!(v["service"]["name"], "lb");
    assert_eq!(v["localEndpoints"], 1);
    assert_eq!(v["serviceProxyHealthy"], true);
    let (code, body) = wait_http(&cluster.client_a, &url_a, "node-a health check", |_| true);
    assert_eq!(code, 503, "{body}");
    assert_eq!(json(&body)["localEndpoints"], 0);

    // pod-a becomes an endpoint: node A turns healthy.
    let mut docs = vec![cluster.node_manifests(), lb_service(&[POD_A, POD_B])];
    dir.write("cluster.yaml", &manifests::join(&docs));
    let (_, body) = wait_http(&cluster.client_a, &url_a, "node-a to report pod-a", |c| {
        c == 200
    });
    assert_eq!(json(&body)["localEndpoints"], 1);

    // The Service goes away: both nodes close the port.
    docs.truncate(1);
    dir.write("cluster.yaml", &manifests::join(&docs));
    let refused = |a: &Answer| matches!(a, Answer::Refused);
    wait_curl(&cluster.client_a, &url_a, "node-a to close", refused);
    wait_curl(&cluster.client_b, &url_b, "node-b to close", refused);
    agents.iter_mut().for_each(NodeAgent::assert_running);
}

#[test]
fn udp_nodeport_to_a_remote_pod_is_snated_and_answered() {
    let udp = service("dns", "10.96.1.5", 30105, "Cluster", &[POD_B])
        .replace("protocol: TCP", "protocol: UDP");
    let (cluster, dir) = setup(&[udp]);
    let mut agents = agents(&cluster, &dir);
    let frontend = SocketAddrV4::new(NODE_A_CLIENT_IP, 30105);
    // The connected socket only takes answers from the frontend: the reply was translated
    // back on node A.
    let (pod, seen) = wait_for(
        "UDP NodePort on node A to answer",
        Duration::from_secs(20),
        || {
            agents.iter_mut().for_each(NodeAgent::assert_running);
            udp_peer(&cluster.client_a, frontend, Duration::from_millis(300)).ok()
        },
    );
    assert_eq!(pod, "pod-b");
    assert_eq!(ip(seen), NODE_A_IP, "pod-b saw {seen}");
    assert_snat_port(seen);
    // Every new socket is a new flow with a SNAT port of its own.
    let sock_seen: BTreeSet<SocketAddr> = (0..3)
        .map(|_| {
            udp_peer(&cluster.client_a, frontend, Duration::from_secs(2))
                .expect("UDP answer")
                .1
        })
        .collect();
    assert_eq!(
        sock_seen.len(),
        3,
        "three sockets, three flows: {sock_seen:?}"
    );
}
