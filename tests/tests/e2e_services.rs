//! End to end: the real `svc-lb run` agent in a node namespace, real echo servers in pod
//! namespaces, real traffic from a client namespace. Needs root; fails (never skips) otherwise.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    path::Path,
    process::Command,
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

/// The datapath logs each new connection at debug level. At the agent's default `info` filter
/// the record must not even be written: the agent sets aya-log's `AYA_LOG_LEVEL` in the loaded
/// program, so it is read back from the attached program's `.rodata`.
#[test]
fn kernel_log_level_follows_the_agent_log_filter() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);
    let new_flows = |agent: &AgentGuard| agent.log_text().matches("new flow").count();
    // The previous agent's program serves until the new one replaced it in the pinned links.
    let loaded = |agent: &AgentGuard, n: usize| {
        svc_lb_tests::wait_for(
            "the restarted agent's program",
            Duration::from_secs(10),
            || (agent.log_text().matches("dataplane loaded").count() >= n).then_some(()),
        )
    };

    // The tests' default filter (`svc_lb=debug`) covers the datapath's records.
    assert_eq!(kernel_log_level(&agent.pin_dir), 4, "debug");
    for i in 0..3 {
        client::http_get(&topo.client, fixture::frontend())
            .unwrap_or_else(|e| panic!("request {i} to frontend-svc: {e}"));
    }
    svc_lb_tests::wait_for("debug records of new flows", Duration::from_secs(5), || {
        (new_flows(&agent) >= 3).then_some(())
    });

    agent.set_log_filter("info");
    agent.restart();
    loaded(&agent, 2);
    fixture::wait_serving(&topo, &mut agent);
    assert_eq!(kernel_log_level(&agent.pin_dir), 3, "info");
    client::http_get(&topo.client, fixture::frontend()).expect("request after the restart");

    // "dataplane loaded" is an info line: keep it visible.
    agent.set_log_filter("warn,svc_lb::dataplane=info,svc_lb::tc=trace");
    agent.restart();
    loaded(&agent, 3);
    fixture::wait_serving(&topo, &mut agent);
    assert_eq!(kernel_log_level(&agent.pin_dir), 5, "trace for one module");
}

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// `AYA_LOG_LEVEL` of the TC program attached through the agent's first pinned link, located
/// with the program's BTF (its offset in `.rodata`).
fn kernel_log_level(pin_dir: &Path) -> u8 {
    let link = std::fs::read_dir(pin_dir.join("links"))
        .expect("links dir")
        .map(|e| e.expect("dir entry").path())
        .find(|p| p.to_string_lossy().ends_with("-tc-ingress"))
        .expect("a pinned TC link");
    let link = bpftool_json(&["link", "show", "pinned", link.to_str().unwrap()]);
    let prog = bpftool_json(&["prog", "show", "id", &link["prog_id"].to_string()]);
    let btf = bpftool_json(&["btf", "dump", "id", &prog["btf_id"].to_string()]);
    let types = btf["types"].as_array().expect("BTF types");
    let var = types
        .iter()
        .find(|t| t["kind"] == "VAR" && t["name"] == "AYA_LOG_LEVEL")
        .expect("AYA_LOG_LEVEL in the program's BTF")["id"]
        .clone();
    let offset = types
        .iter()
        .find(|t| t["kind"] == "DATASEC" && t["name"] == ".rodata")
        .and_then(|t| t["vars"].as_array())
        .and_then(|vars| vars.iter().find(|v| v["type_id"] == var))
        .expect("AYA_LOG_LEVEL in .rodata")["offset"]
        .as_u64()
        .unwrap() as usize;
    let rodata = prog["map_ids"]
        .as_array()
        .expect("map ids")
        .iter()
        .map(|id| id.to_string())
        .find(|id| bpftool_json(&["map", "show", "id", id])["name"] == ".rodata")
        .expect("the program's .rodata map");
    let dump = bpftool_json(&["map", "dump", "id", &rodata]);
    let byte = dump[0]["value"][offset].as_str().expect("value byte");
    u8::from_str_radix(byte.trim_start_matches("0x"), 16).unwrap()
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
