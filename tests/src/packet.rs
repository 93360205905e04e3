//! Ethernet/IPv4/TCP/UDP frame builder and a strict parser that recomputes every checksum, for
//! the BPF_PROG_TEST_RUN program tests.

use std::net::{Ipv4Addr, SocketAddrV4};

use svc_lb_common::{
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    csum::{checksum_be, l4_checksum_v4_be},
};

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
pub const L4_OFF: usize = ETH_LEN + IP_LEN;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;

pub const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const MAC_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Ethernet + IPv4 header (no options, DF, TTL 64, id 0x1234) with a correct checksum.
fn eth_ip(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_LEN + IP_LEN + l4_len);
    f.extend_from_slice(&MAC_NODE);
    f.extend_from_slice(&MAC_CLIENT);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = u16::try_from(IP_LEN + l4_len).expect("packet too long");
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let c = checksum_be(&f[ETH_LEN..L4_OFF]);
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
    f
}

/// A TCP segment with a correct checksum.
pub fn tcp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth_ip(IPPROTO_TCP, *src.ip(), *dst.ip(), TCP_LEN + payload.len());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    let c = l4_checksum_v4_be(
        src.ip().octets(),
        dst.ip().octets(),
        IPPROTO_TCP,
        &f[L4_OFF..],
    );
    f[L4_OFF + 16..L4_OFF + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// A UDP datagram; `with_csum = false` sends checksum 0 ("none").
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], with_csum: bool) -> Vec<u8> {
    let len = UDP_LEN + payload.len();
    let mut f = eth_ip(IPPROTO_UDP, *src.ip(), *dst.ip(), len);
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&u16::try_from(len).expect("len").to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    if with_csum {
        let mut c = l4_checksum_v4_be(
            src.ip().octets(),
            dst.ip().octets(),
            IPPROTO_UDP,
            &f[L4_OFF..],
        );
        if c == 0 {
            c = 0xffff;
        }
        f[L4_OFF + 6..L4_OFF + 8].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// An ICMP echo request (a protocol the load balancer must ignore).
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut f = eth_ip(IPPROTO_ICMP, src, dst, 8);
    f.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    let c = checksum_be(&f[L4_OFF..]);
    f[L4_OFF + 2..L4_OFF + 4].copy_from_slice(&c.to_be_bytes());
    f
}

/// Recomputes the IP header checksum after a test edited the header.
pub fn fix_ip_checksum(f: &mut [u8]) {
    let ihl = usize::from(f[ETH_LEN] & 0x0f) * 4;
    f[ETH_LEN + 10..ETH_LEN + 12].fill(0);
    let c = checksum_be(&f[ETH_LEN..ETH_LEN + ihl]);
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
}

/// A decoded frame whose checksums were all verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub l4: L4,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        /// The checksum field as sent (0 = none).
        csum: u16,
        payload: Vec<u8>,
    },
    Icmp {
        ty: u8,
        code: u8,
        /// Everything after the 8-byte ICMP header.
        body: Vec<u8>,
    },
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Parses an Ethernet/IPv4 frame and verifies the IP checksum and the TCP/UDP/ICMP checksum by
/// full recomputation. Errors describe the first problem.
pub fn decode(f: &[u8]) -> Result<Decoded, String> {
    if f.len() < L4_OFF {
        return Err(format!("frame too short: {} bytes", f.len()));
    }
    if be16(f, 12) != 0x0800 {
        return Err(format!("ethertype {:#06x} is not IPv4", be16(f, 12)));
    }
    let ip = &f[ETH_LEN..];
    if ip[0] != 0x45 {
        return Err(format!("version/IHL byte {:#04x}", ip[0]));
    }
    let tot = usize::from(be16(ip, 2));
    if tot < IP_LEN || tot > ip.len() {
        return Err(format!("IP total length {tot} vs {} bytes", ip.len()));
    }
    if checksum_be(&ip[..IP_LEN]) != 0 {
        return Err(format!("bad IP header checksum {:#06x}", be16(ip, 10)));
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let seg = &ip[IP_LEN..tot];
    let l4 = match proto {
        IPPROTO_TCP => {
            if seg.len() < TCP_LEN {
                return Err("truncated TCP header".into());
            }
            let doff = usize::from(seg[12] >> 4) * 4;
            if doff < TCP_LEN || doff > seg.len() {
                return Err(format!("bad TCP data offset {doff}"));
            }
            // Summing a segment with its own checksum gives 0 when the checksum is right.
            if l4_checksum_v4_be(src.octets(), dst.octets(), proto, seg) != 0 {
                return Err(format!("bad TCP checksum {:#06x}", be16(seg, 16)));
            }
            L4::Tcp {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                seq: be32(seg, 4),
                ack: be32(seg, 8),
                flags: seg[13],
                payload: seg[doff..].to_vec(),
            }
        }
        IPPROTO_UDP => {
            if seg.len() < UDP_LEN || usize::from(be16(seg, 4)) != seg.len() {
                return Err("bad UDP length".into());
            }
            let csum = be16(seg, 6);
            if csum != 0 && l4_checksum_v4_be(src.octets(), dst.octets(), proto, seg) != 0 {
                return Err(format!("bad UDP checksum {csum:#06x}"));
            }
            L4::Udp {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                csum,
                payload: seg[UDP_LEN..].to_vec(),
            }
        }
        IPPROTO_ICMP => {
            if seg.len() < 8 {
                return Err("truncated ICMP header".into());
            }
            if checksum_be(seg) != 0 {
                return Err(format!("bad ICMP checksum {:#06x}", be16(seg, 2)));
            }
            L4::Icmp {
                ty: seg[0],
                code: seg[1],
                body: seg[8..].to_vec(),
            }
        }
        p => return Err(format!("unexpected IP protocol {p}")),
    };
    let mut eth_dst = [0; 6];
    let mut eth_src = [0; 6];
    eth_dst.copy_from_slice(&f[0..6]);
    eth_src.copy_from_slice(&f[6..12]);
    Ok(Decoded {
        eth_dst,
        eth_src,
        src,
        dst,
        proto,
        ttl: ip[8],
        l4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_verify() {
        let t = tcp(
            a("172.31.0.2:40000"),
            a("10.96.0.10:80"),
            TCP_SYN,
            7,
            0,
            b"hi",
        );
        let d = decode(&t).unwrap();
        assert_eq!(d.dst, Ipv4Addr::new(10, 96, 0, 10));
        assert!(matches!(d.l4, L4::Tcp { dport: 80, seq: 7, ref payload, .. } if payload == b"hi"));
        let u = udp(a("172.31.0.2:40000"), a("10.96.0.53:53"), b"q", true);
        assert!(matches!(decode(&u).unwrap().l4, L4::Udp { csum, .. } if csum != 0));
        let u0 = udp(a("172.31.0.2:40000"), a("10.96.0.53:53"), b"q", false);
        assert!(matches!(decode(&u0).unwrap().l4, L4::Udp { csum: 0, .. }));
        decode(&icmp_echo(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(5, 6, 7, 8),
        ))
        .unwrap();
    }

    #[test]
    fn corrupted_checksums_are_caught() {
        let mut t = tcp(
            a("172.31.0.2:40000"),
            a("10.96.0.10:80"),
            TCP_SYN,
            7,
            0,
            b"",
        );
        t[L4_OFF + 2] ^= 1; // port changed, TCP checksum not updated
        assert!(decode(&t).unwrap_err().contains("TCP checksum"));
        let mut t = tcp(
            a("172.31.0.2:40000"),
            a("10.96.0.10:80"),
            TCP_SYN,
            7,
            0,
            b"",
        );
        t[ETH_LEN + 19] ^= 1; // address changed, both checksums wrong
        assert!(decode(&t).unwrap_err().contains("IP header checksum"));
        let mut u = udp(a("172.31.0.2:40000"), a("10.96.0.53:53"), b"q", true);
        u[L4_OFF + 8] ^= 1;
        assert!(decode(&u).unwrap_err().contains("UDP checksum"));
    }
}
