//! `--iface` patterns: an interface created after the agent started (a new pod's veth) gets the
//! datapath, and deleting it leaves no pinned link behind.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use svc_lb_tests::{
    agent::AgentGuard,
    bin_path, client, fixture,
    manifests::{self, FRONTEND_PORTS, FRONTEND_VIP},
    netns::{Netns, Pod, Topology},
    wait_for,
};

/// Node-side name of the late pod's veth: only the agent's `lxc*` pattern covers it.
const LATE_IFACE: &str = "lxc-late1";
const LATE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 2);

/// A pod namespace + veth created after the agent started; deleted on drop (the veth goes with
/// the namespace's peer).
struct LatePod {
    pod: Pod,
    node: Netns,
}

impl LatePod {
    fn create(topo: &Topology) -> LatePod {
        let late = LatePod {
            pod: Pod {
                name: "pod-late".into(),
                ns: Netns {
                    name: format!("{}-pod-late", topo.prefix),
                },
                ip: LATE_IP,
                node_iface: LATE_IFACE.into(),
            },
            node: topo.node.clone(),
        };
        ip(&["netns", "add", &late.pod.ns.name]);
        let (node, ns) = (late.node.name.as_str(), late.pod.ns.name.as_str());
        ip(&[
            "-n", node, "link", "add", LATE_IFACE, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            "10.244.9.1/24",
            "dev",
            LATE_IFACE,
        ]);
        ip(&["-n", node, "link", "set", LATE_IFACE, "up"]);
        ip(&["-n", ns, "addr", "add", "10.244.9.2/24", "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "route", "add", "default", "via", "10.244.9.1"]);
        late
    }

    fn delete_veth(&self) {
        ip(&["-n", &self.node.name, "link", "del", LATE_IFACE]);
    }
}

impl Drop for LatePod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pod.ns.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn link_pin(pin_dir: &std::path::Path) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{LATE_IFACE}-tc-ingress"))
}

#[test]
fn pattern_attaches_to_a_pod_created_after_start_and_forgets_it_when_deleted() {
    let (topo, dir) = fixture::standard();
    // The pattern matches nothing at start: that is allowed, unlike a missing exact name.
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--iface", "lxc*"]);
    fixture::wait_serving(&topo, &mut agent);
    assert!(!link_pin(&agent.pin_dir).exists());

    let late = LatePod::create(&topo);
    let mut cmd = Command::new(bin_path("svc-lb-echo", "SVC_LB_ECHO_BIN"));
    cmd.args(["--name", "pod-late", "--tcp", "0.0.0.0:5000"]);
    topo.spawn_ready(&late.pod.ns, "echo-pod-late", cmd);
    wait_for(
        "the agent to pin a TC link for the new interface",
        Duration::from_secs(10),
        || link_pin(&agent.pin_dir).exists().then_some(()),
    );

    // The new pod is a client: its ClusterIP traffic is DNATed at TC ingress of its veth (the
    // node has no route for 10.96.0.0/12, so nothing else could answer) and balanced.
    let vip = SocketAddr::from((FRONTEND_VIP, 80));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let name = client::http_get_within(&late.pod.ns, vip, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("new pod -> {vip}: {e}\n{}", agent.log_text()));
        seen.insert(name);
    }
    let want: std::collections::BTreeSet<String> =
        topo.pods.iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        seen, want,
        "the new pod's requests were not spread over every backend"
    );

    // The new pod is a backend: its replies are reverse-NATed at TC ingress of its veth, so the
    // client sees them come from the ClusterIP.
    dir.write(
        "late.yaml",
        &manifests::join(&[
            manifests::endpoint_slice("frontend-svc", &FRONTEND_PORTS, &[&late.pod])
                .replace("frontend-svc-x7k2p", "frontend-svc-late"),
            manifests::pod(&late.pod),
        ]),
    );
    wait_for(
        "a request through frontend-svc to reach pod-late",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            client::http_get_within(&topo.client, vip, Duration::from_millis(500))
                .ok()
                .filter(|n| n == "pod-late")
        },
    );
    let log = agent.log_text();
    let attach_lines = log
        .lines()
        .filter(|l| l.contains("attached svc_lb_tc_ingress") && l.contains(LATE_IFACE))
        .count();
    assert_eq!(
        attach_lines, 1,
        "attach of {LATE_IFACE} not logged exactly once:\n{log}"
    );

    // Deleting the veth detaches and unpins its link.
    late.delete_veth();
    wait_for(
        "the agent to remove the deleted interface's link pin",
        Duration::from_secs(10),
        || (!link_pin(&agent.pin_dir).exists()).then_some(()),
    );
    agent.assert_running();
    assert!(
        agent.log_text().contains("interface removed"),
        "{}",
        agent.log_text()
    );
    // The other interfaces keep working.
    fixture::wait_serving(&topo, &mut agent);
    drop(late);
}

#[test]
fn a_missing_exact_name_fails_the_start_and_attaches_nothing() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--iface", "svclb-nope0"]);
    let log = wait_for("the agent to exit", Duration::from_secs(10), || {
        let log = agent.log_text();
        log.contains("does not exist").then_some(log)
    });
    assert!(log.contains("\"svclb-nope0\""), "{log}");
    agent.stop();
    assert!(
        !agent.pin_dir.join("links").exists(),
        "a failed start must not attach anything"
    );
}

#[test]
fn a_restarted_agent_adopts_late_links_and_drops_pins_of_interfaces_gone_meanwhile() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--iface", "lxc*"]);
    fixture::wait_serving(&topo, &mut agent);
    let late = LatePod::create(&topo);
    wait_for(
        "the agent to pin a TC link for the new interface",
        Duration::from_secs(10),
        || link_pin(&agent.pin_dir).exists().then_some(()),
    );
    let vip = SocketAddr::from((FRONTEND_VIP, 80));

    // kill -9 + restart: the link made for the late interface is adopted (program replaced
    // inside it), and the pod keeps reaching the Service.
    agent.restart();
    wait_for(
        "the restarted agent to adopt the late interface's link",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            agent
                .log_text()
                .lines()
                .any(|l| {
                    l.contains("replaced program in existing pinned TC link")
                        && l.contains(LATE_IFACE)
                })
                .then_some(())
        },
    );
    client::http_get_within(&late.pod.ns, vip, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("new pod -> {vip} after restart: {e}"));

    // The interface disappears while no agent runs: the next agent removes its stale pin.
    agent.kill_hard();
    late.delete_veth();
    assert!(
        link_pin(&agent.pin_dir).exists(),
        "pin removed without an agent?"
    );
    agent.restart();
    // (Traffic alone proves nothing here: the pinned links kept serving without an agent.)
    wait_for(
        "the restarted agent to remove the stale pin of the deleted interface",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            (!link_pin(&agent.pin_dir).exists()).then_some(())
        },
    );
    fixture::wait_serving(&topo, &mut agent);
}
