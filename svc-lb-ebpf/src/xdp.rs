//! Optional XDP fast path (not attached by default): DNAT of NodePort / ExternalIP /
//! LoadBalancer frontends as early as possible. ClusterIP traffic, rejects, reverse NAT and
//! anything unusual are left to the TC program, which sees the packet next.
//!
//! XDP cannot see the skb checksum state, so the checksums are updated with RFC 1624 math
//! (svc_lb_common::csum). That is right for packets from a real NIC (full checksums) but wrong
//! for CHECKSUM_PARTIAL packets sent by a local veth peer, which is why TC is the default.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use svc_lb_common::{IPPROTO_SCTP, IPPROTO_UDP, STAT_DNAT, STAT_SRC_RANGE_DROP, csum};

use crate::{
    lb::{self, EXTERNAL_KINDS},
    maps::{count_flow, stat},
    parse::{
        self, IP_CSUM_OFF, IP_DADDR_OFF, L4_DPORT_OFF, Packet, Parsed, TCP_CSUM_OFF, UDP_CSUM_OFF,
        ptr_at,
    },
};

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;

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
        UDP_CSUM_OFF
    } else {
        TCP_CSUM_OFF
    };
    ptr_at::<u16>(ctx, csum_off)?;
    ptr_at::<u32>(ctx, IP_DADDR_OFF)?;
    update_u16(ctx, IP_CSUM_OFF, |c| csum::replace4(c, p.daddr, addr))?;
    write_u32(ctx, IP_DADDR_OFF, addr)?;
    if p.proto == IPPROTO_UDP {
        update_u16(ctx, csum_off, |c| {
            csum::udp_replace2(csum::udp_replace4(c, p.daddr, addr), p.dport, port)
        })?;
    } else {
        update_u16(ctx, csum_off, |c| {
            csum::replace2(csum::replace4(c, p.daddr, addr), p.dport, port)
        })?;
    }
    update_u16(ctx, L4_DPORT_OFF, |_| port)
}

#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> u32 {
    // SCTP (its CRC32c would need recomputing on a port change) and everything the parser
    // refuses are the TC program's job, which sees the packet next.
    let p = match parse::parse(ctx) {
        Parsed::Ok(p) if p.proto != IPPROTO_SCTP => p,
        _ => return PASS,
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
