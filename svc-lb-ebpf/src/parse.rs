//! Header parsing. Reads go through `bpf_skb_load_bytes` (`TcContext::load`), which fails
//! instead of reading past the end of the packet, so a truncated header is a clean "no" and the
//! verifier needs no data/data_end proofs. Only the plain case is handled: IPv4 with a 20-byte
//! header, not fragmented, TCP or UDP. Everything else is left to the kernel untouched.

use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use svc_lb_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_LEN: usize = 14;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_LEN: usize = 20;
/// L4 header offset; constant because IP options are refused.
pub const L4_OFF: usize = IP_OFF + IP_LEN;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;

pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SADDR_OFF: usize = IP_OFF + 12;
pub const IP_DADDR_OFF: usize = IP_OFF + 16;
pub const L4_SPORT_OFF: usize = L4_OFF;
pub const L4_DPORT_OFF: usize = L4_OFF + 2;
pub const TCP_CSUM_OFF: usize = L4_OFF + 16;
pub const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// Ethertype IPv4 in network order, as loaded.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset mask of the host-order flags/offset word.
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The fields the load balancer needs, addresses and ports in network order.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flag byte (FIN..CWR); 0 for UDP.
    pub tcp_flags: u8,
    /// IPv4 total length (host order).
    pub ip_tot_len: u16,
    /// TCP header length in bytes (data offset * 4); 8 for UDP.
    pub l4_hdr_len: u16,
}

pub enum Parsed {
    /// Not IPv4 (or not even a full Ethernet header): not ours, not counted.
    NotIpv4,
    /// IPv4 that we cannot handle safely: truncated, options, fragment.
    Unparsed,
    /// IPv4 carrying something other than TCP/UDP.
    OtherProto,
    Ok(Packet),
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return Parsed::NotIpv4;
    };
    if eth.ether_type != ETH_P_IP_BE {
        return Parsed::NotIpv4;
    }
    let Ok(ip) = ctx.load::<Ipv4Hdr>(IP_OFF) else {
        return Parsed::Unparsed;
    };
    // IHL must be exactly 5: options would move the L4 header, and a constant L4 offset keeps
    // every later access a constant offset for the verifier.
    if ip.vihl != 0x45 {
        return Parsed::Unparsed;
    }
    let frag = u16::from_be_bytes(ip.frags);
    if frag & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Parsed::Unparsed;
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    // The IP datagram must fit in the frame (Ethernet padding may make the frame longer).
    if (tot_len as u32) < IP_LEN as u32 || tot_len as u32 + ETH_LEN as u32 > ctx.len() {
        return Parsed::Unparsed;
    }
    let saddr = u32::from_ne_bytes(ip.src_addr);
    let daddr = u32::from_ne_bytes(ip.dst_addr);
    match ip.proto {
        IPPROTO_TCP => {
            let Ok(tcp) = ctx.load::<TcpHdr>(L4_OFF) else {
                return Parsed::Unparsed;
            };
            let hdr_len = tcp.doff() * 4;
            if (hdr_len as usize) < TCP_LEN || tot_len < IP_LEN as u16 + hdr_len {
                return Parsed::Unparsed;
            }
            // Byte 13 of the TCP header holds FIN..CWR.
            let Ok(flags) = ctx.load::<u8>(L4_OFF + 13) else {
                return Parsed::Unparsed;
            };
            Parsed::Ok(Packet {
                saddr,
                daddr,
                sport: u16::from_ne_bytes(tcp.source),
                dport: u16::from_ne_bytes(tcp.dest),
                proto: IPPROTO_TCP,
                tcp_flags: flags,
                ip_tot_len: tot_len,
                l4_hdr_len: hdr_len,
            })
        }
        IPPROTO_UDP => {
            let Ok(udp) = ctx.load::<UdpHdr>(L4_OFF) else {
                return Parsed::Unparsed;
            };
            if tot_len < (IP_LEN + UDP_LEN) as u16 {
                return Parsed::Unparsed;
            }
            Parsed::Ok(Packet {
                saddr,
                daddr,
                sport: u16::from_ne_bytes(udp.src),
                dport: u16::from_ne_bytes(udp.dst),
                proto: IPPROTO_UDP,
                tcp_flags: 0,
                ip_tot_len: tot_len,
                l4_hdr_len: UDP_LEN as u16,
            })
        }
        _ => Parsed::OtherProto,
    }
}
