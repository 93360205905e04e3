//! Header parsing with direct packet access, one parser for the TC and the XDP program
//! (generic over [`PacketCtx`]). The headers are read in place from the linear area
//! (bounds-checked against `data_end`, as the verifier requires) instead of being copied out
//! with `bpf_skb_load_bytes`: four helper calls per packet cost about 70 ns under
//! BPF_PROG_TEST_RUN, most of the TC program's time on a packet that is not ours. When an skb's
//! headers are not all in the linear area (some drivers and GRO leave them in page fragments),
//! `bpf_skb_pull_data` moves them there once and the parse continues.
//!
//! Only the plain case is handled: IPv4 with a 20-byte header, not fragmented, TCP, UDP or
//! SCTP.
//! Everything else is left to the kernel untouched.

use core::mem;

use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use svc_lb_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_LEN: usize = 14;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_LEN: usize = 20;
/// L4 header offset; constant because IP options are refused.
pub const L4_OFF: usize = IP_OFF + IP_LEN;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// SCTP common header: ports, verification tag, CRC32c.
pub const SCTP_LEN: usize = 12;

pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SADDR_OFF: usize = IP_OFF + 12;
pub const IP_DADDR_OFF: usize = IP_OFF + 16;
pub const L4_SPORT_OFF: usize = L4_OFF;
pub const L4_DPORT_OFF: usize = L4_OFF + 2;
pub const TCP_CSUM_OFF: usize = L4_OFF + 16;
pub const UDP_CSUM_OFF: usize = L4_OFF + 6;
/// Byte 13 of the TCP header: the flags FIN..CWR.
const TCP_FLAGS_OFF: usize = L4_OFF + 13;

/// Bytes that must be in the linear area for a full parse (Ethernet, IPv4, a TCP header
/// without options; a UDP header is shorter).
const HDRS_LEN: usize = L4_OFF + TCP_LEN;

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
    /// TCP header length in bytes (data offset * 4); 8 for UDP, 12 for SCTP.
    pub l4_hdr_len: u16,
}

pub enum Parsed {
    /// Not IPv4 (or not even a full Ethernet header): not ours, not counted.
    NotIpv4,
    /// IPv4 that we cannot handle safely: truncated, options, fragment.
    Unparsed,
    /// IPv4 carrying something other than TCP/UDP/SCTP.
    OtherProto,
    Ok(Packet),
}

/// What the parser needs from a program context.
pub trait PacketCtx {
    /// Start of the directly accessible (linear) packet data.
    fn data(&self) -> usize;
    /// End of the directly accessible packet data.
    fn data_end(&self) -> usize;
    /// Length of the whole packet, including bytes outside the linear area.
    fn packet_len(&self) -> u32;
    /// Makes the first `len` bytes directly accessible if they are not. A failure (no memory)
    /// leaves the packet as it was; the bounds checks then refuse it as truncated.
    fn pull(&self, len: u32);
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        self.len()
    }

    #[inline(always)]
    fn pull(&self, len: u32) {
        let _ = self.pull_data(len);
    }
}

/// `svc_lb_xdp` is not a multi-buffer (`xdp.frags`) program, so the kernel only gives it frames
/// that are all linear: the frame is `data..data_end` and there is nothing to pull.
impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn pull(&self, _len: u32) {}
}

/// Pointer to a `T` at `off` in the linear area, after the bounds check the verifier requires
/// (data + off + size <= data_end). Packet pointers die at every helper that may move packet
/// data (csum/store/pull helpers), so callers derive them again after such a call.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl PacketCtx, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Makes sure the first `HDRS_LEN` bytes (or the whole packet, if shorter) are linear.
/// Cheap when they already are, which is nearly always.
#[inline(always)]
fn linearize(ctx: &impl PacketCtx) {
    let want = if (ctx.packet_len() as usize) < HDRS_LEN {
        ctx.packet_len() as usize
    } else {
        HDRS_LEN
    };
    if ctx.data() + want > ctx.data_end() {
        ctx.pull(want as u32);
    }
}

#[inline(always)]
pub fn parse(ctx: &impl PacketCtx) -> Parsed {
    linearize(ctx);
    // SAFETY (every read below): bounds checked by ptr_at; unaligned reads because packet data
    // has no alignment guarantee.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::NotIpv4;
    };
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Parsed::NotIpv4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, IP_OFF) else {
        return Parsed::Unparsed;
    };
    let ip = unsafe { ip.read_unaligned() };
    // IHL must be exactly 5: options would move the L4 header, and a constant L4 offset keeps
    // every later access a constant offset for the verifier.
    if ip.vihl != 0x45 {
        return Parsed::Unparsed;
    }
    let frag = u16::from_be_bytes(ip.frags);
    if frag & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Parsed::Unparsed;
    }
    // The fixed-size L4 header is bounds-checked with a constant offset *before* the IP total
    // length is compared with the packet length: for XDP that length is `data_end - data`, and
    // the compiler may drop a constant-offset check as implied by the variable
    // `data + 14 + tot_len <= data_end` comparison, which the verifier cannot use.
    // (sport, dport, TCP flags, L4 header length, its minimum), ports in network order.
    let l4 = match ip.proto {
        IPPROTO_TCP => {
            let Some(tcp) = ptr_at::<TcpHdr>(ctx, L4_OFF) else {
                return Parsed::Unparsed;
            };
            let tcp = unsafe { tcp.read_unaligned() };
            // Inside the 20 bytes checked above, but the verifier wants its own check.
            let Some(flags) = ptr_at::<u8>(ctx, TCP_FLAGS_OFF) else {
                return Parsed::Unparsed;
            };
            let flags = unsafe { *flags };
            Some((tcp.source, tcp.dest, flags, tcp.doff() * 4, TCP_LEN))
        }
        IPPROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(ctx, L4_OFF) else {
                return Parsed::Unparsed;
            };
            let udp = unsafe { udp.read_unaligned() };
            Some((udp.src, udp.dst, 0, UDP_LEN as u16, UDP_LEN))
        }
        IPPROTO_SCTP => {
            // Only the ports are needed: the first 4 bytes, like TCP and UDP.
            let Some(ports) = ptr_at::<[u8; 4]>(ctx, L4_OFF) else {
                return Parsed::Unparsed;
            };
            let ports = unsafe { ports.read_unaligned() };
            let (sport, dport) = ([ports[0], ports[1]], [ports[2], ports[3]]);
            Some((sport, dport, 0, SCTP_LEN as u16, SCTP_LEN))
        }
        _ => None,
    };
    let tot_len = u16::from_be_bytes(ip.tot_len);
    // The IP datagram must fit in the frame (Ethernet padding may make the frame longer).
    if u32::from(tot_len) < IP_LEN as u32 || u32::from(tot_len) + ETH_LEN as u32 > ctx.packet_len()
    {
        return Parsed::Unparsed;
    }
    let Some((sport, dport, tcp_flags, l4_hdr_len, min_hdr_len)) = l4 else {
        return Parsed::OtherProto;
    };
    if usize::from(l4_hdr_len) < min_hdr_len || tot_len < IP_LEN as u16 + l4_hdr_len {
        return Parsed::Unparsed;
    }
    Parsed::Ok(Packet {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: u16::from_ne_bytes(sport),
        dport: u16::from_ne_bytes(dport),
        proto: ip.proto,
        tcp_flags,
        ip_tot_len: tot_len,
        l4_hdr_len,
    })
}
