//! End to end in API mode: the real agent in the node namespace watches the fake API server
//! (127.0.0.1:6443 inside that namespace) and drives the real datapath. Needs root.

use std::{
    collections::BTreeSet,
    io,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use svc_lb::maps::{BpfLbMaps, LbMaps as _, Op};
use svc_lb_tests::{
    client,
    kube_agent::{KubeAgent, NODE_NAME, serve_in_node},
    kube_api::FakeApi,
    kube_objects::{Endpoint, endpoint_slice, node, service},
    manifests::{FRONTEND_PORTS, FRONTEND_VIP, WEB_NODE_PORT, WEB_PORTS, WEB_VIP},
    netns::{NODE_IP, Topology},
    wait_for,
};

fn frontend() -> SocketAddr {
    SocketAddr::from((FRONTEND_VIP, 80))
}

fn slice(topo: &Topology, service: &str, pods: &[&str]) -> serde_json::Value {
    let ports: &[_] = if service == "web-service" {
        &WEB_PORTS
    } else {
        &FRONTEND_PORTS
    };
    let eps: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::ready(topo.pod(p).ip, p))
        .collect();
    endpoint_slice(service, &format!("{service}-x7k2p"), "IPv4", ports, &eps)
}

/// frontend-svc on `pods`, web-service (NodePort 30080) on every pod, and this node with
/// InternalIP 172.31.0.1 (the agent gets no --node-ip for it: it comes from the Node object).
fn cluster(topo: &Topology, pods: &[&str]) -> FakeApi {
    let api = FakeApi::new();
    api.apply(service(
        "frontend-svc",
        &[&FRONTEND_VIP.to_string()],
        ("app", "frontend"),
        &FRONTEND_PORTS,
    ));
    api.apply(slice(topo, "frontend-svc", pods));
    api.apply(service(
        "web-service",
        &[&WEB_VIP.to_string()],
        ("k8s-app", "webserver"),
        &WEB_PORTS,
    ));
    api.apply(slice(topo, "web-service", &["pod-a", "pod-b", "pod-c"]));
    api.apply(node(NODE_NAME, &NODE_IP.to_string()));
    api
}

fn topology() -> Topology {
    let topo = Topology::new(3);
    topo.start_echo_servers();
    topo
}

/// Agent flags: a node IP that is not the client-facing one, so NodePort on 172.31.0.1 only
/// works through the Node object; a short resync for the drift test.
const ARGS: &[&str] = &["--node-ip", "10.244.1.1", "--resync-interval", "1s"];

fn wait_serving(topo: &Topology, agent: &mut KubeAgent<'_>) {
    wait_for(
        "frontend-svc to answer through svc-lb (API mode)",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            client::http_get_within(&topo.client, frontend(), Duration::from_millis(300)).ok()
        },
    );
}

/// Backends seen over `n` new connections (every request must succeed).
fn backends(topo: &Topology, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            client::http_get(&topo.client, frontend())
                .unwrap_or_else(|e| panic!("request {i} to frontend-svc: {e}"))
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Polls until `n` consecutive new connections land only on `want`, returning the time taken.
fn converge_to(
    topo: &Topology,
    agent: &mut KubeAgent<'_>,
    want: &[&str],
    limit: Duration,
) -> Duration {
    let want = set(want);
    let t0 = Instant::now();
    let mut streak = 0;
    let mut seen = BTreeSet::new();
    while streak < 15 {
        agent.assert_running();
        assert!(
            t0.elapsed() < limit,
            "backends did not become {want:?} within {limit:?} (last seen {seen:?})"
        );
        match client::http_get_within(&topo.client, frontend(), Duration::from_millis(500)) {
            Ok(n) if want.contains(&n) => {
                streak += 1;
                seen.insert(n);
            }
            Ok(n) => {
                streak = 0;
                seen = BTreeSet::from([n]);
            }
            Err(_) => streak = 0,
        }
    }
    t0.elapsed()
}

#[test]
fn api_mode_create_scale_delete_and_nodeport_from_node_object() {
    let topo = topology();
    let api = cluster(&topo, &["pod-a"]);
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(&topo, ARGS);
    wait_serving(&topo, &mut agent);
    assert_eq!(agent.health("/healthz"), Some(200));
    assert_eq!(agent.health("/livez"), Some(200));
    assert_eq!(backends(&topo, 10), set(&["pod-a"]));

    // NodePort on the Node object's InternalIP.
    let np = SocketAddr::from((NODE_IP, WEB_NODE_PORT));
    let name = client::http_get(&topo.client, np).expect("NodePort via the Node's InternalIP");
    assert!(name.starts_with("pod-"), "{name}");

    // Scale up: the slice gains pod-b and pod-c; new connections reach them within 1 s.
    api.apply(slice(&topo, "frontend-svc", &["pod-a", "pod-b", "pod-c"]));
    let t0 = Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "scale-up not followed within 1 s: {seen:?}"
        );
        if let Ok(n) = client::http_get(&topo.client, frontend()) {
            seen.insert(n);
        }
    }
    eprintln!("scale-up followed after {:?}", t0.elapsed());

    // Scale down to pod-c: from 1 s on, nothing else is chosen.
    api.apply(slice(&topo, "frontend-svc", &["pod-c"]));
    thread::sleep(Duration::from_secs(1));
    assert_eq!(backends(&topo, 20), set(&["pod-c"]), "scale-down after 1 s");

    // The slice is deleted (no endpoints left): new connections are refused (ICMP port
    // unreachable, like kube-proxy's REJECT) within 1 s.
    api.delete("EndpointSlice", Some("default"), "frontend-svc-x7k2p");
    let t0 = Instant::now();
    wait_for(
        "frontend-svc to be refused",
        Duration::from_secs(1),
        || match client::http_get_within(&topo.client, frontend(), Duration::from_millis(300)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        },
    );
    eprintln!("endpoints removal followed after {:?}", t0.elapsed());
    // The Service is deleted: its frontend is gone from the maps (nothing answers any more),
    // unless a TCP flow that still looks established names it (one of the connections above
    // that timed out can leave one): then it stays without backends until that flow ends,
    // like a removed pod's backend drains, and the agent says so.
    let log_before = agent.log_text().len();
    api.delete("Service", Some("default"), "frontend-svc");
    wait_for(
        "frontend-svc frontend removed (or draining)",
        Duration::from_secs(1),
        || {
            let out = agent.cli(&["debug", "services", "-o", "json"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let draining = agent.log_text()[log_before..].lines().any(|l| {
                l.contains("removed frontend kept without backends")
                    && l.contains("10.96.0.10:80/TCP")
            });
            (out.status.success() && (!text.contains("10.96.0.10") || draining)).then_some(())
        },
    );
    assert!(client::connect(&topo.client, frontend(), Duration::from_millis(500)).is_err());
    // The other Service is untouched.
    client::http_get(&topo.client, np).expect("NodePort still served");
    agent.assert_running();
}

#[test]
fn api_mode_watch_drop_and_410_relist_converge() {
    let topo = topology();
    let api = cluster(&topo, &["pod-a", "pod-b"]);
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(&topo, ARGS);
    wait_serving(&topo, &mut agent);

    // Connections cut; a change while the watch reconnects still arrives (resumed watch).
    api.drop_watches();
    api.apply(slice(&topo, "frontend-svc", &["pod-c"]));
    let took = converge_to(&topo, &mut agent, &["pod-c"], Duration::from_secs(5));
    eprintln!("after a dropped watch: converged in {took:?}");

    // 410 Gone and compacted history: the agent re-lists, and the change made meanwhile
    // (visible only in the new list) is programmed.
    api.expire_watches();
    api.apply(slice(&topo, "frontend-svc", &["pod-a"]));
    api.compact();
    let took = converge_to(&topo, &mut agent, &["pod-a"], Duration::from_secs(8));
    eprintln!("after 410 Gone: converged in {took:?}");
    let log = agent.log_text();
    assert!(
        log.contains("re-listed"),
        "no re-list in the agent log:\n{log}"
    );
    assert_eq!(agent.health("/healthz"), Some(200));
}

#[test]
fn api_unreachable_at_start_keeps_pinned_maps_then_converges() {
    let topo = topology();
    let api = cluster(&topo, &["pod-a", "pod-b", "pod-c"]);
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(&topo, ARGS);
    wait_serving(&topo, &mut agent);
    let mut kept = client::HttpConn::connect(&topo.client, frontend()).expect("keep-alive");
    let kept_name = kept.get().expect("first request");

    // The agent dies, the API server goes away, and the cluster changes meanwhile.
    agent.kill_hard();
    drop(api);
    thread::sleep(Duration::from_millis(100));
    let api = cluster(&topo, &["pod-a"]);

    agent.restart();
    // Unreachable API: the agent waits (no crash), reports not ready, and the maps keep
    // what was programmed: all three pods still answer, the kept connection still works.
    thread::sleep(Duration::from_millis(1500));
    agent.assert_running();
    assert_eq!(agent.health("/healthz"), Some(503));
    assert_eq!(agent.health("/livez"), Some(200));
    let seen = backends(&topo, 30);
    assert!(
        seen.len() >= 2,
        "maps changed while the API was down: {seen:?}"
    );
    assert_eq!(kept.get().expect("kept connection"), kept_name);

    // The API server comes up: the agent lists and converges.
    serve_in_node(&topo, &api);
    let took = converge_to(&topo, &mut agent, &["pod-a"], Duration::from_secs(12));
    eprintln!("converged {took:?} after the API server came up");
    wait_for("healthz 200", Duration::from_secs(2), || {
        (agent.health("/healthz") == Some(200)).then_some(())
    });
    let log = agent.log_text();
    assert!(
        log.contains("watch failed, retrying with backoff"),
        "no retry logged:\n{log}"
    );
}

#[test]
fn api_mode_resync_repairs_a_hand_deleted_map_entry() {
    let topo = topology();
    let api = cluster(&topo, &["pod-a", "pod-b"]);
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(&topo, ARGS);
    wait_serving(&topo, &mut agent);
    // The watch queues one change signal when its initial lists finish; wait for a periodic
    // resync first so that sync cannot be the one that repairs the entry below.
    wait_for(
        "a periodic resync after start-up",
        Duration::from_secs(5),
        || agent.log_text().contains("trigger=rescan").then_some(()),
    );
    let log_before = agent.log_text().len();

    // Someone deletes frontend-svc's slot-0 entry by hand: the frontend stops working.
    let mut maps = BpfLbMaps::open(&agent.pin_dir).expect("open pinned maps");
    let state = maps.dump().expect("dump");
    let key = *state
        .services
        .keys()
        .find(|k| k.backend_slot == 0 && k.ip() == FRONTEND_VIP && k.port() == 80)
        .expect("frontend-svc slot 0 programmed");
    maps.apply(&Op::DeleteService(key)).expect("delete entry");
    assert!(!maps.dump().unwrap().services.contains_key(&key));

    // No watch event happens; the periodic resync (1 s here) puts it back.
    let t0 = Instant::now();
    wait_for(
        "the deleted entry to be restored",
        Duration::from_secs(3),
        || {
            maps.dump()
                .unwrap()
                .services
                .contains_key(&key)
                .then_some(())
        },
    );
    eprintln!("drift repaired after {:?}", t0.elapsed());
    converge_to(
        &topo,
        &mut agent,
        &["pod-a", "pod-b"],
        Duration::from_secs(2),
    );
    let log = agent.log_text();
    let repair: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.contains("synced "))
        .collect();
    assert!(
        !repair.is_empty() && repair.iter().all(|l| l.contains("trigger=rescan")),
        "repair not done by the periodic resync: {repair:?}"
    );
}

#[test]
fn api_mode_restart_adopts_the_maps_and_keeps_established_connections() {
    let topo = topology();
    let api = cluster(&topo, &["pod-a", "pod-b", "pod-c"]);
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(&topo, ARGS);
    wait_serving(&topo, &mut agent);
    let mut conn = client::HttpConn::connect(&topo.client, frontend()).expect("keep-alive");
    let backend = conn.get().expect("first request");

    agent.restart();
    // While the new agent loads, lists and reconciles, the connection keeps its backend and
    // new connections keep working.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        assert_eq!(
            conn.get().expect("keep-alive request across the restart"),
            backend,
            "established connection moved after {:?}",
            t0.elapsed()
        );
        client::http_get(&topo.client, frontend()).expect("new connection across the restart");
        thread::sleep(Duration::from_millis(50));
    }
    wait_for("healthz 200 after restart", Duration::from_secs(5), || {
        (agent.health("/healthz") == Some(200)).then_some(())
    });
    // Nothing changed in the cluster: the restarted agent adopted every id and wrote nothing.
    let log = agent.log_text();
    let last_startup = log
        .lines()
        .rfind(|l| l.contains("trigger=startup"))
        .expect("startup sync logged");
    assert!(last_startup.contains("(0 ops)"), "{last_startup}");

    // And it follows the cluster again: scale to the kept connection's backend only.
    api.apply(slice(&topo, "frontend-svc", &[backend.as_str()]));
    converge_to(
        &topo,
        &mut agent,
        &[backend.as_str()],
        Duration::from_secs(3),
    );
    assert_eq!(conn.get().expect("kept connection after scaling"), backend);
}

#[test]
fn bad_kubeconfig_fails_before_touching_the_node() {
    let dir = std::env::temp_dir().join(format!("svc-lb-badkc-{}", std::process::id()));
    let pin_dir = dir.join("pins");
    let out = std::process::Command::new(svc_lb_tests::bin_path("svc-lb", "SVC_LB_BIN"))
        .args(["run", "--iface", "lo", "--node-ip", "192.0.2.1"])
        .args(["--kubeconfig", "/nonexistent/svc-lb-kubeconfig"])
        .arg("--pin-dir")
        .arg(&pin_dir)
        .env("RUST_LOG", "info")
        .output()
        .expect("run svc-lb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot read kubeconfig /nonexistent/svc-lb-kubeconfig"),
        "{stderr}"
    );
    assert!(!pin_dir.exists(), "the datapath was loaded anyway");
}
