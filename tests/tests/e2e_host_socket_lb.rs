//! Socket LB: processes of the node itself (node network namespace) reach Services through the
//! cgroup connect4/sendmsg4/recvmsg4/getpeername4 programs, which TC ingress cannot do for
//! locally originated traffic.
//!
//! The agent attaches to a child cgroup made for the test (never the machine's root cgroup:
//! that would balance every process of the machine), and the client runs as a separate process
//! placed in that cgroup before it executes.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use svc_lb_tests::{
    agent::AgentGuard,
    cgroup::{TestCgroup, attached_progs},
    fixture,
    manifests::{self, FRONTEND_PORTS, FRONTEND_VIP},
    netns::{NODE_IP, Netns},
    wait_for,
};

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs the client `count` times in one process and returns the backend names, checking every
/// line starts with `<key>=<frontend>` (the application must only ever see the frontend).
fn answers(
    cg: &TestCgroup,
    ns: &Netns,
    mode: &str,
    frontend: &str,
    key: &str,
    count: usize,
) -> Vec<String> {
    let out = cg.client(ns, true, &[mode, frontend, &count.to_string()]);
    let ls = lines(&out);
    assert!(
        out.status.success() && ls.len() == count,
        "{mode} {frontend}: {ls:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ls.iter()
        .map(|l| {
            let prefix = format!("{key}={frontend} body=");
            l.strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{mode} {frontend}: expected {prefix}..., got {l:?}"))
                .to_owned()
        })
        .collect()
}

fn all_pods() -> BTreeSet<String> {
    ["pod-a", "pod-b", "pod-c"].map(String::from).into()
}

fn sock_pins(pin_dir: &Path) -> Vec<PathBuf> {
    ["connect4", "sendmsg4", "recvmsg4", "getpeername4"]
        .iter()
        .map(|h| pin_dir.join("links").join(format!("sock-{h}")))
        .collect()
}

#[test]
fn node_processes_reach_services_and_see_the_frontend_as_peer() {
    let (topo, dir) = fixture::standard();
    let cg = TestCgroup::new(&topo.prefix);
    let cg_path = cg.path.to_string_lossy().into_owned();
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--cgroup-path", &cg_path]);
    fixture::wait_serving(&topo, &mut agent);
    for pin in sock_pins(&agent.pin_dir) {
        assert!(pin.exists(), "{} missing", pin.display());
    }
    let vip = format!("{FRONTEND_VIP}:80");

    // TCP: balanced over every backend; getpeername says ClusterIP.
    let seen: BTreeSet<String> = answers(&cg, &topo.node, "tcp", &vip, "peer", 30)
        .into_iter()
        .collect();
    assert_eq!(seen, all_pods(), "TCP from the node was not balanced");

    // Unconnected UDP: sendmsg4 picks a backend per datagram, recvmsg4 shows the frontend as
    // the reply's source.
    let dns = format!("{}:53", manifests::DNS_VIP);
    let seen: BTreeSet<String> = answers(&cg, &topo.node, "udp", &dns, "from", 30)
        .into_iter()
        .collect();
    assert_eq!(
        seen,
        all_pods(),
        "unconnected UDP from the node was not balanced"
    );
    // Connected UDP: connect4 + getpeername4.
    answers(&cg, &topo.node, "udp-connected", &dns, "peer", 3);

    // NodePort on the node's own address.
    let np = format!("{NODE_IP}:{}", manifests::WEB_NODE_PORT);
    let seen: BTreeSet<String> = answers(&cg, &topo.node, "tcp", &np, "peer", 10)
        .into_iter()
        .collect();
    assert!(!seen.is_empty());

    // Control: the same client outside the cgroup has no way to the ClusterIP (the node has
    // no route for it), so the answers above came through the socket LB.
    let out = cg.client(&topo.node, false, &["tcp", &vip]);
    assert!(!out.status.success(), "{:?}", lines(&out));

    // sessionAffinity ClientIP: the node's processes share their client (the network
    // namespace), so every new connection goes to the same backend.
    let pods: Vec<_> = topo.pods.iter().collect();
    dir.write(
        "services.yaml",
        &manifests::standard(&pods).replacen(
            "  sessionAffinity: None\n",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n",
            1,
        ),
    );
    let sticky = wait_for(
        "host connections to frontend-svc to stick to one backend",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            let got = answers(&cg, &topo.node, "tcp", &vip, "peer", 8);
            got.iter().all(|b| *b == got[0]).then(|| got[0].clone())
        },
    );
    let got = answers(&cg, &topo.node, "tcp", &vip, "peer", 20);
    assert!(got.iter().all(|b| *b == sticky), "affinity broken: {got:?}");

    // No backends: connect fails at once with ECONNREFUSED (no SYN timeout).
    let slices = manifests::endpoint_slice("frontend-svc", &FRONTEND_PORTS, &[]);
    let others = manifests::standard(&pods).replace(
        &manifests::endpoint_slice("frontend-svc", &FRONTEND_PORTS, &pods),
        &slices,
    );
    dir.write("services.yaml", &others);
    wait_for(
        "connects to the backendless frontend-svc to be refused",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            let out = cg.client(&topo.node, true, &["tcp", &vip]);
            (lines(&out) == ["error=ECONNREFUSED"]).then_some(())
        },
    );
    let start = Instant::now();
    let out = cg.client(&topo.node, true, &["tcp", &vip]);
    assert_eq!(lines(&out), ["error=ECONNREFUSED"]);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refusal took {:?}",
        start.elapsed()
    );

    // Uninstall detaches the cgroup programs: the ClusterIP is unreachable again.
    let out = agent.shutdown();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cg.client(&topo.node, true, &["udp-connected", &dns]);
    assert!(
        !out.status.success(),
        "still balanced after uninstall: {:?}",
        lines(&out)
    );
}

#[test]
fn a_restarted_agent_keeps_one_set_of_socket_links_and_no_socket_lb_detaches_them() {
    let (topo, dir) = fixture::standard();
    let cg = TestCgroup::new(&topo.prefix);
    let cg_path = cg.path.to_string_lossy().into_owned();
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--cgroup-path", &cg_path]);
    fixture::wait_serving(&topo, &mut agent);
    let dns = format!("{}:53", manifests::DNS_VIP);
    answers(&cg, &topo.node, "udp-connected", &dns, "peer", 1);

    // kill -9 and restart: the pinned links kept balancing meanwhile, the new agent replaces
    // them (one program per hook afterwards, checked through the kernel's view).
    agent.kill_hard();
    answers(&cg, &topo.node, "udp", &dns, "from", 3);
    agent.restart();
    // Traffic alone proves nothing (the pinned links served meanwhile): wait for the new
    // agent's own attach.
    wait_for(
        "the restarted agent to attach its socket LB",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            (agent.log_text().matches("socket LB attached").count() == 2).then_some(())
        },
    );
    answers(&cg, &topo.node, "udp", &dns, "from", 3);
    let attached = attached_progs(&cg.path);
    assert_eq!(
        attached,
        ["connect4", "getpeername4", "recvmsg4", "sendmsg4"]
            .map(String::from)
            .to_vec(),
        "expected exactly one program per hook on {}",
        cg.path.display()
    );
    assert_eq!(sock_pin_count(&agent.pin_dir), 4);

    // The next agent runs with --no-socket-lb (what AgentGuard passes without --cgroup-path):
    // it detaches its predecessor's socket LB but keeps serving through TC.
    agent.stop();
    let mut plain = AgentGuard::start(&topo, &dir.path);
    wait_for(
        "the --no-socket-lb agent to detach the socket LB",
        Duration::from_secs(10),
        || {
            plain.assert_running();
            (sock_pin_count(&plain.pin_dir) == 0).then_some(())
        },
    );
    fixture::wait_serving(&topo, &mut plain);
    assert!(
        attached_progs(&cg.path).is_empty(),
        "{:?}",
        attached_progs(&cg.path)
    );
    let out = cg.client(&topo.node, true, &["udp-connected", &dns]);
    assert!(!out.status.success(), "still balanced: {:?}", lines(&out));
    assert!(plain.log_text().contains("socket LB detached"));
}

fn sock_pin_count(pin_dir: &Path) -> usize {
    fs::read_dir(pin_dir.join("links"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("sock-"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// externalTrafficPolicy Local does not restrict the node's own processes (kube-proxy sends
/// locally originated traffic to the Service's cluster chain): a NodePort whose endpoints are
/// all on another node answers them through the socket LB, from any of those endpoints.
#[test]
fn node_processes_reach_a_local_policy_node_port_without_local_endpoints() {
    use svc_lb_tests::manifests::Port;

    let (topo, dir) = fixture::standard();
    let cg = TestCgroup::new(&topo.prefix);
    let cg_path = cg.path.to_string_lossy().into_owned();
    let ports = [Port {
        node_port: Some(30184),
        ..Port::tcp("http", 80, 5000)
    }];
    let pods: Vec<_> = topo.pods.iter().collect();
    let svc = manifests::service(
        "remote-local",
        "10.96.0.84".parse().unwrap(),
        ("app", "frontend"),
        &ports,
    )
    .replace(
        "  sessionAffinity: None\n",
        "  sessionAffinity: None\n  externalTrafficPolicy: Local\n",
    );
    // Every endpoint on node-2.
    let slice = manifests::endpoint_slice("remote-local", &ports, &pods)
        .replace("nodeName: node-1\n", "nodeName: node-2\n");
    dir.write("remote-local.yaml", &manifests::join(&[svc, slice]));
    let mut agent = AgentGuard::start_with(
        &topo,
        &dir.path,
        &["--cgroup-path", &cg_path, "--node-name", "node-1"],
    );
    fixture::wait_serving(&topo, &mut agent);
    let out = agent.cli(&["debug", "services"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("NodePort local"), "{table}");

    let np = format!("{NODE_IP}:30184");
    let seen: BTreeSet<String> = wait_for(
        "the node's connections to the Local NodePort to be answered",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            let out = cg.client(&topo.node, true, &["tcp", &np, "12"]);
            out.status
                .success()
                .then(|| answers(&cg, &topo.node, "tcp", &np, "peer", 20))
        },
    )
    .into_iter()
    .collect();
    assert!(seen.is_subset(&all_pods()), "{seen:?}");
    assert!(seen.len() >= 2, "one endpoint only: {seen:?}");
}
