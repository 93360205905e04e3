//! `svc-lb run --xdp generic|native`: the XDP program is attached next to TC on every selected
//! interface with pinned links, DNATs NodePort traffic before the stack sees it, survives a
//! restart as exactly one program per interface, and is removed by `--xdp off` and by uninstall.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use svc_lb_common::XDP_PROG;
use svc_lb_tests::{
    agent::AgentGuard,
    bin_path, client, fixture,
    manifests::WEB_NODE_PORT,
    netns::{NODE_IP, Netns, Topology},
    wait_for,
};

/// iproute2's `IFLA_XDP_ATTACHED` values for driver (native) and generic (SKB mode) XDP.
const XDP_ATTACHED_DRV: u64 = 1;
const XDP_ATTACHED_SKB: u64 = 2;

fn nodeport() -> SocketAddr {
    SocketAddr::from((NODE_IP, WEB_NODE_PORT))
}

/// The XDP program on `iface` in `ns` as (mode, program id, program name), from `ip -j -d link`.
fn xdp_prog(ns: &Netns, iface: &str) -> Option<(u64, u64, String)> {
    let out = ns.run("ip", &["-j", "-d", "link", "show", "dev", iface]);
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ip -j link show {iface}: {e}"));
    let xdp = links.get(0)?.get("xdp")?;
    let mode = xdp.get("mode")?.as_u64()?;
    let prog = xdp.get("prog")?;
    Some((
        mode,
        prog.get("id")?.as_u64()?,
        prog.get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string(),
    ))
}

/// Asserts every node interface has `svc_lb_xdp` in generic mode and its pin, and no other XDP
/// pin; returns the program id per interface.
fn assert_generic_everywhere(topo: &Topology, pin_dir: &Path) -> BTreeMap<String, u64> {
    assert_mode_everywhere(topo, pin_dir, "generic")
}

/// [`assert_generic_everywhere`] for `mode_name` ("generic" or "native").
fn assert_mode_everywhere(
    topo: &Topology,
    pin_dir: &Path,
    mode_name: &str,
) -> BTreeMap<String, u64> {
    let want_mode = if mode_name == "native" {
        XDP_ATTACHED_DRV
    } else {
        XDP_ATTACHED_SKB
    };
    let mut ids = BTreeMap::new();
    for iface in topo.node_ifaces() {
        let (mode, id, name) =
            xdp_prog(&topo.node, &iface).unwrap_or_else(|| panic!("no XDP program on {iface}"));
        assert_eq!(mode, want_mode, "{iface}: not {mode_name} XDP");
        assert_eq!(name, XDP_PROG, "{iface}: wrong program");
        ids.insert(iface, id);
    }
    let mut pins: Vec<String> = xdp_pins(pin_dir);
    pins.sort();
    let mut want: Vec<String> = topo
        .node_ifaces()
        .iter()
        .map(|i| format!("{i}-xdp-{mode_name}"))
        .collect();
    want.sort();
    assert_eq!(pins, want, "exactly one pinned XDP link per interface");
    ids
}

fn xdp_pins(pin_dir: &Path) -> Vec<String> {
    std::fs::read_dir(pin_dir.join("links"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("-xdp-"))
                .collect()
        })
        .unwrap_or_default()
}

/// `tcpdump` on the node side of the client link, killed on drop. Taps see a frame after
/// generic XDP ran (and before TC ingress), so a SYN already addressed to a pod proves that XDP
/// did the DNAT.
struct Tcpdump {
    child: Child,
}

impl Tcpdump {
    fn start(ns: &Netns, iface: &str) -> Tcpdump {
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-n", "-l", "-c", "1", "-i", iface])
            .args(["tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ns.enter(&mut cmd);
        let mut child = cmd.spawn().expect("spawn tcpdump (is it installed?)");
        let mut err = BufReader::new(child.stderr.take().expect("tcpdump stderr"));
        let mut line = String::new();
        // tcpdump prints "listening on <iface>" once its socket is capturing.
        loop {
            line.clear();
            if err.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                panic!("tcpdump exited before capturing: {line}");
            }
            if line.contains("listening on") {
                break;
            }
        }
        Tcpdump { child }
    }

    /// The captured line (waits up to 5 s for the one packet).
    fn finish(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let mut out = String::new();
                if let Some(mut o) = self.child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                return out;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("tcpdump captured no SYN on the client link within 5 s");
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_xdp_arg(agent: &mut AgentGuard<'_>, from: &str, to: &str) {
    for arg in agent.args_mut().iter_mut() {
        if arg == from {
            *arg = OsString::from(to);
        }
    }
}

fn nodeport_answers(topo: &Topology) -> String {
    client::http_get(&topo.client, nodeport())
        .unwrap_or_else(|e| panic!("client -> NodePort {}: {e}", nodeport()))
}

#[test]
fn generic_xdp_dnats_nodeport_survives_restart_and_is_removed() {
    let (topo, dir) = fixture::standard();
    // Frames off a wire carry full L4 checksums, which XDP updates correctly; a local veth
    // sender would leave CHECKSUM_PARTIAL that XDP cannot see (see
    // docs/kube-proxy-replacement.md). With offload off the pods verify the rewritten checksum.
    topo.client.run("ethtool", &["-K", "c0", "tx", "off"]);
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--xdp", "generic"]);
    fixture::wait_serving(&topo, &mut agent);
    let ids = assert_generic_everywhere(&topo, &agent.pin_dir);

    // XDP rewrote the SYN before the capture tap: the node saw it addressed to a pod's port 80.
    let dump = Tcpdump::start(&topo.node, "n-c");
    let answer = nodeport_answers(&topo);
    let syn = dump.finish();
    assert!(answer.contains("pod-"), "NodePort answer: {answer:?}");
    assert!(
        syn.contains("172.31.0.2.") && syn.contains("> 10.244.") && syn.contains(".80: Flags [S]"),
        "the SYN to the NodePort was not DNATed by XDP before the stack: {syn:?}"
    );
    let mut pods = std::collections::BTreeSet::new();
    for _ in 0..20 {
        pods.insert(nodeport_answers(&topo));
    }
    assert!(pods.len() > 1, "NodePort not balanced over pods: {pods:?}");

    // Restart: the new agent swaps its own program into the pinned links, one per interface.
    agent.restart();
    let new_ids = wait_for(
        "the restarted agent's XDP program on every interface",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            let now: BTreeMap<String, u64> = topo
                .node_ifaces()
                .into_iter()
                .filter_map(|i| xdp_prog(&topo.node, &i).map(|(_, id, _)| (i, id)))
                .collect();
            (now.len() == ids.len() && now.iter().all(|(i, id)| ids[i] != *id)).then_some(now)
        },
    );
    assert_eq!(assert_generic_everywhere(&topo, &agent.pin_dir), new_ids);
    assert!(nodeport_answers(&topo).contains("pod-"));

    // A mode change detaches the generic links before attaching native ones (the kernel allows
    // one XDP mode per interface). veth implements native XDP for frames its peer sends.
    set_xdp_arg(&mut agent, "generic", "native");
    agent.restart();
    wait_for(
        "native XDP on every interface",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            topo.node_ifaces()
                .iter()
                .all(|i| matches!(xdp_prog(&topo.node, i), Some((XDP_ATTACHED_DRV, _, _))))
                .then_some(())
        },
    );
    assert_mode_everywhere(&topo, &agent.pin_dir, "native");
    assert!(nodeport_answers(&topo).contains("pod-"));

    // `--xdp off` on the next start removes the links; TC alone keeps the NodePort working.
    set_xdp_arg(&mut agent, "native", "off");
    agent.restart();
    wait_for(
        "XDP removed from every interface by --xdp off",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            topo.node_ifaces()
                .iter()
                .all(|i| xdp_prog(&topo.node, i).is_none())
                .then_some(())
        },
    );
    assert_eq!(xdp_pins(&agent.pin_dir), Vec::<String>::new());
    wait_for(
        "the NodePort to answer through TC alone",
        Duration::from_secs(10),
        || client::http_get_within(&topo.client, nodeport(), Duration::from_millis(500)).ok(),
    );

    // Back to generic, then uninstall: nothing XDP is left on any interface.
    set_xdp_arg(&mut agent, "off", "generic");
    agent.restart();
    wait_for("XDP attached again", Duration::from_secs(20), || {
        agent.assert_running();
        (xdp_pins(&agent.pin_dir).len() == topo.node_ifaces().len()).then_some(())
    });
    assert_generic_everywhere(&topo, &agent.pin_dir);
    let out = agent.shutdown();
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for iface in topo.node_ifaces() {
        let text = topo.node.run("ip", &["link", "show", "dev", &iface]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(!text.contains("xdp"), "{iface} after uninstall: {text}");
    }
    assert!(!agent.pin_dir.exists(), "pin dir left after uninstall");
}

/// Removes the pin directory of a failed `svc-lb run` on drop.
struct Uninstall<'a> {
    ns: &'a Netns,
    pin_dir: String,
}

impl Drop for Uninstall<'_> {
    fn drop(&mut self) {
        let mut cmd = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
        cmd.args(["uninstall", "--pin-dir", &self.pin_dir]);
        self.ns.enter(&mut cmd);
        let _ = cmd.output();
    }
}

#[test]
fn native_xdp_on_loopback_fails_naming_the_interface() {
    let (topo, dir) = fixture::standard();
    // The loopback driver implements no XDP (no ndo_bpf): only generic mode attaches there. The
    // node namespace's own `lo` is private to this test.
    let pin_dir = format!("/sys/fs/bpf/{}-native", topo.prefix);
    let _cleanup = Uninstall {
        ns: &topo.node,
        pin_dir: pin_dir.clone(),
    };
    let mut cmd = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
    cmd.arg("run")
        .arg("--manifests")
        .arg(&dir.path)
        .args(["--iface", "lo", "--xdp", "native", "--no-socket-lb"])
        .args(["--node-ip", &NODE_IP.to_string(), "--pin-dir", &pin_dir])
        .stdin(Stdio::null());
    topo.node.enter(&mut cmd);
    let out = cmd.output().expect("run svc-lb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "native XDP on lo attached: {stderr}");
    assert!(
        stderr.contains("interface lo ") && stderr.contains("native"),
        "error does not name the interface and mode: {stderr}"
    );
}

#[test]
fn interface_created_after_start_gets_xdp_and_loses_its_pin_when_deleted() {
    let (topo, dir) = fixture::standard();
    let mut agent =
        AgentGuard::start_with(&topo, &dir.path, &["--xdp", "generic", "--iface", "lxcx*"]);
    fixture::wait_serving(&topo, &mut agent);
    // A veth pair inside the node namespace stands in for a new pod's veth.
    topo.node.run(
        "ip",
        &[
            "link", "add", "lxcx1", "type", "veth", "peer", "name", "xpeer1",
        ],
    );
    topo.node.run("ip", &["link", "set", "lxcx1", "up"]);
    let pin = agent.pin_dir.join("links").join("lxcx1-xdp-generic");
    let (mode, _, name) = wait_for(
        "the watcher to attach XDP to the new interface",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            pin.exists()
                .then(|| xdp_prog(&topo.node, "lxcx1"))
                .flatten()
        },
    );
    assert_eq!((mode, name.as_str()), (XDP_ATTACHED_SKB, XDP_PROG));
    assert!(
        xdp_prog(&topo.node, "xpeer1").is_none(),
        "peer must not match"
    );

    topo.node.run("ip", &["link", "del", "lxcx1"]);
    wait_for(
        "the XDP pin of the deleted interface to be removed",
        Duration::from_secs(10),
        || (!pin.exists()).then_some(()),
    );
}
