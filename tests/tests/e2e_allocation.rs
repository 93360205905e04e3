//! End to end (issue 11): standalone mode allocates like an API server. The tutorial's two
//! files, verbatim (no clusterIP, no nodePort), get a ClusterIP and a NodePort and answer, on
//! the same addresses after a restart; a newcomer asking for a live Service's address never
//! interrupts it, not even for one request. Needs root.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use svc_lb_tests::{
    agent::AgentGuard,
    bin_path, client,
    manifests::{self, ManifestDir},
    netns::{NODE_IP, Topology},
    wait_for,
};

const FRONTEND_SVC: &str = include_str!("../../examples/tutorial/frontend-svc.yml");
const WEB_SERVICE: &str = include_str!("../../examples/tutorial/web-service.yml");
/// Connect/read timeout while polling.
const POLL: Duration = Duration::from_millis(300);

/// Three echo pods (HTTP on 5000 and 80, plus 8080: web-service's targetPort defaults to its
/// port), their Pod objects, and a state directory for the agent's record.
fn setup() -> (Topology, ManifestDir, PathBuf) {
    let topo = Topology::new(3);
    topo.start_echo_servers();
    let bin = bin_path("svc-lb-echo", "SVC_LB_ECHO_BIN");
    for pod in &topo.pods {
        let mut cmd = Command::new(&bin);
        cmd.args(["--name", &pod.name, "--tcp", "0.0.0.0:8080"]);
        topo.spawn_ready(&pod.ns, &format!("echo8080-{}", pod.name), cmd);
    }
    let dir = ManifestDir::new(&topo.dir);
    let pods: Vec<_> = topo.pods.iter().collect();
    dir.write("pods.yaml", &manifests::pods(&pods));
    let state = topo.dir.join("state");
    (topo, dir, state)
}

fn start<'t>(topo: &'t Topology, dir: &ManifestDir, state: &Path) -> AgentGuard<'t> {
    let state = state.to_str().expect("UTF-8 state dir");
    AgentGuard::start_with(topo, &dir.path, &["--state-dir", state])
}

/// The agent's record (`<state>/allocations.json`), once it lists every one of `services`.
fn record(state: &Path, services: &[&str], agent: &mut AgentGuard<'_>) -> serde_json::Value {
    let file = state.join("allocations.json");
    wait_for("the allocation record", Duration::from_secs(20), || {
        agent.assert_running();
        let rec: serde_json::Value = serde_json::from_str(&fs::read_to_string(&file).ok()?).ok()?;
        services
            .iter()
            .all(|s| rec["services"].get(s).is_some())
            .then_some(rec)
    })
}

fn cluster_ip(rec: &serde_json::Value, service: &str) -> Ipv4Addr {
    let ip = rec["services"][service]["cluster_ips"][0]
        .as_str()
        .unwrap_or_else(|| panic!("{service} has no ClusterIP in {rec}"));
    ip.parse().expect("an IPv4 ClusterIP")
}

/// Waits until `addr` answers (a pod's name), failing early if the agent exits.
fn wait_answers(topo: &Topology, agent: &mut AgentGuard<'_>, addr: SocketAddr) -> String {
    wait_for(
        &format!("{addr} to answer"),
        Duration::from_secs(20),
        || {
            agent.assert_running();
            client::http_get_within(&topo.client, addr, POLL).ok()
        },
    )
}

fn in_default_range(ip: Ipv4Addr) -> bool {
    // 10.96.0.0/12 without its network, broadcast and first (kubernetes) addresses.
    let n = u32::from(ip);
    let (net, last) = (
        u32::from(Ipv4Addr::new(10, 96, 0, 0)),
        u32::from(Ipv4Addr::new(10, 111, 255, 255)),
    );
    n > net + 1 && n < last
}

#[test]
fn tutorial_files_get_a_cluster_ip_and_a_node_port_and_answer() {
    let (topo, dir, state) = setup();
    dir.write("frontend-svc.yml", FRONTEND_SVC);
    dir.write("web-service.yml", WEB_SERVICE);
    let mut agent = start(&topo, &dir, &state);
    let services = ["default/frontend-svc", "default/web-service"];
    let rec = record(&state, &services, &mut agent);

    let frontend = cluster_ip(&rec, "default/frontend-svc");
    let web = cluster_ip(&rec, "default/web-service");
    assert!(in_default_range(frontend), "frontend-svc got {frontend}");
    assert!(in_default_range(web), "web-service got {web}");
    assert_ne!(frontend, web);
    let node_port = rec["services"]["default/web-service"]["node_ports"][0]["node_port"]
        .as_u64()
        .unwrap_or_else(|| panic!("web-service has no node port in {rec}"))
        as u16;
    assert!((30000..=32767).contains(&node_port), "{node_port}");
    assert!(
        rec["services"]["default/frontend-svc"]
            .get("node_ports")
            .is_none()
    );

    // All three frontends answer, from the pods the selectors pick.
    let pods: Vec<&str> = topo.pods.iter().map(|p| p.name.as_str()).collect();
    for addr in [
        SocketAddr::from((frontend, 80)),
        SocketAddr::from((web, 8080)),
        SocketAddr::from((NODE_IP, node_port)),
    ] {
        let name = wait_answers(&topo, &mut agent, addr);
        assert!(pods.contains(&name.as_str()), "{addr} answered {name:?}");
    }

    // A restart (and a rewrite of the same files) keeps every address.
    agent.restart();
    dir.write("frontend-svc.yml", FRONTEND_SVC);
    wait_answers(&topo, &mut agent, SocketAddr::from((frontend, 80)));
    wait_answers(&topo, &mut agent, SocketAddr::from((NODE_IP, node_port)));
    let again = record(&state, &services, &mut agent);
    assert_eq!(again, rec, "the record changed across a restart");

    // `debug services` shows what was allocated.
    let out = agent.cli(&["debug", "services"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{frontend}:80")), "{text}");
    assert!(text.contains(&format!(":{node_port}")), "{text}");
    agent.assert_running();
}

#[test]
fn a_conflicting_newcomer_never_interrupts_the_first_owner() {
    let (topo, dir, state) = setup();
    dir.write("frontend-svc.yml", FRONTEND_SVC);
    let mut agent = start(&topo, &dir, &state);
    let rec = record(&state, &["default/frontend-svc"], &mut agent);
    let owned = cluster_ip(&rec, "default/frontend-svc");
    let addr = SocketAddr::from((owned, 80));
    wait_answers(&topo, &mut agent, addr);

    // A stream (one keep-alive connection) to the owner, kept busy while the newcomer comes.
    let mut stream = client::HttpConn::connect(&topo.client, addr).expect("connect frontend-svc");
    stream.get().expect("first request on the stream");
    // `default/aaa-dup` sorts before `frontend-svc` and asks for its address; it selects no
    // pod, so had it taken the address, new connections would be refused.
    let newcomer = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: aaa-dup\nspec:\n  clusterIP: {owned}\n  \
         selector:\n    app: nothing\n  ports:\n  - port: 80\n    targetPort: 5000\n"
    );
    dir.write("aaa-dup.yaml", &newcomer);
    let t0 = Instant::now();
    let mut requests = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        stream.get().unwrap_or_else(|e| {
            panic!(
                "the stream broke {:?} after the newcomer: {e}",
                t0.elapsed()
            )
        });
        client::http_get(&topo.client, addr).unwrap_or_else(|e| {
            panic!(
                "a new connection failed {:?} after the newcomer: {e}",
                t0.elapsed()
            )
        });
        requests += 2;
    }
    eprintln!("{requests} requests to the first owner while the newcomer was read");

    // The newcomer is refused with one error naming both objects and both files, and holds
    // nothing.
    let log = wait_for("the conflict to be logged", Duration::from_secs(5), || {
        let log = agent.log_text();
        log.contains("aaa-dup.yaml").then_some(log)
    });
    let line = log
        .lines()
        .find(|l| l.contains("aaa-dup.yaml") && l.contains("already used by"))
        .unwrap_or_else(|| panic!("no conflict error in the log:\n{log}"));
    assert!(line.contains("Service default/aaa-dup"), "{line}");
    assert!(line.contains("Service default/frontend-svc"), "{line}");
    assert!(line.contains("frontend-svc.yml"), "{line}");
    assert!(line.contains(&owned.to_string()), "{line}");
    let rec = record(
        &state,
        &["default/frontend-svc", "default/aaa-dup"],
        &mut agent,
    );
    assert_eq!(cluster_ip(&rec, "default/frontend-svc"), owned);
    assert!(
        rec["services"]["default/aaa-dup"]
            .get("cluster_ips")
            .is_none(),
        "{rec}"
    );

    // A restart with both files present: the owner is still the owner.
    agent.restart();
    wait_answers(&topo, &mut agent, addr);
    for i in 0..20 {
        client::http_get(&topo.client, addr)
            .unwrap_or_else(|e| panic!("request {i} after the restart: {e}"));
    }
    let rec = record(&state, &["default/frontend-svc"], &mut agent);
    assert_eq!(cluster_ip(&rec, "default/frontend-svc"), owned);
    assert!(matches!(IpAddr::from(owned), IpAddr::V4(_)));
    agent.assert_running();
}
