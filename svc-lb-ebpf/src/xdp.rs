//! Optional XDP fast path (not attached by default): DNAT of NodePort / ExternalIP /
//! LoadBalancer frontends as early as possible. ClusterIP traffic, rejects, reverse NAT and
//! anything unusual are left to the TC program, which sees the packet next.
//!
//! XDP cannot see the skb checksum state, so the checksums are updated with RFC 1624 math
//! (svc_lb_common::csum). That is right for packets from a real NIC (full checksums) but wrong
//! for CHECKSUM_PARTIAL packets sent by a local veth peer, which is why TC is the default.

use core::mem;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use svc_lb_common::{IPPROTO_TCP, IPPROTO_UDP, STAT_DNAT, STAT_SRC_RANGE_DROP, csum};

use crate::{
    lb::{self, EXTERNAL_KINDS},
    maps::{count_flow, stat},
    parse::{ETH_LEN, IP_LEN, IP_OFF, L4_OFF, Packet, TCP_LEN, UDP_LEN},
};

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// Pointer to a `T` at `off`, after the bounds check the verifier requires before any direct
/// packet access (data + off + size <= data_end).
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Packet> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY (all reads below): bounds checked by ptr_at; unaligned reads because packet data
    // has no alignment guarantee.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF)?;
    let ip = unsafe { ip.read_unaligned() };
    if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return None;
    }
    // Bounds-check the fixed-size L4 header with a constant offset *before* looking at the IP
    // total length: the compiler may otherwise drop this check as implied by the variable
    // `data + 14 + tot_len <= data_end` comparison, which the verifier cannot use.
    let (sport, dport, tcp_flags, doff) = match ip.proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, L4_OFF)?;
            let tcp = unsafe { tcp.read_unaligned() };
            let flags: *const u8 = ptr_at(ctx, L4_OFF + 13)?;
            (tcp.source, tcp.dest, unsafe { *flags }, tcp.doff() * 4)
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, L4_OFF)?;
            let udp = unsafe { udp.read_unaligned() };
            (udp.src, udp.dst, 0, UDP_LEN as u16)
        }
        _ => return None,
    };
    let tot_len = u16::from_be_bytes(ip.tot_len);
    let frame_len = ctx.data_end() - ctx.data();
    if ETH_LEN + usize::from(tot_len) > frame_len || tot_len < IP_LEN as u16 + doff {
        return None;
    }
    if ip.proto == IPPROTO_TCP && usize::from(doff) < TCP_LEN {
        return None;
    }
    let l4_hdr_len = doff;
    Some(Packet {
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

/// Reads, updates and writes back a native-order u16 at `off` (bounds checked).
#[inline(always)]
fn update_u16(ctx: &XdpContext, off: usize, f: impl FnOnce(u16) -> u16) -> Option<()> {
    let p: *mut u16 = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { p.write_unaligned(f(p.read_unaligned())) };
    Some(())
}

#[inline(always)]
fn write_u32(ctx: &XdpContext, off: usize, v: u32) -> Option<()> {
    let p: *mut u32 = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { p.write_unaligned(v) };
    Some(())
}

/// DNAT of dst address/port with incremental checksum updates. Every pointer was already
/// validated by `parse`; the checks are repeated because the verifier tracks them per access.
#[inline(always)]
fn dnat(ctx: &XdpContext, p: &Packet, addr: u32, port: u16) -> Option<()> {
    // Validate every location first so a failure cannot leave a half-written packet.
    let csum_off = if p.proto == IPPROTO_UDP {
        L4_OFF + 6
    } else {
        L4_OFF + 16
    };
    ptr_at::<u16>(ctx, csum_off)?;
    ptr_at::<u32>(ctx, IP_OFF + 16)?;
    update_u16(ctx, IP_OFF + 10, |c| csum::replace4(c, p.daddr, addr))?;
    write_u32(ctx, IP_OFF + 16, addr)?;
    if p.proto == IPPROTO_UDP {
        update_u16(ctx, csum_off, |c| {
            csum::udp_replace2(csum::udp_replace4(c, p.daddr, addr), p.dport, port)
        })?;
    } else {
        update_u16(ctx, csum_off, |c| {
            csum::replace2(csum::replace4(c, p.daddr, addr), p.dport, port)
        })?;
    }
    update_u16(ctx, L4_OFF + 2, |_| port)
}

#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> u32 {
    let Some(p) = parse(ctx) else {
        return PASS;
    };
    let key = lb::frontend_key(&p);
    let Some(svc) = lb::frontend(&key) else {
        return PASS;
    };
    // ClusterIP is the TC program's job.
    if svc.flags & EXTERNAL_KINDS == 0 {
        return PASS;
    }
    if !lb::source_allowed(&p, &svc) {
        stat(STAT_SRC_RANGE_DROP);
        return DROP;
    }
    let (key, svc) = lb::scoped(&p, key, svc);
    // Without backends (rejects, traffic-policy-Local drops), also the TC program's job.
    if svc.count == 0 {
        return PASS;
    }
    let Some(pick) = lb::pick_backend(ctx, ctx.ingress_ifindex() as u32, &p, &key, &svc) else {
        return DROP;
    };
    // A SNATed flow (backend on another node) is rewritten by the TC program, which follows the
    // conntrack entries just created: its checksum helpers are right for every skb, and the
    // source rewrite belongs with the reverse NAT there.
    if pick.snat.is_some() {
        return PASS;
    }
    if dnat(ctx, &p, pick.be.addr, pick.be.port).is_none() {
        return DROP;
    }
    stat(STAT_DNAT);
    count_flow(
        svc.rev_nat_id,
        pick.backend_id,
        (ctx.data_end() - ctx.data()) as u32,
    );
    PASS
}
