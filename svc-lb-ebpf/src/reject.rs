//! Rejects for frontends without backends: Kubernetes expects a Service with no endpoints to
//! refuse connections (like kube-proxy's REJECT rules), not to time out. The incoming packet is
//! turned into the answer in place and sent back out of the interface it came in on.

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::{eth::EthHdr, tcp::TcpHdr};
use svc_lb_common::{IPPROTO_ICMP, IPPROTO_TCP, csum::fold};

use crate::parse::{
    ETH_LEN, IP_CSUM_OFF, IP_LEN, IP_OFF, IP_SADDR_OFF, L4_OFF, Packet, TCP_ACK, TCP_CSUM_OFF,
    TCP_FIN, TCP_LEN, TCP_SYN,
};

const RST_FRAME_LEN: usize = ETH_LEN + IP_LEN + TCP_LEN;
const ICMP_HDR_LEN: usize = 8;
/// Quoted original datagram: its IP header and the first 8 bytes of its L4 header (RFC 792).
const ICMP_QUOTE_LEN: usize = IP_LEN + 8;
const ICMP_FRAME_LEN: usize = ETH_LEN + IP_LEN + ICMP_HDR_LEN + ICMP_QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const TCP_RST_ACK: u8 = 0x14;
const DEFAULT_TTL: u8 = 64;

/// Sum of big-endian 16-bit words of `buf[start..start + 2 * words]`, unfolded. `start` and
/// `words` are constants at every call site, so the loop unrolls and the indexes are provably in
/// bounds (no panic path for the verifier to reject).
#[inline(always)]
fn sum_words<const N: usize>(buf: &[u8; N], start: usize, words: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words {
        let o = start + 2 * i;
        if o + 1 < N {
            sum += u32::from(u16::from_be_bytes([buf[o], buf[o + 1]]));
        }
        i += 1;
    }
    sum
}

#[inline(always)]
fn put_csum<const N: usize>(buf: &mut [u8; N], off: usize, sum: u32) {
    let c = (!fold(sum)).to_be_bytes();
    if off + 1 < N {
        buf[off] = c[0];
        buf[off + 1] = c[1];
    }
}

/// Ethernet with swapped MACs + an IPv4 header from the frontend back to the client.
#[inline(always)]
fn reply_headers<const N: usize>(buf: &mut [u8; N], eth: &EthHdr, p: &Packet, proto: u8, df: bool) {
    if N < ETH_LEN + IP_LEN {
        return;
    }
    buf[0..6].copy_from_slice(&eth.src_addr);
    buf[6..12].copy_from_slice(&eth.dst_addr);
    buf[12] = 0x08;
    buf[13] = 0x00;
    let ip_len = ((N - ETH_LEN) as u16).to_be_bytes();
    buf[14] = 0x45;
    buf[15] = 0;
    buf[16] = ip_len[0];
    buf[17] = ip_len[1];
    // id 0, DF for the RST like Linux's own resets; ICMP errors carry no DF.
    buf[20] = if df { 0x40 } else { 0 };
    buf[22] = DEFAULT_TTL;
    buf[23] = proto;
    buf[26..30].copy_from_slice(&p.daddr.to_ne_bytes());
    buf[30..34].copy_from_slice(&p.saddr.to_ne_bytes());
    let s = sum_words(buf, IP_OFF, IP_LEN / 2);
    put_csum(buf, IP_CSUM_OFF, s);
}

/// Replaces the packet with `frame` (resizing it first) and redirects it out of the ingress
/// interface. Errors leave a packet the caller must drop.
#[inline(always)]
fn emit<const N: usize>(ctx: &TcContext, frame: &[u8; N]) -> Result<i32, i64> {
    // SAFETY: the skb pointer is the program's context.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) };
    if ret != 0 {
        return Err(ret);
    }
    ctx.store(0, frame, 0)?;
    // SAFETY: reading a field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Without BPF_F_INGRESS the packet leaves through `ifindex`, i.e. back towards the sender.
    let ret = unsafe { bpf_redirect(ifindex, 0) };
    if ret == TC_ACT_REDIRECT as i64 {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(ret)
    }
}

/// TCP RST|ACK answer. seq = the client's ack if it sent one, ack = its seq + segment length
/// (payload + SYN + FIN), so the client accepts the reset in SYN-SENT and ESTABLISHED.
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, p: &Packet) -> Result<i32, i64> {
    let eth = ctx.load::<EthHdr>(0)?;
    let tcp = ctx.load::<TcpHdr>(L4_OFF)?;
    let in_seq = u32::from_be_bytes(tcp.seq);
    let in_ack = u32::from_be_bytes(tcp.ack_seq);
    let payload = u32::from(p.ip_tot_len)
        .wrapping_sub(IP_LEN as u32)
        .wrapping_sub(u32::from(p.l4_hdr_len));
    let mut seg_len = payload;
    if p.tcp_flags & TCP_SYN != 0 {
        seg_len += 1;
    }
    if p.tcp_flags & TCP_FIN != 0 {
        seg_len += 1;
    }
    let seq = if p.tcp_flags & TCP_ACK != 0 {
        in_ack
    } else {
        0
    };
    let ack = in_seq.wrapping_add(seg_len);

    let mut f = [0u8; RST_FRAME_LEN];
    reply_headers(&mut f, &eth, p, IPPROTO_TCP, true);
    f[34..36].copy_from_slice(&p.dport.to_ne_bytes());
    f[36..38].copy_from_slice(&p.sport.to_ne_bytes());
    f[38..42].copy_from_slice(&seq.to_be_bytes());
    f[42..46].copy_from_slice(&ack.to_be_bytes());
    f[46] = 0x50; // data offset 5, no options
    f[47] = TCP_RST_ACK;
    // Pseudo-header: addresses (already in the IP header), zero + protocol, TCP length.
    let pseudo = sum_words(&f, IP_SADDR_OFF, 4) + u32::from(IPPROTO_TCP) + TCP_LEN as u32;
    let s = pseudo + sum_words(&f, L4_OFF, TCP_LEN / 2);
    put_csum(&mut f, TCP_CSUM_OFF, s);
    emit(ctx, &f)
}

/// ICMP destination unreachable / port unreachable quoting the original IP header and the first
/// 8 bytes of the UDP header.
#[inline(always)]
pub fn icmp_port_unreachable(ctx: &TcContext, p: &Packet) -> Result<i32, i64> {
    let eth = ctx.load::<EthHdr>(0)?;
    let quote = ctx.load::<[u8; ICMP_QUOTE_LEN]>(IP_OFF)?;

    let mut f = [0u8; ICMP_FRAME_LEN];
    reply_headers(&mut f, &eth, p, IPPROTO_ICMP, false);
    f[34] = ICMP_DEST_UNREACH;
    f[35] = ICMP_PORT_UNREACH;
    f[42..70].copy_from_slice(&quote);
    let s = sum_words(&f, L4_OFF, (ICMP_HDR_LEN + ICMP_QUOTE_LEN) / 2);
    put_csum(&mut f, L4_OFF + 2, s);
    emit(ctx, &f)
}
