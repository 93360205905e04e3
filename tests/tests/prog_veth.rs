//! The datapath on real veth traffic, without the agent: the dataplane is loaded in the node
//! namespace of the standard test topology and its pinned maps are seeded directly. Checks that
//! locally generated (CHECKSUM_PARTIAL) packets survive DNAT and reverse NAT, and that Services
//! without backends refuse connections. Needs root; fails, never skips.

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray};
use svc_lb::dataplane::{Dataplane, DataplaneConfig, uninstall};
use svc_lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, STAT_DNAT, STAT_NO_BACKEND, STAT_REVNAT, SVC_F_CLUSTER_IP, maps,
};
use svc_lb_tests::{
    client::{self, HttpConn},
    netns::{Topology, unique_prefix},
    prog::{Seeder, open_map},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
/// The node's own address on the client link (n-c): a NodePort frontend.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);

/// Collects `log` records (the dataplane forwards aya-log records from the programs into `log`).
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

fn logged(needle: &str) -> bool {
    CAPTURE.0.lock().unwrap().iter().any(|l| l.contains(needle))
}

/// Uninstalls (detaching the links) on drop, also when the test fails.
struct Installed(PathBuf);

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = uninstall(&self.0) {
            eprintln!("uninstall {}: {e}", self.0.display());
        }
    }
}

fn stat(dir: &Path, idx: u32) -> u64 {
    let a: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open_map(dir, maps::STATS_MAP))).unwrap();
    a.get(&idx, 0).unwrap().iter().sum()
}

#[test]
fn veth_traffic_dnat_revnat_and_rejects() {
    let topo = Topology::new(3);
    topo.start_echo_servers();
    svc_lb_tests::ensure_bpffs();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-veth", unique_prefix()));
    let _installed = Installed(pin_dir.clone());
    let cfg = DataplaneConfig {
        pin_dir: pin_dir.clone(),
        ifaces: topo.node_ifaces(),
    };
    log::set_logger(&CAPTURE).expect("install the capturing logger");
    log::set_max_level(log::LevelFilter::Trace);
    // Loaded inside the node namespace (interfaces, rp_filter); kept alive for log forwarding.
    let dp = topo
        .node
        .in_ns(move || Dataplane::load(&cfg))
        .expect("Dataplane::load in the node namespace");

    let pods: Vec<_> = topo.pods.iter().map(|p| (p.name.clone(), p.ip)).collect();
    let mut seed = Seeder::new(&pin_dir);
    let web: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, (_, ip))| (i as u32 + 1, *ip, 5000))
        .collect();
    let dns: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, (_, ip))| (i as u32 + 11, *ip, 5353))
        .collect();
    seed.service(WEB_VIP, 80, IPPROTO_TCP, SVC_F_CLUSTER_IP, 1, &web);
    seed.service(DNS_VIP, 53, IPPROTO_UDP, SVC_F_CLUSTER_IP, 2, &dns);
    seed.service(EMPTY_VIP, 80, IPPROTO_TCP, SVC_F_CLUSTER_IP, 3, &[]);
    let node_port: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, (_, ip))| (i as u32 + 21, *ip, 80))
        .collect();
    seed.service(NODE_IP, 30080, IPPROTO_TCP, SVC_F_CLUSTER_IP, 5, &node_port);
    seed.service(EMPTY_VIP, 53, IPPROTO_UDP, SVC_F_CLUSTER_IP, 4, &[]);

    let names: BTreeSet<String> = pods.iter().map(|(n, _)| n.clone()).collect();
    let web_addr = SocketAddr::from((WEB_VIP, 80));
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let body = client::http_get(&topo.client, web_addr).expect("GET through the VIP");
        assert!(names.contains(&body), "unexpected answer {body:?}");
        seen.insert(body);
    }
    assert_eq!(seen, names, "30 connections should reach every backend");

    // NodePort on the node's own address: replies are reverse-NATed to a local source address,
    // which the node forwards only with accept_local (set by the dataplane).
    for i in 0..5 {
        let body = client::http_get(&topo.client, SocketAddr::from((NODE_IP, 30080)))
            .unwrap_or_else(|e| panic!("NodePort request {i}: {e}"));
        assert!(names.contains(&body), "unexpected NodePort answer {body:?}");
    }

    // One connection stays on its backend.
    let mut conn = HttpConn::connect(&topo.client, web_addr).expect("keep-alive connect");
    let first = conn.get().unwrap();
    for _ in 0..10 {
        assert_eq!(conn.get().unwrap(), first);
    }
    drop(conn);

    // UDP through a connected socket (only accepts replies from the VIP).
    let answer = client::udp_request(
        &topo.client,
        SocketAddr::from((DNS_VIP, 53)),
        client::TIMEOUT,
    )
    .expect("UDP through the VIP");
    assert!(names.contains(&answer), "unexpected UDP answer {answer:?}");

    // Without backends: a TCP SYN gets ICMP port unreachable like kube-proxy's REJECT rule
    // (refused, not a timeout) ...
    let err = client::connect(
        &topo.client,
        SocketAddr::from((EMPTY_VIP, 80)),
        Duration::from_secs(3),
    )
    .expect_err("connect to a Service without endpoints must fail");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    // ... and UDP an ICMP port unreachable, reported on the connected socket.
    let sock = topo.client.in_ns(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((EMPTY_VIP, 53)).unwrap();
        s
    });
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    sock.send(b"ping").unwrap();
    let err = sock.recv(&mut [0u8; 64]).expect_err("no answer expected");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    assert!(stat(&pin_dir, STAT_DNAT) > 0);
    assert!(stat(&pin_dir, STAT_REVNAT) > 0);
    assert_eq!(stat(&pin_dir, STAT_NO_BACKEND), 2);

    // Rare events are logged by the programs and reach `log` through the dataplane.
    svc_lb_tests::wait_for(
        "aya-log records from the datapath",
        Duration::from_secs(5),
        || (logged("new flow") && logged("no backends")).then_some(()),
    );
    drop(dp);
}
