//! `svc_lb_xdp` under BPF_PROG_TEST_RUN: DNAT of NodePort frontends with incremental checksum
//! updates (verified by full recomputation), everything else passed untouched for the TC
//! program, and the conntrack entries it creates let TC reverse-NAT the replies.
//! Needs root; fails, never skips.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, Xdp},
};
use svc_lb::dataplane::{TC_INGRESS_PROG, XDP_PROG};
use svc_lb_common::RevNatId;
use svc_lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CtEntry, CtKeyV4, IPPROTO_TCP, IPPROTO_UDP, SRC_RANGE_FIXED_BITS,
    STAT_CT_HIT, STAT_CT_NEW, STAT_DNAT, STAT_REVNAT, STAT_SRC_RANGE_DROP, SVC_F_CLUSTER_IP,
    SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES, SrcRangeKeyV4, ip_to_net, maps,
};
use svc_lb_tests::packet::{self, ETH_LEN, L4, TCP_ACK, TCP_SYN, decode};
use svc_lb_tests::prog::{self, PinDir, Seeder, ct_key};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn pod(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, 2)
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

struct Harness {
    ebpf: Ebpf,
    dir: PinDir,
}

impl Harness {
    fn new() -> Self {
        let dir = PinDir::new("xdptest");
        let mut ebpf = prog::load_object(&dir.0);
        let xdp: &mut Xdp = ebpf.program_mut(XDP_PROG).unwrap().try_into().unwrap();
        xdp.load().expect("verifier accepts svc_lb_xdp");
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_INGRESS_PROG)
            .unwrap()
            .try_into()
            .unwrap();
        tc.load().expect("verifier accepts svc_lb_tc_ingress");
        Harness { ebpf, dir }
    }

    fn add_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        flags: u16,
        rev_nat_id: RevNatId,
        backends: &[(u32, Ipv4Addr, u16)],
    ) {
        Seeder::new(&self.dir.0).service(vip, port, proto, flags, rev_nat_id, backends);
    }

    fn run_xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self.ebpf.program_mut(XDP_PROG).unwrap().try_into().unwrap();
        prog::run_once(prog, frame)
    }

    fn run_tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_INGRESS_PROG)
            .unwrap()
            .try_into()
            .unwrap();
        prog::run_once(prog, frame)
    }

    fn ct(&self, key: &CtKeyV4) -> Option<CtEntry> {
        let m: HashMap<&MapData, CtKeyV4, CtEntry> =
            HashMap::try_from(self.ebpf.map(maps::CT_MAP).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    fn stat(&self, idx: u32) -> u64 {
        prog::stat(&self.ebpf, idx)
    }
}

fn dst_of(out: &[u8]) -> SocketAddrV4 {
    let d = decode(out).expect("checksums after XDP");
    match d.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => sa(d.dst, dport),
        L4::Icmp { .. } => panic!("ICMP"),
    }
}

#[test]
fn nodeport_tcp_dnat_and_tc_reverse_nat() {
    let mut h = Harness::new();
    h.add_service(
        NODE_IP,
        30080,
        IPPROTO_TCP,
        SVC_F_NODE_PORT,
        3,
        &[(7, pod(2), 80)],
    );
    let client = sa(CLIENT, 50000);
    let nodeport = sa(NODE_IP, 30080);
    let syn = packet::tcp(client, nodeport, TCP_SYN, 77, 0, b"");
    let (v, out) = h.run_xdp(&syn);
    assert_eq!(v, XDP_PASS);
    assert_eq!(dst_of(&out), sa(pod(2), 80));
    let data = packet::tcp(client, nodeport, TCP_ACK, 78, 1, b"GET / HTTP/1.1\r\n\r\n");
    let (v, out) = h.run_xdp(&data);
    assert_eq!(v, XDP_PASS);
    assert_eq!(dst_of(&out), sa(pod(2), 80));
    assert!(
        matches!(decode(&out).unwrap().l4, L4::Tcp { ref payload, .. } if payload.starts_with(b"GET"))
    );

    let fwd = h
        .ct(&ct_key(client, nodeport, IPPROTO_TCP, CT_DIR_FORWARD))
        .expect("forward CT");
    assert_eq!((fwd.backend_id, fwd.rev_nat_id), (7, 3));
    assert!(
        h.ct(&ct_key(sa(pod(2), 80), client, IPPROTO_TCP, CT_DIR_REPLY))
            .is_some()
    );
    assert_eq!(h.stat(STAT_DNAT), 2);
    assert_eq!(h.stat(STAT_CT_NEW), 1);
    assert_eq!(h.stat(STAT_CT_HIT), 1);

    // The backend's reply is reverse-NATed by the TC program to the NodePort frontend.
    let reply = packet::tcp(sa(pod(2), 80), client, TCP_SYN | TCP_ACK, 9, 78, b"");
    let (v, out) = h.run_tc(&reply);
    assert_eq!(v, TC_ACT_OK);
    let d = decode(&out).unwrap();
    assert_eq!(d.src, NODE_IP);
    assert!(matches!(
        d.l4,
        L4::Tcp {
            sport: 30080,
            dport: 50000,
            ..
        }
    ));
    assert_eq!(h.stat(STAT_REVNAT), 1);
}

#[test]
fn nodeport_udp_dnat_keeps_zero_checksum() {
    let mut h = Harness::new();
    h.add_service(
        NODE_IP,
        30053,
        IPPROTO_UDP,
        SVC_F_NODE_PORT,
        4,
        &[(8, pod(3), 5353)],
    );
    for (port, with_csum) in [(50001, true), (50002, false)] {
        let q = packet::udp(sa(CLIENT, port), sa(NODE_IP, 30053), b"query", with_csum);
        let (v, out) = h.run_xdp(&q);
        assert_eq!(v, XDP_PASS);
        assert_eq!(dst_of(&out), sa(pod(3), 5353));
        let L4::Udp { csum, .. } = decode(&out).unwrap().l4 else {
            panic!("not UDP")
        };
        assert_eq!(csum != 0, with_csum, "checksum {csum:#06x}");
    }
}

#[test]
fn conntrack_keeps_backend_and_flows_spread() {
    let mut h = Harness::new();
    let bes = [(1, pod(1), 80), (2, pod(2), 80), (3, pod(3), 80)];
    h.add_service(NODE_IP, 30080, IPPROTO_TCP, SVC_F_NODE_PORT, 3, &bes);
    let mut seen = std::collections::BTreeSet::new();
    for port in 51000..51040u16 {
        let c = sa(CLIENT, port);
        let (_, out) = h.run_xdp(&packet::tcp(c, sa(NODE_IP, 30080), TCP_SYN, 1, 0, b""));
        let first = dst_of(&out);
        seen.insert(first);
        for i in 0..3 {
            let (_, out) = h.run_xdp(&packet::tcp(c, sa(NODE_IP, 30080), TCP_ACK, 2 + i, 1, b"x"));
            assert_eq!(dst_of(&out), first);
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn clusterip_empty_and_unparseable_pass_untouched() {
    let mut h = Harness::new();
    h.add_service(
        VIP,
        8080,
        IPPROTO_TCP,
        SVC_F_CLUSTER_IP,
        5,
        &[(9, pod(1), 80)],
    );
    h.add_service(NODE_IP, 30099, IPPROTO_TCP, SVC_F_NODE_PORT, 6, &[]);
    h.add_service(
        NODE_IP,
        30080,
        IPPROTO_TCP,
        SVC_F_NODE_PORT,
        3,
        &[(7, pod(2), 80)],
    );
    let mut frames = vec![
        packet::tcp(sa(CLIENT, 1), sa(VIP, 8080), TCP_SYN, 1, 0, b""),
        packet::tcp(sa(CLIENT, 1), sa(NODE_IP, 30099), TCP_SYN, 1, 0, b""),
        packet::tcp(sa(CLIENT, 1), sa(NODE_IP, 22), TCP_SYN, 1, 0, b""),
        packet::icmp_echo(CLIENT, NODE_IP),
    ];
    let np = packet::tcp(sa(CLIENT, 2), sa(NODE_IP, 30080), TCP_SYN, 1, 0, b"");
    for len in ETH_LEN..np.len() {
        frames.push(np[..len].to_vec());
    }
    let mut frag = packet::udp(sa(CLIENT, 3), sa(NODE_IP, 30080), b"x", true);
    frag[ETH_LEN + 6] = 0x20;
    packet::fix_ip_checksum(&mut frag);
    frames.push(frag);
    for f in &frames {
        let (v, out) = h.run_xdp(f);
        assert_eq!(v, XDP_PASS, "{f:02x?}");
        assert_eq!(&out, f, "must pass unchanged");
    }
    assert_eq!(h.stat(STAT_DNAT), 0);
    let _ = XDP_DROP;
}

#[test]
fn load_balancer_source_ranges_drop_outsiders_in_xdp() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    let mut h = Harness::new();
    let lb = Ipv4Addr::new(198, 51, 100, 20);
    h.add_service(
        lb,
        443,
        IPPROTO_TCP,
        SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGES,
        5,
        &[(7, pod(2), 80)],
    );
    let mut ranges: LpmTrie<&mut MapData, SrcRangeKeyV4, u8> =
        LpmTrie::try_from(h.ebpf.map_mut(maps::SRC_RANGES_MAP).unwrap()).unwrap();
    let key = Key::new(
        SRC_RANGE_FIXED_BITS + 24,
        SrcRangeKeyV4 {
            rev_nat_id: 5,
            addr: ip_to_net(Ipv4Addr::new(172, 31, 0, 0)),
        },
    );
    ranges.insert(&key, 1, 0).unwrap();

    let inside = packet::tcp(sa(CLIENT, 50100), sa(lb, 443), TCP_SYN, 1, 0, b"");
    let (v, out) = h.run_xdp(&inside);
    assert_eq!(v, XDP_PASS);
    assert_eq!(dst_of(&out), sa(pod(2), 80));
    let outside = packet::tcp(
        sa(Ipv4Addr::new(203, 0, 113, 9), 50101),
        sa(lb, 443),
        TCP_SYN,
        1,
        0,
        b"",
    );
    let (v, _) = h.run_xdp(&outside);
    assert_eq!(v, XDP_DROP);
    assert_eq!(h.stat(STAT_SRC_RANGE_DROP), 1);
}

/// A NodePort flow to a backend on another node: XDP picks the backend and creates the SNAT
/// conntrack entries but leaves the frame untouched; TC then rewrites both addresses from
/// those entries, and reverse-translates the reply. Runs in a namespace with a route to the
/// backend (the SNAT source comes from the FIB).
#[test]
fn remote_backend_flow_is_left_to_tc_which_snats_it() {
    use svc_lb_common::{BE_F_REMOTE, BackendV4, CT_F_SNAT, STAT_SNAT};
    use svc_lb_tests::multinode::RoutedNs;

    const LINK_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
    let routed = RoutedNs::create();
    routed.ns.in_ns(|| {
        let mut h = Harness::new();
        h.add_service(
            NODE_IP,
            30080,
            IPPROTO_TCP,
            SVC_F_NODE_PORT,
            3,
            &[(5, pod(2), 80)],
        );
        let mut backends: HashMap<MapData, u32, BackendV4> = HashMap::try_from(
            aya::maps::Map::HashMap(prog::open_map(&h.dir.0, maps::BACKENDS_MAP)),
        )
        .unwrap();
        backends
            .insert(5, BackendV4::new(pod(2), 80, IPPROTO_TCP, BE_F_REMOTE), 0)
            .unwrap();
        let client = sa(CLIENT, 40100);
        let frontend = sa(NODE_IP, 30080);
        let syn = packet::tcp(client, frontend, TCP_SYN, 1, 0, b"");

        let (v, out) = h.run_xdp(&syn);
        assert_eq!(v, XDP_PASS);
        assert_eq!(out, syn, "XDP rewrote a SNAT flow");
        let fwd = h
            .ct(&ct_key(client, frontend, IPPROTO_TCP, CT_DIR_FORWARD))
            .expect("XDP created the forward entry");
        assert!(fwd.flags & CT_F_SNAT != 0);
        assert_eq!(fwd.nat_addr, ip_to_net(LINK_IP));
        assert_eq!((h.stat(STAT_SNAT), h.stat(STAT_DNAT)), (1, 0));

        let (v, out) = h.run_tc(&syn);
        assert_eq!(v, TC_ACT_OK);
        let d = decode(&out).expect("checksums after TC DNAT+SNAT");
        assert_eq!((d.src, d.dst), (LINK_IP, pod(2)));
        let L4::Tcp {
            sport, dport: 80, ..
        } = d.l4
        else {
            panic!("{d:?}")
        };
        assert_eq!(svc_lb_common::port_to_net(sport), fwd.nat_port);
        assert_eq!(h.stat(STAT_CT_HIT), 1);

        let reply = packet::tcp(
            sa(pod(2), 80),
            sa(LINK_IP, sport),
            TCP_SYN | TCP_ACK,
            9,
            2,
            b"",
        );
        let (v, out) = h.run_tc(&reply);
        assert_eq!(v, TC_ACT_OK);
        let d = decode(&out).expect("checksums after reverse NAT");
        assert_eq!((d.src, d.dst), (NODE_IP, CLIENT));
        assert!(matches!(
            d.l4,
            L4::Tcp {
                sport: 30080,
                dport: 40100,
                ..
            }
        ));
        assert_eq!(h.stat(STAT_REVNAT), 1);
    });
}

/// XDP follows the short-circuit of externalTrafficPolicy Local too: an in-cluster source
/// (`LB4_LOCAL_SRC`) uses the LoadBalancer frontend's in-cluster twin, an external one its
/// node-local slots; with no local endpoint the external packet is left to TC (which drops).
#[test]
fn local_policy_in_cluster_sources_use_the_twin_in_xdp() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    use svc_lb_common::{SCOPE_INTERNAL, SVC_F_LOCAL};
    let mut h = Harness::new();
    let lb = Ipv4Addr::new(198, 51, 100, 21);
    h.add_service(
        lb,
        80,
        IPPROTO_TCP,
        SVC_F_LOAD_BALANCER | SVC_F_LOCAL,
        3,
        &[(5, pod(1), 80)],
    );
    h.add_service(
        lb,
        81,
        IPPROTO_TCP,
        SVC_F_LOAD_BALANCER | SVC_F_LOCAL,
        4,
        &[],
    );
    for (port, rev) in [(80, 6), (81, 7)] {
        Seeder::new(&h.dir.0).service_in_scope(
            lb,
            port,
            IPPROTO_TCP,
            SCOPE_INTERNAL,
            SVC_F_LOAD_BALANCER,
            rev,
            &[(8, pod(2), 80)],
        );
    }
    let mut local_src: LpmTrie<&mut MapData, u32, u8> =
        LpmTrie::try_from(h.ebpf.map_mut(maps::LOCAL_SRC_MAP).unwrap()).unwrap();
    local_src
        .insert(&Key::new(16, ip_to_net(Ipv4Addr::new(10, 244, 0, 0))), 1, 0)
        .unwrap();

    let from_pod = packet::tcp(sa(pod(3), 50200), sa(lb, 80), TCP_SYN, 1, 0, b"");
    let (v, out) = h.run_xdp(&from_pod);
    assert_eq!(v, XDP_PASS);
    assert_eq!(
        dst_of(&out),
        sa(pod(2), 80),
        "in-cluster: the twin's endpoint"
    );
    let from_client = packet::tcp(sa(CLIENT, 50201), sa(lb, 80), TCP_SYN, 1, 0, b"");
    let (v, out) = h.run_xdp(&from_client);
    assert_eq!(v, XDP_PASS);
    assert_eq!(dst_of(&out), sa(pod(1), 80), "external: the local endpoint");

    // No local endpoint: the pod still gets the twin in XDP, the client's packet goes on
    // untouched to TC.
    let from_pod = packet::tcp(sa(pod(3), 50202), sa(lb, 81), TCP_SYN, 1, 0, b"");
    let (v, out) = h.run_xdp(&from_pod);
    assert_eq!(v, XDP_PASS);
    assert_eq!(dst_of(&out), sa(pod(2), 80));
    let from_client = packet::tcp(sa(CLIENT, 50203), sa(lb, 81), TCP_SYN, 1, 0, b"");
    let (v, out) = h.run_xdp(&from_client);
    assert_eq!((v, out.as_slice()), (XDP_PASS, from_client.as_slice()));
}
