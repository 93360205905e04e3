//! `svc_lb_tc_ingress` under BPF_PROG_TEST_RUN: crafted frames in, verdict and exact bytes out.
//! Needs root (BPF + bpffs); fails, never skips, when the program cannot be loaded.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
};
use svc_lb::dataplane::TC_INGRESS_PROG;
use svc_lb_common::{ALL_MAPS, RevNatId};
use svc_lb_common::{
    AffinityEntry, AffinityKeyV4, BE_STATE_TERMINATING, BackendV4, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_F_CLOSING, Counter, CtEntry, CtKeyV4, IPPROTO_TCP, IPPROTO_UDP, MaglevTable, SCOPE_EXTERNAL,
    SRC_RANGE_FIXED_BITS, STAT_CT_HIT, STAT_CT_NEW, STAT_CT_RESELECT, STAT_DNAT, STAT_LOOKUP_MISS,
    STAT_NO_BACKEND, STAT_NO_BACKEND_DROP, STAT_NO_LOCAL_DROP, STAT_PACKETS, STAT_PASS_UNPARSED,
    STAT_REVNAT, STAT_SRC_RANGE_DROP, SVC_F_CLUSTER_IP, SVC_F_LOCAL, SVC_F_MAGLEV,
    SVC_F_SOURCE_RANGES, ServiceEntry, ServiceKeyV4, SrcRangeKeyV4, ip_to_net,
    maglev::{self, MAGLEV_TABLE_SIZE},
    maps, port_to_net,
};
use svc_lb_tests::packet::{
    self, Decoded, ETH_LEN, L4, L4_OFF, MAC_CLIENT, MAC_NODE, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST,
    TCP_SYN, decode,
};
use svc_lb_tests::prog::{self, PinDir, Seeder, ct_key};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);

fn pod(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, 2)
}

struct Harness {
    ebpf: Ebpf,
    // Declared after `ebpf` so the maps are closed before the pins go.
    dir: PinDir,
}

impl Harness {
    fn new() -> Self {
        Self::load_in(PinDir::new("progtest"))
    }

    fn load_in(dir: PinDir) -> Self {
        let ebpf = prog::load_object(&dir.0);
        Self::with_object(ebpf, dir)
    }

    /// The object with an `LB4_CT` of `entries` entries instead of `MAX_CT_ENTRIES`.
    fn with_ct_capacity(entries: u32) -> Self {
        let dir = PinDir::new("progtest-ct");
        let ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&dir.0)
            .map_max_entries(maps::CT_MAP, entries)
            .load(svc_lb::dataplane::ebpf_object())
            .expect("load the svc-lb eBPF object with a small conntrack map");
        Self::with_object(ebpf, dir)
    }

    fn with_object(mut ebpf: Ebpf, dir: PinDir) -> Self {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TC_INGRESS_PROG)
            .expect("program present")
            .try_into()
            .expect("program is a classifier");
        prog.load().expect("verifier accepts svc_lb_tc_ingress");
        Harness { ebpf, dir }
    }

    fn services(&mut self) -> HashMap<&mut MapData, ServiceKeyV4, ServiceEntry> {
        HashMap::try_from(self.ebpf.map_mut(maps::SERVICES_MAP).unwrap()).unwrap()
    }

    fn backends(&mut self) -> HashMap<&mut MapData, u32, BackendV4> {
        HashMap::try_from(self.ebpf.map_mut(maps::BACKENDS_MAP).unwrap()).unwrap()
    }

    fn ct(&self) -> HashMap<&MapData, CtKeyV4, CtEntry> {
        HashMap::try_from(self.ebpf.map(maps::CT_MAP).unwrap()).unwrap()
    }

    /// A ClusterIP frontend with backends `(id, ip, port)` (slots 1..=n, in order) and a rev-NAT entry.
    fn add_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        rev_nat_id: RevNatId,
        backends: &[(u32, Ipv4Addr, u16)],
    ) {
        Seeder::new(&self.dir.0).service(vip, port, proto, SVC_F_CLUSTER_IP, rev_nat_id, backends);
    }

    /// Runs the program once (TEST_RUN does not reset the packet between repeats).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_INGRESS_PROG)
            .unwrap()
            .try_into()
            .unwrap();
        prog::run_once(prog, frame)
    }

    fn stat(&self, idx: u32) -> u64 {
        prog::stat(&self.ebpf, idx)
    }

    fn counter(&self, map: &str, idx: u32) -> Counter {
        let a: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).unwrap();
        a.get(&idx, 0)
            .unwrap()
            .iter()
            .fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn three_backends() -> [(u32, Ipv4Addr, u16); 3] {
    [(1, pod(1), 5000), (2, pod(2), 5000), (3, pod(3), 5000)]
}

fn tcp_dst(d: &Decoded) -> SocketAddrV4 {
    match d.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => sa(d.dst, dport),
        L4::Icmp { .. } => panic!("not TCP/UDP: {d:?}"),
    }
}

#[test]
fn all_maps_are_created_and_pinned() {
    let h = Harness::new();
    for name in ALL_MAPS {
        assert!(h.ebpf.map(name).is_some(), "map {name} missing from object");
        assert!(h.dir.0.join(name).exists(), "pin {name} missing");
    }
}

#[test]
fn tcp_clusterip_dnat_rewrites_dst_with_correct_checksums() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(2), 5000)]);
    let client = sa(CLIENT, 40001);
    let frame = packet::tcp(client, sa(VIP, 80), TCP_SYN, 1000, 0, b"");
    let (verdict, out) = h.run(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out.len(), frame.len());
    let d = decode(&out).expect("checksums after DNAT");
    assert_eq!(d.src, CLIENT);
    assert_eq!(tcp_dst(&d), sa(pod(2), 5000));
    // Nothing but destination address/port and the two checksums changed.
    let changed: Vec<usize> = (0..frame.len()).filter(|&i| frame[i] != out[i]).collect();
    let allowed = [24, 25, 30, 31, 32, 33, 36, 37, 50, 51];
    assert!(
        changed.iter().all(|i| allowed.contains(i)),
        "changed bytes {changed:?}"
    );

    // A data segment with payload also comes out consistent.
    let data = packet::tcp(
        client,
        sa(VIP, 80),
        TCP_ACK | TCP_PSH,
        1001,
        5,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    let (verdict, out) = h.run(&data);
    assert_eq!(verdict, TC_ACT_OK);
    let d = decode(&out).expect("checksums after DNAT with payload");
    assert_eq!(tcp_dst(&d), sa(pod(2), 5000));

    assert_eq!(h.stat(STAT_DNAT), 2);
    assert_eq!(h.stat(STAT_PACKETS), 2);
    assert_eq!(h.stat(STAT_CT_NEW), 1);
    assert_eq!(h.stat(STAT_CT_HIT), 1);
    let svc = h.counter(maps::SVC_STATS_MAP, 7);
    assert_eq!(svc.packets, 2);
    assert_eq!(svc.bytes, (frame.len() + data.len()) as u64);
    assert_eq!(h.counter(maps::BE_STATS_MAP, 4).packets, 2);
}

#[test]
fn udp_dnat_with_and_without_checksum() {
    let mut h = Harness::new();
    h.add_service(DNS_VIP, 53, IPPROTO_UDP, 9, &[(5, pod(3), 5353)]);
    let client = sa(CLIENT, 40002);
    let frame = packet::udp(client, sa(DNS_VIP, 53), b"query", true);
    let (verdict, out) = h.run(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    let d = decode(&out).expect("checksums after UDP DNAT");
    assert_eq!(tcp_dst(&d), sa(pod(3), 5353));
    assert!(matches!(d.l4, L4::Udp { csum, ref payload, .. } if csum != 0 && payload == b"query"));

    let frame = packet::udp(sa(CLIENT, 40003), sa(DNS_VIP, 53), b"query", false);
    let (verdict, out) = h.run(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    let d = decode(&out).expect("IP checksum after UDP DNAT");
    assert_eq!(tcp_dst(&d), sa(pod(3), 5353));
    assert!(
        matches!(d.l4, L4::Udp { csum: 0, .. }),
        "zero UDP checksum must stay 0: {d:?}"
    );
    assert_eq!(h.stat(STAT_DNAT), 2);
}

#[test]
fn reply_is_reverse_nated_after_forward_packet() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(2), 5000)]);
    let client = sa(CLIENT, 40010);
    let backend = sa(pod(2), 5000);
    let (v, _) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 1000, 0, b""));
    assert_eq!(v, TC_ACT_OK);

    let fwd = h
        .ct()
        .get(&ct_key(client, sa(VIP, 80), IPPROTO_TCP, CT_DIR_FORWARD), 0)
        .expect("forward CT entry");
    let rev = h
        .ct()
        .get(&ct_key(backend, client, IPPROTO_TCP, CT_DIR_REPLY), 0)
        .expect("reply CT entry");
    assert_eq!((fwd.backend_id, fwd.rev_nat_id), (4, 7));
    assert_eq!((rev.backend_id, rev.rev_nat_id), (4, 7));
    assert_ne!(fwd.last_seen_ns, 0);

    let reply = packet::tcp(backend, client, TCP_SYN | TCP_ACK, 5000, 1001, b"");
    let (v, out) = h.run(&reply);
    assert_eq!(v, TC_ACT_OK);
    let d = decode(&out).expect("checksums after reverse NAT");
    assert_eq!(d.src, VIP);
    assert_eq!(d.dst, CLIENT);
    assert!(matches!(
        d.l4,
        L4::Tcp {
            sport: 80,
            dport: 40010,
            seq: 5000,
            ack: 1001,
            ..
        }
    ));
    assert_eq!(h.stat(STAT_REVNAT), 1);
    assert_eq!(h.counter(maps::SVC_STATS_MAP, 7).packets, 2);
    assert_eq!(h.counter(maps::BE_STATS_MAP, 4).packets, 2);

    // UDP reply path with a zero checksum keeps it zero.
    h.add_service(DNS_VIP, 53, IPPROTO_UDP, 9, &[(5, pod(3), 5353)]);
    let uc = sa(CLIENT, 40011);
    h.run(&packet::udp(uc, sa(DNS_VIP, 53), b"q", false));
    let (v, out) = h.run(&packet::udp(sa(pod(3), 5353), uc, b"answer", false));
    assert_eq!(v, TC_ACT_OK);
    let d = decode(&out).unwrap();
    assert_eq!(d.src, DNS_VIP);
    assert!(matches!(
        d.l4,
        L4::Udp {
            sport: 53,
            dport: 40011,
            csum: 0,
            ..
        }
    ));
    let (_, out) = h.run(&packet::udp(sa(pod(3), 5353), uc, b"answer", true));
    assert!(matches!(decode(&out).unwrap().l4, L4::Udp { sport: 53, csum, .. } if csum != 0));

    // FIN marks the flow as closing.
    h.run(&packet::tcp(
        client,
        sa(VIP, 80),
        TCP_FIN | TCP_ACK,
        1001,
        5001,
        b"",
    ));
    let fwd = h
        .ct()
        .get(&ct_key(client, sa(VIP, 80), IPPROTO_TCP, CT_DIR_FORWARD), 0)
        .unwrap();
    assert_ne!(fwd.flags & CT_F_CLOSING, 0);
}

#[test]
fn conntrack_pins_flows_and_new_flows_spread() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &three_backends());
    let vip = sa(VIP, 80);
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41060u16 {
        let client = sa(CLIENT, port);
        let (_, out) = h.run(&packet::tcp(client, vip, TCP_SYN, 1, 0, b""));
        let first = tcp_dst(&decode(&out).unwrap());
        seen.insert(*first.ip());
        for i in 0..5 {
            let (v, out) = h.run(&packet::tcp(client, vip, TCP_ACK, 2 + i, 1, b"x"));
            assert_eq!(v, TC_ACT_OK);
            assert_eq!(tcp_dst(&decode(&out).unwrap()), first, "flow {port} moved");
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "60 flows should use all 3 backends, got {seen:?}"
    );
    assert_eq!(h.stat(STAT_CT_NEW), 60);
    assert_eq!(h.stat(STAT_CT_HIT), 300);
    let total: u64 = (1..=3)
        .map(|id| h.counter(maps::BE_STATS_MAP, id).packets)
        .sum();
    assert_eq!(total, 360);
}

#[test]
fn removed_backend_is_reselected() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(1), 5000)]);
    let client = sa(CLIENT, 42000);
    h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 1, 0, b""));
    // The agent replaces backend 4 by backend 6 in slot 1.
    h.backends().remove(&4).unwrap();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(6, pod(3), 5000)]);
    let (v, out) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_ACK, 2, 1, b""));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(3), 5000));
    assert_eq!(h.stat(STAT_CT_RESELECT), 1);
    let fwd = h
        .ct()
        .get(&ct_key(client, sa(VIP, 80), IPPROTO_TCP, CT_DIR_FORWARD), 0)
        .unwrap();
    assert_eq!(fwd.backend_id, 6);
}

#[test]
fn missing_slot_drops_and_counts() {
    let mut h = Harness::new();
    // Frontend claims 2 backends but only slot 1 exists (agent mid-update): slot 2 may be hit.
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(1), 5000)]);
    let key = ServiceKeyV4::new(VIP, 80, IPPROTO_TCP, SCOPE_EXTERNAL, 0);
    h.services()
        .insert(
            key,
            ServiceEntry {
                count: 2,
                rev_nat_id: 7,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    let mut drops = 0;
    for port in 43000..43040u16 {
        let (v, _) = h.run(&packet::tcp(
            sa(CLIENT, port),
            sa(VIP, 80),
            TCP_SYN,
            1,
            0,
            b"",
        ));
        assert!(v == TC_ACT_OK || v == TC_ACT_SHOT, "verdict {v}");
        if v == TC_ACT_SHOT {
            drops += 1;
        }
    }
    assert!(drops > 0, "40 new flows never picked the missing slot 2");
    assert_eq!(h.stat(STAT_LOOKUP_MISS), drops);
}

#[test]
fn non_matching_packets_pass_unchanged() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &three_backends());
    let frames = [
        // other port, other address, other protocol on the VIP port
        packet::tcp(sa(CLIENT, 40000), sa(VIP, 81), TCP_SYN, 1, 0, b""),
        packet::tcp(
            sa(CLIENT, 40000),
            sa(Ipv4Addr::new(10, 96, 0, 11), 80),
            TCP_SYN,
            1,
            0,
            b"",
        ),
        packet::udp(sa(CLIENT, 40000), sa(VIP, 80), b"x", true),
        packet::icmp_echo(CLIENT, VIP),
    ];
    for f in &frames {
        let (v, out) = h.run(f);
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(&out, f, "packet must pass byte-for-byte");
    }
    assert_eq!(h.stat(STAT_PACKETS), 3);
    assert_eq!(h.stat(STAT_DNAT), 0);
    assert_eq!(h.stat(STAT_PASS_UNPARSED), 0);
}

#[test]
fn unparseable_packets_pass_unchanged() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &three_backends());
    h.add_service(DNS_VIP, 53, IPPROTO_UDP, 9, &[(5, pod(3), 5353)]);
    let tcp = packet::tcp(sa(CLIENT, 40000), sa(VIP, 80), TCP_SYN, 1, 0, b"");
    let udp = packet::udp(sa(CLIENT, 40000), sa(DNS_VIP, 53), b"q", true);
    let mut cases: Vec<(String, Vec<u8>, bool)> = Vec::new();
    // Truncated at every length TEST_RUN accepts: for an IPv4 ethertype it refuses frames
    // without a full IP header (EINVAL), so truncation is exercised from the end of the IP
    // header through the L4 header and into the payload. (The program itself reads headers with
    // bpf_skb_load_bytes, which fails cleanly on shorter packets too.)
    for len in L4_OFF..tcp.len() {
        cases.push((format!("tcp truncated to {len}"), tcp[..len].to_vec(), true));
    }
    for len in L4_OFF..udp.len() - 1 {
        cases.push((format!("udp truncated to {len}"), udp[..len].to_vec(), true));
    }
    // IP options (IHL 6): same service tuple, but the L4 header would move.
    let mut opt = tcp.clone();
    opt[ETH_LEN] = 0x46;
    opt.splice(L4_OFF..L4_OFF, [1u8, 1, 1, 0]);
    let tot = u16::from_be_bytes([opt[16], opt[17]]) + 4;
    opt[16..18].copy_from_slice(&tot.to_be_bytes());
    packet::fix_ip_checksum(&mut opt);
    cases.push(("ip options".into(), opt, true));
    // First fragment (MF) and a later fragment (offset != 0).
    for (name, flags) in [("MF set", [0x20u8, 0x00]), ("offset 8", [0x00, 0x01])] {
        let mut f = udp.clone();
        f[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&flags);
        packet::fix_ip_checksum(&mut f);
        cases.push((name.into(), f, true));
    }
    // IP total length larger than the frame.
    let mut long = tcp.clone();
    long[16..18].copy_from_slice(&200u16.to_be_bytes());
    packet::fix_ip_checksum(&mut long);
    cases.push(("tot_len beyond frame".into(), long, true));
    // Non-IP (ARP ethertype) with a TCP-to-VIP-looking body: not counted.
    let mut arp = tcp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("arp ethertype".into(), arp, false));

    let mut expect_unparsed = 0;
    for (name, frame, counted) in &cases {
        if *counted {
            expect_unparsed += 1;
        }
        let (v, out) = h.run(frame);
        assert_eq!(v, TC_ACT_OK, "{name}");
        assert_eq!(&out, frame, "{name}: must pass unchanged");
    }
    assert_eq!(h.stat(STAT_PASS_UNPARSED), expect_unparsed);
    assert_eq!(h.stat(STAT_DNAT), 0);
    assert_eq!(h.stat(STAT_PACKETS), 0);
}

#[test]
fn no_backend_tcp_syn_gets_icmp_other_segments_rst() {
    let mut h = Harness::new();
    h.add_service(EMPTY_VIP, 80, IPPROTO_TCP, 11, &[]);
    let client = sa(CLIENT, 44000);
    // A SYN is refused like kube-proxy's REJECT rule: ICMP port unreachable (ECONNREFUSED).
    let syn = packet::tcp(client, sa(EMPTY_VIP, 80), TCP_SYN, 0x1000_0000, 0, b"");
    let (v, out) = h.run(&syn);
    assert_eq!(v, TC_ACT_REDIRECT);
    let d = decode(&out).expect("checksums of the ICMP error");
    assert_eq!(d.eth_dst, MAC_CLIENT);
    assert_eq!(d.eth_src, MAC_NODE);
    assert_eq!((d.src, d.dst), (EMPTY_VIP, CLIENT));
    let L4::Icmp { ty, code, body } = d.l4 else {
        panic!("not ICMP: {d:?}")
    };
    assert_eq!((ty, code), (3, 3));
    // Quote: IP header + ports and sequence number, which the client matches to its socket.
    assert_eq!(&body[..], &syn[ETH_LEN..L4_OFF + 8]);

    // A segment without ACK (and no state): RST with seq 0, ack = seq + 1 for the FIN.
    let fin = packet::tcp(client, sa(EMPTY_VIP, 80), TCP_FIN, 0x1000_0000, 0, b"");
    let (v, out) = h.run(&fin);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 54, "RST frame is Ethernet + IP + bare TCP");
    let d = decode(&out).expect("checksums of the RST");
    assert_eq!((d.src, d.dst), (EMPTY_VIP, CLIENT));
    assert_eq!(
        d.l4,
        L4::Tcp {
            sport: 80,
            dport: 44000,
            seq: 0,
            ack: 0x1000_0001,
            flags: TCP_RST | TCP_ACK,
            payload: vec![]
        }
    );

    // A data segment with ACK: seq = its ack, ack = seq + payload; payload trimmed.
    let data = packet::tcp(
        client,
        sa(EMPTY_VIP, 80),
        TCP_ACK | TCP_PSH,
        500,
        900,
        b"hello",
    );
    let (v, out) = h.run(&data);
    assert_eq!(v, TC_ACT_REDIRECT);
    let d = decode(&out).unwrap();
    assert!(
        matches!(d.l4, L4::Tcp { seq: 900, ack: 505, flags, ref payload, .. } if flags == TCP_RST | TCP_ACK && payload.is_empty())
    );

    // A reset is never answered: dropped.
    let rst = packet::tcp(client, sa(EMPTY_VIP, 80), TCP_RST, 1, 0, b"");
    let (v, _) = h.run(&rst);
    assert_eq!(v, TC_ACT_SHOT);

    assert_eq!(h.stat(STAT_NO_BACKEND), 3);
    assert_eq!(h.stat(STAT_NO_BACKEND_DROP), 1);
    assert_eq!(h.stat(STAT_DNAT), 0);
}

#[test]
fn no_backend_udp_gets_icmp_port_unreachable() {
    let mut h = Harness::new();
    h.add_service(EMPTY_VIP, 53, IPPROTO_UDP, 12, &[]);
    for payload in [&b""[..], b"a long enough query payload to be trimmed away"] {
        let q = packet::udp(sa(CLIENT, 45000), sa(EMPTY_VIP, 53), payload, true);
        let (v, out) = h.run(&q);
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(out.len(), 14 + 20 + 8 + 28);
        let d = decode(&out).expect("checksums of the ICMP error");
        assert_eq!(d.eth_dst, MAC_CLIENT);
        assert_eq!((d.src, d.dst), (EMPTY_VIP, CLIENT));
        let L4::Icmp { ty, code, body } = d.l4 else {
            panic!("not ICMP: {d:?}")
        };
        assert_eq!((ty, code), (3, 3));
        // Quote: the original IP header and the first 8 bytes of UDP, unchanged.
        assert_eq!(&body[..], &q[ETH_LEN..L4_OFF + 8]);
    }
    assert_eq!(h.stat(STAT_NO_BACKEND), 2);
}

#[test]
fn restarted_loader_reuses_pinned_maps() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(2), 5000)]);
    let client = sa(CLIENT, 46000);
    h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 1, 0, b""));
    let Harness { ebpf, dir } = h;
    drop(ebpf);
    // A second load from the same pin dir sees the services and the conntrack entries.
    let mut h = Harness::load_in(dir);
    let (v, out) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_ACK, 2, 1, b""));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(2), 5000));
    assert_eq!(h.stat(STAT_CT_HIT), 1);
    assert_eq!(h.stat(STAT_DNAT), 2);
}

#[test]
fn draining_backend_keeps_its_connections_but_no_new_ones() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(1), 5000)]);
    let client = sa(CLIENT, 42100);
    h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 1, 0, b""));
    // The agent drains backend 4: TERMINATING, replaced by backend 6 in slot 1.
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(6, pod(3), 5000)]);
    h.backends()
        .insert(
            4,
            BackendV4::new(pod(1), 5000, IPPROTO_TCP, BE_STATE_TERMINATING),
            0,
        )
        .unwrap();
    // Established: data and FIN still reach the draining backend.
    for flags in [TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK] {
        let (v, out) = h.run(&packet::tcp(client, sa(VIP, 80), flags, 2, 1, b"x"));
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(1), 5000));
    }
    assert_eq!(h.stat(STAT_CT_RESELECT), 0);
    // A new connection reusing the tuple goes to an active backend, and stays there.
    let (v, out) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 100, 0, b""));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(3), 5000));
    assert_eq!(h.stat(STAT_CT_RESELECT), 1);
    let (_, out) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_ACK, 101, 1, b""));
    assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(3), 5000));
    // Other new connections never pick it.
    for port in 42101..42121u16 {
        let (_, out) = h.run(&packet::tcp(
            sa(CLIENT, port),
            sa(VIP, 80),
            TCP_SYN,
            1,
            0,
            b"",
        ));
        assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(3), 5000));
    }
}

/// Sets the frontend's sessionAffinity timeout (0 = off), as the agent does on slot 0.
fn set_affinity(h: &mut Harness, vip: Ipv4Addr, port: u16, timeout_s: u32) {
    let key = ServiceKeyV4::new(vip, port, IPPROTO_TCP, SCOPE_EXTERNAL, 0);
    let mut svcs = h.services();
    let mut e = svcs.get(&key, 0).unwrap();
    e.affinity_timeout_s = timeout_s;
    svcs.insert(key, e, 0).unwrap();
}

fn affinity_map(h: &mut Harness) -> HashMap<&mut MapData, AffinityKeyV4, AffinityEntry> {
    HashMap::try_from(h.ebpf.map_mut(maps::AFFINITY_MAP).unwrap()).unwrap()
}

/// Backends hit by SYNs from `client_ip`, source ports `ports`.
fn syn_backends(
    h: &mut Harness,
    client_ip: Ipv4Addr,
    ports: std::ops::Range<u16>,
) -> Vec<Ipv4Addr> {
    ports
        .map(|port| {
            let (v, out) = h.run(&packet::tcp(
                sa(client_ip, port),
                sa(VIP, 80),
                TCP_SYN,
                1,
                0,
                b"",
            ));
            assert_eq!(v, TC_ACT_OK);
            *tcp_dst(&decode(&out).unwrap()).ip()
        })
        .collect()
}

#[test]
fn session_affinity_sticks_per_client_until_timeout_or_off() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &three_backends());
    set_affinity(&mut h, VIP, 80, 60);

    // One client: every new connection lands on the same backend.
    let first = syn_backends(&mut h, CLIENT, 47000..47030);
    let set: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(set.len(), 1, "one client spread over {set:?}");
    let sticky = first[0];
    let entry = affinity_map(&mut h)
        .get(&AffinityKeyV4::new(CLIENT, 7), 0)
        .expect("affinity entry");
    assert_eq!(
        BackendV4::new(sticky, 5000, IPPROTO_TCP, 0),
        h.backends().get(&entry.backend_id, 0).unwrap()
    );
    // Other clients are balanced independently (each sticky on its own).
    let mut others = std::collections::BTreeSet::new();
    for i in 0..30u8 {
        let ip = Ipv4Addr::new(172, 31, 1, i);
        let b = syn_backends(&mut h, ip, 47000..47003);
        assert!(b.iter().all(|x| *x == b[0]), "client {ip}: {b:?}");
        others.insert(b[0]);
    }
    assert_eq!(others.len(), 3, "30 clients should use all 3 backends");

    // Expired (last use long ago): a fresh choice is made and remembered.
    let key = AffinityKeyV4::new(CLIENT, 7);
    let mut aff = affinity_map(&mut h);
    let mut e = aff.get(&key, 0).unwrap();
    e.last_used_ns = 0;
    aff.insert(key, e, 0).unwrap();
    set_affinity(&mut h, VIP, 80, 1);
    syn_backends(&mut h, CLIENT, 47100..47101);
    let refreshed = affinity_map(&mut h).get(&key, 0).unwrap();
    assert_ne!(refreshed.last_used_ns, 0, "expired entry was not replaced");

    // Its backend starts draining (out of the slots, TERMINATING): the client's affinity must
    // not lead new connections there.
    let id = refreshed.backend_id;
    let rest: Vec<_> = three_backends().into_iter().filter(|b| b.0 != id).collect();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &rest);
    let mut be = h.backends().get(&id, 0).unwrap();
    be.state = BE_STATE_TERMINATING;
    h.backends().insert(id, be, 0).unwrap();
    set_affinity(&mut h, VIP, 80, 60);
    let after = syn_backends(&mut h, CLIENT, 47200..47210);
    assert!(
        after.iter().all(|b| *b != be.ip() && *b == after[0]),
        "affinity led to a terminating backend or did not re-stick: {after:?}"
    );
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &three_backends());

    // Off: the same client spreads again.
    set_affinity(&mut h, VIP, 80, 0);
    let spread: std::collections::BTreeSet<_> = syn_backends(&mut h, CLIENT, 47300..47360)
        .into_iter()
        .collect();
    assert_eq!(spread.len(), 3, "affinity off, still sticky: {spread:?}");
}

/// Programs the frontend's Maglev table for `backends` (as the agent does: permutations from
/// the sorted addresses) and sets `SVC_F_MAGLEV` on slot 0.
fn set_maglev(h: &mut Harness, rev_nat_id: RevNatId, backends: &[(u32, Ipv4Addr, u16)]) {
    let mut sorted = backends.to_vec();
    sorted.sort_by_key(|b| (b.1, b.2));
    let perms: Vec<(usize, usize)> = sorted
        .iter()
        .map(|b| maglev::permutation(ip_to_net(b.1), port_to_net(b.2), MAGLEV_TABLE_SIZE))
        .collect();
    let mut positions = vec![0u32; MAGLEV_TABLE_SIZE];
    maglev::populate(&perms, &mut positions, &mut vec![0; perms.len()]).unwrap();
    let mut table = Box::<MaglevTable>::default();
    for (slot, pos) in table.backend_ids.iter_mut().zip(&positions) {
        *slot = sorted[*pos as usize].0;
    }
    let mut tables: HashMap<&mut MapData, RevNatId, MaglevTable> =
        HashMap::try_from(h.ebpf.map_mut(maps::MAGLEV_MAP).unwrap()).unwrap();
    tables.insert(rev_nat_id, table.as_ref(), 0).unwrap();
    let key = ServiceKeyV4::new(VIP, 80, IPPROTO_TCP, SCOPE_EXTERNAL, 0);
    let mut svcs = h.services();
    let mut e = svcs.get(&key, 0).unwrap();
    e.flags |= SVC_F_MAGLEV;
    svcs.insert(key, e, 0).unwrap();
}

#[test]
fn maglev_flows_keep_their_backend_when_another_goes_away() {
    let mut h = Harness::new();
    let four: Vec<_> = (1..=4u8).map(|n| (u32::from(n), pod(n), 5000)).collect();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &four);
    set_maglev(&mut h, 7, &four);
    let ports = 48000..48400u16;
    let first = syn_backends(&mut h, CLIENT, ports.clone());
    let used: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(used.len(), 4, "400 flows over 4 backends: {used:?}");

    // Backend 3 goes away; conntrack is gone too (another node, or entries evicted): every
    // flow is decided by the table alone.
    let three: Vec<_> = four.iter().copied().filter(|b| b.0 != 3).collect();
    h.backends().remove(&3).unwrap();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &three);
    set_maglev(&mut h, 7, &three);
    let keys: Vec<CtKeyV4> = h.ct().keys().map(Result::unwrap).collect();
    let mut ct: HashMap<&mut MapData, CtKeyV4, CtEntry> =
        HashMap::try_from(h.ebpf.map_mut(maps::CT_MAP).unwrap()).unwrap();
    for k in keys {
        ct.remove(&k).unwrap();
    }
    let again = syn_backends(&mut h, CLIENT, ports);
    let (mut kept, mut moved, mut from_removed) = (0, 0, 0);
    for (a, b) in first.iter().zip(&again) {
        assert_ne!(*b, pod(3), "a flow went to the removed backend");
        if *a == pod(3) {
            from_removed += 1;
        } else if a == b {
            kept += 1;
        } else {
            moved += 1;
        }
    }
    eprintln!("maglev: kept {kept}, moved {moved}, re-homed from the removed one {from_removed}");
    // Random slots would move about half of them; Maglev only a few percent.
    assert!(from_removed > 0);
    assert!(
        moved * 100 <= (kept + moved) * 3,
        "{moved} of {} flows of remaining backends moved",
        kept + moved
    );
}

#[test]
fn established_flows_drain_after_the_last_backend_left() {
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(1), 5000)]);
    let client = sa(CLIENT, 44100);
    h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 1, 0, b""));
    // The agent removed the only backend; it drains (TERMINATING) and the frontend has none.
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[]);
    h.backends()
        .insert(
            4,
            BackendV4::new(pod(1), 5000, IPPROTO_TCP, BE_STATE_TERMINATING),
            0,
        )
        .unwrap();
    let (v, out) = h.run(&packet::tcp(
        client,
        sa(VIP, 80),
        TCP_ACK | TCP_PSH,
        2,
        1,
        b"x",
    ));
    assert_eq!(v, TC_ACT_OK, "established flow must still be forwarded");
    assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(1), 5000));
    // A new connection (even on the same tuple) is refused.
    let (v, out) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 100, 0, b""));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert!(matches!(
        decode(&out).unwrap().l4,
        L4::Icmp { ty: 3, code: 3, .. }
    ));
    let (v, _) = h.run(&packet::tcp(
        sa(CLIENT, 44101),
        sa(VIP, 80),
        TCP_SYN,
        1,
        0,
        b"",
    ));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(h.stat(STAT_NO_BACKEND), 2);
}

#[test]
fn source_ranges_admit_only_listed_clients() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    let mut h = Harness::new();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &[(4, pod(1), 5000)]);
    let mut ranges: LpmTrie<&mut MapData, SrcRangeKeyV4, u8> =
        LpmTrie::try_from(h.ebpf.map_mut(maps::SRC_RANGES_MAP).unwrap()).unwrap();
    for (addr, len, rev_nat_id) in [
        (Ipv4Addr::new(172, 31, 0, 0), 24, 7),
        (Ipv4Addr::new(198, 51, 100, 7), 32, 7),
        // Another frontend's range must not open this one.
        (Ipv4Addr::new(203, 0, 113, 0), 24, 8),
    ] {
        let key = Key::new(
            SRC_RANGE_FIXED_BITS + len,
            SrcRangeKeyV4 {
                rev_nat_id,
                addr: ip_to_net(addr),
            },
        );
        ranges.insert(&key, 1, 0).unwrap();
    }
    // Not enforced until slot 0 says so.
    let outsider = sa(Ipv4Addr::new(203, 0, 113, 9), 40000);
    let (v, _) = h.run(&packet::tcp(outsider, sa(VIP, 80), TCP_SYN, 1, 0, b""));
    assert_eq!(v, TC_ACT_OK);
    let key = ServiceKeyV4::new(VIP, 80, IPPROTO_TCP, SCOPE_EXTERNAL, 0);
    let mut e = h.services().get(&key, 0).unwrap();
    e.flags |= SVC_F_SOURCE_RANGES;
    h.services().insert(key, e, 0).unwrap();

    for (client, allowed) in [
        (sa(CLIENT, 40001), true),
        (sa(Ipv4Addr::new(172, 31, 0, 254), 40002), true),
        (sa(Ipv4Addr::new(198, 51, 100, 7), 40003), true),
        (sa(Ipv4Addr::new(198, 51, 100, 8), 40004), false),
        (sa(Ipv4Addr::new(172, 31, 1, 2), 40005), false),
        (outsider, false),
    ] {
        let (v, out) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 1, 0, b""));
        if allowed {
            assert_eq!(v, TC_ACT_OK, "{client}");
            assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(1), 5000));
        } else {
            assert_eq!(v, TC_ACT_SHOT, "{client} must be dropped");
        }
    }
    assert_eq!(h.stat(STAT_SRC_RANGE_DROP), 3);
}

#[test]
fn local_policy_without_local_endpoint_drops_instead_of_refusing() {
    let mut h = Harness::new();
    h.add_service(EMPTY_VIP, 80, IPPROTO_TCP, 11, &[]);
    let key = ServiceKeyV4::new(EMPTY_VIP, 80, IPPROTO_TCP, SCOPE_EXTERNAL, 0);
    let mut e = h.services().get(&key, 0).unwrap();
    e.flags |= SVC_F_LOCAL;
    h.services().insert(key, e, 0).unwrap();
    let (v, _) = h.run(&packet::tcp(
        sa(CLIENT, 44200),
        sa(EMPTY_VIP, 80),
        TCP_SYN,
        1,
        0,
        b"",
    ));
    assert_eq!(
        v, TC_ACT_SHOT,
        "no local endpoint: drop, other nodes may serve"
    );
    h.add_service(EMPTY_VIP, 53, IPPROTO_UDP, 12, &[]);
    let (v, _) = h.run(&packet::udp(
        sa(CLIENT, 44201),
        sa(EMPTY_VIP, 53),
        b"q",
        true,
    ));
    assert_eq!(v, TC_ACT_REDIRECT, "without the flag: refused as before");
    assert_eq!(h.stat(STAT_NO_LOCAL_DROP), 1);
    assert_eq!(h.stat(STAT_NO_BACKEND), 1);
}

/// External traffic to a backend on another node (BE_F_REMOTE) is DNATed and SNATed to the
/// node's address towards the backend (from the FIB: the test runs in a namespace with a route
/// to 10.244.2.0/24 from 172.30.0.1), on a port from the SNAT range that differs for two
/// clients with the same source port; the reply to node:port is translated back to
/// frontend -> client. Every rewritten frame's checksums are verified by recomputation.
#[test]
fn remote_backend_flows_are_snated_to_the_node_and_replies_restored() {
    use svc_lb_common::{
        BE_F_REMOTE, CT_F_SNAT, SNAT_PORT_MAX, SNAT_PORT_MIN, STAT_SNAT, SVC_F_NODE_PORT,
    };
    use svc_lb_tests::multinode::RoutedNs;

    const NODE_PORT_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
    const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
    let routed = RoutedNs::create();
    routed.ns.in_ns(|| {
        let mut h = Harness::new();
        let backend = sa(pod(2), 80);
        Seeder::new(&h.dir.0).service(
            NODE_PORT_IP,
            30080,
            IPPROTO_TCP,
            SVC_F_NODE_PORT,
            3,
            &[(5, pod(2), 80)],
        );
        // The same backend behind a ClusterIP: in-cluster traffic is never SNATed.
        Seeder::new(&h.dir.0).service(VIP, 80, IPPROTO_TCP, SVC_F_CLUSTER_IP, 4, &[(5, pod(2), 80)]);
        h.backends()
            .insert(5, BackendV4::new(pod(2), 80, IPPROTO_TCP, BE_F_REMOTE), 0)
            .unwrap();
        let frontend = sa(NODE_PORT_IP, 30080);

        // Two clients, same source port.
        let mut snat_ports = Vec::new();
        for client_ip in [CLIENT, Ipv4Addr::new(172, 31, 0, 3)] {
            let client = sa(client_ip, 40000);
            let (v, out) = h.run(&packet::tcp(client, frontend, TCP_SYN, 1000, 0, b""));
            assert_eq!(v, TC_ACT_OK);
            let d = decode(&out).expect("checksums after DNAT+SNAT");
            assert_eq!((d.src, d.dst), (NODE_IP, pod(2)), "{d:?}");
            let L4::Tcp { sport, dport, seq, .. } = d.l4 else {
                panic!("not TCP: {d:?}")
            };
            assert_eq!((dport, seq), (80, 1000));
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&sport), "{sport}");
            let node = sa(NODE_IP, sport);
            let fwd = h
                .ct()
                .get(&ct_key(client, frontend, IPPROTO_TCP, CT_DIR_FORWARD), 0)
                .expect("forward CT entry");
            let rev = h
                .ct()
                .get(&ct_key(backend, node, IPPROTO_TCP, CT_DIR_REPLY), 0)
                .expect("reply CT entry keyed by the SNAT tuple");
            assert_eq!((fwd.backend_id, fwd.rev_nat_id, rev.backend_id), (5, 3, 5));
            assert!(fwd.flags & CT_F_SNAT != 0 && rev.flags & CT_F_SNAT != 0);
            assert_eq!((fwd.nat_addr, fwd.nat_port), (ip_to_net(NODE_IP), port_to_net(sport)));
            assert_eq!((rev.nat_addr, rev.nat_port), (ip_to_net(client_ip), port_to_net(40000)));

            // The reply to node:port goes back as frontend -> client.
            let reply = packet::tcp(backend, node, TCP_SYN | TCP_ACK, 7000, 1001, b"");
            let (v, out) = h.run(&reply);
            assert_eq!(v, TC_ACT_OK);
            let d = decode(&out).expect("checksums after reverse NAT of a SNATed flow");
            assert_eq!((d.src, d.dst), (NODE_PORT_IP, client_ip), "{d:?}");
            assert!(matches!(
                d.l4,
                L4::Tcp { sport: 30080, dport: 40000, seq: 7000, ack: 1001, .. }
            ));

            // Later packets of the flow keep their SNAT port (from conntrack).
            let ack = packet::tcp(client, frontend, TCP_ACK | TCP_PSH, 1001, 7001, b"GET /");
            let (v, out) = h.run(&ack);
            assert_eq!(v, TC_ACT_OK);
            let d = decode(&out).expect("checksums of an established SNATed packet");
            assert_eq!((d.src, d.dst), (NODE_IP, pod(2)));
            assert!(matches!(&d.l4, L4::Tcp { sport: s, dport: 80, payload, .. } if *s == sport && payload == b"GET /"));
            snat_ports.push(sport);
        }
        assert_ne!(snat_ports[0], snat_ports[1], "same client port, same SNAT port");
        assert_eq!(h.stat(STAT_SNAT), 2);

        // ClusterIP to the same remote backend: DNAT only, the client's address stays.
        let client = sa(pod(1), 41000);
        let (v, out) = h.run(&packet::tcp(client, sa(VIP, 80), TCP_SYN, 1, 0, b""));
        assert_eq!(v, TC_ACT_OK);
        let d = decode(&out).expect("checksums after ClusterIP DNAT");
        assert_eq!((d.src, d.dst), (pod(1), pod(2)));
        assert!(matches!(d.l4, L4::Tcp { sport: 41000, dport: 80, .. }));
        assert_eq!(h.stat(STAT_SNAT), 2);

        // UDP: both checksums (and the reply) are right too.
        let udp_port = 30053;
        Seeder::new(&h.dir.0).service(
            NODE_PORT_IP,
            udp_port,
            IPPROTO_UDP,
            SVC_F_NODE_PORT,
            6,
            &[(8, pod(2), 5353)],
        );
        h.backends()
            .insert(8, BackendV4::new(pod(2), 5353, IPPROTO_UDP, BE_F_REMOTE), 0)
            .unwrap();
        let client = sa(CLIENT, 42000);
        let (v, out) = h.run(&packet::udp(client, sa(NODE_PORT_IP, udp_port), b"q", true));
        assert_eq!(v, TC_ACT_OK);
        let d = decode(&out).expect("UDP checksums after DNAT+SNAT");
        assert_eq!((d.src, d.dst), (NODE_IP, pod(2)));
        let L4::Udp { sport, dport: 5353, .. } = d.l4 else {
            panic!("{d:?}")
        };
        let (v, out) = h.run(&packet::udp(sa(pod(2), 5353), sa(NODE_IP, sport), b"a", true));
        assert_eq!(v, TC_ACT_OK);
        let d = decode(&out).expect("UDP checksums after reverse NAT");
        assert_eq!((d.src, d.dst), (NODE_PORT_IP, CLIENT));
        assert!(matches!(d.l4, L4::Udp { sport: 30053, dport: 42000, .. }));
    });
}

/// Conntrack at capacity: `LB4_CT` is an LRU hash, so with more flows than it holds inserts
/// evict the least recently used entries instead of failing. New flows keep being balanced and
/// forwarded (nothing is dropped for lack of space, `ct_full` stays 0); an established flow
/// whose entries were evicted is decided again on its next packet: with Maglev by the same
/// table, i.e. to the same backend (with random selection it may land elsewhere).
#[test]
fn conntrack_at_capacity_evicts_lru_and_keeps_balancing() {
    use svc_lb_common::STAT_CT_FULL;

    const CAPACITY: u32 = 64;
    let mut h = Harness::with_ct_capacity(CAPACITY);
    let four: Vec<_> = (1..=4u8).map(|n| (u32::from(n), pod(n), 5000)).collect();
    h.add_service(VIP, 80, IPPROTO_TCP, 7, &four);
    set_maglev(&mut h, 7, &four);

    // 300 flows = 600 entries through a 64-entry table.
    let ports = 50000..50300u16;
    let first = syn_backends(&mut h, CLIENT, ports.clone());
    let used: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(
        used.len(),
        4,
        "new flows still spread over every backend: {used:?}"
    );
    let entries = h.ct().keys().count();
    assert!(
        entries <= CAPACITY as usize,
        "{entries} conntrack entries in a {CAPACITY}-entry map"
    );
    assert_eq!(
        h.stat(STAT_CT_FULL),
        0,
        "an insert failed for lack of space"
    );
    assert_eq!(h.stat(STAT_CT_NEW), 300);

    // The oldest flows lost their entries; their next packets (not SYNs) are decided again,
    // reach the same backend, and get entries again so the reply is reverse-NATed.
    let evicted: Vec<u16> = ports
        .clone()
        .filter(|p| {
            h.ct()
                .get(
                    &ct_key(sa(CLIENT, *p), sa(VIP, 80), IPPROTO_TCP, CT_DIR_FORWARD),
                    0,
                )
                .is_err()
        })
        .collect();
    assert!(
        evicted.len() >= 300 - CAPACITY as usize / 2,
        "only {} of 300 flows were evicted",
        evicted.len()
    );
    let new_before = h.stat(STAT_CT_NEW);
    for &port in evicted.iter().take(40) {
        let client = sa(CLIENT, port);
        let (v, out) = h.run(&packet::tcp(
            client,
            sa(VIP, 80),
            TCP_ACK | TCP_PSH,
            2,
            1,
            b"x",
        ));
        assert_eq!(v, TC_ACT_OK, "packet of an evicted flow dropped");
        let backend = *tcp_dst(&decode(&out).unwrap()).ip();
        let was = first[usize::from(port - ports.start)];
        assert_eq!(backend, was, "flow {port} moved from {was} to {backend}");
        let reply = packet::tcp(sa(backend, 5000), client, TCP_ACK, 9, 3, b"y");
        let (v, out) = h.run(&reply);
        assert_eq!(v, TC_ACT_OK);
        let d = decode(&out).unwrap();
        assert_eq!(
            (d.src, d.dst),
            (VIP, CLIENT),
            "reply of a re-created flow not reverse-NATed"
        );
    }
    assert_eq!(h.stat(STAT_CT_NEW) - new_before, 40);
    assert_eq!(h.stat(STAT_CT_FULL), 0);
}

/// CRC32c (Castagnoli, reflected), the SCTP checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP packet (common header + one DATA-like chunk) with a correct CRC32c (stored
/// little-endian, as Linux does) and a correct IP header checksum.
fn sctp_frame(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    // A UDP frame of the right size gives Ethernet + IPv4; protocol and checksum are redone.
    let chunk = [0u8, 3, 0, 8, 0xde, 0xad, 0xbe, 0xef];
    let mut f = packet::udp(src, dst, &[0; 4 + 8], false);
    f[ETH_LEN + 9] = svc_lb_common::IPPROTO_SCTP;
    packet::fix_ip_checksum(&mut f);
    let l4 = &mut f[L4_OFF..];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    l4[8..12].fill(0);
    l4[12..20].copy_from_slice(&chunk);
    let crc = crc32c(l4);
    l4[8..12].copy_from_slice(&crc.to_le_bytes());
    f
}

/// (src, dst) of an SCTP frame after checking its IP header checksum and its CRC32c.
fn sctp_check(f: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let ip = &f[ETH_LEN..L4_OFF];
    assert_eq!(
        svc_lb_common::csum::checksum_be(ip),
        0,
        "IP header checksum"
    );
    let mut l4 = f[L4_OFF..].to_vec();
    let stored = u32::from_le_bytes(l4[8..12].try_into().unwrap());
    l4[8..12].fill(0);
    assert_eq!(crc32c(&l4), stored, "SCTP CRC32c");
    let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let port = |o: usize| u16::from_be_bytes([f[L4_OFF + o], f[L4_OFF + o + 1]]);
    (sa(addr(12), port(0)), sa(addr(16), port(2)))
}

/// SCTP ClusterIP with port == targetPort: only addresses change (the CRC32c covers no IP
/// pseudo-header, so it stays valid untouched); the reply is reverse-NATed the same way. A
/// frontend whose backend port differs is dropped rather than sent with a broken CRC.
#[test]
fn sctp_addresses_are_translated_and_the_crc_stays_valid() {
    use svc_lb_common::IPPROTO_SCTP;

    let mut h = Harness::new();
    h.add_service(VIP, 3868, IPPROTO_SCTP, 7, &[(4, pod(2), 3868)]);
    let client = sa(CLIENT, 40500);
    let frame = sctp_frame(client, sa(VIP, 3868));
    let (v, out) = h.run(&frame);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(sctp_check(&out), (client, sa(pod(2), 3868)));
    assert_eq!(
        out[L4_OFF..],
        frame[L4_OFF..],
        "SCTP header or chunks changed"
    );
    assert!(
        h.ct()
            .get(
                &ct_key(client, sa(VIP, 3868), IPPROTO_SCTP, CT_DIR_FORWARD),
                0
            )
            .is_ok()
    );

    let reply = sctp_frame(sa(pod(2), 3868), client);
    let (v, out) = h.run(&reply);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(sctp_check(&out), (sa(VIP, 3868), client));
    assert_eq!(h.stat(STAT_REVNAT), 1);

    // Port translation cannot be done without recomputing the CRC: dropped, not corrupted.
    h.add_service(VIP, 3869, IPPROTO_SCTP, 8, &[(5, pod(3), 9999)]);
    let (v, _) = h.run(&sctp_frame(sa(CLIENT, 40501), sa(VIP, 3869)));
    assert_eq!(v, TC_ACT_SHOT);
}

/// externalTrafficPolicy Local restricts only traffic from outside the cluster: a source in
/// `LB4_LOCAL_SRC` (cluster CIDR, node address) uses the frontend's in-cluster twin (scope
/// internal, every endpoint), any other source the frontend's own node-local slots, and without
/// a local endpoint it is dropped. Replies are translated back to the one frontend address.
#[test]
fn local_policy_short_circuits_in_cluster_sources_to_every_endpoint() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    use svc_lb_common::{SCOPE_INTERNAL, SVC_F_NODE_PORT};

    const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
    let mut h = Harness::new();
    // 30080: no local endpoint, one on another node. 30081: one local, one elsewhere.
    Seeder::new(&h.dir.0).service(
        NODE_IP,
        30080,
        IPPROTO_TCP,
        SVC_F_NODE_PORT | SVC_F_LOCAL,
        3,
        &[],
    );
    Seeder::new(&h.dir.0).service(
        NODE_IP,
        30081,
        IPPROTO_TCP,
        SVC_F_NODE_PORT | SVC_F_LOCAL,
        5,
        &[(7, pod(1), 80)],
    );
    // Twins first, as the agent writes them (each frontend goes in after its slots).
    Seeder::new(&h.dir.0).service_in_scope(
        NODE_IP,
        30080,
        IPPROTO_TCP,
        SCOPE_INTERNAL,
        SVC_F_NODE_PORT,
        4,
        &[(8, pod(2), 80)],
    );
    Seeder::new(&h.dir.0).service_in_scope(
        NODE_IP,
        30081,
        IPPROTO_TCP,
        SCOPE_INTERNAL,
        SVC_F_NODE_PORT,
        6,
        &[(8, pod(2), 80)],
    );

    // Before any in-cluster prefix is known, everyone is external.
    let pod_client = sa(pod(3), 40000);
    let (v, _) = h.run(&packet::tcp(
        pod_client,
        sa(NODE_IP, 30080),
        TCP_SYN,
        1,
        0,
        b"",
    ));
    assert_eq!(
        v, TC_ACT_SHOT,
        "no local endpoint, source not in-cluster: dropped"
    );
    assert_eq!(h.stat(STAT_NO_LOCAL_DROP), 1);

    let mut local_src: LpmTrie<&mut MapData, u32, u8> =
        LpmTrie::try_from(h.ebpf.map_mut(maps::LOCAL_SRC_MAP).unwrap()).unwrap();
    local_src
        .insert(&Key::new(16, ip_to_net(Ipv4Addr::new(10, 244, 0, 0))), 1, 0)
        .unwrap();
    local_src
        .insert(&Key::new(32, ip_to_net(NODE_IP)), 1, 0)
        .unwrap();

    for (client, fe_port, want) in [
        // Pods and the node: every endpoint (here only the remote one).
        (sa(pod(3), 40001), 30080, Some(pod(2))),
        (sa(NODE_IP, 40002), 30080, Some(pod(2))),
        (sa(pod(1), 40003), 30081, Some(pod(2))),
        // Outside the cluster: node-local endpoints only, dropped without one.
        (sa(CLIENT, 40004), 30080, None),
        (sa(CLIENT, 40005), 30081, Some(pod(1))),
        (sa(Ipv4Addr::new(10, 245, 0, 2), 40006), 30081, Some(pod(1))),
    ] {
        let frontend = sa(NODE_IP, fe_port);
        let (v, out) = h.run(&packet::tcp(client, frontend, TCP_SYN, 1, 0, b""));
        let Some(backend) = want else {
            assert_eq!(v, TC_ACT_SHOT, "{client} -> {frontend}");
            continue;
        };
        assert_eq!(v, TC_ACT_OK, "{client} -> {frontend}");
        let d = decode(&out).expect("checksums after DNAT");
        assert_eq!(
            (d.src, tcp_dst(&d)),
            (*client.ip(), sa(backend, 80)),
            "{client} -> {frontend}"
        );
        // The reply appears to come from the frontend the client addressed.
        let reply = packet::tcp(sa(backend, 80), client, TCP_SYN | TCP_ACK, 9, 2, b"");
        let (v, out) = h.run(&reply);
        assert_eq!(v, TC_ACT_OK);
        let d = decode(&out).expect("checksums after reverse NAT");
        assert_eq!(d.src, NODE_IP);
        assert!(
            matches!(d.l4, L4::Tcp { sport, dport, .. } if sport == fe_port && dport == client.port()),
            "{d:?}"
        );
    }
    assert_eq!(h.stat(STAT_NO_LOCAL_DROP), 2);

    // A ClusterIP frontend is never switched, whatever the source.
    h.add_service(VIP, 80, IPPROTO_TCP, 9, &[(10, pod(1), 5000)]);
    let (v, out) = h.run(&packet::tcp(
        sa(pod(3), 40007),
        sa(VIP, 80),
        TCP_SYN,
        1,
        0,
        b"",
    ));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(tcp_dst(&decode(&out).unwrap()), sa(pod(1), 5000));
}
